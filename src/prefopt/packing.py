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

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor

from .data.types import TokenizedExample

LAYOUT_KEYS = ("layout_input_ids", "layout_position_ids", "layout_segment_ids", "layout_branch_ids",
               "layout_keep", "layout_pick", "layout_targets", "layout_rows")
PAD_SEGMENT = -1


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


def allowed_attention(segment_ids: Tensor, branch_ids: Tensor) -> Tensor:
    """[rows, L, L] bool: may query q attend to key j (see the module docstring). Pads see only themselves."""
    L = segment_ids.shape[-1]
    idx = torch.arange(L, device=segment_ids.device)
    causal = idx[:, None] >= idx[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    bq, bk = branch_ids[:, :, None], branch_ids[:, None, :]
    visible = (bk == 0) | (bk == bq)
    eye = idx[:, None] == idx[None, :]
    return (same & causal & visible) | eye


def uses_position_packing(attn_implementation: str | None) -> bool:
    """FlashAttention-style kernels take packed sequences through position ids (varlen), not a mask."""
    return bool(attn_implementation) and "flash" in str(attn_implementation)


def layout_attention_mask(batch: dict, attn_implementation: str | None, dtype: torch.dtype) -> Tensor | object | None:
    """The attention_mask argument for the model's attention implementation.

    sdpa: a 4D boolean mask [rows, 1, L, L] (True = attend); eager and others: the same as an additive float
    mask; flex_attention: a BlockMask; flash_attention_*: None (packing is read from the position ids, which
    restart at 0 in each sequence) -- that cannot express prefix sharing, which then raises.
    """
    seg, br = batch["layout_segment_ids"], batch["layout_branch_ids"]
    impl = str(attn_implementation or "sdpa")
    if uses_position_packing(impl):
        if batch.get("layout") != "packed":
            raise ValueError(f"attention implementation '{impl}' packs sequences by position ids and cannot express "
                             "prefix sharing (responses that see a shared prompt but not each other); load the model "
                             "with attn_implementation='sdpa' (or 'flex_attention') for prefix sharing.")
        return None
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            same = seg[b, q] == seg[b, kv]
            visible = (br[b, kv] == 0) | (br[b, kv] == br[b, q])
            return (same & (kv <= q) & visible) | (q == kv)

        rows, L = seg.shape
        return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=L, KV_LEN=L, device=seg.device)
    allowed = allowed_attention(seg, br)[:, None]
    if impl == "sdpa":
        return allowed
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


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

SEGMENT_ATTENTION = "prefopt_segments"
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
           "uses_position_packing", "layout_tokens", "layout_groups", "segment_attention",
           "supports_segment_attention", "SEGMENT_ATTENTION"]
