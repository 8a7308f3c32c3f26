"""Per-response log-probabilities log pi(y|x) of a causal LM.

The plain path runs one forward over the concatenated batch (every response of every example, the
response-major layout made by ``prefopt.data.collate``) and sums the log-probs of response tokens only.
Faster paths (precomputed reference, packing, prefix sharing, chunked log-softmax) sit beside it and are
checked against it; the losses never see which path produced the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from .models import decoder_of, evaluating, forward_accepts, is_partitioned, unwrap_model


@dataclass
class ResponseLogps:
    """Summed log-probs of each response row and its number of response tokens, both of shape [N]."""

    sum: Tensor
    count: Tensor

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count.clamp(min=1)

    def by_example(self, num_responses: int) -> "ResponseLogps":
        """[K*B] response-major -> [B, K] (column k holds response k of every example)."""
        return ResponseLogps(split_responses(self.sum, num_responses), split_responses(self.count, num_responses))


def split_responses(x: Tensor, num_responses: int) -> Tensor:
    """Undo the response-major concatenation: [K*B, ...] -> [B, K, ...]."""
    return x.view(num_responses, -1, *x.shape[1:]).transpose(0, 1)


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels] per position, in float32, without materialising the full log-softmax.

    logits: [..., V], labels: [...] (any valid index where masked out). Returns [...].
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> ResponseLogps:
    """Sum the log-probs of the tokens flagged by ``loss_mask`` given the logits over the same rows.

    The logit at position t predicts token t+1, so the mask and ids are shifted left by one.
    """
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:]
    per_token = token_logps(logits[:, :-1], labels.masked_fill(~mask, 0))
    per_token = per_token * mask
    return ResponseLogps(per_token.sum(-1), mask.sum(-1))


def forward_logps(model: torch.nn.Module, batch: dict) -> ResponseLogps:
    """The plain path: one forward of the whole concatenated (padded) batch; log-probs of response tokens, [K*B].

    The LM head and the log-softmax run at response positions only (never on prompt or pad positions) for any
    transformers causal LM; other models get full logits (``full_logits_logps``). Same numbers either way.
    """
    if head_at_selected_positions(unwrap_model(model)):
        return chunked_forward_logps(model, batch, None)
    return full_logits_logps(model, batch)


def full_logits_logps(model: torch.nn.Module, batch: dict) -> ResponseLogps:
    """Logits at every position of the padded batch, then the response tokens' log-probs (the simplest form)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return masked_sequence_logps(out.logits, batch["input_ids"], batch["loss_mask"])


_HEAD_CHECKS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def head_at_selected_positions(base: torch.nn.Module) -> bool:
    """Can the log-probs apply the LM head to chosen hidden states only? Needs a decoder, an output embedding and
    ``logits_to_keep``, and -- checked once per model on a 3-token input -- head(decoder output) must reproduce the
    model's own logits (some architectures scale or post-process logits in ways only their forward knows)."""
    if not forward_accepts(type(base), "logits_to_keep") or base.get_output_embeddings() is None:
        return False
    if _fsdp_sharded(base) or is_partitioned(base):  # FSDP2 and ZeRO-3 gather and free weights in hooks around
        return False  # each module's own forward: a head applied outside it would find its weight a shard
    ok = _HEAD_CHECKS.get(base)
    if ok is None:
        ok = _HEAD_CHECKS[base] = _head_reproduces_logits(base)
    return ok


def _fsdp_sharded(base: torch.nn.Module) -> bool:
    """The model is sharded by FSDP2 (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(base, FSDPModule)


def _head_reproduces_logits(base: torch.nn.Module) -> bool:
    try:
        with evaluating(base), torch.no_grad():
            vocab = base.get_output_embeddings().weight.shape[0]
            ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]], device=next(base.parameters()).device)
            full = base(input_ids=ids, use_cache=False).logits[0, -1].float()
            hidden = _run_for_hidden(base, base, input_ids=ids)[0, -1:]
            mine = base.get_output_embeddings()(hidden)
            transform = _head_transform(base)
            if transform is not None:
                mine = transform(mine)
            mine = mine.float()[0]
        return mine.shape == full.shape and bool(torch.allclose(mine, full, rtol=1e-2,
                                                                atol=1e-3 * max(1.0, float(full.abs().max()))))
    except Exception:  # any architecture the hook / head route does not fit: full logits instead
        return False


def naive_logps(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int]) -> float:
    """One sequence, no padding, no batching: the definition the fast paths are tested against."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(start, ids.shape[1])))


# ---------------------------------------------------------------------------------------------------------
# Fast paths: chunked log-softmax through the LM head, packed / prefix-shared layouts (prefopt.packing).
# Every path returns the same ResponseLogps as forward_logps (tests/test_fast_paths.py checks values and grads).


def _head_transform(base: torch.nn.Module) -> Callable[[Tensor], Tensor] | None:
    """Logit post-processing some architectures apply after the LM head (None: plain linear head)."""
    cfg = getattr(base, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(base, "logit_scale", None)
    divide = getattr(cfg, "logits_scaling", None)
    if not cap and scale is None and not divide:
        return None

    def fn(logits: Tensor) -> Tensor:
        if scale is not None:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return fn


# The memory rule. Measured on CPU in float32 (peak RSS of the LM-head pass alone, forward and backward, 1,024
# positions x 151,936 vocabulary entries, hidden 256): the plain pass peaks at 19-20 bytes per (position,
# vocabulary entry) -- the logits, kept for backward (4), and in backward about four more [P, V] float32 buffers
# (the pick's scattered gradient, exp(logits - logsumexp), the gradient times it, their sum); its forward peaks at
# 8 (the logits and the logsumexp's exp buffer). A chunk of the chunked pass holds 8 (its logits and one exp or
# softmax buffer, in forward and in backward alike). 16-bit logits add their own copy (2) beside the float32 one.
PLAIN_LOGIT_BYTES = 20
"""Bytes the plain log-prob pass holds at once per (response position, vocabulary entry), float32 logits."""
CHUNK_LOGIT_BYTES = 8
"""Bytes a chunk of the chunked pass holds at once per (position, vocabulary entry), float32 logits."""
DEFAULT_LOGITS_MEMORY_MB = 256.0
"""Default budget (DPOConfig.logits_memory_mb): at vocabularies of 150k-260k it still gives chunks of 128-220
positions, where the chunked head runs as fast as the plain one (benchmarks/RESULTS.md, "Memory at real
vocabularies"); at a 4k-32k vocabulary micro-batches of up to 3,300-400 response positions keep the plain path."""
KEEP_LAST_CHUNK = True
"""The chunked backward reuses the last chunk's softmax kept from the forward instead of recomputing its logits
(the same numbers; set False only to measure the recomputation)."""


@dataclass(frozen=True)
class LogitsBudget:
    """A ``chunk_size`` that decides per batch: the plain path while a batch's logits fit in ``bytes``, otherwise
    chunks of as many positions as fit in it.

    Rule, for P response positions (the rows the LM head runs on) and vocabulary V: the plain pass needs
    P x V x PLAIN_LOGIT_BYTES (20 for float32 logits, 22 for 16-bit); above ``bytes`` the head runs in chunks of
    max(1, bytes // (V x CHUNK_LOGIT_BYTES)) positions (8, or 10 for 16-bit logits).
    """

    bytes: int

    def __post_init__(self) -> None:
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes <= 0:
            from .errors import ConfigError

            raise ConfigError(f"invalid logits memory budget = {self.bytes!r} bytes: must be a positive integer "
                              "(logits_memory_mb: a positive number of MB).")

    @classmethod
    def from_mb(cls, mb: float) -> "LogitsBudget":
        """The budget of ``logits_memory_mb`` (MB = 2**20 bytes); ConfigError naming that field unless positive."""
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0 or mb == float("inf"):
            from .errors import ConfigError

            raise ConfigError(f"invalid logits_memory_mb = {mb!r}: must be a positive number of MB.")
        return cls(max(1, int(mb * 2**20)))

    def plain_positions(self, vocab: int, low_precision: bool = False) -> int:
        """The most response positions a batch may have and still take the plain path."""
        return self.bytes // (vocab * (PLAIN_LOGIT_BYTES + 2 * low_precision))

    def chunk_positions(self, vocab: int, low_precision: bool = False) -> int:
        """The chunk size (positions) used above that."""
        return max(1, self.bytes // (vocab * (CHUNK_LOGIT_BYTES + 2 * low_precision)))

    def chunk_size(self, positions: int, vocab: int, low_precision: bool = False) -> int | None:
        """None (the plain path) when ``positions`` fit the budget, else the chunk size."""
        if positions <= self.plain_positions(vocab, low_precision):
            return None
        return self.chunk_positions(vocab, low_precision)


class _ChunkedLinearLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for [M, H] hidden rows, ``chunk`` rows at a time.

    Only one chunk's [chunk, V] logits exist at once, in forward and in backward (which recomputes them from
    the saved hidden states): d logp / d logits = onehot(target) - softmax(logits), the softmax taken as
    exp(logits - logsumexp) in place with the forward's logsumexp. With ``keep_last`` the last chunk's softmax is
    kept from the forward and its logits are not recomputed (a single chunk: no recomputation at all); the backward
    runs the chunks last to first, so that kept buffer is freed before any recomputation, and the gradients are the
    same bits with or without it.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                keep_last: bool = False) -> Tensor:
        dev = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.chunk = chunk
        ctx.kept = None
        starts = range(0, hidden.shape[0], chunk)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in starts:
            logits = F.linear(hidden[s:s + chunk], weight, bias).float()
            lse[s:s + chunk] = logits.logsumexp(-1)
            out[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if keep_last and s == starts[-1]:  # the backward's recomputation, bit for bit, in the logits' buffer
                ctx.kept = logits.sub_(lse[s:s + chunk, None]).exp_()
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        enabled, amp_dtype = ctx.autocast
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        starts = range(0, hidden.shape[0], ctx.chunk)
        with torch.autocast(hidden.device.type, dtype=amp_dtype, enabled=enabled):
            for s in reversed(starts):
                h, go, t = hidden[s:s + ctx.chunk], grad_out[s:s + ctx.chunk, None], targets[s:s + ctx.chunk, None]
                if ctx.kept is not None and s == starts[-1]:
                    g, ctx.kept = ctx.kept, None  # used once (a second backward with retain_graph recomputes)
                else:
                    g = F.linear(h, weight, bias).float().sub_(lse[s:s + ctx.chunk, None]).exp_()
                g.mul_(-go)
                g.scatter_add_(1, t, go)
                if not enabled:
                    g = g.to(weight.dtype)
                if need_h:
                    grad_h[s:s + ctx.chunk] = (g @ weight).to(grad_h.dtype)
                if need_w:
                    if g.dtype == h.dtype == torch.float32 and not enabled:
                        grad_w.addmm_(g.t(), h)  # no [V, H] temporary per chunk
                    else:
                        grad_w += (g.t() @ h).float()
                if need_b:
                    grad_b += g.float().sum(0)
                del g
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


def chunked_token_logps(hidden: Tensor, head: torch.nn.Module, targets: Tensor, chunk_size: int,
                        transform: Callable[[Tensor], Tensor] | None = None, keep_last: bool | None = None) -> Tensor:
    """Per-row log-probs [M] (float32) of ``targets`` [M] under ``head(hidden)`` [M, V], chunk by chunk.

    A plain nn.Linear head uses a custom autograd Function (backward recomputes each chunk's logits); any other
    head (e.g. LoRA on the LM head) or a logit transform (soft-capping) falls back to checkpointing per chunk.
    Either way the full [M, V] logits never exist at once. keep_last (default ``KEEP_LAST_CHUNK``): the last chunk
    is not recomputed in backward (its softmax, or for the fallback its graph, is kept from the forward; that one
    chunk is then held until backward, as the plain path holds all its logits); same numbers either way.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keep_last = KEEP_LAST_CHUNK if keep_last is None else keep_last
    if type(head) is torch.nn.Linear and transform is None:
        keep = keep_last and torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad or
                                                          (head.bias is not None and head.bias.requires_grad))
        return _ChunkedLinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, keep)

    def one(h: Tensor, t: Tensor) -> Tensor:
        logits = head(h)
        if transform is not None:
            logits = transform(logits)
        return token_logps(logits, t)

    parts = []
    starts = range(0, hidden.shape[0], chunk_size)
    for s in starts:
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad and not (keep_last and s == starts[-1]):
            parts.append(torch.utils.checkpoint.checkpoint(one, h, t, use_reentrant=False))
        else:
            parts.append(one(h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _head_vocab(head: torch.nn.Module, base: torch.nn.Module) -> int:
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(getattr(head, "out_features", None) or base.config.vocab_size)


def _low_precision_logits(hidden: Tensor, head: torch.nn.Module) -> bool:
    """Would the head give 16-bit logits (16-bit weights, or a 16-bit autocast)?"""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in (torch.float16, torch.bfloat16):
        return True
    weight = getattr(head, "weight", None)
    return isinstance(weight, Tensor) and weight.dtype in (torch.float16, torch.bfloat16)


def resolve_chunk_size(chunk_size: "int | LogitsBudget | None", positions: int, vocab: int,
                       low_precision: bool = False) -> int | None:
    """The chunk size a batch gets: a fixed size as given (None/0: the plain path), a ``LogitsBudget`` by its rule
    from this batch's ``positions`` and the ``vocab``."""
    if isinstance(chunk_size, LogitsBudget):
        return chunk_size.chunk_size(positions, vocab, low_precision)
    return chunk_size or None


def _run_for_hidden(model: torch.nn.Module, base: torch.nn.Module, **inputs) -> Tensor:
    """Run the (possibly wrapped) model; return the decoder's final hidden states, computing no logits."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder_of(base).register_forward_hook(hook)
    try:
        model(**inputs, use_cache=False,
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the decoder's forward hook did not fire; chunked log-probs cannot read hidden states")
    return captured[-1]


def _selected_token_logps(model: torch.nn.Module, inputs: dict, keep: Tensor, pick: Tensor, targets: Tensor,
                          chunk_size: "int | LogitsBudget | None") -> Tensor:
    """Per-target log-probs [M]: logits only at the ``keep`` positions ([rows, L] bool), each computed once.

    The LM head runs on the kept hidden states only (never on prompt or pad positions); with ``chunk_size`` it
    runs chunk by chunk so the [M, V] logits never exist at once; with a ``LogitsBudget``, only when this batch's
    kept positions would exceed it (``resolve_chunk_size``).
    """
    base = unwrap_model(model)
    if not head_at_selected_positions(base):  # the model's own logits at every position, then the kept ones
        if chunk_size and not isinstance(chunk_size, LogitsBudget):
            warnings.warn(f"{type(base).__name__}: chunked log-probs need the LM head applied to hidden states, "
                          "which does not reproduce this model's logits; computing full logits instead.",
                          stacklevel=3)
        logits = model(**inputs, use_cache=False).logits[keep].float()
    else:
        hidden = _run_for_hidden(model, base, **inputs)[keep]  # [U, H], row-major
        head, transform = base.get_output_embeddings(), _head_transform(base)
        chunk_size = resolve_chunk_size(chunk_size, hidden.shape[0], _head_vocab(head, base),
                                        _low_precision_logits(hidden, head))
        if chunk_size:
            return chunked_token_logps(hidden[pick], head, targets, chunk_size, transform)
        logits = head(hidden)
        if transform is not None:
            logits = transform(logits)
        logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return logits[pick, targets] - lse[pick]


def _sum_by_row(per_token: Tensor, rows: Tensor, num_rows: int) -> ResponseLogps:
    sums = torch.zeros(num_rows, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    counts = torch.bincount(rows, minlength=num_rows)
    return ResponseLogps(sums, counts)


def chunked_forward_logps(model: torch.nn.Module, batch: dict,
                          chunk_size: "int | LogitsBudget | None") -> ResponseLogps:
    """The plain padded layout, logits only at response positions; with ``chunk_size``, in chunks of positions
    (a ``LogitsBudget``: only when this batch's logits would exceed it)."""
    mask = batch["loss_mask"][:, 1:]
    keep = torch.zeros_like(batch["loss_mask"])
    keep[:, :-1] = mask
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    targets = batch["input_ids"][:, 1:][mask]
    pick = torch.arange(targets.numel(), device=targets.device)
    per_token = _selected_token_logps(model, {"input_ids": batch["input_ids"],
                                              "attention_mask": batch["attention_mask"]},
                                      keep, pick, targets, chunk_size)
    return _sum_by_row(per_token, rows, mask.shape[0])


def layout_logps(model: torch.nn.Module, batch: dict, chunk_size: int | None = None,
                 attention: str = "auto") -> ResponseLogps:
    """Log-probs over a packed and/or prefix-shared layout (``prefopt.packing.build_layout``), [K*B].

    attention: "segments" runs attention group by group (``prefopt.packing.segment_attention``), "mask" passes
    the model one mask over the whole row (dense for sdpa/eager, a BlockMask for flex_attention, position ids for
    FlashAttention), "auto" takes segments wherever the model supports them. A model with sliding-window layers
    gets, per layer type, the block mask AND the window over position ids (a dict {layer type: mask} where its
    layers differ); a model no layout mask can serve exactly is refused first (``packing.check_layout_support``).
    """
    from .packing import (check_layout_support, layout_attention_masks, segment_attention, supports_segment_attention,
                          uses_position_packing)

    if attention not in ("auto", "segments", "mask"):
        raise ValueError(f"attention must be 'auto', 'segments' or 'mask', got {attention!r}")
    support = check_layout_support(model, batch.get("layout"))  # raises ConfigError before any compute
    base = unwrap_model(model)
    inputs = {"input_ids": batch["layout_input_ids"], "position_ids": batch["layout_position_ids"]}
    segments = supports_segment_attention(base)
    if attention == "segments" and not segments:
        raise ValueError(f"{type(base).__name__} (attention '{getattr(base.config, '_attn_implementation', None)}') "
                         "cannot run segment attention; use attention='mask' or 'auto'")
    if attention != "mask" and segments:
        with segment_attention(base, batch) as extra:
            per_token = _selected_token_logps(model, {**inputs, **extra},
                                              batch["layout_keep"], batch["layout_pick"], batch["layout_targets"],
                                              chunk_size)
        return _sum_by_row(per_token, batch["layout_rows"], batch["layout_num_rows"])
    impl = getattr(base.config, "_attn_implementation", None)
    dtype = next(base.parameters()).dtype
    mask = layout_attention_masks(batch, impl, dtype, support)
    if mask is not None or not uses_position_packing(impl):
        inputs["attention_mask"] = mask
    per_token = _selected_token_logps(model, inputs, batch["layout_keep"], batch["layout_pick"],
                                      batch["layout_targets"], chunk_size)
    return _sum_by_row(per_token, batch["layout_rows"], batch["layout_num_rows"])


def compute_logps(model: torch.nn.Module, batch: dict, *, packing: bool = False, prefix_sharing: bool = False,
                  chunk_size: "int | LogitsBudget | None" = None) -> ResponseLogps:
    """Summed response log-probs [K*B] by the chosen path; every path equals ``forward_logps``.

    packing / prefix_sharing need the batch to carry that layout (``prefopt.train.dpo.make_collate`` with the
    same flags, or ``prefopt.packing.build_layout``); chunk_size (None/0: off; N: N positions at a time; a
    ``LogitsBudget``: chunks only for a batch whose logits would exceed it) bounds the LM-head memory.
    """
    from .packing import layout_name

    want = layout_name(packing, prefix_sharing)
    if want is None:
        return chunked_forward_logps(model, batch, chunk_size) if chunk_size else forward_logps(model, batch)
    have = batch.get("layout")
    if have != want:
        raise ValueError(f"compute_logps(packing={packing}, prefix_sharing={prefix_sharing}) needs a batch with "
                         f"layout '{want}', got {have!r}: build the batch with make_collate(..., packing=..., "
                         "prefix_sharing=...) or prefopt.packing.build_layout")
    return layout_logps(model, batch, chunk_size or None)


LogpsFn = Callable[[torch.nn.Module, dict], ResponseLogps]


def make_logps_fn(*, packing: bool = False, prefix_sharing: bool = False,
                  chunk_size: "int | LogitsBudget | None" = None) -> LogpsFn:
    """A ``(model, batch) -> ResponseLogps`` for one mode; the plain mode is ``forward_logps`` itself.

    chunk_size: None or 0 off, N positions at a time, or a ``LogitsBudget`` (decided per batch)."""
    if isinstance(chunk_size, LogitsBudget):
        return functools.partial(compute_logps, packing=packing, prefix_sharing=prefix_sharing, chunk_size=chunk_size)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
        from .errors import ConfigError

        raise ConfigError(f"invalid logps_chunk_size = {chunk_size!r}: must be an integer >= 0 (0 disables chunking).")
    if not (packing or prefix_sharing or chunk_size):
        return forward_logps
    return functools.partial(compute_logps, packing=packing, prefix_sharing=prefix_sharing,
                             chunk_size=chunk_size or None)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


@dataclasses.dataclass(frozen=True)
class LogpsMode:
    """How a run computes log-probs: the batch layout and the path that reads it, from one description.

    The collate function (which layout a batch carries) and the log-prob function (which layout it expects) are
    both made here, so the two cannot disagree; ``key`` names everything about the mode that can change the
    numbers in the last bits (for caches of computed log-probs).

    chunk_size: None (the default) decides per micro-batch by ``memory_budget_bytes`` (``LogitsBudget``: the plain
    LM head while the batch's P response positions x vocabulary V x 20 bytes fit, otherwise chunks of
    budget // (V x 8) positions); 0 never chunks; N always runs N positions at a time.
    """

    packing: bool = False
    prefix_sharing: bool = False
    chunk_size: int | None = None
    memory_budget_bytes: int = int(DEFAULT_LOGITS_MEMORY_MB * 2**20)

    def __post_init__(self) -> None:
        from .errors import ConfigError

        c = self.chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ConfigError(f"invalid logps_chunk_size = {c!r}: must be an integer >= 0 (0 disables chunking) or "
                              "None (auto: chunk a micro-batch whose logits would exceed logits_memory_mb).")
        LogitsBudget(self.memory_budget_bytes)  # ConfigError unless a positive integer

    @classmethod
    def from_config(cls, cfg) -> "LogpsMode":
        """The mode a DPOConfig asks for (fields packing, prefix_sharing, logps_chunk_size, logits_memory_mb;
        packing / prefix sharing / chunking absent = off)."""
        mb = getattr(cfg, "logits_memory_mb", DEFAULT_LOGITS_MEMORY_MB)
        return cls(packing=getattr(cfg, "packing", False), prefix_sharing=getattr(cfg, "prefix_sharing", False),
                   chunk_size=getattr(cfg, "logps_chunk_size", 0), memory_budget_bytes=LogitsBudget.from_mb(mb).bytes)

    @property
    def layout(self) -> str | None:
        from .packing import layout_name

        return layout_name(self.packing, self.prefix_sharing)

    @property
    def chunking(self) -> "int | LogitsBudget | None":
        """What the log-prob functions get as ``chunk_size``: None (off), N, or the per-batch ``LogitsBudget``."""
        if self.chunk_size is None:
            return LogitsBudget(self.memory_budget_bytes)
        return self.chunk_size or None

    @property
    def key(self) -> str:
        # The auto rule is in the key: which batches chunk, and at what size, can change the last bits (the head's
        # matmul over a subset of rows), and it is decided by the budget (the vocabulary is in the model's key).
        chunk = f"auto{self.memory_budget_bytes}" if self.chunk_size is None else str(self.chunk_size)
        return f"layout={self.layout or 'plain'}|chunk={chunk}"

    def logps_fn(self) -> LogpsFn:
        return make_logps_fn(packing=self.packing, prefix_sharing=self.prefix_sharing, chunk_size=self.chunking)

    def describe(self, model: torch.nn.Module, longest_positions: int | None = None) -> str:
        """One line for the start of a run: how the LM head runs for this model, and what that means for the
        longest micro-batch (``longest_positions`` response positions: micro-batch x responses x max length)."""
        base = unwrap_model(model)
        head = base.get_output_embeddings()
        if head is not None and (_fsdp_sharded(base) or is_partitioned(base)):
            return ("log-probs: the weights are sharded (FSDP2 / ZeRO-3), so the LM head runs inside the model's "
                    "forward, at every position; logits are not chunked (logps_chunk_size and logits_memory_mb have "
                    "no effect)")
        if head is None or not head_at_selected_positions(base):
            return (f"log-probs: {type(base).__name__} makes its own logits at every position; they are not "
                    "chunked (logps_chunk_size and logits_memory_mb have no effect)")
        vocab = _head_vocab(head, base)
        low = _low_precision_logits(next(base.parameters()), head)
        need = _size(longest_positions * vocab * (PLAIN_LOGIT_BYTES + 2 * low)) if longest_positions else ""
        if self.chunk_size == 0:
            line = f"log-probs: LM head over all response positions at once (chunking off; vocabulary {vocab:,})"
            if longest_positions:
                line += f"; the longest micro-batch ({longest_positions:,} positions) needs up to {need} for it"
            return line
        if self.chunk_size:
            return f"log-probs: LM head in chunks of {self.chunk_size:,} positions (vocabulary {vocab:,})"
        budget = LogitsBudget(self.memory_budget_bytes)
        plain, chunk = budget.plain_positions(vocab, low), budget.chunk_positions(vocab, low)
        line = (f"log-probs: LM head in chunks of up to {chunk:,} positions when a micro-batch's logits exceed "
                f"{self.memory_budget_bytes / 2**20:.3g} MB (over {plain:,} response positions at vocabulary "
                f"{vocab:,}; logits_memory_mb, logps_chunk_size)")
        if longest_positions:
            verdict = "always fits" if longest_positions <= plain else f"would need {need} unchunked"
            line += f"; the longest micro-batch here ({longest_positions:,} positions) {verdict}"
        return line

    def collate(self, pad_token_id: int) -> Callable[[list], dict]:
        """Plain padded batches (``data.collate_preferences``) plus, for a packed / prefix-shared mode, the
        layout the fast path reads (``packing.build_layout``)."""
        from .data import collate_preferences
        from .packing import build_layout

        def collate(examples: list) -> dict:
            batch = collate_preferences(list(examples), pad_token_id)
            if self.layout is not None:
                batch.update(build_layout(list(examples), packing=self.packing, prefix_sharing=self.prefix_sharing,
                                          pad_token_id=pad_token_id))
            return batch

        return collate


__all__ = ["ResponseLogps", "split_responses", "token_logps", "masked_sequence_logps", "forward_logps", "naive_logps",
           "full_logits_logps", "head_at_selected_positions",
           "unwrap_model", "chunked_token_logps", "chunked_forward_logps", "layout_logps", "compute_logps",
           "make_logps_fn", "LogpsMode", "LogpsFn", "LogitsBudget", "resolve_chunk_size", "PLAIN_LOGIT_BYTES",
           "CHUNK_LOGIT_BYTES", "DEFAULT_LOGITS_MEMORY_MB"]
