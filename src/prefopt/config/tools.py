"""Configs of the data tools around training: ``prefopt generate``, ``prefopt label``, ``prefopt score``,
``prefopt eval`` and ``prefopt data inspect``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .loading import DTYPES, check_field, check_length_limits, check_required, check_reward_fn

DEVICES_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps"
"""The devices a tool runs on: the --device help and the invalid-device message both use this text."""


@dataclass
class GenerateConfig:
    """prefopt generate: sample responses to prompts (prefopt.generation)."""

    model: str = ""
    """Path of the causal LM to sample from (its tokenizer is loaded from the same path)."""
    prompts: str = ""
    """Prompts: .txt (one a line) or .jsonl/.json/.parquet rows with a 'prompt' field (text or message list)."""
    output: str = ""
    """JSONL file of rows {prompt, response, prompt_index, sample_index, prompt_tokens, response_tokens,
    ended_with_eos}."""
    num_samples: int = 1
    """Responses sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1 disables)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 disables)."""
    max_new_tokens: int = 128
    """Longest response in tokens (responses end at EOS or here)."""
    seed: int = 0
    """Each (prompt, sample) gets its own generator seeded from this: same seed, same samples, any batch size
    (exactly in float32; bf16/fp16 rounding of batched logits can change a few)."""
    batch_size: int = 16
    """Sequences generated together (left-padded, KV-cached)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    device: str = field(default="auto", metadata={"doc": DEVICES_HELP + "."})
    trust_remote_code: bool = False
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        check_required(self, "model", "prompts", "output")
        check_field(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        check_field(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 means greedy decoding)")
        check_field(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check_field(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 disables top-k)")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        check_field(bool(self.device), "device", self.device, DEVICES_HELP)


@dataclass
class LabelConfig:
    """prefopt label: score sampled responses and write preference pairs or rankings (prefopt.label)."""

    samples: str = ""
    """Sample rows {prompt, response} (as written by 'prefopt generate'), grouped by prompt."""
    output: str = ""
    """JSONL of pairs {prompt, chosen, rejected, chosen_score, rejected_score}, or with ranking rows
    {prompt, responses, scores} (best first)."""
    reward_fn: str | None = None
    """A Python reward 'module:function' or 'path/to/file.py:function' taking (prompts, responses) and
    returning one float per response; give this or reward_model."""
    reward_model: str | None = None
    """A reward model written by 'prefopt rm'; give this or reward_fn."""
    ranking: bool = False
    """Write one ranked row of all distinct responses per prompt (for plackett_luce) instead of pairs."""
    all_pairs: bool = False
    """Write every ordered pair of a prompt's responses instead of only best vs worst."""
    min_margin: float = 0.0
    """Write a pair only if chosen_score - rejected_score > min_margin (ties are never ordered)."""
    batch_size: int = 16
    """Responses scored per reward-model forward pass."""

    def validate(self) -> None:
        check_required(self, "samples", "output")
        if bool(self.reward_model) == bool(self.reward_fn):
            raise ConfigError("give exactly one of reward_model (--reward-model PATH) and reward_fn "
                              "(--reward-fn module:function).")
        check_reward_fn(self.reward_fn)
        if self.ranking and self.all_pairs:
            raise ConfigError("ranking and all_pairs exclude each other: ranking writes one row of all responses.")
        check_field(self.min_margin >= 0, "min_margin", self.min_margin, ">= 0")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")


@dataclass
class ScoreConfig:
    """prefopt score: the DPO policy as a reward model, beta * (log pi - log pi_ref) (prefopt.score)."""

    model: str = ""
    """The DPO-trained policy (its tokenizer is used for both models)."""
    ref_model: str = ""
    """The reference model the policy was trained against."""
    data: str = ""
    """Rows {prompt, response} (e.g. 'prefopt generate' output) or preference data in any format DPO reads;
    for preference data pair accuracy and mean margin are reported too."""
    output: str = ""
    """JSONL of per-row implicit rewards, policy and reference log-probs (and reward-model scores)."""
    beta: float = 0.1
    """The beta the policy was trained with."""
    reward_model: str | None = None
    """Also score the rows with this reward model ('prefopt rm') to compare with the implicit reward."""
    data_format: str = "auto"
    """Row format: auto, explicit, conversational, implicit, ranked."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_length: int | None = None
    """Truncate as DPO training did (prompt + response tokens); default: no truncation."""
    max_prompt_length: int | None = None
    """Longest prompt kept when a row must be truncated (as in DPO training)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    device: str = field(default="auto", metadata={"doc": DEVICES_HELP + "."})
    trust_remote_code: bool = False
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        check_required(self, "model", "ref_model", "data", "output")
        check_field(self.beta > 0, "beta", self.beta, "a positive number")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_length_limits(self.max_length, self.max_prompt_length)
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        check_field(bool(self.device), "device", self.device, DEVICES_HELP)


INSPECT_PREFERENCE_FORMATS = ("auto", "explicit", "conversational", "implicit", "ranked")
INSPECT_SFT_FORMATS = ("auto", "explicit", "conversational", "text")


@dataclass
class InspectConfig:
    """prefopt data inspect: print one data row as the model sees it -- the rendered text, then every token with
    the prompt/response boundary, BOS/EOS/special tokens and any truncation marked (prefopt.data.inspect). Only
    the tokenizer is loaded, never model weights."""

    model: str = ""
    """Path of the model (or of a tokenizer folder written by save_pretrained) whose tokenizer is used."""
    data: str = ""
    """The data file or datasets directory, in any format DPO (or, with sft, SFT) reads."""
    row: int = 0
    """Which data row to show, counting from 0 (blank lines do not count)."""
    data_format: str = "auto"
    """Row format: auto, explicit, conversational, implicit, ranked; with sft: auto, explicit, conversational,
    text."""
    sft: bool = False
    """Read the row as SFT data (prompt/response, messages or text) instead of preference data."""
    split: str | None = None
    """Split to read from a datasets directory (default: train)."""
    max_length: int | None = None
    """Truncate as a run with this max_length would (prompt + response tokens); default: no truncation (a
    training run defaults to the model's context size capped at 1024)."""
    max_prompt_length: int | None = None
    """Longest prompt kept when the row must be truncated, as in training (a run defaults to half of
    max_length)."""
    trust_remote_code: bool = False

    def validate(self) -> None:
        check_required(self, "model", "data")
        check_field(self.row >= 0, "row", self.row, "an integer >= 0 (rows count from 0)")
        formats = INSPECT_SFT_FORMATS if self.sft else INSPECT_PREFERENCE_FORMATS
        check_field(self.data_format in formats, "data_format", self.data_format,
                    f"one of {', '.join(formats)}" + (" (sft data)" if self.sft else " (add --sft for SFT formats)"))
        check_length_limits(self.max_length, self.max_prompt_length)


EVAL_JUDGE_KINDS = ("rm", "implicit", "fn", "openai")


@dataclass
class EvalConfig:
    """prefopt eval: win rates of a policy against a baseline at several sampling temperatures, judged pairwise
    (ties count half, invalid verdicts counted apart), with 95 % intervals, verdicts, a plot and an HTML report
    (prefopt.eval.run)."""

    model: str = ""
    """The policy to evaluate (its tokenizer is loaded from the same path)."""
    baseline: str = ""
    """Another model to sample at the same temperatures (seed + 1), or 'dataset': the baseline_field of each
    prompts row."""
    prompts: str = ""
    """Prompts in any format 'prefopt generate' reads (rows with a 'prompt' field; with baseline 'dataset' also
    the baseline_field, or preference rows)."""
    output_dir: str = ""
    """Where results.json, verdicts.jsonl, win_rate_vs_temperature.png and report.html go."""
    judge: str = ""
    """rm:PATH (reward model), implicit:POLICY,REF (DPO implicit reward), fn:module:function (reward callable)
    or openai:MODEL (a chat-completions endpoint)."""
    baseline_field: str = "chosen"
    """With baseline 'dataset': the field of the prompts rows that holds the baseline response."""
    temperatures: list[str] = field(default_factory=lambda: ["0", "0.25", "0.5", "0.75", "1.0"])
    """Sampling temperatures, comma-separated (0 is greedy decoding)."""
    num_samples: int = 1
    """Policy (and baseline-model) samples per prompt and temperature; with more than one the interval is a
    bootstrap over prompts."""
    max_new_tokens: int = 128
    """Longest sampled response in tokens."""
    top_p: float = 1.0
    """Nucleus sampling for policy and baseline (1 disables)."""
    top_k: int = 0
    """Top-k sampling for policy and baseline (0 disables)."""
    max_prompts: int | None = None
    """Use only the first N prompts of the file."""
    skip_bad_rows: bool = False
    """With baseline 'dataset': skip (and count) prompts rows that fail validation instead of stopping."""
    seed: int = 0
    """Seeds sampling (the baseline model uses seed + 1), the A/B order of each pair and the bootstrap."""
    judge_url: str = "https://api.openai.com/v1"
    """openai judge: base URL of the chat-completions API (or its full /chat/completions URL)."""
    judge_key_env: str = "OPENAI_API_KEY"
    """openai judge: name of the environment variable holding the API key ('' sends no key). The key itself is
    never written anywhere."""
    judge_template: str = "dialogue"
    """openai judge: 'dialogue' (helpfulness), 'summary' (summary quality) or a template file with {prompt},
    {response_a} and {response_b}; the request for a last line 'Verdict: A|B|tie' is always appended."""
    judge_cache: str | None = None
    """openai judge: JSON lines cache of answers (default: $PREFOPT_CACHE/judge_verdicts.jsonl); a rerun sends
    no request for a pair asked before."""
    judge_max_requests: int | None = None
    """openai judge: stop after this many HTTP requests, retries included (default: no limit)."""
    judge_concurrency: int = 4
    """openai judge: requests in flight at once."""
    judge_max_retries: int = 5
    """openai judge: retries of a request after a timeout, connection error, 429 or 5xx."""
    judge_backoff: float = 1.0
    """openai judge: first retry delay in seconds, doubled each retry (a 429's Retry-After wins)."""
    judge_timeout: float = 60.0
    """openai judge: seconds to wait for one answer."""
    judge_max_tokens: int = 512
    """openai judge: longest answer requested."""
    judge_beta: float = 0.1
    """implicit judge: the beta of beta * (log pi - log pi_ref)."""
    judge_tolerance: float = 0.0
    """Score judges (rm, implicit, fn): scores within this of each other are a tie."""
    report_pairs: int = 30
    """Judged pairs shown in report.html."""
    batch_size: int = 16
    """Sequences generated (and reward-model rows scored) together."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    device: str = field(default="auto", metadata={"doc": DEVICES_HELP + "."})
    trust_remote_code: bool = False
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        check_required(self, "model", "baseline", "prompts", "judge", "output_dir")
        kind, sep, rest = self.judge.partition(":")
        check_field(bool(sep) and kind in EVAL_JUDGE_KINDS and bool(rest), "judge", self.judge,
                    "rm:PATH, implicit:POLICY,REF, fn:module:function or openai:MODEL")
        if kind == "fn":
            check_reward_fn(rest)
        check_field(self.baseline != "dataset" or bool(self.baseline_field), "baseline_field", self.baseline_field,
                    "a field name of the prompts rows")
        try:
            temps = [float(t) for t in self.temperatures]
        except (TypeError, ValueError):
            temps = []
        check_field(bool(temps) and all(t >= 0 for t in temps), "temperatures", self.temperatures,
                    "numbers >= 0, comma-separated (e.g. 0,0.5,1.0)")
        check_field(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check_field(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check_field(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 disables top-k)")
        check_field(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", self.max_prompts,
                    "an integer >= 1")
        check_field(self.judge_max_requests is None or self.judge_max_requests >= 0, "judge_max_requests",
                    self.judge_max_requests, "an integer >= 0")
        check_field(self.judge_concurrency >= 1, "judge_concurrency", self.judge_concurrency, "an integer >= 1")
        check_field(self.judge_max_retries >= 0, "judge_max_retries", self.judge_max_retries, "an integer >= 0")
        check_field(self.judge_backoff >= 0, "judge_backoff", self.judge_backoff, ">= 0")
        check_field(self.judge_timeout > 0, "judge_timeout", self.judge_timeout, "a positive number of seconds")
        check_field(self.judge_max_tokens >= 1, "judge_max_tokens", self.judge_max_tokens, "an integer >= 1")
        check_field(self.judge_beta > 0, "judge_beta", self.judge_beta, "a positive number")
        check_field(self.judge_tolerance >= 0, "judge_tolerance", self.judge_tolerance, ">= 0")
        check_field(self.report_pairs >= 0, "report_pairs", self.report_pairs, "an integer >= 0")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        check_field(bool(self.device), "device", self.device, DEVICES_HELP)
