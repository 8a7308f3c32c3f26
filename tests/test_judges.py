"""Judges: the chat-completions judge against a real HTTP server on 127.0.0.1, verdict parsing, score judges."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prefopt.errors import ConfigError
from prefopt.eval.judges import (
    VERDICT_INSTRUCTION,
    ChatJudge,
    JudgeError,
    ScoreJudge,
    VerdictCache,
    compare_scores,
    load_judge,
    parse_verdict,
    render_judge_prompt,
    retry_after_seconds,
)
from prefopt.eval.run import judge_pairs, policy_first

KEY = "sk-test-9f8e7d6c5b4a-secret"


class ChatServer:
    """A chat-completions server: answers 'Verdict: A' when the response shown first contains GOOD, else 'B'
    (scripted failures first). Records every request: path, headers, JSON body, arrival time."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple] = []  # ("status", code, headers), ("content", text) or ("sleep", seconds)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                            "time": time.monotonic()})
                    action = server.script.pop(0) if server.script else None
                if action is not None and action[0] == "sleep":  # answer after the client gave up
                    time.sleep(action[1])
                    action = None
                if action is not None and action[0] == "body":  # a 200 whose body is not a chat answer
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(action[1])))
                    self.end_headers()
                    self.wfile.write(action[1])
                    return
                if action is not None and action[0] == "status":
                    self.send_response(action[1])
                    for k, v in action[2].items():
                        self.send_header(k, v)
                    payload = b'{"error": {"message": "try again"}}'
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action is not None:
                    content = action[1]
                else:
                    user = body["messages"][-1]["content"]
                    a = user.split("[Response A]")[1].split("[Response B]")[0]
                    content = "A is clearly better.\nVerdict: A" if "GOOD" in a else "B wins.\nVerdict: B"
                payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                   "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:  # the client timed out and closed the connection
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = ChatServer()
    yield s
    s.close()


def chat_judge(server: ChatServer, tmp_path, **kw) -> ChatJudge:
    kw.setdefault("backoff", 0.01)
    return ChatJudge("judge-model", url=server.url, api_key=KEY, cache=tmp_path / "cache.jsonl", **kw)


def test_request_shape_and_key_only_in_authorization(server, tmp_path):
    judge = chat_judge(server, tmp_path)
    [v] = judge.judge(["What is 2+2?"], ["GOOD: four"], ["bad: five"])
    assert (v.winner, v.raw) == ("A", "A is clearly better.\nVerdict: A")
    [req] = server.requests
    assert req["path"] == "/v1/chat/completions"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 512
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert user.endswith(VERDICT_INSTRUCTION) and "Verdict: A" in VERDICT_INSTRUCTION
    assert user.index("What is 2+2?") < user.index("GOOD: four") < user.index("bad: five")
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["content-type"] == "application/json"
    assert KEY not in json.dumps(body)
    assert [k for k, v in headers.items() if KEY in v] == ["authorization"]
    assert KEY not in repr(judge) and KEY not in judge.judge_id


def test_no_key_sends_no_authorization(server, tmp_path):
    judge = ChatJudge("m", url=server.url + "/chat/completions", api_key=None, cache=tmp_path / "c.jsonl")
    judge.judge(["p"], ["x"], ["GOOD"])
    assert "authorization" not in {k.lower() for k in server.requests[0]["headers"]}


def test_order_randomised_recorded_and_mapped(server, tmp_path):
    """The policy's response (always GOOD here) is shown first in about half of the pairs; whatever the order,
    the recorded policy_first maps the judge's A/B back to a policy win."""
    judge = chat_judge(server, tmp_path)
    pairs = [{"temperature": 1.0, "prompt": f"prompt {i}", "prompt_index": i, "sample_index": 0,
              "policy": f"GOOD answer {i}", "baseline": f"meh answer {i}", "policy_first": policy_first(0, 1.0, i, 0)}
             for i in range(24)]
    rows = judge_pairs(judge, pairs)
    firsts = [r["policy_first"] for r in rows]
    assert 0 < sum(firsts) < len(firsts)  # both orders occur
    assert firsts == [policy_first(0, 1.0, i, 0) for i in range(24)]  # seeded: the same orders again
    assert [r["judge_verdict"] for r in rows] == ["A" if f else "B" for f in firsts]
    assert all(r["verdict"] == "policy" for r in rows)
    seen_first = {}
    for req in server.requests:
        user = req["body"]["messages"][-1]["content"]
        a = user.split("[Response A]")[1].split("[Response B]")[0]
        i = int(user.split("[Conversation]")[1].split("[Response A]")[0].strip().split()[-1])
        seen_first[i] = "GOOD" in a
    assert seen_first == {i: f for i, f in enumerate(firsts)}


def test_500_then_success_is_retried(server, tmp_path):
    server.script = [("status", 500, {}), ("status", 503, {})]
    judge = chat_judge(server, tmp_path)
    [v] = judge.judge(["p"], ["GOOD"], ["x"])
    assert v.winner == "A"
    assert len(server.requests) == 3 and judge.requests == 3


def test_timeout_is_retried(server, tmp_path):
    server.script = [("sleep", 1.0)]
    judge = chat_judge(server, tmp_path, timeout=0.3)
    [v] = judge.judge(["p"], ["GOOD"], ["x"])
    assert v.winner == "A" and len(server.requests) == 2 and judge.requests == 2


def test_429_retry_after_is_honoured(server, tmp_path):
    server.script = [("status", 429, {"Retry-After": "1"})]
    judge = chat_judge(server, tmp_path, backoff=0.0)
    [v] = judge.judge(["p"], ["x"], ["GOOD"])
    assert v.winner == "B"
    first, second = server.requests
    assert second["time"] - first["time"] >= 0.95


def test_retries_exhausted_and_refusals_raise_without_the_key(server, tmp_path):
    server.script = [("status", 500, {})] * 3
    judge = chat_judge(server, tmp_path, max_retries=2)
    with pytest.raises(JudgeError, match="after 3 attempts") as e:
        judge.judge(["p"], ["x"], ["y"])
    assert KEY not in str(e.value) and len(server.requests) == 3
    server.script = [("status", 401, {})]
    with pytest.raises(JudgeError, match="HTTP 401") as e:
        chat_judge(server, tmp_path).judge(["p"], ["x"], ["y"])
    assert KEY not in str(e.value) and len(server.requests) == 4  # a 401 is not retried


def test_request_budget(server, tmp_path):
    judge = chat_judge(server, tmp_path, max_requests=2, concurrency=1)
    with pytest.raises(JudgeError, match="budget"):
        judge.judge(["a", "b", "c"], ["GOOD", "GOOD", "GOOD"], ["x", "x", "x"])
    assert len(server.requests) == 2
    assert len(VerdictCache(tmp_path / "cache.jsonl")) == 2  # what was paid for is kept


def test_malformed_verdict_is_invalid(server, tmp_path):
    server.script = [("content", "Response A is better, I think."), ("content", "Verdict: A\nActually no.")]
    rows = judge_pairs(chat_judge(server, tmp_path, concurrency=1), [
        {"temperature": 0.0, "prompt": f"p{i}", "prompt_index": i, "sample_index": 0, "policy": "GOOD",
         "baseline": "x", "policy_first": True} for i in range(3)])
    assert [r["verdict"] for r in rows] == ["invalid", "invalid", "policy"]
    assert rows[0]["raw"] == "Response A is better, I think."


def test_a_body_that_is_no_chat_answer_is_invalid_and_not_cached(server, tmp_path):
    server.script = [("body", b'{"error": {"message": "overloaded"}}'), ("body", b"<html>bad gateway</html>")]
    judge = chat_judge(server, tmp_path, concurrency=1)
    assert [v.winner for v in judge.judge(["p", "q"], ["GOOD", "GOOD"], ["x", "x"])] == ["invalid", "invalid"]
    assert len(VerdictCache(tmp_path / "cache.jsonl")) == 0
    again = chat_judge(server, tmp_path, concurrency=1).judge(["p", "q"], ["GOOD", "GOOD"], ["x", "x"])
    assert [v.winner for v in again] == ["A", "A"] and len(server.requests) == 4  # asked again, now answered


def test_second_run_is_served_from_cache(server, tmp_path):
    prompts, a, b = [f"q{i}" for i in range(5)], [f"GOOD {i}" for i in range(5)], [f"x{i}" for i in range(5)]
    first = chat_judge(server, tmp_path).judge(prompts, a, b)
    n = len(server.requests)
    assert n == 5
    again = chat_judge(server, tmp_path)  # a new judge, as a new run: only the file is shared
    assert again.judge(prompts, a, b) == first
    assert len(server.requests) == n and again.requests == 0
    # a question repeated within one call is asked once, even with several requests in flight
    chat_judge(server, tmp_path, concurrency=4).judge(["dup"] * 6, ["GOOD d"] * 6, ["x d"] * 6)
    assert len(server.requests) == n + 1
    n += 1
    # the order is part of the key: the swapped pairs are new questions
    chat_judge(server, tmp_path).judge(prompts, b, a)
    assert len(server.requests) == n + 5
    assert KEY not in (tmp_path / "cache.jsonl").read_text()


def test_changed_instructions_are_not_served_from_cache(server, tmp_path):
    chat_judge(server, tmp_path).judge(["p"], ["GOOD"], ["x"])
    template = tmp_path / "t.txt"
    template.write_text("Which is better for {prompt}?\n[Response A]\n{response_a}\n[Response B]\n{response_b}\n")
    chat_judge(server, tmp_path, template=str(template)).judge(["p"], ["GOOD"], ["x"])
    assert len(server.requests) == 2


def test_another_answer_length_is_not_served_from_cache(server, tmp_path):
    chat_judge(server, tmp_path).judge(["p"], ["GOOD"], ["x"])
    chat_judge(server, tmp_path, max_tokens=512).judge(["p"], ["GOOD"], ["x"])  # the default: the same key
    assert len(server.requests) == 1
    chat_judge(server, tmp_path, max_tokens=8).judge(["p"], ["GOOD"], ["x"])
    assert len(server.requests) == 2


def test_load_judge_reads_the_key_from_the_named_variable(server, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFOPT_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="PREFOPT_TEST_JUDGE_KEY"):
        load_judge("openai:m", url=server.url, key_env="PREFOPT_TEST_JUDGE_KEY", cache=tmp_path / "c.jsonl")
    with pytest.raises(ConfigError, match="NAME of the environment variable") as e:  # the key given by mistake
        load_judge("openai:m", url=server.url, key_env=KEY, cache=tmp_path / "c.jsonl")
    assert KEY not in str(e.value)
    monkeypatch.setenv("PREFOPT_TEST_JUDGE_KEY", KEY)
    judge = load_judge("openai:m", url=server.url, key_env="PREFOPT_TEST_JUDGE_KEY", cache=tmp_path / "c.jsonl",
                       backoff=0.0)
    judge.judge(["p"], ["GOOD"], ["x"])
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


# ------------------------------------------------------------------------------------------ pure parts

@pytest.mark.parametrize("answer,expected", [
    ("reasoning\nVerdict: A", "A"), ("Verdict: B", "B"), ("x\nverdict: TIE\n\n", "tie"), ("**Verdict: A**", "A"),
    ("Verdict: b.", "B"), ("Verdict: A or B", "invalid"), ("Verdict: A\nmore text", "invalid"), ("", "invalid"),
    ("The answer is A", "invalid"), ("Verdict: C", "invalid"), ("Verdict:", "invalid")])
def test_parse_verdict(answer, expected):
    assert parse_verdict(answer) == expected


def test_render_judge_prompt_inserts_texts_verbatim():
    text = render_judge_prompt("P={prompt} A={response_a} B={response_b}", "{response_b}", "x {y}", "z")
    assert text == "P={response_b} A=x {y} B=z\n\n" + VERDICT_INSTRUCTION


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert 0 <= retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0  # a past date: no wait


def test_score_judge_compares_with_tolerance():
    assert [compare_scores(*x, tolerance=0.5) for x in [(2, 1), (1, 2), (1, 1.4), (float("nan"), 0)]] == \
        ["A", "B", "tie", "invalid"]
    judge = ScoreJudge("len", lambda p, r: [len(x) for x in r], tolerance=1, batch_size=2)
    verdicts = judge.judge(["p"] * 3, ["aaaa", "a", "aa"], ["a", "aaaa", "a"])
    assert [v.winner for v in verdicts] == ["A", "B", "tie"]
    assert json.loads(verdicts[0].raw) == {"A": 4.0, "B": 1.0}


def test_fn_judge_resolves_like_label(tmp_path):
    f = tmp_path / "my_judge_fn.py"
    f.write_text("def score(prompts, responses):\n    return [r.count('!') for r in responses]\n")
    judge = load_judge(f"fn:{f}:score")
    assert [v.winner for v in judge.judge(["p", "p"], ["yes!!", "no"], ["yes", "no!"])] == ["A", "B"]
    with pytest.raises(ConfigError):
        load_judge("fn:nowhere_module_xyz:score")
    with pytest.raises(ConfigError, match="expected one of"):
        load_judge("gpt4")


def test_eval_with_the_chat_judge_end_to_end(server, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """prefopt eval against the local server: every pair asked once, the key in no file written (outputs and
    cache), and a rerun served from the cache with zero requests."""
    from prefopt.cli import main
    from prefopt.jsonl import read_jsonl, write_jsonl

    monkeypatch.setenv("PREFOPT_TEST_JUDGE_KEY", KEY)
    prompts = write_jsonl([{"prompt": f"Say something nice {i}", "chosen": f"GOOD reply {i}"} for i in range(4)],
                          tmp_path / "prompts.jsonl")
    args = ["eval", "--model", str(tiny_model_dir), "--baseline", "dataset", "--prompts", str(prompts),
            "--judge", "openai:judge-model", "--judge-url", server.url, "--judge-key-env", "PREFOPT_TEST_JUDGE_KEY",
            "--judge-cache", str(tmp_path / "cache" / "verdicts.jsonl"), "--temperatures", "0.5,1.0",
            "--max-new-tokens", "6", "--progress", "false", "--device", "cpu"]
    assert main(args + ["--output-dir", str(tmp_path / "run1")]) == 0
    rows = read_jsonl(tmp_path / "run1" / "verdicts.jsonl")
    assert len(rows) == 8
    # one request per distinct question (a pair sampled alike at both temperatures, in the same order, is
    # answered from the cache)
    asked = {(r["prompt"], r["policy"], r["policy_first"]) for r in rows}
    assert len(server.requests) == len(asked)
    results = json.loads((tmp_path / "run1" / "results.json").read_text())
    assert results["judge_requests"] == len(asked)
    # the server prefers the GOOD (baseline) reply wherever it is shown: recorded order maps it back
    assert [r["verdict"] for r in rows] == ["baseline"] * 8
    assert [r["judge_verdict"] for r in rows] == ["B" if r["policy_first"] else "A" for r in rows]
    assert all(r["raw"].splitlines()[-1] in ("Verdict: A", "Verdict: B") for r in rows)
    assert main(args + ["--output-dir", str(tmp_path / "run2")]) == 0
    assert len(server.requests) == len(asked)  # the rerun asked nothing
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["judge_requests"] == 0
    assert read_jsonl(tmp_path / "run2" / "verdicts.jsonl") == rows
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"results.json", "verdicts.jsonl", "win_rate_vs_temperature.png",
                                         "report.html", "verdicts.jsonl"}
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
    out = capsys.readouterr()
    assert KEY not in out.out and KEY not in out.err


def test_rm_and_implicit_judges(tiny_model_dir, tmp_path):
    from conftest import make_tiny_reward_model

    from prefopt.models import load_tokenizer
    from prefopt.rewards import load_reward_model, score_texts

    tok = load_tokenizer(tiny_model_dir)
    rm_path = make_tiny_reward_model(tmp_path / "rm", tok)
    prompts = ["a good movie", "the plot"] * 2
    a, b = ["great fun", "dull", "ok", "x"], ["dull", "great fun", "ok", "y z"]
    verdicts = load_judge(f"rm:{rm_path}").judge(prompts, a, b)
    model, rm_tok = load_reward_model(rm_path)
    sa, sb = score_texts(model, rm_tok, prompts, a).tolist(), score_texts(model, rm_tok, prompts, b).tolist()
    assert [v.winner for v in verdicts] == [compare_scores(x, y) for x, y in zip(sa, sb)]
    assert verdicts[2].winner == "tie"  # the same text scores the same
    assert [json.loads(v.raw)["A"] for v in verdicts] == pytest.approx(sa, abs=1e-5)
    # a policy against itself as reference: beta * (log pi - log pi_ref) is 0 for every response
    same = load_judge(f"implicit:{tiny_model_dir},{tiny_model_dir}", beta=0.5).judge(prompts, a, b)
    assert all(v.winner == "tie" and json.loads(v.raw) == {"A": 0.0, "B": 0.0} for v in same)
    # against another reference: the scores are beta * (log pi - log pi_ref) as prefopt score computes them
    import torch

    from prefopt.data.types import PreferenceExample
    from prefopt.models import load_model
    from prefopt.score import implicit_rewards

    ref = load_model(tiny_model_dir)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    ref.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    other = load_judge(f"implicit:{tiny_model_dir},{tmp_path / 'ref'}", beta=0.5).judge(prompts, a, b)
    expected = implicit_rewards(load_model(tiny_model_dir), load_model(tmp_path / "ref"), tok,
                                [PreferenceExample(p, [r]) for p, r in zip(prompts, a)], 0.5)[:, 0].tolist()
    assert [json.loads(v.raw)["A"] for v in other] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert any(x != 0 for x in expected) and other[2].winner == "tie"
    with pytest.raises(ConfigError, match="POLICY,REF"):
        load_judge(f"implicit:{tiny_model_dir}")
