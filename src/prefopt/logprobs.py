"""Per-response log-probabilities log pi(y|x) of a causal LM.

The plain path runs one forward over the concatenated batch (every response of every example, the
response-major layout made by ``prefopt.data.collate``) and sums the log-probs of response tokens only.
Faster paths (precomputed reference, packing, prefix sharing, chunked log-softmax) sit beside it and are
checked against it; the losses never see which path produced the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    """The plain path: one forward of the whole concatenated batch; log-probs of response tokens, [K*B]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return masked_sequence_logps(out.logits, batch["input_ids"], batch["loss_mask"])


def naive_logps(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int]) -> float:
    """One sequence, no padding, no batching: the definition the fast paths are tested against."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(start, ids.shape[1])))


__all__ = ["ResponseLogps", "split_responses", "token_logps", "masked_sequence_logps", "forward_logps", "naive_logps"]
