"""The fast log-prob paths (packing, prefix sharing, chunked LM head, all combined) against the plain path.

Every fast path must give the plain path's per-response summed log-probs (1e-5) and parameter gradients (1e-4
relative), keep packed sequences from seeing each other, and leave a DPO run's loss trajectory unchanged.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from prefopt.config import DPOConfig
from prefopt.data import collate_preferences
from prefopt.data.types import TokenizedExample
from prefopt.errors import ConfigError
from prefopt.logprobs import (compute_logps, forward_logps, full_logits_logps, layout_logps, make_logps_fn,
                              naive_logps)
from prefopt.models import apply_lora, enable_gradient_checkpointing, reference_mode
from prefopt.packing import SEGMENT_ATTENTION, build_layout, layout_attention_mask, supports_segment_attention
from prefopt.train.dpo import live_reference, make_collate, precompute_reference, train_dpo

VOCAB = 101
# (packing, prefix_sharing, chunk_size): every fast mode
FAST_MODES = [
    (False, False, 7),
    (True, False, None),
    (False, True, None),
    (True, True, None),
    (True, False, 5),
    (False, True, 3),
    (True, True, 4),
]
MODE_IDS = [f"{'pack' if p else ''}{'+prefix' if s else ''}{f'+chunk{c}' if c else ''}".strip("+")
            for p, s, c in FAST_MODES]


def tiny_llama(tie: bool = True, seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      tie_word_embeddings=tie, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # untied heads start equal to the embeddings otherwise; make them differ
        if not tie:
            model.lm_head.weight.normal_(0, 0.2)
    return model


def random_examples(n: int, k: int, seed: int = 0, max_prompt: int = 11, max_resp: int = 9) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, max_prompt))]
        responses = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(1, max_resp))] for _ in range(k)]
        out.append(TokenizedExample(prompt, responses, source=f"rand[{i}]"))
    return out


def batch_for(examples, packing: bool, prefix_sharing: bool) -> dict:
    return make_collate(0, packing=packing, prefix_sharing=prefix_sharing)(examples)


def logps_and_grads(model, batch, fn, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch)
    (out.sum * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_grads_close(fast: dict, plain: dict, rel: float = 1e-4) -> None:
    assert fast.keys() == plain.keys()
    for name, g in plain.items():
        err = (fast[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err <= rel, f"{name}: relative gradient error {err:.2e}"


# ------------------------------------------------------------------------------------------------- values + grads


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("mode", FAST_MODES, ids=MODE_IDS)
def test_fast_path_equals_plain(mode, k, tie):
    packing, prefix, chunk = mode
    model = tiny_llama(tie=tie, seed=k)
    examples = random_examples(5, k, seed=10 * k + tie)
    weights = torch.randn(5 * k, generator=torch.Generator().manual_seed(1))
    plain, g_plain = logps_and_grads(model, batch_for(examples, False, False), forward_logps, weights)
    fast, g_fast = logps_and_grads(model, batch_for(examples, packing, prefix),
                                   make_logps_fn(packing=packing, prefix_sharing=prefix, chunk_size=chunk), weights)
    torch.testing.assert_close(fast.sum, plain.sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.count, plain.count)
    assert_grads_close(g_fast, g_plain)


@pytest.mark.parametrize("mode", FAST_MODES, ids=MODE_IDS)
def test_fast_path_equals_plain_with_a_sliding_window(mode):
    """A sliding-window model (every layer windowed, sequences up to 20 tokens against a window of 4): the layouts
    give each layer the block mask AND the window over position ids, so they still equal the plain path."""
    from transformers import MistralConfig, MistralForCausalLM

    packing, prefix, chunk = mode
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             sliding_window=4)).float()
    examples = random_examples(4, 2, seed=21)
    weights = torch.randn(8, generator=torch.Generator().manual_seed(5))
    plain, g_plain = logps_and_grads(model, batch_for(examples, False, False), forward_logps, weights)
    fast, g_fast = logps_and_grads(model, batch_for(examples, packing, prefix),
                                   make_logps_fn(packing=packing, prefix_sharing=prefix, chunk_size=chunk), weights)
    torch.testing.assert_close(fast.sum, plain.sum, rtol=1e-5, atol=1e-5)
    assert_grads_close(g_fast, g_plain)


def test_plain_path_is_the_naive_definition():
    """Anchor: the reference the fast paths are compared with is itself right (one unpadded sequence at a time)."""
    model = tiny_llama()
    examples = random_examples(3, 3, seed=4)
    with torch.no_grad():
        out = compute_logps(model, batch_for(examples, True, True), packing=True, prefix_sharing=True, chunk_size=4)
    b = len(examples)
    for i, ex in enumerate(examples):
        for r, resp in enumerate(ex.response_ids):
            assert float(out.sum[r * b + i]) == pytest.approx(naive_logps(model, ex.prompt_ids, resp), abs=1e-4)


def test_first_response_token_is_predicted_by_last_prompt_position():
    ex = TokenizedExample([5, 6, 7], [[8, 9], [10, 11, 12]])
    lay = build_layout([ex], packing=True, prefix_sharing=True)
    # row: 5 6 7 | 8 9 | 10 11 12 ; positions continue from the prompt length in each response
    assert lay["layout_input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert lay["layout_position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    kept = lay["layout_keep"].view(-1).nonzero().view(-1)
    src = kept[lay["layout_pick"]].tolist()
    assert list(zip(src, lay["layout_targets"].tolist(), lay["layout_rows"].tolist())) == [
        (2, 8, 0), (3, 9, 0), (2, 10, 1), (5, 11, 1), (6, 12, 1)]
    # response 2 sees the prompt and itself, not response 1
    allowed = layout_attention_mask(lay, "sdpa", torch.float32)[0, 0]
    assert allowed[6].tolist() == [True, True, True, False, False, True, True, False]


def test_packing_has_no_pad_tokens_and_restarts_positions():
    examples = random_examples(4, 2, seed=3)
    lay = build_layout(examples, packing=True, prefix_sharing=False)
    plain = collate_preferences(examples, 0)
    assert lay["layout_input_ids"].shape == (1, int(plain["attention_mask"].sum()))
    pos = lay["layout_position_ids"][0]
    assert int((pos == 0).sum()) == 8  # one start per sequence
    shared = build_layout(examples, packing=True, prefix_sharing=True)
    assert shared["layout_input_ids"].shape[1] < lay["layout_input_ids"].shape[1]  # prompts computed once


@pytest.mark.parametrize("attention", ["segments", "mask"])
@pytest.mark.parametrize("prefix", [False, True], ids=["packed", "packed+prefix"])
def test_packed_sequences_never_see_each_other(prefix, attention):
    model = tiny_llama(seed=3)
    examples = random_examples(4, 3, seed=7)
    b = len(examples)

    def fn(m, batch):
        return layout_logps(m, batch, None, attention)

    with torch.no_grad():
        before = fn(model, batch_for(examples, True, prefix)).sum
        # change the prompt of example 1: only its K responses may move
        examples[1].prompt_ids = [(t + 17) % (VOCAB - 4) + 4 for t in examples[1].prompt_ids]
        after = fn(model, batch_for(examples, True, prefix)).sum
        touched = torch.tensor([r * b + 1 for r in range(3)])
        others = torch.tensor([i for i in range(3 * b) if i not in touched.tolist()])
        torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
        assert (after[touched] - before[touched]).abs().min() > 1e-3
        # change response 0 of example 2 (not its last token, so the change is seen by a later prediction)
        examples[2].response_ids[0] = [(t + 5) % (VOCAB - 4) + 4 for t in examples[2].response_ids[0][:-1]] + \
            examples[2].response_ids[0][-1:]
        after2 = fn(model, batch_for(examples, True, prefix)).sum
        row = 0 * b + 2
        rest = torch.tensor([i for i in range(3 * b) if i != row])
        torch.testing.assert_close(after2[rest], after[rest], rtol=0, atol=1e-6)
        assert abs(float(after2[row] - after[row])) > 1e-3


@pytest.mark.parametrize("layout", [(True, False), (False, True), (True, True)], ids=["packed", "prefix", "both"])
@pytest.mark.parametrize("k", [2, 3])
def test_segment_attention_and_row_mask_both_equal_plain(layout, k):
    """The two ways a layout's attention runs: group by group (the default for sdpa models) and one mask per row."""
    model = tiny_llama(seed=k + 20)
    examples = random_examples(6, k, seed=k + 30, max_prompt=14)
    weights = torch.randn(6 * k, generator=torch.Generator().manual_seed(3))
    plain, g_plain = logps_and_grads(model, batch_for(examples, False, False), full_logits_logps, weights)
    for attention in ("segments", "segments without spans", "mask"):
        batch = batch_for(examples, *layout)
        if attention == "segments without spans":  # group boundaries read back from the segment ids instead
            del batch["layout_spans"]
        fast, g_fast = logps_and_grads(model, batch, lambda m, b: layout_logps(m, b, None, attention.split()[0]),
                                       weights)
        torch.testing.assert_close(fast.sum, plain.sum, rtol=1e-5, atol=1e-5)
        assert_grads_close(g_fast, g_plain)


def test_segment_attention_is_sdpa_outside_layouts(tmp_path):
    """After a layout forward switches the model to segment attention, ordinary forwards are unchanged, the saved
    config does not name it, and models it cannot serve fall back to the row mask."""
    model = tiny_llama(seed=4)
    examples = random_examples(3, 2, seed=1)
    with torch.no_grad():
        before = model(input_ids=batch_for(examples, False, False)["input_ids"],
                       attention_mask=batch_for(examples, False, False)["attention_mask"]).logits
        layout_logps(model, batch_for(examples, True, True))
        assert model.config._attn_implementation == SEGMENT_ATTENTION
        after = model(input_ids=batch_for(examples, False, False)["input_ids"],
                      attention_mask=batch_for(examples, False, False)["attention_mask"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert SEGMENT_ATTENTION not in (tmp_path / "config.json").read_text()
    assert supports_segment_attention(model)
    assert not supports_segment_attention(tiny_llama(attn="eager"))
    windowed = tiny_llama()
    windowed.config.sliding_window = 4
    assert not supports_segment_attention(windowed)


def test_eager_attention_gets_an_additive_mask():
    model = tiny_llama(attn="eager")
    examples = random_examples(3, 2, seed=5)
    with torch.no_grad():
        plain = forward_logps(model, batch_for(examples, False, False)).sum
        fast = compute_logps(model, batch_for(examples, True, True), packing=True, prefix_sharing=True).sum
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_flash_attention_packs_by_positions_and_refuses_prefix_sharing():
    examples = random_examples(2, 2)
    assert layout_attention_mask(build_layout(examples, packing=True, prefix_sharing=False),
                                 "flash_attention_2", torch.bfloat16) is None
    with pytest.raises(ValueError, match="prefix sharing"):
        layout_attention_mask(build_layout(examples, packing=True, prefix_sharing=True), "flash_attention_2",
                              torch.bfloat16)


def test_mode_needs_matching_layout():
    model = tiny_llama()
    batch = batch_for(random_examples(2, 2), False, False)
    with pytest.raises(ValueError, match="layout 'packed'"):
        compute_logps(model, batch, packing=True)
    with pytest.raises(ConfigError, match="logps_chunk_size"):
        make_logps_fn(chunk_size=-1)
    assert make_logps_fn() is forward_logps


# --------------------------------------------------------------------------------------- training switches


@pytest.mark.parametrize("mode", [(True, True, 4), (True, False, None), (False, False, 6)],
                         ids=["all", "pack", "chunk"])
def test_fast_paths_with_gradient_checkpointing(mode):
    packing, prefix, chunk = mode
    examples = random_examples(4, 2, seed=8)
    weights = torch.randn(8, generator=torch.Generator().manual_seed(2))
    model = tiny_llama(seed=5)
    plain, g_plain = logps_and_grads(model, batch_for(examples, False, False), forward_logps, weights)
    enable_gradient_checkpointing(model)
    model.train()
    assert model.model.gradient_checkpointing
    fast, g_fast = logps_and_grads(model, batch_for(examples, packing, prefix),
                                   make_logps_fn(packing=packing, prefix_sharing=prefix, chunk_size=chunk), weights)
    torch.testing.assert_close(fast.sum, plain.sum, rtol=1e-5, atol=1e-5)
    assert_grads_close(g_fast, g_plain)


def test_fast_paths_under_bf16_autocast():
    """Mixed precision: the chunked head runs its matmuls in bf16 like the plain head (same tolerance class)."""
    examples = random_examples(4, 2, seed=9)
    weights = torch.ones(8)
    model = tiny_llama(seed=6)
    with torch.no_grad():
        exact = forward_logps(model, batch_for(examples, False, False)).sum
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, g_plain = logps_and_grads(model, batch_for(examples, False, False), forward_logps, weights)
        fast, g_fast = logps_and_grads(model, batch_for(examples, True, True),
                                       make_logps_fn(packing=True, prefix_sharing=True, chunk_size=4), weights)
    plain_err = (plain.sum - exact).abs().max()
    assert plain_err > 0  # autocast was really on
    assert (fast.sum - exact).abs().max() <= 4 * plain_err + 0.05
    for name, g in g_plain.items():
        assert g_fast[name].dtype == g.dtype == torch.float32
        assert (g_fast[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name


def test_fast_paths_on_a_lora_model_and_its_adapter_reference():
    model = apply_lora(tiny_llama(seed=2), r=4, alpha=8)
    with torch.no_grad():  # non-zero adapters, so adapters-on and adapters-off differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    examples = random_examples(4, 3, seed=11)
    weights = torch.randn(12, generator=torch.Generator().manual_seed(3))
    fn = make_logps_fn(packing=True, prefix_sharing=True, chunk_size=5)
    plain, g_plain = logps_and_grads(model, batch_for(examples, False, False), forward_logps, weights)
    fast, g_fast = logps_and_grads(model, batch_for(examples, True, True), fn, weights)
    torch.testing.assert_close(fast.sum, plain.sum, rtol=1e-5, atol=1e-5)
    assert g_plain and all("lora" in n for n in g_plain)
    assert_grads_close(g_fast, g_plain)
    with torch.no_grad(), reference_mode(model):
        ref_plain = forward_logps(model, batch_for(examples, False, False)).sum
        ref_fast = fn(model, batch_for(examples, True, True)).sum
    torch.testing.assert_close(ref_fast, ref_plain, rtol=1e-5, atol=1e-5)
    assert (ref_plain - plain.sum).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ DPO runs


def _cfg(model: Path, data: Path, out: Path, **kw) -> DPOConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), optimizer="adamw", lr=1e-3, warmup_steps=0,
                batch_size=8, micro_batch_size=4, max_steps=4, max_length=96, max_prompt_length=48, progress=False)
    base.update(kw)
    return DPOConfig(**base)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_dpo_run_with_all_fast_paths_matches_plain(tiny_model_dir, synthetic_pairs, tmp_path):
    """20 steps: the plain path with a live reference against every fast path with the precomputed reference."""
    train_dpo(_cfg(tiny_model_dir, synthetic_pairs, tmp_path / "plain", max_steps=20, precompute_ref=False))
    train_dpo(_cfg(tiny_model_dir, synthetic_pairs, tmp_path / "fast", max_steps=20, packing=True,
                   prefix_sharing=True, logps_chunk_size=16, cache_dir=str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").glob("ref-logps-*"))) == 1
    plain, fast = _losses(tmp_path / "plain"), _losses(tmp_path / "fast")
    assert len(plain) == len(fast) == 20
    assert plain[-1] < plain[0]  # it trained, so the trajectories are worth comparing
    assert max(abs(a - b) for a, b in zip(plain, fast)) <= 1e-5


def test_ranked_plackett_luce_run_with_fast_paths_matches_plain(tiny_model_dir, tmp_path):
    from prefopt.data import make_synthetic_preferences, write_jsonl

    data = write_jsonl(make_synthetic_preferences(16, seed=1, num_responses=3), tmp_path / "ranked.jsonl")
    kw = dict(loss="plackett_luce", batch_size=4, micro_batch_size=4, max_steps=3)
    train_dpo(_cfg(tiny_model_dir, data, tmp_path / "plain", **kw))
    train_dpo(_cfg(tiny_model_dir, data, tmp_path / "fast", packing=True, prefix_sharing=True, logps_chunk_size=8,
                   **kw))
    plain, fast = _losses(tmp_path / "plain"), _losses(tmp_path / "fast")
    assert len(plain) == 3 and max(abs(a - b) for a, b in zip(plain, fast)) <= 1e-5


def test_precompute_cache_is_read_back_and_invalidated(tmp_path):
    acc = Accelerator(cpu=True)
    model = tiny_llama(seed=1)
    examples = random_examples(6, 2, seed=12)
    fast = make_logps_fn(packing=True, prefix_sharing=True, chunk_size=4)
    collate = make_collate(0, packing=True, prefix_sharing=True)
    from prefopt.models import model_fingerprint

    def run(m, items, ref=None):
        return precompute_reference(ref or live_reference(m, fast), m, items, collate, micro_batch_size=4,
                                    accelerator=acc, cache_dir=tmp_path, model_key=model_fingerprint(m),
                                    progress=False)

    logps, path, cached = run(model, examples)
    assert not cached and path.is_file() and logps.shape == (6, 2)
    # the cached values are the plain reference log-probs
    with torch.no_grad():
        plain = forward_logps(model, collate_preferences(examples, 0)).by_example(2).sum
    torch.testing.assert_close(logps, plain, rtol=1e-5, atol=1e-5)

    def boom(policy, batch):
        raise AssertionError("the cache should have been read")

    again, path2, cached2 = run(model, examples, ref=boom)
    assert cached2 and path2 == path and torch.equal(again, logps)

    changed = tiny_llama(seed=1)
    with torch.no_grad():
        changed.model.norm.weight.add_(0.01)
    _, path3, cached3 = run(changed, examples)
    assert not cached3 and path3 != path

    other = random_examples(6, 2, seed=12)
    other[3].response_ids[1] = other[3].response_ids[1] + [7]
    _, path4, cached4 = run(model, other)
    assert not cached4 and path4 not in (path, path3)


def test_precompute_run_reads_cache_on_second_run(tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    kw = dict(precompute_ref=True, cache_dir=str(tmp_path / "cache"), packing=True, prefix_sharing=True,
              logps_chunk_size=16, max_steps=2, eval_fraction=0.25)
    train_dpo(_cfg(tiny_model_dir, synthetic_pairs, tmp_path / "a", **kw))
    assert "computed and cached" in capsys.readouterr().out
    train_dpo(_cfg(tiny_model_dir, synthetic_pairs, tmp_path / "b", **kw))
    assert "read from cache" in capsys.readouterr().out
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 1


class _ScaledLogitsLlama(LlamaForCausalLM):
    """An architecture whose forward post-processes the head's logits in a way prefopt does not know about."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_unknown_logit_processing_falls_back_to_the_models_own_logits():
    from prefopt.logprobs import head_at_selected_positions

    torch.manual_seed(0)
    model = _ScaledLogitsLlama(tiny_llama().config)
    assert not head_at_selected_positions(model)  # the one-off check sees head(hidden) != the model's logits
    assert head_at_selected_positions(tiny_llama())
    examples = random_examples(4, 2, seed=2)
    weights = torch.randn(8, generator=torch.Generator().manual_seed(0))
    full, g_full = logps_and_grads(model, batch_for(examples, False, False), full_logits_logps, weights)
    for packing, prefix, chunk in [(False, False, None), (False, False, 4), (True, True, None), (True, True, 4)]:
        fn = make_logps_fn(packing=packing, prefix_sharing=prefix, chunk_size=chunk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast, g_fast = logps_and_grads(model, batch_for(examples, packing, prefix), fn, weights)
        torch.testing.assert_close(fast.sum, full.sum, rtol=1e-5, atol=1e-5)
        assert_grads_close(g_fast, g_full)


def test_segment_attention_is_registered_on_import_and_refused_where_unsupported():
    from transformers import AttentionInterface

    assert SEGMENT_ATTENTION in AttentionInterface._global_mapping  # a switched (e.g. unpickled) model still runs
    model = tiny_llama(attn="eager")
    with pytest.raises(ValueError, match="segment attention"):
        layout_logps(model, batch_for(random_examples(2, 2), True, False), None, "segments")
    assert model.config._attn_implementation == "eager"  # refused before anything was switched


def test_precompute_cache_is_not_shared_between_log_prob_modes(tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    """The cache key names the log-prob mode: a plain run never reads what a packed run wrote (last-bit
    differences between layouts stay within each mode)."""
    kw = dict(precompute_ref=True, cache_dir=str(tmp_path / "cache"), max_steps=1)
    train_dpo(_cfg(tiny_model_dir, synthetic_pairs, tmp_path / "packed", packing=True, **kw))
    assert "computed and cached" in capsys.readouterr().out
    train_dpo(_cfg(tiny_model_dir, synthetic_pairs, tmp_path / "plain", **kw))
    assert "computed and cached" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 2
