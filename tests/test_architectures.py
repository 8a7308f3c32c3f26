"""The architecture matrix: every log-prob path on tiny models of many transformers architectures.

Each model is built from its transformers config (seeded, fp32, 2 layers, never from the hub) and every path --
plain, full logits, chunked, and the packed / prefix-shared / both layouts with segment attention and with the row
mask -- must equal unpadded single-sequence forwards in values (1e-5) and parameter gradients (1e-4 relative), or
be refused up front with a ConfigError naming the reason. The sequences are longer than the sliding windows (up to
19 tokens against windows of 4-6), with different lengths per example, so a layer that attends past its window
changes the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

import pytest
import torch
import transformers

from prefopt.data import collate_preferences
from prefopt.data.types import TokenizedExample
from prefopt.errors import ConfigError
from prefopt.logprobs import ResponseLogps, compute_logps, forward_logps, full_logits_logps, layout_logps
from prefopt.packing import (FULL_ATTENTION, SLIDING_ATTENTION, LayoutSupport, allowed_attention, build_layout,
                             check_layout_support, layout_attention_masks, supports_segment_attention)

VOCAB = 160
LAYER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64)
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    config: str  # transformers config class name
    model: str  # transformers causal-LM class name
    kwargs: dict
    attn: str | None = None  # attn_implementation (None: the model's default)
    refused: str | None = None  # regex the layouts' ConfigError must match (None: the layouts must be exact)
    window: int | None = None  # the sliding window the layouts must honour

    @property
    def id(self) -> str:
        return self.name + (f"-{self.attn}" if self.attn else "")


ARCHS = [
    Arch("llama", "LlamaConfig", "LlamaForCausalLM", dict(LAYER, tie_word_embeddings=False)),
    Arch("llama", "LlamaConfig", "LlamaForCausalLM", dict(LAYER, tie_word_embeddings=False), attn="eager"),
    Arch("qwen2-tied", "Qwen2Config", "Qwen2ForCausalLM", dict(LAYER, tie_word_embeddings=True)),
    Arch("qwen2-sliding", "Qwen2Config", "Qwen2ForCausalLM",  # layer 0 full, layer 1 sliding
         dict(LAYER, use_sliding_window=True, sliding_window=5, max_window_layers=1), window=5),
    Arch("qwen2-sliding", "Qwen2Config", "Qwen2ForCausalLM",
         dict(LAYER, use_sliding_window=True, sliding_window=5, max_window_layers=1), attn="eager", window=5),
    Arch("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(LAYER, head_dim=8)),
    Arch("qwen3-sliding", "Qwen3Config", "Qwen3ForCausalLM",  # both layers sliding
         dict(LAYER, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=0), window=4),
    Arch("mistral", "MistralConfig", "MistralForCausalLM", dict(LAYER, sliding_window=6), window=6),
    Arch("mistral", "MistralConfig", "MistralForCausalLM", dict(LAYER, sliding_window=6), attn="eager", window=6),
    Arch("gemma2", "Gemma2Config", "Gemma2ForCausalLM",  # eager only; attention and final logit soft-capping
         dict(LAYER, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
              query_pre_attn_scalar=8), window=4),
    Arch("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
         dict(LAYER, head_dim=8, sliding_window=5, layer_types=[SLIDING_ATTENTION, FULL_ATTENTION],
              query_pre_attn_scalar=8), window=5),
    Arch("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
         dict(LAYER, head_dim=8, sliding_window=5, layer_types=[SLIDING_ATTENTION, FULL_ATTENTION],
              query_pre_attn_scalar=8), attn="eager", window=5),
    Arch("phi3", "Phi3Config", "Phi3ForCausalLM", dict(LAYER, sliding_window=6, **SPECIAL), window=6),
    Arch("phi3", "Phi3Config", "Phi3ForCausalLM", dict(LAYER, sliding_window=6, **SPECIAL), attn="eager", window=6),
    Arch("gpt2", "GPT2Config", "GPT2LMHeadModel",  # learned absolute positions
         dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    Arch("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)),
    Arch("olmo2", "Olmo2Config", "Olmo2ForCausalLM", dict(LAYER, **SPECIAL)),
    Arch("cohere", "CohereConfig", "CohereForCausalLM", dict(LAYER, logit_scale=0.5, **SPECIAL)),
    Arch("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
         dict(LAYER, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
              num_experts_per_tok=2)),
    Arch("mixtral-sliding", "MixtralConfig", "MixtralForCausalLM",
         dict(LAYER, num_local_experts=4, num_experts_per_tok=2, sliding_window=6), window=6),
    Arch("bloom", "BloomConfig", "BloomForCausalLM",
         dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
         refused="ALiBi"),
    Arch("falcon-alibi", "FalconConfig", "FalconForCausalLM",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
              new_decoder_architecture=False, multi_query=True), refused="ALiBi"),
    Arch("gpt_neo-local", "GPTNeoConfig", "GPTNeoForCausalLM",  # local layers via a column-indexed causal buffer
         dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
              window_size=4, max_position_embeddings=64, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0),
         refused="local attention"),
]
ARCH_IDS = [a.id for a in ARCHS]
ARCH_BY_ID = dict(zip(ARCH_IDS, ARCHS))
assert len(ARCH_BY_ID) == len(ARCHS)

# (prompt length, [response lengths]) per example: prompts and responses longer and shorter than every window,
# a one-token response (predicted by the last prompt position alone), totals up to 19 tokens
SHAPES = {2: [(9, [8, 2]), (3, [5, 9]), (6, [1, 7])],
          3: [(7, [9, 3, 6]), (2, [4, 10, 1])]}

LAYOUTS = {"packed": (True, False), "prefix": (False, True), "packed+prefix": (True, True)}
PATHS = (["plain", "full_logits", "chunked"]
         + [f"{lay}/{att}" for lay in LAYOUTS for att in ("auto", "segments", "mask")]
         + ["packed+prefix/auto+chunk3"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two and does not fight the other test processes for the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def build_model(arch: Arch, seed: int = 0) -> torch.nn.Module:
    cfg_cls = getattr(transformers, arch.config, None)
    model_cls = getattr(transformers, arch.model, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"{arch.config} / {arch.model} not in transformers {transformers.__version__}")
    kw = dict(arch.kwargs)
    if arch.attn:
        kw["attn_implementation"] = arch.attn
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(cfg).float()
    with torch.no_grad():  # an untied head that differs from the embeddings
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            out.weight.normal_(0, 0.2)
    return model.eval()  # no dropout; gradients still flow


def make_examples(k: int, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    return [TokenizedExample([rng.randrange(4, VOCAB) for _ in range(p)],
                             [[rng.randrange(4, VOCAB) for _ in range(n)] for n in rs], source=f"ex[{i}]")
            for i, (p, rs) in enumerate(SHAPES[k])]


def collate(examples, packing: bool, prefix_sharing: bool) -> dict:
    """What ``prefopt.train.dpo.make_collate(0, packing=..., prefix_sharing=...)`` makes (plain rows + layout)."""
    batch = collate_preferences(list(examples), 0)
    if packing or prefix_sharing:
        batch.update(build_layout(list(examples), packing=packing, prefix_sharing=prefix_sharing, pad_token_id=0))
    return batch


def weights_for(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(7))


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


_REFERENCE: dict = {}


def unpadded_reference(arch: Arch, k: int):
    """Per-response summed log-probs [K*B] and the gradients of their weighted sum, each sequence ``prompt +
    response`` run alone: no padding, no mask, no position ids (the definition every path must reproduce)."""
    key = (arch.id, k)
    if key not in _REFERENCE:
        model = build_model(arch)
        examples = make_examples(k)
        b, w = len(examples), weights_for(k * len(examples))
        sums = torch.zeros(k * b)
        model.zero_grad(set_to_none=True)
        for i, ex in enumerate(examples):
            for r, resp in enumerate(ex.response_ids):
                ids = torch.tensor([ex.prompt_ids + resp])
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
                t = torch.arange(len(ex.prompt_ids), ids.shape[1])
                total = logp[t - 1, ids[0, t]].sum()
                (w[r * b + i] * total).backward()
                sums[r * b + i] = total.detach()
        _REFERENCE[key] = (sums, grads_of(model))
    return _REFERENCE[key]


def run_path(model, path: str, examples) -> ResponseLogps:
    if path == "plain":
        return forward_logps(model, collate(examples, False, False))
    if path == "full_logits":
        return full_logits_logps(model, collate(examples, False, False))
    if path == "chunked":
        return compute_logps(model, collate(examples, False, False), chunk_size=3)
    layout, attention = path.split("/")
    packing, prefix = LAYOUTS[layout]
    batch = collate(examples, packing, prefix)
    if attention == "auto+chunk3":
        return compute_logps(model, batch, packing=packing, prefix_sharing=prefix, chunk_size=3)
    return layout_logps(model, batch, None, attention)


def assert_matches_reference(model, out, arch: Arch, k: int) -> None:
    ref, ref_grads = unpadded_reference(arch, k)
    torch.testing.assert_close(out.sum.detach(), ref, rtol=1e-5, atol=1e-5)
    model.zero_grad(set_to_none=True)
    (out.sum * weights_for(ref.numel())).sum().backward()
    got = grads_of(model)
    assert got.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        err = float((got[name] - g).norm())
        assert err <= 1e-4 * float(g.norm()) + 1e-7, f"{name}: gradient error {err:.2e} (norm {float(g.norm()):.2e})"


def expected_outcome(arch: Arch, model, path: str) -> str:
    """"exact", "refused" (the layouts' ConfigError) or "no-segments" (ValueError: this model runs the row mask)."""
    if "/" not in path:
        return "exact"
    if arch.refused:
        return "refused"
    if path.endswith("/segments") and not supports_segment_attention(model):
        return "no-segments"
    return "exact"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_path_equals_unpadded_forwards(arch_id, path):
    arch = ARCH_BY_ID[arch_id]
    model = build_model(arch)
    examples = make_examples(2)
    outcome = expected_outcome(arch, model, path)
    if outcome == "refused":
        with pytest.raises(ConfigError, match=arch.refused) as err:
            run_path(model, path, examples)
        assert type(model).__name__ in str(err.value)
        return
    if outcome == "no-segments":  # auto takes the row mask instead (its own case)
        with pytest.raises(ValueError, match="cannot run segment attention"):
            run_path(model, path, examples)
        return
    assert_matches_reference(model, run_path(model, path, examples), arch, 2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch_id", [a.id for a in ARCHS if not a.refused])
def test_three_responses(arch_id, layout):
    """K=3: the prefix-shared group holds three branches; each sees the prompt and itself only, within the window."""
    arch = ARCH_BY_ID[arch_id]
    model = build_model(arch)
    assert_matches_reference(model, run_path(model, f"{layout}/auto", make_examples(3)), arch, 3)


@pytest.mark.parametrize("arch_id", [a.id for a in ARCHS if a.window])
def test_windowed_layout_mask_per_layer_type(arch_id):
    """What the check decides for the windowed models: which layer types get the window, and one mask or a dict."""
    arch = ARCH_BY_ID[arch_id]
    model = build_model(arch)
    support = check_layout_support(model, "packed+prefix")
    assert isinstance(support, LayoutSupport) and support.windowed
    layer_types = getattr(model.config, "layer_types", None)
    expected = {t: (arch.window if t == SLIDING_ATTENTION else None) for t in (layer_types or [SLIDING_ATTENTION])}
    if arch.model in ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"):  # one mask, every layer windowed
        expected = {SLIDING_ATTENTION: arch.window}
    assert support.layer_windows == expected
    assert not supports_segment_attention(model)
    batch = collate(make_examples(2), True, True)
    masks = layout_attention_masks(batch, model.config._attn_implementation, torch.float32, support)
    assert isinstance(masks, dict) == (len(set(expected.values())) > 1)


@pytest.mark.parametrize("layout", [None, *LAYOUTS])
def test_batches_are_the_trainers_batches(layout):
    """The matrix's batches are exactly what the DPO trainer's collate makes."""
    try:
        from prefopt.train.dpo import make_collate
    except ImportError as e:  # the trainer is being restructured; the layouts themselves are what is tested here
        pytest.skip(f"prefopt.train.dpo.make_collate not importable: {e}")
    flags = LAYOUTS.get(layout, (False, False))
    mine, theirs = collate(make_examples(3), *flags), make_collate(0, packing=flags[0], prefix_sharing=flags[1])(
        make_examples(3))
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]) if isinstance(value, torch.Tensor) else value == theirs[key], key


def test_window_counts_position_ids_not_columns():
    """A response token's distance to the prompt is its position distance: the other responses laid between
    them in the row do not push the prompt out of its window, and its own earlier tokens fall out as they would."""
    ex = TokenizedExample([5, 6, 7], [[8, 9, 10], [11, 12, 13]])
    lay = build_layout([ex], packing=False, prefix_sharing=True)
    # row: 5 6 7 | 8 9 10 | 11 12 13, positions 0 1 2 | 3 4 5 | 3 4 5
    allowed = allowed_attention(lay["layout_segment_ids"], lay["layout_branch_ids"], lay["layout_position_ids"],
                                window=3)[0]
    # token 12 (column 7, position 4) with window 3 sees positions 2..4: prompt token 7 (column 2), 11 and itself
    assert allowed[7].tolist() == [False, False, True, False, False, False, True, True, False]
    # token 10 (column 5, position 5): 9 and itself and token 8 (positions 3..5), no prompt token
    assert allowed[5].tolist() == [False, False, False, True, True, True, False, False, False]
    # transformers' convention (masking_utils.sliding_window_overlay): kv > q - window, i.e. q - kv < window
    full = allowed_attention(lay["layout_segment_ids"], lay["layout_branch_ids"])[0]
    assert full[7].tolist() == [True, True, True, False, False, False, True, True, False]


def test_layout_mask_matches_transformers_sliding_mask_on_one_sequence():
    """On a single unshared sequence the layout's sliding mask is exactly transformers' own (same window bound)."""
    from transformers import MistralConfig
    from transformers.masking_utils import create_sliding_window_causal_mask

    cfg = MistralConfig(**LAYER, sliding_window=4)
    cfg._attn_implementation = "sdpa"
    n = 13
    theirs = create_sliding_window_causal_mask(config=cfg, inputs_embeds=torch.zeros(1, n, 32),
                                               attention_mask=torch.ones(1, n, dtype=torch.long), cache=None,
                                               position_ids=torch.arange(n)[None], allow_is_causal_skip=False)
    lay = build_layout([TokenizedExample(list(range(4, 4 + n - 1)), [[99]])], packing=True, prefix_sharing=False)
    mine = allowed_attention(lay["layout_segment_ids"], lay["layout_branch_ids"], lay["layout_position_ids"], 4)
    assert torch.equal(mine[0], theirs[0, 0])


def test_refusals_name_the_model_and_come_before_any_compute():
    bloom = build_model(next(a for a in ARCHS if a.name == "bloom"))
    with pytest.raises(ConfigError, match=r"BloomForCausalLM .*ALiBi"):
        check_layout_support(bloom)
    # a FlashAttention model with a window: refused (the kernel applies the window; unverified here), checked from
    # the config alone (nothing runs on a CPU without flash-attn)
    mistral = build_model(next(a for a in ARCHS if a.name == "mistral"))
    mistral.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="MistralForCausalLM.*sliding window"):
        check_layout_support(mistral, "packed")
    llama = build_model(ARCHS[0])
    llama.config._attn_implementation = "flash_attention_2"
    assert check_layout_support(llama, "packed").layer_windows == {FULL_ATTENTION: None}
    with pytest.raises(ConfigError, match="prefix sharing"):
        check_layout_support(llama, "packed+prefix")
    # an unknown layer type
    qwen = build_model(next(a for a in ARCHS if a.name == "qwen2-sliding"))
    qwen.config.layer_types = [FULL_ATTENTION, "chunked_attention"]
    with pytest.raises(ConfigError, match=re.escape("['chunked_attention']")):
        check_layout_support(qwen)
    # attention sinks
    sink = build_model(ARCHS[0])
    sink.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError, match="sinks"):
        layout_logps(sink, collate(make_examples(2), True, False))


def test_plain_forward_still_exact_after_layout_forwards():
    """A windowed model's ordinary forward is untouched by layout forwards (no switched implementation)."""
    arch = next(a for a in ARCHS if a.name == "gemma3" and a.attn is None)
    model = build_model(arch)
    examples = make_examples(2)
    with torch.no_grad():
        before = forward_logps(model, collate(examples, False, False)).sum
        layout_logps(model, collate(examples, True, True))
        after = forward_logps(model, collate(examples, False, False)).sum
    assert torch.equal(before, after)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flex_block_mask_is_the_dense_mask(layout, window):
    """flex_attention gets a BlockMask per layer type; its mask_mod allows exactly what the dense masks allow."""
    from prefopt.packing import layout_attention_mask

    batch = collate(make_examples(3), *LAYOUTS[layout])
    block = layout_attention_mask(batch, "flex_attention", torch.float32, window)
    rows, L = batch["layout_segment_ids"].shape
    b, q, kv = torch.arange(rows)[:, None, None], torch.arange(L)[None, :, None], torch.arange(L)[None, None, :]
    dense = block.mask_mod(b, torch.zeros((), dtype=torch.long), q, kv)
    assert torch.equal(dense, layout_attention_mask(batch, "sdpa", torch.float32, window)[:, 0])


_FLEX_SCRIPT = """
import sys, dataclasses, torch
sys.path.insert(0, {tests!r})
import test_architectures as T
for name in ("mistral", "gemma3", "qwen2-sliding", "llama"):
    base = next(a for a in T.ARCHS if a.name == name and a.attn is None)
    model = T.build_model(dataclasses.replace(base, attn="flex_attention"))
    ref, _ = T.unpadded_reference(base, 2)
    for layout, flags in T.LAYOUTS.items():
        with torch.no_grad():
            out = T.layout_logps(model, T.collate(T.make_examples(2), *flags), None, "mask")
        torch.testing.assert_close(out.sum, ref, rtol=1e-5, atol=1e-5)
        print("ok", name, layout)
"""


@pytest.mark.slow
def test_flex_attention_layouts_unfused():
    """flex_attention end to end (values), run unfused (TORCHDYNAMO_DISABLE=1, in a subprocess): on this CPU the
    inductor fails to compile flex kernels for some shapes even for transformers' own masks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _FLEX_SCRIPT.format(tests=str(Path(__file__).parent))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok ") == 12


# ------------------------------------------------------------------------------------ DPO, save / reload, generate


@pytest.fixture(scope="module")
def small_tokenizer():
    from prefopt.data import synthetic_text
    from prefopt.models import train_tokenizer

    return train_tokenizer(synthetic_text(300), vocab_size=320)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from prefopt.data import make_synthetic_preferences, write_jsonl

    return write_jsonl(make_synthetic_preferences(16, seed=3), tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def _saved_model(arch: Arch, tok, directory) -> str:
    """The tiny architecture with the tokenizer's vocabulary and special ids, saved locally (save_pretrained)."""
    kw = dict(arch.kwargs, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
    for key in ("n_positions", "max_position_embeddings"):
        if key in kw:
            kw[key] = 256
    model = build_model(dataclasses.replace(arch, kwargs=kw))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def _dpo_losses(out) -> list[float]:
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("arch_id", [a.id for a in ARCHS if a.attn is None])
def test_dpo_steps_save_reload_generate(arch_id, small_tokenizer, pairs_file, tmp_path):
    """Two DPO steps by the public API, plain and with every fast path (or refused, for the refused models), then
    the saved model reloads and generates."""
    from prefopt.config import DPOConfig
    from prefopt.models import load_model
    from prefopt.train.dpo import train_dpo

    arch = ARCH_BY_ID[arch_id]
    model_dir = _saved_model(arch, small_tokenizer, tmp_path / "init")

    def cfg(out, **kw):
        return DPOConfig(model=model_dir, data=str(pairs_file), output_dir=str(out), optimizer="adamw", lr=1e-3,
                         warmup_steps=0, batch_size=4, micro_batch_size=4, max_steps=2, max_length=40,
                         max_prompt_length=20, progress=False, cache_dir=str(tmp_path / "cache"), **kw)

    train_dpo(cfg(tmp_path / "plain"))
    fast = dict(packing=True, prefix_sharing=True, logps_chunk_size=8)
    if arch.refused:
        with pytest.raises(ConfigError, match=arch.refused):
            train_dpo(cfg(tmp_path / "fast", **fast))
    else:
        train_dpo(cfg(tmp_path / "fast", **fast))
        plain, fastl = _dpo_losses(tmp_path / "plain"), _dpo_losses(tmp_path / "fast")
        assert len(plain) == len(fastl) == 2
        assert max(abs(a - b) for a, b in zip(plain, fastl)) <= 1e-5
    reloaded = load_model(tmp_path / "plain").eval()
    assert type(reloaded).__name__ == arch.model
    ids = torch.tensor([small_tokenizer("the movie was").input_ids])
    with torch.no_grad():
        out = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                pad_token_id=small_tokenizer.pad_token_id)
        assert out.shape[1] > ids.shape[1]
        # greedy decoding with the cache == argmax of an uncached forward over the same tokens, at every step
        logits = reloaded(input_ids=out[:, :-1]).logits
    assert torch.equal(logits[0, ids.shape[1] - 1:].argmax(-1), out[0, ids.shape[1]:])


def test_moe_router_aux_loss_is_added_to_the_dpo_loss_when_the_config_asks():
    """A MoE whose config sets output_router_logits: each example's DPO loss gains router_aux_loss_coef x the
    load-balancing loss of the policy's forward (as transformers adds it to the LM loss); the layouts, whose
    tokens differ from the plain batch, are refused by train_dpo before any compute."""
    from prefopt.losses import get_loss
    from prefopt.train.dpo import DPO, live_reference, router_aux_loss_coef

    base = ARCH_BY_ID["qwen2_moe"]
    arch = dataclasses.replace(base, kwargs={**base.kwargs, "output_router_logits": True, "router_aux_loss_coef": 0.3})
    policy, reference = build_model(arch, seed=0), build_model(arch, seed=1)
    assert router_aux_loss_coef(policy) == 0.3 and router_aux_loss_coef(build_model(base)) == 0.0
    batch = collate(make_examples(2), False, False)
    result = DPO("sigmoid", 0.1, live_reference(reference)).step(policy, batch)
    with torch.no_grad():
        aux = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).aux_loss
        pol = forward_logps(policy, batch).by_example(2).sum
        ref = forward_logps(reference, batch).by_example(2).sum
    plain, _, _ = get_loss("sigmoid")(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
    assert float(aux) > 0
    torch.testing.assert_close(result.losses.detach(), plain + 0.3 * aux, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.metrics["aux_loss"], aux.expand_as(result.losses))


def test_moe_router_aux_loss_runs_in_dpo_and_refuses_the_layouts(small_tokenizer, pairs_file, tmp_path):
    from prefopt.config import DPOConfig
    from prefopt.train.dpo import train_dpo

    base = ARCH_BY_ID["qwen2_moe"]
    arch = dataclasses.replace(base, kwargs={**base.kwargs, "output_router_logits": True, "router_aux_loss_coef": 0.3})
    model_dir = _saved_model(arch, small_tokenizer, tmp_path / "init")

    def cfg(out, **kw):
        return DPOConfig(model=model_dir, data=str(pairs_file), output_dir=str(out), batch_size=4,
                         micro_batch_size=4, max_steps=1, max_length=40, max_prompt_length=20, progress=False,
                         cache_dir=str(tmp_path / "cache"), **kw)

    train_dpo(cfg(tmp_path / "plain"))
    row = _rows(tmp_path / "plain")[0]
    assert row["aux_loss"] > 0 and row["loss"] == pytest.approx(math.log(2) + 0.3 * row["aux_loss"], abs=1e-5)
    with pytest.raises(ConfigError, match="router load-balancing loss"):
        train_dpo(cfg(tmp_path / "packed", packing=True))


def _rows(out) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
