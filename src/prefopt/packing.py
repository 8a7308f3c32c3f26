"""Padding-free and prefix-shared batch layouts for the fast log-prob paths.

The plain layout (``prefopt.data.collate``) pads K*B rows ``prompt + response_k`` to one width. The layouts here
hold the same tokens with less work:

* **packing**: every ``prompt + response_k`` sequence is laid end to end in ONE row, no pad tokens; position ids
  restart at 0 in each sequence and attention never crosses a sequence boundary::

      [p0 r00][p1 r10][p2 r20][p0 r01][p1 r11][p2 r21]      (response-major, as the plain rows)

* **prefix sharing**: the prompt of an example is computed once for its K responses::

      [p0 r00 r01 ... r0(K-1)]                             (one group per example)

  each response attends to the prompt and causally to itself, never to another response; its position ids
  continue from the prompt length, so every response sees exactly the positions it would see alone. The first
  token of every response is predicted by the LAST PROMPT POSITION (one logit serves all K responses).

* both: the groups of all examples packed in one row. Prefix sharing alone: one (padded) row per example.

A layout is a few tensors added to the collated batch (the plain keys stay, for counting and for code that
only needs the shapes); everything attention needs is ``segment`` (which group/sequence a token belongs to)
and ``branch`` (0 on tokens every later token of the group may see, k + 1 on response k):

    token q may attend to token j  <=>  segment[j] == segment[q]  and  j <= q  and  branch[j] in (0, branch[q])

The log-prob targets are listed explicitly, so no path ever needs a shifted loss mask:

    layout_keep    [rows, L] bool   positions whose logits are needed (each once)
    layout_pick    [M]              for each counted target, its index among the kept positions (row-major)
    layout_targets [M]              the token id that position predicts
    layout_rows    [M]              the response-major row (k * B + b) the target belongs to
"""

from __future__ import annotations

import functools
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .data.types import TokenizedExample
from .errors import ConfigError

LAYOUT_KEYS = ("layout_input_ids", "layout_position_ids", "layout_segment_ids", "layout_branch_ids",
               "layout_keep", "layout_pick", "layout_targets", "layout_rows")
PAD_SEGMENT = -1
SEGMENT_ATTENTION = "prefopt_segments"  # the attention implementation of segment attention (below)


def layout_name(packing: bool, prefix_sharing: bool) -> str | None:
    """The layout a mode needs: None (plain padded rows), "packed", "prefix" or "packed+prefix"."""
    if packing and prefix_sharing:
        return "packed+prefix"
    if packing:
        return "packed"
    if prefix_sharing:
        return "prefix"
    return None


def build_layout(examples: Sequence[TokenizedExample], *, packing: bool, prefix_sharing: bool,
                 pad_token_id: int = 0) -> dict[str, Tensor | int | str]:
    """The layout tensors (``LAYOUT_KEYS``), plus ``layout`` naming it, ``layout_num_rows`` = K*B and
    ``layout_spans`` (per row, the (start, end, has-branches) of each group: what segment attention loops over)."""
    name = layout_name(packing, prefix_sharing)
    if name is None:
        raise ValueError("build_layout needs packing and/or prefix_sharing (the plain layout is collate_preferences)")
    if not examples:
        raise ValueError("cannot lay out an empty batch")
    k = examples[0].num_responses
    if any(ex.num_responses != k for ex in examples):
        raise ValueError(f"all examples in a batch must have the same number of responses, "
                         f"got {sorted({ex.num_responses for ex in examples})}")
    b = len(examples)

    # segments: (row-of-batch-tensor, token ids, position ids, branch ids, targets as (pos in segment, token, row))
    segments: list[tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]] = []
    if prefix_sharing:
        for i, ex in enumerate(examples):
            p = list(ex.prompt_ids)
            ids, pos, br, tg = p.copy(), list(range(len(p))), [0] * len(p), []
            for r_idx, resp in enumerate(ex.response_ids):
                row = r_idx * b + i
                start = len(ids)
                ids += resp
                pos += range(len(p), len(p) + len(resp))
                br += [r_idx + 1] * len(resp)
                for j, tok in enumerate(resp):
                    t = len(p) + j  # position of this token in the unshared sequence prompt + resp
                    if t == 0:
                        continue  # nothing predicts the very first token (as in the plain path)
                    src = len(p) - 1 if j == 0 else start + j - 1
                    tg.append((src, tok, row))
            segments.append((ids, pos, br, tg))
    else:
        for r_idx in range(k):
            for i, ex in enumerate(examples):
                p, resp = list(ex.prompt_ids), list(ex.response_ids[r_idx])
                ids = p + resp
                tg = [(t - 1, ids[t], r_idx * b + i) for t in range(max(len(p), 1), len(ids))]
                segments.append((ids, list(range(len(ids))), [0] * len(ids), tg))

    groups = [segments] if packing else [[s] for s in segments]
    width = max(sum(len(s[0]) for s in g) for g in groups)
    rows = len(groups)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    segment_ids = torch.full((rows, width), PAD_SEGMENT, dtype=torch.long)
    branch_ids = torch.zeros((rows, width), dtype=torch.long)
    flat_src: list[int] = []
    targets: list[int] = []
    target_rows: list[int] = []
    seg_no = 0
    spans: list[list[tuple[int, int, bool]]] = []  # per row: (start, end, has branches) of each group, in order
    for r, group in enumerate(groups):
        off = 0
        spans.append([])
        for ids, pos, br, tg in group:
            n = len(ids)
            spans[r].append((off, off + n, any(br)))
            input_ids[r, off:off + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, off:off + n] = torch.tensor(pos, dtype=torch.long)
            segment_ids[r, off:off + n] = seg_no
            branch_ids[r, off:off + n] = torch.tensor(br, dtype=torch.long)
            for src, tok, row in tg:
                flat_src.append(r * width + off + src)
                targets.append(tok)
                target_rows.append(row)
            off += n
            seg_no += 1
    src_t = torch.tensor(flat_src, dtype=torch.long)
    keep = torch.zeros(rows * width, dtype=torch.bool)
    keep[src_t] = True
    # index of each flat position among the kept ones (row-major), then of each target's source position
    rank = torch.cumsum(keep.long(), 0) - 1
    return {
        "layout": name,
        "layout_num_rows": k * b,
        "layout_input_ids": input_ids,
        "layout_position_ids": position_ids,
        "layout_segment_ids": segment_ids,
        "layout_branch_ids": branch_ids,
        "layout_keep": keep.view(rows, width),
        "layout_pick": rank[src_t],
        "layout_targets": torch.tensor(targets, dtype=torch.long),
        "layout_rows": torch.tensor(target_rows, dtype=torch.long),
        "layout_spans": spans,
    }


def allowed_attention(segment_ids: Tensor, branch_ids: Tensor, position_ids: Tensor | None = None,
                      window: int | None = None) -> Tensor:
    """[rows, L, L] bool: may query q attend to key j (see the module docstring). Pads see only pads.

    ``window`` (with ``position_ids``): a sliding-window layer's mask, the block mask AND pos[q] - pos[j] < window
    (transformers' convention, ``masking_utils.sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``).
    The distance is taken between POSITION IDS, not columns: two tokens one may see of the other always lie in one
    sequence (or a prompt and one of its responses), whose position ids are exactly those of the unpadded
    sequence ``prompt + response``, so the window cuts where it would in that sequence alone (a response's
    column distance to the prompt also counts the other responses laid between them, its position distance does not).
    """
    L = segment_ids.shape[-1]
    idx = torch.arange(L, device=segment_ids.device)
    causal = idx[:, None] >= idx[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    bq, bk = branch_ids[:, :, None], branch_ids[:, None, :]
    visible = (bk == 0) | (bk == bq)
    eye = idx[:, None] == idx[None, :]
    allowed = same & causal & visible
    if window is not None:
        if position_ids is None:
            raise ValueError("a sliding-window mask needs the layout's position ids")
        allowed &= (position_ids[:, :, None] - position_ids[:, None, :]) < int(window)
    return allowed | eye


def uses_position_packing(attn_implementation: str | None) -> bool:
    """FlashAttention-style kernels take packed sequences through position ids (varlen), not a mask."""
    return bool(attn_implementation) and "flash" in str(attn_implementation)


def layout_attention_mask(batch: dict, attn_implementation: str | None, dtype: torch.dtype,
                          window: int | None = None) -> Tensor | object | None:
    """The attention_mask argument for the model's attention implementation, for layers of one kind: full causal
    attention (``window`` None) or a sliding window of ``window`` tokens (see ``allowed_attention``).

    sdpa: a 4D boolean mask [rows, 1, L, L] (True = attend); eager and others: the same as an additive float
    mask; flex_attention: a BlockMask; flash_attention_*: None (packing is read from the position ids, which
    restart at 0 in each sequence) -- that cannot express prefix sharing, which then raises.
    ``layout_attention_masks`` gives what a whole model needs (one mask per layer type).
    """
    seg, br, pos = batch["layout_segment_ids"], batch["layout_branch_ids"], batch["layout_position_ids"]
    impl = str(attn_implementation or "sdpa")
    if uses_position_packing(impl):
        if batch.get("layout") != "packed":
            raise ConfigError(f"attention implementation '{impl}' packs sequences by position ids and cannot express "
                              "prefix sharing (responses that see a shared prompt but not each other); load the model "
                              "with attn_implementation='sdpa' (or 'flex_attention') for prefix sharing.")
        if window is not None:
            raise ConfigError(f"attention implementation '{impl}' with a sliding window of {window}: prefopt cannot "
                              "check the kernel's window over packed sequences; use attn_implementation='sdpa' or "
                              "'eager' for packing.")
        return None
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            same = seg[b, q] == seg[b, kv]
            visible = (br[b, kv] == 0) | (br[b, kv] == br[b, q])
            ok = same & (kv <= q) & visible
            if window is not None:
                ok = ok & (pos[b, q] - pos[b, kv] < window)
            return ok | (q == kv)

        rows, L = seg.shape
        return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=L, KV_LEN=L, device=seg.device)
    allowed = allowed_attention(seg, br, pos, window)[:, None]
    if impl in ("sdpa", SEGMENT_ATTENTION):
        return allowed
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def layout_attention_masks(batch: dict, attn_implementation: str | None, dtype: torch.dtype,
                           support: "LayoutSupport") -> Tensor | dict | object | None:
    """The attention_mask argument for a whole model (``support`` from ``check_layout_support``): one mask when
    every layer attends alike, else a dict {layer type: mask}, which transformers' mixed-layer models take as
    ready masks (``if not isinstance(causal_mask_mapping := attention_mask, dict)`` in their forward)."""
    masks: dict[int | None, object] = {}
    for window in dict.fromkeys(support.layer_windows.values()):
        masks[window] = layout_attention_mask(batch, attn_implementation, dtype, window)
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {kind: masks[window] for kind, window in support.layer_windows.items()}


# ---------------------------------------------------------------------------------------------------------
# Which models a layout mask can serve.
#
# A layout forward hands the model one ready 4D mask (or one per layer type) and position ids that restart per
# sequence / continue from the prompt per response. That is exact only where (a) every attention layer reads the
# mask it is given and nothing else that depends on where a token sits in the row, (b) the positions enter only
# through position ids, and (c) prefopt knows every layer type's pattern (full causal, or a sliding window over
# config.sliding_window tokens). Everything else is refused before any compute, with the reason.

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
KNOWN_LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", SEGMENT_ATTENTION)
_ALIBI_MODEL_TYPES = ("bloom", "mpt", "jais", "baichuan")
# modules that carry state along the row (recurrences, convolutions): they would mix packed sequences whatever the mask
_ROW_MIXING_MODULES = re.compile(r"Mamba|SSM|Rwkv|RWKV|Mixer|GatedDeltaNet|LinearAttention|ShortConv|Recurrent|"
                                 r"LightningAttention")
_HYBRID_CONFIG_KEYS = ("layers_block_type", "layers_block_types", "hybrid_override_pattern", "attn_layer_indices")
_DICT_MASK = re.compile(r"isinstance\(\s*(?:\w+\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")
_UNIFORM_WINDOW = re.compile(r"create_causal_mask\s+if\s+(?:self\.)?config\.sliding_window\s+is\s+None\s+else\s+"
                             r"create_sliding_window_causal_mask\b")


@dataclass(frozen=True)
class LayoutSupport:
    """What a layout forward passes a model that ``check_layout_support`` accepted.

    layer_windows: for each layer type the model uses, its window (None = full causal attention); mapping: the
    model takes a dict {layer type: mask} (needed when its layers differ)."""

    model: str
    attn_implementation: str
    layer_windows: dict
    mapping: bool

    @property
    def windowed(self) -> bool:
        return any(w is not None for w in self.layer_windows.values())


def _refuse(base: torch.nn.Module, reason: str) -> ConfigError:
    return ConfigError(f"{type(base).__name__} cannot run the packed / prefix-shared layouts: {reason}. "
                       "Turn packing and prefix_sharing off for this model (the plain padded path is exact).")


@functools.lru_cache(maxsize=None)
def _mask_building(decoder_cls: type) -> tuple[str, str]:
    """How a decoder class builds its attention masks, read from its forward's source: ("mapping", _) for a dict
    {layer type: mask} it also accepts ready, ("uniform-window", _) for one mask, sliding iff config.sliding_window
    is set (Mistral, Phi-3, ...), ("causal", _) for one plain causal mask; ("unknown", why) otherwise."""
    import inspect

    try:
        src = inspect.getsource(decoder_cls.forward)
    except (OSError, TypeError):
        return "unknown", f"the source of {decoder_cls.__name__}.forward is not available to check how it masks"
    builders = set(re.findall(r"\bcreate_\w*mask\w*\b", src))
    if _DICT_MASK.search(src):
        if "layer_types" not in src:
            return "unknown", f"{decoder_cls.__name__} takes a dict of masks but does not pick them by layer_types"
        return "mapping", ""
    if not builders:
        return "unknown", (f"{decoder_cls.__name__} builds its attention mask outside transformers' masking utilities "
                           "(e.g. ALiBi biases or a column-indexed causal buffer), so a ready layout mask is not "
                           "what its attention sees")
    if _UNIFORM_WINDOW.search(src) and builders <= {"create_causal_mask", "create_sliding_window_causal_mask"}:
        return "uniform-window", ""
    if builders - {"create_bidirectional_mask"} == {"create_causal_mask"}:  # (GPT-2's cross-attention mask: unused)
        return "causal", ""
    return "unknown", f"{decoder_cls.__name__} builds masks prefopt does not know ({', '.join(sorted(builders))})"


_MODULE_SCAN: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def _module_refusal(base: torch.nn.Module) -> str | None:
    """Module-level reasons (attention sinks, recurrent / convolutional token mixers), scanned once per model."""
    try:
        return _MODULE_SCAN[base]
    except KeyError:
        pass
    reason = None
    for name, m in base.named_modules():
        if hasattr(m, "sinks") and isinstance(getattr(m, "sinks"), torch.Tensor):
            reason = (f"its attention has learned attention sinks ({name}.sinks); prefopt's layout masks are not "
                      "checked against them")
            break
        if _ROW_MIXING_MODULES.search(type(m).__name__):
            reason = (f"{name} ({type(m).__name__}) carries state along the row, so packed sequences would see each "
                      "other whatever the attention mask")
            break
    _MODULE_SCAN[base] = reason
    return reason


def check_layout_support(model: torch.nn.Module, layout: str | None = None) -> LayoutSupport:
    """Can ``model`` compute exact log-probs over a packed / prefix-shared layout? Returns how (the masks per
    layer type), or raises ``ConfigError`` naming the model class and the reason. Computes nothing; cheap enough
    to call per forward (``layout_logps`` does); a trainer calls it once after loading the model, with
    ``layout_name(packing, prefix_sharing)``, to fail before any training step.

    Refused: ALiBi models (Bloom, MPT, Falcon with alibi=True: their biases come from the padding mask / columns,
    not position ids), bidirectional models, attention sinks, recurrent or convolutional token mixers, layer types
    other than full / sliding-window attention, decoders that build masks some other way or take no position ids,
    and a sliding window under FlashAttention (whose kernel applies the window itself: unverified here) or under an
    attention implementation prefopt does not know.
    """
    from .models import decoder_of, forward_accepts, unwrap_model

    base = unwrap_model(model)
    cfg = getattr(base, "config", None)
    if cfg is None:
        raise _refuse(base, "it has no transformers config to say how its attention masks")
    impl = str(getattr(cfg, "_attn_implementation", None) or "sdpa")
    model_type = str(getattr(cfg, "model_type", "") or "")
    if (getattr(cfg, "alibi", False) or model_type in _ALIBI_MODEL_TYPES
            or getattr(cfg, "position_embedding_type", None) == "alibi"):
        raise _refuse(base, "it uses ALiBi attention biases, which are built from the padding mask / column index of "
                            "the row rather than from position ids, so they would run across packed sequences")
    if not getattr(cfg, "is_causal", True) or getattr(cfg, "use_bidirectional_attention", False):
        raise _refuse(base, "its attention is bidirectional (not causal)")
    if not forward_accepts(type(base), "position_ids"):
        raise _refuse(base, "its forward takes no position_ids, so positions cannot restart per sequence")
    hybrid = [k for k in _HYBRID_CONFIG_KEYS if getattr(cfg, k, None)]
    if hybrid:
        raise _refuse(base, f"its config describes a hybrid stack ({', '.join(hybrid)}): its non-attention layers "
                            "carry state along the row, so packed sequences would see each other")
    reason = _module_refusal(base)
    if reason:
        raise _refuse(base, reason)
    try:
        decoder = decoder_of(base)
    except TypeError as e:
        raise _refuse(base, str(e)) from None
    kind, why = _mask_building(type(decoder))
    if kind == "unknown":
        raise _refuse(base, why)
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if kind == "mapping":
        if not layer_types:
            raise _refuse(base, "it takes a mask per layer type but its config lists no layer_types")
        types = list(layer_types)
    elif kind == "uniform-window":
        types = [SLIDING_ATTENTION if window is not None else FULL_ATTENTION]
    else:  # one plain causal mask for every layer: a window anywhere in the config is applied some other way
        hints = [f"layer_types {sorted(set(layer_types) - {FULL_ATTENTION})}" if layer_types and
                 any(t != FULL_ATTENTION for t in layer_types) else None,
                 f"sliding_window={window}" if window else None,
                 *(f"{a}={getattr(cfg, a)!r}" for a in ("window_size", "attention_chunk_size", "local_attention")
                   if getattr(cfg, a, None)),
                 *(f"{a} with local layers" for a in ("attention_layers", "attention_types")
                   if "local" in str(getattr(cfg, a, "") or ""))]
        hints = [h for h in hints if h]
        if hints:
            raise _refuse(base, f"its config declares local attention ({'; '.join(hints)}) but its decoder builds one "
                                "causal mask, so prefopt cannot tell where the window is applied")
        types = [FULL_ATTENTION]
    unknown = sorted(set(types) - set(KNOWN_LAYER_TYPES))
    if unknown:
        raise _refuse(base, f"layer type(s) {unknown} (prefopt's layout masks know only {list(KNOWN_LAYER_TYPES)})")
    if SLIDING_ATTENTION in types and not (isinstance(window, int) and window >= 1):
        raise _refuse(base, f"it has sliding-window layers but config.sliding_window = {window!r}")
    windows = {t: (int(window) if t == SLIDING_ATTENTION else None) for t in dict.fromkeys(types)}
    support = LayoutSupport(type(base).__name__, impl, windows, kind == "mapping")
    if support.windowed:
        if uses_position_packing(impl):
            raise _refuse(base, f"attention implementation '{impl}' with a sliding window of {window}: the "
                                "FlashAttention kernel applies the window itself over the packed row, which prefopt "
                                "cannot verify; load the model with attn_implementation='sdpa' or 'eager'")
        if impl not in _MASK_IMPLEMENTATIONS:
            raise _refuse(base, f"attention implementation '{impl}' with a sliding window: prefopt only knows how "
                                f"{list(_MASK_IMPLEMENTATIONS)} read a ready mask")
    if layout not in (None, "packed") and uses_position_packing(impl):
        raise _refuse(base, f"attention implementation '{impl}' packs sequences by position ids and cannot express "
                            "prefix sharing (responses that see a shared prompt but not each other); load the model "
                            "with attn_implementation='sdpa' (or 'flex_attention') for prefix sharing")
    return support


# ---------------------------------------------------------------------------------------------------------
# Segment attention: attention computed group by group, never over the whole packed row.
#
# A dense [L, L] mask over a packed row makes every attention kernel do (and mostly discard) work on all L^2
# query-key pairs, although a token only ever sees its own group. Here each group (one sequence when packing, a
# prompt with its K responses when prefix sharing) runs its own SDPA call: plain causal (is_causal, the fast kernel)
# for a sequence, a small [G, G] mask for a prefix-shared group.
#
# It reaches the model through transformers' attention interface: an sdpa model is switched to the registered
# implementation SEGMENT_ATTENTION, which IS sdpa (same function, same masks) unless a forward passes a segment
# plan in its keyword arguments. The plan travels with the arguments, so gradient checkpointing's recomputation in
# the backward pass sees it too.

_SEGMENTS_KWARG = "prefopt_segments"


def layout_groups(segment_ids: Tensor, branch_ids: Tensor,
                  spans: list[list[tuple[int, int, bool]]] | None = None) -> list[list[tuple[int, int, Tensor | None]]]:
    """Per row, its groups in order as (start, end, mask): mask None for a causal sequence, else the group's
    [G, G] bool mask (prefix sharing). Tokens after the last group are pads. ``spans`` (``layout_spans``, made by
    the collator on the CPU) gives the boundaries without reading the ids back from the device."""
    if spans is None:
        spans = []
        for row in segment_ids.tolist():
            spans.append([])
            start = 0
            for i in range(1, len(row) + 1):
                if i == len(row) or row[i] != row[start]:
                    if row[start] != PAD_SEGMENT:
                        spans[-1].append((start, i, True))  # masks decide; a causal group gets an all-causal one
                    start = i
    plan = []
    for r, row_spans in enumerate(spans):
        plan.append([(s, e, allowed_attention(segment_ids[r:r + 1, s:e], branch_ids[r:r + 1, s:e])[0] if shared
                      else None) for s, e, shared in row_spans])
    return plan


class _SegmentPlan:
    def __init__(self, groups):
        self.groups, self.calls = groups, 0


def _segment_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention-interface function: [B, H, L, D] in, ([B, L, H, D], None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = kwargs.pop(_SEGMENTS_KWARG, None)
    if plan is None:  # not a layout forward: exactly sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    plan.calls += 1
    heads = query.shape[1]
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves consecutive query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    rows = []
    for r, groups in enumerate(plan.groups):
        parts, end = [], 0
        for start, end, mask in groups:
            q, k, v = query[r:r + 1, :, start:end], key[r:r + 1, :, start:end], value[r:r + 1, :, start:end]
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling))
        if end < query.shape[2]:  # pads: no real token reads them; zeros
            parts.append(query.new_zeros(1, heads, query.shape[2] - end, query.shape[3]))
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _register_segment_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, _segment_attention_forward)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)  # outside layout forwards: sdpa's own masks


def supports_segment_attention(base: torch.nn.Module) -> bool:
    """sdpa models that route attention through transformers' interface, with nothing per-group attention would
    leave out (a sliding window, logit soft-capping, attention sinks)."""
    cfg = getattr(base, "config", None)
    impl = str(getattr(cfg, "_attn_implementation", None) or "")
    if cfg is None or impl not in ("sdpa", SEGMENT_ATTENTION) or not getattr(base, "_supports_attention_backend", False):
        return False
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None):
        return False
    if getattr(cfg, "layer_types", None) and any(t != "full_attention" for t in cfg.layer_types):
        return False
    return not any(hasattr(m, "sinks") for m in base.modules())


@contextmanager
def segment_attention(base: torch.nn.Module, batch: dict):
    """Yields the keyword arguments that make ``base``'s forward run attention group by group over the layout.

    The model's sdpa implementation is switched (for good) to SEGMENT_ATTENTION, which behaves as sdpa whenever
    those arguments are absent. A placeholder 4D mask keeps transformers from building a mask for the row.
    """
    _register_segment_attention()
    if base.config._attn_implementation != SEGMENT_ATTENTION:
        base.config._attn_implementation = SEGMENT_ATTENTION
    seg = batch["layout_segment_ids"]
    plan = _SegmentPlan(layout_groups(seg, batch["layout_branch_ids"], batch.get("layout_spans")))
    placeholder = torch.ones(seg.shape[0], 1, 1, 1, dtype=torch.bool, device=seg.device)
    yield {_SEGMENTS_KWARG: plan, "attention_mask": placeholder}
    if plan.calls == 0:
        raise RuntimeError(f"{type(base).__name__} did not call the segment attention: its attention modules do not "
                           "use transformers' attention interface; load it with attn_implementation='flex_attention'")


try:  # registered on import, so a model switched to it (and, say, pickled) loads again wherever prefopt is imported
    _register_segment_attention()
except ImportError:  # pragma: no cover - transformers is a dependency
    pass


def layout_tokens(batch: dict) -> int:
    """Tokens a forward over the layout computes (pads excluded)."""
    return int((batch["layout_segment_ids"] != PAD_SEGMENT).sum())


__all__ = ["LAYOUT_KEYS", "build_layout", "layout_name", "allowed_attention", "layout_attention_mask",
           "layout_attention_masks", "check_layout_support", "LayoutSupport", "KNOWN_LAYER_TYPES",
           "uses_position_packing", "layout_tokens", "layout_groups", "segment_attention",
           "supports_segment_attention", "SEGMENT_ATTENTION"]
