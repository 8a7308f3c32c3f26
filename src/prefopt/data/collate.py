"""Pad a batch of TokenizedExamples into one response-major tensor batch (a single forward pass)."""

from __future__ import annotations

import torch

from .types import TokenizedExample


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors moved to ``device`` (other values, e.g. ``num_responses``, as they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def collate_preferences(batch: list[TokenizedExample], pad_token_id: int,
                        pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor | int]:
    """Stack K responses of B examples into [K*B, T] rows ``prompt + response_k``, right-padded.

    Row ``k * B + b`` holds example b with its response k (response-major: all best responses first).
    ``loss_mask`` is True exactly on response tokens (label positions, not yet shifted).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    k = batch[0].num_responses
    if any(ex.num_responses != k for ex in batch):
        counts = sorted({ex.num_responses for ex in batch})
        raise ValueError(f"all examples in a batch must have the same number of responses, got {counts}")
    rows = [(ex.prompt_ids, ex.response_ids[i]) for i in range(k) for ex in batch]
    width = max(len(p) + len(r) for p, r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for j, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[j, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[j, :n] = 1
        loss_mask[j, len(p):n] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "response_lengths": torch.tensor([len(r) for _, r in rows], dtype=torch.long),
        "prompt_lengths": torch.tensor([len(p) for p, _ in rows], dtype=torch.long),
        "num_responses": k,
    }
