"""Chunked log-probs that turn on by themselves (``LogitsBudget``) and the chunked backward's kept last chunk.

The rule: a batch whose P response positions x vocabulary V x PLAIN_LOGIT_BYTES exceed the budget runs the LM head
in chunks of budget // (V x CHUNK_LOGIT_BYTES) positions; below it the plain path runs. Either way the numbers are
the plain path's (1e-5 in values, 1e-4 in gradients), and keeping the last chunk's softmax from the forward gives
the same gradient bits as recomputing it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prefopt.logprobs as lp
from prefopt.config import DPOConfig
from prefopt.errors import ConfigError
from prefopt.logprobs import (CHUNK_LOGIT_BYTES, PLAIN_LOGIT_BYTES, LogitsBudget, LogpsMode, chunked_token_logps,
                              forward_logps, make_logps_fn)
from prefopt.data.types import TokenizedExample
from prefopt.train.dpo import make_collate, train_dpo

VOCAB = 101


def tiny_llama(tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                         tie_word_embeddings=tie)).float()
    if not tie:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.2)
    return model


def random_examples(n: int, k: int, seed: int = 0) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(most: int) -> list[int]:
        return torch.randint(4, VOCAB, (int(torch.randint(1, most + 1, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedExample(ids(11), [ids(9) for _ in range(k)], source=f"rand[{i}]") for i in range(n)]


def logps_and_grads(model, batch, fn, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch)
    (out.sum * weights).sum().backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(fast: dict, plain: dict, rel: float = 1e-4) -> None:
    assert fast.keys() == plain.keys()
    for name, g in plain.items():
        err = (fast[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err <= rel, f"{name}: relative gradient error {err:.2e}"


def positions(batch: dict) -> int:
    """The rows the LM head runs on for this batch: its response positions (a layout's kept positions)."""
    if "layout_keep" in batch:
        return int(batch["layout_keep"].sum())
    return int(batch["loss_mask"][:, 1:].sum())


@pytest.fixture
def chunk_calls(monkeypatch):
    """The chunk sizes the chunked head was called with."""
    calls: list[int] = []
    real = lp.chunked_token_logps

    def spy(hidden, head, targets, chunk_size, *a, **k):
        calls.append(chunk_size)
        return real(hidden, head, targets, chunk_size, *a, **k)

    monkeypatch.setattr(lp, "chunked_token_logps", spy)
    return calls


# ------------------------------------------------------------------------------------------------ the rule


def test_rule_in_numbers():
    v = 151_936
    budget = LogitsBudget.from_mb(256)
    assert budget.bytes == 256 * 2**20
    assert budget.plain_positions(v) == 256 * 2**20 // (v * PLAIN_LOGIT_BYTES) == 88
    assert budget.chunk_positions(v) == 256 * 2**20 // (v * CHUNK_LOGIT_BYTES) == 220
    assert budget.chunk_size(88, v) is None and budget.chunk_size(89, v) == 220
    assert budget.chunk_positions(v, low_precision=True) == 256 * 2**20 // (v * (CHUNK_LOGIT_BYTES + 2))
    assert LogitsBudget(1).chunk_size(1, v) == 1  # never below one position


@pytest.mark.parametrize("layout", [(False, False), (True, True)], ids=["plain", "pack+prefix"])
def test_auto_chunks_exactly_when_the_budget_is_exceeded(layout, chunk_calls):
    packing, prefix = layout
    model = tiny_llama(seed=3)
    batch = make_collate(0, packing=packing, prefix_sharing=prefix)(random_examples(4, 2, seed=5))
    p = positions(batch)
    fits = p * VOCAB * PLAIN_LOGIT_BYTES
    with torch.no_grad():
        make_logps_fn(packing=packing, prefix_sharing=prefix, chunk_size=LogitsBudget(fits))(model, batch)
        assert chunk_calls == []  # exactly at the budget: the plain path
        make_logps_fn(packing=packing, prefix_sharing=prefix, chunk_size=LogitsBudget(fits - 1))(model, batch)
    assert chunk_calls == [(fits - 1) // (VOCAB * CHUNK_LOGIT_BYTES)]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", [(False, False), (True, False), (True, True)], ids=["plain", "pack", "pack+prefix"])
@pytest.mark.parametrize("budget_positions", [10_000, 30, 7, 1], ids=["fits", "chunk30", "chunk7", "chunk1"])
def test_auto_equals_plain_in_both_regimes(tie, layout, budget_positions, chunk_calls):
    packing, prefix = layout
    model = tiny_llama(tie=tie, seed=4)
    examples = random_examples(5, 2, seed=7 + tie)
    weights = torch.randn(10, generator=torch.Generator().manual_seed(2))
    plain, g_plain = logps_and_grads(model, make_collate(0)(examples), forward_logps, weights)
    budget = LogitsBudget(budget_positions * VOCAB * CHUNK_LOGIT_BYTES)
    fast, g_fast = logps_and_grads(model, make_collate(0, packing=packing, prefix_sharing=prefix)(examples),
                                   make_logps_fn(packing=packing, prefix_sharing=prefix, chunk_size=budget), weights)
    assert chunk_calls == ([] if budget_positions == 10_000 else [budget_positions])
    torch.testing.assert_close(fast.sum, plain.sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.count, plain.count)
    assert_grads_close(g_fast, g_plain)


def test_chunk_size_zero_turns_it_off(chunk_calls):
    mode = LogpsMode(chunk_size=0, memory_budget_bytes=1)
    assert mode.logps_fn() is forward_logps and mode.chunking is None
    model = tiny_llama(seed=1)
    batch = make_collate(0)(random_examples(3, 2, seed=1))
    out = LogpsMode(packing=True, chunk_size=0, memory_budget_bytes=1).logps_fn()(
        model, make_collate(0, packing=True)(random_examples(3, 2, seed=1)))
    assert chunk_calls == []
    with torch.no_grad():
        torch.testing.assert_close(out.sum, forward_logps(model, batch).sum, rtol=1e-5, atol=1e-5)
    # a fixed size chunks every batch, however small
    LogpsMode(chunk_size=5).logps_fn()(model, batch)
    assert chunk_calls == [5]


def test_mode_from_config_and_its_key():
    auto = LogpsMode.from_config(DPOConfig())
    assert auto.chunk_size is None and auto.memory_budget_bytes == 256 * 2**20
    assert isinstance(auto.chunking, LogitsBudget)
    assert LogpsMode.from_config(DPOConfig(logps_chunk_size=0)).chunking is None
    assert LogpsMode.from_config(DPOConfig(logps_chunk_size=64)).chunking == 64
    assert LogpsMode.from_config(DPOConfig(logits_memory_mb=0.5)).memory_budget_bytes == 2**19
    assert LogpsMode.from_config(object()).chunking is None  # a config without the fields: off, as before
    keys = {LogpsMode().key, LogpsMode(memory_budget_bytes=2**20).key, LogpsMode(chunk_size=0).key,
            LogpsMode(chunk_size=64).key}
    assert len(keys) == 4 and LogpsMode().key == LogpsMode.from_config(DPOConfig()).key


@pytest.mark.parametrize("kw, field", [
    (dict(logps_chunk_size=-1), "logps_chunk_size"),
    (dict(logits_memory_mb=-1.0), "logits_memory_mb"),
    (dict(logits_memory_mb=0.0), "logits_memory_mb"),
])
def test_negative_budget_or_chunk_is_a_config_error_naming_the_field(kw, field, tmp_path):
    cfg = DPOConfig(model="m", data="d", output_dir=str(tmp_path), **kw)
    with pytest.raises(ConfigError, match=field):
        cfg.validate()
    with pytest.raises(ConfigError, match=field):
        LogpsMode.from_config(cfg)
    with pytest.raises(ConfigError, match="logps_chunk_size"):
        make_logps_fn(chunk_size=-4)


def test_describe_states_the_rule(chunk_calls):
    model = tiny_llama(seed=0)
    line = LogpsMode(memory_budget_bytes=2**20).describe(model, 4 * 2 * 64)
    assert line.startswith("log-probs: LM head in chunks of up to ")
    assert f"{2**20 // (VOCAB * CHUNK_LOGIT_BYTES):,} positions" in line and "exceed 1 MB" in line
    assert f"vocabulary {VOCAB}" in line and "always fits" in line
    assert "would need" in LogpsMode(memory_budget_bytes=1000).describe(model, 768)
    assert "chunking off" in LogpsMode(chunk_size=0).describe(model)
    assert "chunks of 32 positions" in LogpsMode(chunk_size=32).describe(model)


def test_dpo_run_with_a_tiny_budget_matches_chunking_off(tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    def run(name, **kw):
        train_dpo(DPOConfig(model=str(tiny_model_dir), data=str(synthetic_pairs), output_dir=str(tmp_path / name),
                            optimizer="adamw", lr=1e-3, warmup_steps=0, batch_size=4, micro_batch_size=4,
                            max_steps=3, max_length=96, max_prompt_length=48, progress=False,
                            cache_dir=str(tmp_path / "cache"), **kw))
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], capsys.readouterr().out

    off, out_off = run("off", logps_chunk_size=0)
    auto, out_auto = run("auto", logits_memory_mb=0.01)
    assert "chunking off" in out_off
    assert "log-probs: LM head in chunks of up to" in out_auto and "exceed 0.01 MB" in out_auto
    assert len(off) == len(auto) == 3 and max(abs(a - b) for a, b in zip(off, auto)) <= 1e-5
    assert len(list(Path(tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 2  # the rule is in the cache key


# ------------------------------------------------------------------------------- the kept last chunk


def _head_grads(n: int, chunk: int, keep: bool, bias: bool = True, transform=None, seed: int = 0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(16, 37, bias=bias)
    hidden = torch.randn(n, 16, requires_grad=True)
    targets = torch.randint(0, 37, (n,))
    w = torch.randn(n)
    out = chunked_token_logps(hidden, head, targets, chunk, transform, keep_last=keep)
    (out * w).sum().backward()
    grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    return out.detach(), grads


@pytest.mark.parametrize("n, chunk", [(10, 16), (10, 10), (10, 3), (10, 1), (1, 4)],
                         ids=["one-chunk", "exact", "ragged", "rows", "single-row"])
@pytest.mark.parametrize("transform", [None, torch.tanh], ids=["linear", "fallback"])
def test_kept_last_chunk_gives_identical_gradients(n, chunk, transform):
    out_k, g_k = _head_grads(n, chunk, keep=True, transform=transform)
    out_r, g_r = _head_grads(n, chunk, keep=False, transform=transform)
    assert torch.equal(out_k, out_r)
    for a, b in zip(g_k, g_r):
        assert torch.equal(a, b)
    # and both are the plain computation's gradients
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37)
    hidden = torch.randn(n, 16, requires_grad=True)
    targets = torch.randint(0, 37, (n,))
    w = torch.randn(n)
    logits = head(hidden) if transform is None else transform(head(hidden))
    (torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1) * w).sum().backward()
    for a, b in zip(g_k, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, chunk, recomputed_keep, recomputed_plain", [(10, 16, 0, 1), (10, 3, 3, 4), (9, 3, 2, 3)])
def test_kept_last_chunk_is_not_recomputed(n, chunk, recomputed_keep, recomputed_plain, monkeypatch):
    calls = {"n": 0, "count": False}
    real = F.linear

    def counting(*a, **k):
        if calls["count"]:
            calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    for keep, expected in ((True, recomputed_keep), (False, recomputed_plain)):
        torch.manual_seed(0)
        head = torch.nn.Linear(16, 37)
        hidden = torch.randn(n, 16, requires_grad=True)
        out = chunked_token_logps(hidden, head, torch.randint(0, 37, (n,)), chunk, keep_last=keep)
        calls.update(n=0, count=True)
        out.sum().backward()
        calls["count"] = False
        assert calls["n"] == expected


def test_kept_chunk_survives_a_second_backward_and_no_grad():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37)
    hidden = torch.randn(8, 16, requires_grad=True)
    targets = torch.randint(0, 37, (8,))
    out = chunked_token_logps(hidden, head, targets, 3, keep_last=True)
    out.sum().backward(retain_graph=True)
    first = head.weight.grad.clone()
    head.weight.grad = None
    out.sum().backward()  # the kept softmax was used up: this backward recomputes, same numbers
    assert torch.equal(head.weight.grad, first)
    with torch.no_grad():  # nothing is kept without a graph
        torch.testing.assert_close(chunked_token_logps(hidden, head, targets, 3, keep_last=True), out.detach())


def test_kept_last_chunk_under_bf16_autocast():
    outs = []
    for keep in (True, False):
        torch.manual_seed(0)
        head = torch.nn.Linear(16, 37)
        hidden = torch.randn(10, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = chunked_token_logps(hidden, head, torch.randint(0, 37, (10,)), 4, keep_last=keep)
        out.sum().backward()
        outs.append((out.detach(), hidden.grad, head.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
