"""Per-response log-probabilities log pi(y|x) of a causal LM.

The plain path runs one forward over the concatenated batch (every response of every example, the
response-major layout made by ``prefopt.data.collate``) and sums the log-probs of response tokens only.
Faster paths (precomputed reference, packing, prefix sharing, chunked log-softmax) sit beside it and are
checked against it; the losses never see which path produced the numbers.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor


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


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(cls: type) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


_HEAD_CHECKS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def head_at_selected_positions(base: torch.nn.Module) -> bool:
    """Can the log-probs apply the LM head to chosen hidden states only? Needs a decoder, an output embedding and
    ``logits_to_keep``, and -- checked once per model on a 3-token input -- head(decoder output) must reproduce the
    model's own logits (some architectures scale or post-process logits in ways only their forward knows)."""
    if not _accepts_logits_to_keep(type(base)) or base.get_output_embeddings() is None:
        return False
    ok = _HEAD_CHECKS.get(base)
    if ok is None:
        ok = _HEAD_CHECKS[base] = _head_reproduces_logits(base)
    return ok


def _head_reproduces_logits(base: torch.nn.Module) -> bool:
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
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
    finally:
        base.train(was_training)


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


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / torch.compile / peft wrappers (LoRA layers stay injected in it)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    return model


def _decoder(base: torch.nn.Module) -> torch.nn.Module:
    dec = base.get_decoder() if hasattr(base, "get_decoder") else None
    if dec is None:
        dec = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if not isinstance(dec, torch.nn.Module) or dec is base:
        raise TypeError(f"cannot find the decoder (backbone) of {type(base).__name__} for chunked log-probs")
    return dec


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


class _ChunkedLinearLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for [M, H] hidden rows, ``chunk`` rows at a time.

    Only one chunk's [chunk, V] logits exist at once, in forward and in backward (which recomputes them from
    the saved hidden states): d logp / d logits = onehot(target) - softmax(logits).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        dev = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.chunk = chunk
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias).float()
            out[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        enabled, amp_dtype = ctx.autocast
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        with torch.autocast(hidden.device.type, dtype=amp_dtype, enabled=enabled):
            for s in range(0, hidden.shape[0], ctx.chunk):
                h, go, t = hidden[s:s + ctx.chunk], grad_out[s:s + ctx.chunk, None], targets[s:s + ctx.chunk, None]
                logits = F.linear(h, weight, bias).float()
                g = torch.softmax(logits, dim=-1).mul_(-go)
                g.scatter_add_(1, t, go)
                if not enabled:
                    g = g.to(weight.dtype)
                if need_h:
                    grad_h[s:s + ctx.chunk] = (g @ weight).to(grad_h.dtype)
                if need_w:
                    grad_w += (g.t() @ h).float()
                if need_b:
                    grad_b += g.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None)


def chunked_token_logps(hidden: Tensor, head: torch.nn.Module, targets: Tensor, chunk_size: int,
                        transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Per-row log-probs [M] (float32) of ``targets`` [M] under ``head(hidden)`` [M, V], chunk by chunk.

    A plain nn.Linear head uses a custom autograd Function (backward recomputes each chunk's logits); any other
    head (e.g. LoRA on the LM head) or a logit transform (soft-capping) falls back to checkpointing per chunk.
    Either way the full [M, V] logits never exist at once.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if type(head) is torch.nn.Linear and transform is None:
        return _ChunkedLinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)

    def one(h: Tensor, t: Tensor) -> Tensor:
        logits = head(h)
        if transform is not None:
            logits = transform(logits)
        return token_logps(logits, t)

    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(one, h, t, use_reentrant=False))
        else:
            parts.append(one(h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _run_for_hidden(model: torch.nn.Module, base: torch.nn.Module, **inputs) -> Tensor:
    """Run the (possibly wrapped) model; return the decoder's final hidden states, computing no logits."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = _decoder(base).register_forward_hook(hook)
    try:
        model(**inputs, use_cache=False,
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the decoder's forward hook did not fire; chunked log-probs cannot read hidden states")
    return captured[-1]


def _selected_token_logps(model: torch.nn.Module, inputs: dict, keep: Tensor, pick: Tensor, targets: Tensor,
                          chunk_size: int | None) -> Tensor:
    """Per-target log-probs [M]: logits only at the ``keep`` positions ([rows, L] bool), each computed once.

    The LM head runs on the kept hidden states only (never on prompt or pad positions); with ``chunk_size`` it
    runs chunk by chunk so the [M, V] logits never exist at once.
    """
    base = unwrap_model(model)
    if not head_at_selected_positions(base):  # the model's own logits at every position, then the kept ones
        if chunk_size:
            warnings.warn(f"{type(base).__name__}: chunked log-probs need the LM head applied to hidden states, "
                          "which does not reproduce this model's logits; computing full logits instead.",
                          stacklevel=3)
        logits = model(**inputs, use_cache=False).logits[keep].float()
    else:
        hidden = _run_for_hidden(model, base, **inputs)[keep]  # [U, H], row-major
        head, transform = base.get_output_embeddings(), _head_transform(base)
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


def chunked_forward_logps(model: torch.nn.Module, batch: dict, chunk_size: int | None) -> ResponseLogps:
    """The plain padded layout, logits only at response positions; with ``chunk_size``, in chunks of positions."""
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
    FlashAttention), "auto" takes segments wherever the model supports them.
    """
    from .packing import layout_attention_mask, segment_attention, supports_segment_attention, uses_position_packing

    if attention not in ("auto", "segments", "mask"):
        raise ValueError(f"attention must be 'auto', 'segments' or 'mask', got {attention!r}")
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
    mask = layout_attention_mask(batch, impl, dtype)
    if mask is not None or not uses_position_packing(impl):
        inputs["attention_mask"] = mask
    per_token = _selected_token_logps(model, inputs, batch["layout_keep"], batch["layout_pick"],
                                      batch["layout_targets"], chunk_size)
    return _sum_by_row(per_token, batch["layout_rows"], batch["layout_num_rows"])


def compute_logps(model: torch.nn.Module, batch: dict, *, packing: bool = False, prefix_sharing: bool = False,
                  chunk_size: int | None = None) -> ResponseLogps:
    """Summed response log-probs [K*B] by the chosen path; every path equals ``forward_logps``.

    packing / prefix_sharing need the batch to carry that layout (``prefopt.train.dpo.make_collate`` with the
    same flags, or ``prefopt.packing.build_layout``); chunk_size (None/0: off) bounds the LM-head memory.
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


def make_logps_fn(*, packing: bool = False, prefix_sharing: bool = False, chunk_size: int | None = None) -> LogpsFn:
    """A ``(model, batch) -> ResponseLogps`` for one mode; the plain mode is ``forward_logps`` itself."""
    if chunk_size is not None and chunk_size < 0:
        from .errors import ConfigError

        raise ConfigError(f"invalid logps_chunk_size = {chunk_size!r}: must be an integer >= 0 (0 disables chunking).")
    if not (packing or prefix_sharing or chunk_size):
        return forward_logps
    return functools.partial(compute_logps, packing=packing, prefix_sharing=prefix_sharing,
                             chunk_size=chunk_size or None)


def logps_fn_from_config(cfg) -> LogpsFn:
    """The mode a DPOConfig asks for (fields packing, prefix_sharing, logps_chunk_size; absent = off)."""
    return make_logps_fn(packing=getattr(cfg, "packing", False), prefix_sharing=getattr(cfg, "prefix_sharing", False),
                         chunk_size=getattr(cfg, "logps_chunk_size", 0) or None)


__all__ = ["ResponseLogps", "split_responses", "token_logps", "masked_sequence_logps", "forward_logps", "naive_logps",
           "full_logits_logps", "head_at_selected_positions",
           "unwrap_model", "chunked_token_logps", "chunked_forward_logps", "layout_logps", "compute_logps",
           "make_logps_fn", "logps_fn_from_config", "LogpsFn"]
