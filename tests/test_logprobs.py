"""Log-prob building blocks: per-token log-probs, the plain masked sum, and the chunked LM-head log-softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefopt.data import collate_preferences
from prefopt.data.types import TokenizedExample
from prefopt.logprobs import (
    ResponseLogps,
    chunked_forward_logps,
    chunked_token_logps,
    forward_logps,
    full_logits_logps,
    head_at_selected_positions,
    masked_sequence_logps,
    naive_logps,
    split_responses,
    token_logps,
    unwrap_model,
)


def _head_case(m=23, h=16, v=37, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.5)
        if bias:
            head.bias.copy_(torch.randn(v, generator=g))
    hidden = torch.randn(m, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (m,), generator=g)
    return head, hidden, targets


def _full(head, hidden, targets):
    return torch.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None]).squeeze(1)


def test_token_logps_is_log_softmax_at_labels():
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, labels), expected)


def test_masked_sequence_logps_shifts_and_counts():
    logits = torch.randn(1, 4, 6)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, False, True, True]])
    out = masked_sequence_logps(logits, ids, mask)
    lp = torch.log_softmax(logits[0], -1)
    assert float(out.sum[0]) == pytest.approx(float(lp[1, 3] + lp[2, 4]), abs=1e-6)
    assert out.count.tolist() == [2]


def test_split_responses_and_by_example():
    x = torch.arange(6.0)  # K=3, B=2 response-major
    assert split_responses(x, 3).tolist() == [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    r = ResponseLogps(x, torch.ones(6, dtype=torch.long)).by_example(3)
    assert r.sum.shape == (2, 3) and r.mean.tolist() == r.sum.tolist()


@pytest.mark.parametrize("chunk", [1, 4, 23, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_values_and_grads_equal_full_logits(chunk, bias):
    head, hidden, targets = _head_case(bias=bias)
    w = torch.randn(hidden.shape[0])
    (_full(head, hidden, targets) * w).sum().backward()
    ref = {"h": hidden.grad.clone(), "w": head.weight.grad.clone(), "b": head.bias.grad.clone() if bias else None}
    hidden.grad = None
    head.zero_grad()
    out = chunked_token_logps(hidden, head, targets, chunk)
    torch.testing.assert_close(out, _full(head, hidden, targets), rtol=1e-6, atol=1e-5)
    (out * w).sum().backward()
    torch.testing.assert_close(hidden.grad, ref["h"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, ref["w"], rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(head.bias.grad, ref["b"], rtol=1e-5, atol=1e-6)


def test_chunked_head_fallback_for_other_heads_and_logit_transforms():
    """A non-Linear head (or soft-capping) goes through per-chunk checkpointing: same values and grads."""
    head, hidden, targets = _head_case()
    wrapped = torch.nn.Sequential(head)
    cap = lambda z: torch.tanh(z / 3.0) * 3.0  # noqa: E731

    def full():
        return torch.log_softmax(cap(head(hidden)), -1).gather(1, targets[:, None]).squeeze(1)

    full().sum().backward()
    gh, gw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.zero_grad()
    out = chunked_token_logps(hidden, wrapped, targets, 5, transform=cap)
    torch.testing.assert_close(out, full(), rtol=1e-6, atol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(hidden.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, gw, rtol=1e-5, atol=1e-6)


def test_chunked_head_memory_is_bounded_by_the_chunk():
    """No [M, V] tensor is saved for backward: only the inputs (hidden, weight, targets)."""
    head, hidden, targets = _head_case(m=64, v=257)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_logps(hidden, head, targets, 8)
    assert max(saved) < 64 * 257
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _full(head, hidden, targets)
    assert max(saved) >= 64 * 257  # the plain path does keep full logits (the test can tell the difference)


def test_chunked_head_in_bfloat16_params():
    head, hidden, targets = _head_case()
    head = head.to(torch.bfloat16)
    h = hidden.detach().to(torch.bfloat16).requires_grad_()
    out = chunked_token_logps(h, head, targets, 6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _full(head, h, targets), rtol=0, atol=1e-3)
    out.sum().backward()
    assert h.grad.dtype == head.weight.grad.dtype == torch.bfloat16


def _model(tie: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_plain_and_chunked_forward_equal_naive(tie):
    model = _model(tie)
    examples = [TokenizedExample([3, 4, 5], [[6, 7], [8, 9, 10, 11]]), TokenizedExample([12], [[13, 14, 15], [16]])]
    batch = collate_preferences(examples, 0)
    with torch.no_grad():
        plain = forward_logps(model, batch)
        chunked = chunked_forward_logps(model, batch, chunk_size=3)
    expected = [naive_logps(model, ex.prompt_ids, ex.response_ids[k]) for k in range(2) for ex in examples]
    torch.testing.assert_close(plain.sum, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.sum, plain.sum, rtol=1e-5, atol=1e-5)
    assert chunked.count.tolist() == plain.count.tolist() == [2, 3, 4, 1]


@pytest.mark.parametrize("tie", [True, False])
def test_plain_path_head_at_response_positions_equals_full_logits(tie):
    """forward_logps runs the LM head on response positions only; values and gradients equal full logits."""
    model = _model(tie)
    assert head_at_selected_positions(model)
    examples = [TokenizedExample([3, 4, 5, 9, 9], [[6, 7], [8, 9, 10, 11]]), TokenizedExample([12], [[13, 14, 15], [16]])]
    batch = collate_preferences(examples, 0)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5])
    results = []
    for fn in (forward_logps, full_logits_logps):
        model.zero_grad(set_to_none=True)
        out = fn(model, batch)
        (out.sum * weights).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast, g_fast), (full, g_full) = results
    torch.testing.assert_close(fast.sum, full.sum, rtol=1e-5, atol=1e-5)
    assert fast.count.tolist() == full.count.tolist()
    assert g_fast.keys() == g_full.keys()
    for name in g_full:
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-4, atol=1e-6)

    class NoLogitsToKeep(torch.nn.Module):  # a model without logits_to_keep gets the full-logits form
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    assert not head_at_selected_positions(NoLogitsToKeep())
    with torch.no_grad():
        torch.testing.assert_close(forward_logps(NoLogitsToKeep(), batch).sum, full.sum.detach(), rtol=1e-5, atol=1e-5)


def test_unwrap_model_sees_through_peft_and_ddp_like_wrappers():
    from prefopt.models import apply_lora

    model = _model(True)
    assert unwrap_model(model) is model
    lora = apply_lora(_model(True))
    base = unwrap_model(lora)
    assert type(base).__name__ == "LlamaForCausalLM" and base is lora.get_base_model()
    assert unwrap_model(torch.nn.DataParallel(lora)) is base
