"""Pairwise judges: which of two responses to a prompt is better, behind one interface.

    judge = load_judge("fn:my_rewards:score")
    verdicts = judge.judge(prompts, first, second)      # [PairVerdict("A" | "B" | "tie" | "invalid", raw)]

A judge sees each pair in a given order, A (shown first) and B, and answers ``A``, ``B``, ``tie`` or ``invalid``
(an answer it could not give or that could not be read: never a win for either side). Which response is A is
the caller's choice (``prefopt eval`` randomises it per pair and records it, so a judge's position bias cancels
out over many pairs); a judge never knows which side is the policy.

Judges by spec:

* ``rm:PATH``: a reward model trained by ``prefopt rm`` (``rewards.load_reward_model``, ``rewards.score_texts``);
* ``implicit:POLICY,REF``: the DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (``score.implicit_rewards``);
* ``fn:module:function`` (or ``fn:path/to/file.py:function``): a reward callable as ``prefopt label`` takes it
  (``rewards.load_reward_fn``);
* ``openai:MODEL``: a chat-completions endpoint (OpenAI's, or any server speaking its API).

The three score judges score both responses and let the higher score win; scores within ``tolerance`` of each
other are a tie, and a non-finite score is invalid.

The chat judge (``ChatJudge``) asks with this project's own wording (dialogue helpfulness, summary quality, or a
template file with ``{prompt}``, ``{response_a}`` and ``{response_b}``), always ending with the request for a
last line ``Verdict: A``, ``Verdict: B`` or ``Verdict: tie``; only that line is read (``parse_verdict``). The API
key is read from an environment variable and sent only in the ``Authorization`` header: it is never part of a
cache key, a cached row, an error message or the judge's ``repr``. Requests are retried on timeouts, connection
errors, 429 (waiting for ``Retry-After`` when the server gives it) and 5xx, with exponential backoff; a request
budget and a concurrency limit bound the cost. Every answer is cached on disk (JSON lines) under a key of the
judge (model, endpoint, instructions), the prompt and the two responses in their order, so a rerun of the same
evaluation sends no request.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..data.types import Text
from ..errors import ConfigError, PrefoptError

VERDICTS = ("A", "B", "tie", "invalid")
"""What a judge answers about a pair: A (shown first) is better, B is better, tie, or invalid."""


class JudgeError(PrefoptError):
    """A judge could not answer: the endpoint failed after every retry, refused the request, or the request
    budget ran out (answers received so far are cached)."""


@dataclass(frozen=True)
class PairVerdict:
    winner: str
    """One of VERDICTS."""
    raw: str
    """The judge's own answer: the chat model's text, or the two scores of a score judge."""


class Judge(Protocol):
    name: str
    """The spec the judge was made from, e.g. 'fn:my_rewards:score' or 'openai:gpt-4o' (never a secret)."""

    def judge(self, prompts: Sequence[Text], first: Sequence[str], second: Sequence[str], *,
              progress: bool = False) -> list[PairVerdict]: ...


def prompt_text(prompt: Text) -> str:
    """A prompt as plain text for a judge: a message list becomes 'Role: content' paragraphs."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


# ------------------------------------------------------------------------------------------ score judges

def compare_scores(a: float, b: float, tolerance: float = 0.0) -> str:
    """'A' if a beats b by more than ``tolerance``, 'B' the other way, 'tie' within it, 'invalid' if either
    score is not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return "invalid"
    if a - b > tolerance:
        return "A"
    if b - a > tolerance:
        return "B"
    return "tie"


class ScoreJudge:
    """A judge from a scoring callable ``score(prompts, responses) -> list[float]``: the higher score wins."""

    def __init__(self, name: str, score: Callable[[list, list], Sequence[float]], *, tolerance: float = 0.0,
                 batch_size: int = 64):
        if tolerance < 0:
            raise ConfigError(f"invalid judge tolerance = {tolerance!r}: must be >= 0.")
        self.name, self.score, self.tolerance, self.batch_size = name, score, tolerance, max(1, batch_size)

    def judge(self, prompts: Sequence[Text], first: Sequence[str], second: Sequence[str], *,
              progress: bool = False) -> list[PairVerdict]:
        from tqdm.auto import tqdm

        _check_lengths(prompts, first, second)
        out: list[PairVerdict] = []
        bar = tqdm(total=len(prompts), desc=f"judging ({self.name})", unit="pair", disable=not progress)
        for start in range(0, len(prompts), self.batch_size):
            p = list(prompts[start:start + self.batch_size])
            a, b = list(first[start:start + self.batch_size]), list(second[start:start + self.batch_size])
            scores = [float(s) for s in self.score(p + p, a + b)]
            if len(scores) != 2 * len(p):
                raise ConfigError(f"judge {self.name} returned {len(scores)} scores for {2 * len(p)} responses.")
            for sa, sb in zip(scores[:len(p)], scores[len(p):]):
                out.append(PairVerdict(compare_scores(sa, sb, self.tolerance), json.dumps({"A": sa, "B": sb})))
            bar.update(len(p))
        bar.close()
        return out

    def __repr__(self) -> str:
        return f"ScoreJudge({self.name!r}, tolerance={self.tolerance})"


def _check_lengths(prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any]) -> None:
    if not len(prompts) == len(first) == len(second):
        raise ValueError(f"{len(prompts)} prompts, {len(first)} first and {len(second)} second responses")


def reward_fn_judge(spec: str, *, tolerance: float = 0.0) -> ScoreJudge:
    """``fn:module:function``: a reward callable resolved as ``prefopt label`` resolves ``--reward-fn``."""
    from ..rewards import call_reward_fn, load_reward_fn

    target = spec.removeprefix("fn:")
    fn = load_reward_fn(target)
    return ScoreJudge(spec, lambda p, r: call_reward_fn(fn, p, r, f"judge {spec}"), tolerance=tolerance,
                      batch_size=1024)


def reward_model_judge(spec: str, *, tolerance: float = 0.0, batch_size: int = 8, device: Any = "cpu",
                       dtype: str = "float32", trust_remote_code: bool = False) -> ScoreJudge:
    """``rm:PATH``: a reward model from ``prefopt rm``."""
    from ..rewards import load_reward_model, score_texts

    path = spec.removeprefix("rm:")
    if not path:
        raise ConfigError(f"invalid judge {spec!r}: expected rm:PATH (a model written by 'prefopt rm').")
    model, tokenizer = load_reward_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    def score(prompts: list, responses: list) -> list[float]:
        return score_texts(model, tokenizer, prompts, responses, batch_size).tolist()

    return ScoreJudge(spec, score, tolerance=tolerance, batch_size=max(64, batch_size))


def implicit_reward_judge(spec: str, *, beta: float = 0.1, tolerance: float = 0.0, batch_size: int = 8,
                          device: Any = "cpu", dtype: str = "float32", trust_remote_code: bool = False) -> ScoreJudge:
    """``implicit:POLICY,REF``: beta * (log pi - log pi_ref) of a DPO policy against its reference (the policy's
    tokenizer is used for both)."""
    from ..data.types import PreferenceExample
    from ..models import load_model, load_tokenizer
    from ..score import implicit_rewards

    paths = spec.removeprefix("implicit:").split(",")
    if len(paths) != 2 or not all(p.strip() for p in paths):
        raise ConfigError(f"invalid judge {spec!r}: expected implicit:POLICY,REF (two model paths).")
    if beta <= 0:
        raise ConfigError(f"invalid judge_beta = {beta!r}: must be a positive number.")
    policy_path, ref_path = (p.strip() for p in paths)
    tokenizer = load_tokenizer(policy_path, trust_remote_code=trust_remote_code)
    policy = load_model(policy_path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    reference = load_model(ref_path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)

    def score(prompts: list, responses: list) -> list[float]:
        examples = [PreferenceExample(p, [r], f"<response {i}>") for i, (p, r) in enumerate(zip(prompts, responses))]
        return implicit_rewards(policy, reference, tokenizer, examples, beta, batch_size)[:, 0].tolist()

    return ScoreJudge(spec, score, tolerance=tolerance, batch_size=max(64, batch_size))


# ------------------------------------------------------------------------------------------ chat judge

DIALOGUE_TEMPLATE = """\
Two AI assistants answered the same conversation. Decide which final reply serves the user better: it \
addresses what the user actually asked, is correct, is clear, and does not cause harm. Do not prefer a reply \
for being longer, for its position, or for its style alone.

[Conversation]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}
"""

SUMMARY_TEMPLATE = """\
Two summaries were written of the same text. Decide which one is the better summary: it keeps the most \
important points, states nothing the text does not support, and is concise. Do not prefer a summary for being \
longer, for its position, or for its style alone.

[Text]
{prompt}

[Summary A]
{response_a}

[Summary B]
{response_b}
"""

TEMPLATES = {"dialogue": DIALOGUE_TEMPLATE, "summary": SUMMARY_TEMPLATE}
"""Built-in instructions by name; any other --judge-template is a file with the same three placeholders."""

VERDICT_INSTRUCTION = (
    "Compare the two in a few sentences. Then finish with a last line that is exactly one of:\n"
    "Verdict: A\nVerdict: B\nVerdict: tie\n"
    "where A is the response shown first and B the response shown second.")
"""Appended to every template: the last line of the answer is what ``parse_verdict`` reads."""

_VERDICT_LINE = re.compile(r"verdict\s*:\s*(a|b|tie)\.?", re.IGNORECASE)


def parse_verdict(answer: str) -> str:
    """'A', 'B' or 'tie' from the last non-blank line of the answer when it is ``Verdict: A|B|tie`` (case and
    surrounding ``*``/backticks ignored); anything else is 'invalid'."""
    lines = [ln.strip() for ln in (answer or "").splitlines() if ln.strip()]
    if not lines:
        return "invalid"
    m = _VERDICT_LINE.fullmatch(lines[-1].strip("*` \t"))
    if m is None:
        return "invalid"
    word = m.group(1).lower()
    return "tie" if word == "tie" else word.upper()


def load_template(template: str) -> str:
    """A built-in template by name, or a template file; it must hold {prompt}, {response_a} and {response_b}."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    path = Path(template).expanduser()
    if not path.is_file():
        raise ConfigError(f"invalid judge_template = {template!r}: not one of {', '.join(TEMPLATES)} and no such "
                          "file.")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in ("{prompt}", "{response_a}", "{response_b}") if p not in text]
    if missing:
        raise ConfigError(f"judge template {path} lacks the placeholder(s) {', '.join(missing)}.")
    return text


def render_judge_prompt(template: str, prompt: str, response_a: str, response_b: str) -> str:
    """The user message: the template with its placeholders filled (texts inserted verbatim, braces and all),
    then the verdict instruction."""
    filled = re.sub(r"\{(prompt|response_a|response_b)\}",
                    lambda m: {"prompt": prompt, "response_a": response_a, "response_b": response_b}[m.group(1)],
                    template)
    return filled.rstrip() + "\n\n" + VERDICT_INSTRUCTION


class VerdictCache:
    """Judge answers on disk, one JSON line each ``{key, judge, verdict, raw}``; appended as answers arrive, so
    an interrupted run keeps what it paid for."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._rows[row["key"]] = {"verdict": row["verdict"], "raw": row["raw"]}
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by an interrupted write: that answer is simply asked again

    @staticmethod
    def key(judge_id: str, prompt: str, first: str, second: str) -> str:
        return hashlib.sha256(json.dumps([judge_id, prompt, first, second], ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict[str, str] | None:
        return self._rows.get(key)

    def put(self, key: str, judge: str, verdict: str, raw: str) -> None:
        with self._lock:
            self._rows[key] = {"verdict": verdict, "raw": raw}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "judge": judge, "verdict": verdict, "raw": raw},
                                   ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self._rows)


def default_cache_path() -> Path:
    """$PREFOPT_CACHE/judge_verdicts.jsonl (default ~/.cache/prefopt/judge_verdicts.jsonl)."""
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt")) / "judge_verdicts.jsonl"


def chat_endpoint(url: str) -> str:
    """The chat-completions URL from a base URL ('http://host/v1') or the full endpoint."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"invalid judge_url = {url!r}: must start with http:// or https://.")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds to wait, or None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


MAX_RETRY_AFTER = 600.0
"""The longest wait a 429's Retry-After can ask for (seconds)."""


class ChatJudge:
    """``openai:MODEL``: a pairwise judge on an OpenAI-compatible chat-completions endpoint (stdlib HTTP only)."""

    def __init__(self, model: str, *, url: str = "https://api.openai.com/v1", api_key: str | None = None,
                 template: str = "dialogue", cache: VerdictCache | str | Path | None = None, max_retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 60.0,
                 max_requests: int | None = None, concurrency: int = 4, max_tokens: int = 512,
                 sleep: Callable[[float], None] = time.sleep):
        if not model:
            raise ConfigError("the chat judge needs a model name: openai:MODEL (e.g. openai:gpt-4o-mini).")
        if max_retries < 0 or concurrency < 1 or timeout <= 0 or backoff < 0:
            raise ConfigError("judge max_retries must be >= 0, concurrency >= 1, timeout > 0 and backoff >= 0.")
        self.model = model
        self.name = f"openai:{model}"
        self.endpoint = chat_endpoint(url)
        self.template = load_template(template)
        self.cache = cache if isinstance(cache, VerdictCache) else VerdictCache(cache or default_cache_path())
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.timeout, self.max_requests = timeout, max_requests
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.sleep = sleep
        self.requests = 0
        """HTTP requests sent so far, retries included."""
        self._api_key = api_key  # only ever placed in the Authorization header
        self._lock = threading.Lock()
        # what identifies the judge in the cache: model, endpoint and the exact instructions -- never the key
        # and the answer's length limit (a shorter one can cut an answer off), named only when not the default so
        # that verdicts cached before it was part of the key still count
        self.judge_id = json.dumps({"judge": self.name, "endpoint": self.endpoint,
                                    "instructions": hashlib.sha256((self.template + VERDICT_INSTRUCTION).encode())
                                    .hexdigest(), **({"max_tokens": max_tokens} if max_tokens != 512 else {})},
                                   sort_keys=True)

    def __repr__(self) -> str:
        return f"ChatJudge({self.name!r}, endpoint={self.endpoint!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[key]") if self._api_key else text

    def messages(self, prompt: Text, first: str, second: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": "You are a careful, impartial judge of written responses."},
                {"role": "user", "content": render_judge_prompt(self.template, prompt_text(prompt), first, second)}]

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            with self._lock:
                if self.max_requests is not None and self.requests >= self.max_requests:
                    raise JudgeError(f"the judge's request budget ({self.max_requests} requests) is spent; the "
                                     f"answers received so far are cached in {self.cache.path}: rerun with a larger "
                                     "--judge-max-requests to continue.")
                self.requests += 1
            wait = None
            try:
                req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read().decode("utf-8", errors="replace")
                try:
                    return json.loads(text)
                except ValueError:
                    return {"_unreadable": text[:2000]}
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read().decode("utf-8", errors="replace")[:300]) if e.fp else ""
                last = f"HTTP {e.code}: {detail}".strip()
                if e.code == 429:
                    wait = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
                elif e.code not in (408, 409) and e.code < 500:
                    raise JudgeError(f"the judge endpoint {self.endpoint} refused the request ({last}).") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as e:
                last = self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            if attempt == self.max_retries:
                break
            # a 429's Retry-After is honoured (up to MAX_RETRY_AFTER); otherwise exponential backoff
            delay = min(self.max_backoff, self.backoff * 2 ** attempt) if wait is None else min(wait, MAX_RETRY_AFTER)
            self.sleep(delay)
        raise JudgeError(f"the judge endpoint {self.endpoint} failed after {self.max_retries + 1} attempts "
                         f"(last: {last}); answers received so far are cached in {self.cache.path}.")

    def ask(self, prompt: Text, first: str, second: str) -> PairVerdict:
        """One pair, from the cache when it was asked before, else from the endpoint (the answer is cached)."""
        key = self.cache.key(self.judge_id, prompt_text(prompt), first, second)
        hit = self.cache.get(key)
        if hit is not None:
            return PairVerdict(hit["verdict"], hit["raw"])
        body = json.dumps({"model": self.model, "messages": self.messages(prompt, first, second),
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        payload = self._post(body)
        try:
            raw = payload["choices"][0]["message"]["content"]
            if not isinstance(raw, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            # not a chat answer (an error object, a proxy's page): invalid for this run, but not cached, so a
            # rerun asks again instead of keeping a server failure as the judge's verdict
            return PairVerdict("invalid", self._redact(json.dumps(payload, ensure_ascii=False)[:2000]))
        verdict = parse_verdict(raw)
        self.cache.put(key, self.name, verdict, raw)
        return PairVerdict(verdict, raw)

    def judge(self, prompts: Sequence[Text], first: Sequence[str], second: Sequence[str], *,
              progress: bool = False) -> list[PairVerdict]:
        from tqdm.auto import tqdm

        _check_lengths(prompts, first, second)
        # the same question twice (e.g. equal greedy samples) is asked once, even when both would be in flight
        same: dict[str, list[int]] = {}
        for i in range(len(prompts)):
            same.setdefault(self.cache.key(self.judge_id, prompt_text(prompts[i]), first[i], second[i]), []).append(i)
        out: list[PairVerdict | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=f"judging ({self.name})", unit="pair", disable=not progress)
        errors: list[BaseException] = []

        def one(indices: list[int]) -> None:
            i = indices[0]
            try:
                verdict = self.ask(prompts[i], first[i], second[i])
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the other pairs are cached
                errors.append(e)
            else:
                for j in indices:
                    out[j] = verdict
            bar.update(len(indices))

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            list(pool.map(one, same.values()))
        bar.close()
        if errors:
            raise errors[0]
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ by spec

JUDGE_KINDS = ("rm", "implicit", "fn", "openai")


def load_judge(spec: str, *, url: str = "https://api.openai.com/v1", key_env: str = "OPENAI_API_KEY",
               template: str = "dialogue", cache: str | Path | None = None, beta: float = 0.1,
               tolerance: float = 0.0, batch_size: int = 8, device: Any = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False, **chat: Any) -> Judge:
    """The judge a spec names (see the module doc). ``key_env`` names the environment variable holding the chat
    endpoint's key ('' sends none, e.g. for a local server); ``chat`` goes to ChatJudge (max_retries, backoff,
    timeout, max_requests, concurrency, max_tokens)."""
    kind, sep, rest = (spec or "").partition(":")
    if not sep or kind not in JUDGE_KINDS or not rest:
        raise ConfigError(f"invalid judge {spec!r}: expected one of rm:PATH, implicit:POLICY,REF, "
                          "fn:module:function, openai:MODEL.")
    if kind == "fn":
        return reward_fn_judge(spec, tolerance=tolerance)
    if kind == "rm":
        return reward_model_judge(spec, tolerance=tolerance, batch_size=batch_size, device=device, dtype=dtype,
                                  trust_remote_code=trust_remote_code)
    if kind == "implicit":
        return implicit_reward_judge(spec, beta=beta, tolerance=tolerance, batch_size=batch_size, device=device,
                                     dtype=dtype, trust_remote_code=trust_remote_code)
    api_key = None
    if key_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):  # e.g. the key itself, given by mistake: not echoed
            raise ConfigError("judge_key_env must be the NAME of the environment variable that holds the API key "
                              "(letters, digits, underscores), not the key itself.")
        api_key = os.environ.get(key_env)
        if not api_key:
            raise ConfigError(f"the judge's API key is read from the environment variable {key_env}, which is not "
                              "set; set it, or pass --judge-key-env '' for an endpoint without a key.")
    return ChatJudge(rest, url=url, api_key=api_key, template=template, cache=cache, **chat)


__all__ = ["Judge", "PairVerdict", "VERDICTS", "JudgeError", "ScoreJudge", "ChatJudge", "VerdictCache", "load_judge",
           "parse_verdict", "compare_scores", "render_judge_prompt", "load_template", "prompt_text", "chat_endpoint",
           "retry_after_seconds", "default_cache_path", "TEMPLATES", "VERDICT_INSTRUCTION"]
