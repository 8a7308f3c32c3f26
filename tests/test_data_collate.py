"""Collation into one response-major batch, and the built-in synthetic preference set."""

import pytest
import torch

from prefopt.data import (TokenizedExample, collate_preferences, load_preferences, make_synthetic_preferences,
                          synthetic_text, write_jsonl)

PAD = 0


def test_collate_response_major_layout():
    batch = [TokenizedExample([5, 6], [[10, 11, 12], [20]]), TokenizedExample([7], [[30], [40, 41]])]
    out = collate_preferences(batch, PAD)
    assert out["num_responses"] == 2
    assert out["input_ids"].tolist() == [
        [5, 6, 10, 11, 12],  # ex0.resp0
        [7, 30, 0, 0, 0],    # ex1.resp0
        [5, 6, 20, 0, 0],    # ex0.resp1
        [7, 40, 41, 0, 0],   # ex1.resp1
    ]
    assert out["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert out["loss_mask"].tolist() == [[False, False, True, True, True], [False, True, False, False, False],
                                         [False, False, True, False, False], [False, True, True, False, False]]
    assert out["response_lengths"].tolist() == [3, 1, 1, 2] and out["prompt_lengths"].tolist() == [2, 1, 2, 1]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long
    assert out["loss_mask"].dtype == torch.bool
    assert (out["loss_mask"].sum(1) == out["response_lengths"]).all()


def test_collate_pad_multiple_k3_and_errors():
    batch = [TokenizedExample([1], [[2], [3, 3], [4]])] * 2
    out = collate_preferences(batch, pad_token_id=9, pad_to_multiple_of=8)
    assert out["input_ids"].shape == (6, 8) and out["num_responses"] == 3
    assert out["input_ids"][:, 0].tolist() == [1] * 6 and out["input_ids"][:, 1].tolist() == [2, 2, 3, 3, 4, 4]
    assert (out["input_ids"][:, 3:] == 9).all() and out["attention_mask"].sum().item() == 14
    with pytest.raises(ValueError, match="same number of responses"):
        collate_preferences([TokenizedExample([1], [[2], [3]]), TokenizedExample([1], [[2], [3], [4]])], PAD)
    with pytest.raises(ValueError, match="empty"):
        collate_preferences([], PAD)


def test_synthetic_deterministic_and_separable():
    a, b = make_synthetic_preferences(50, seed=3), make_synthetic_preferences(50, seed=3)
    assert [(e.prompt, e.responses) for e in a] == [(e.prompt, e.responses) for e in b]
    assert [e.responses for e in a] != [e.responses for e in make_synthetic_preferences(50, seed=4)]
    for ex in a:
        assert ex.prompt.startswith("Write a review of") and ex.chosen != ex.rejected
        assert abs(len(ex.chosen) - len(ex.rejected)) <= 4
    assert synthetic_text(20, seed=1) == synthetic_text(20, seed=1) and len(synthetic_text(20)) == 20
    with pytest.raises(ValueError):
        make_synthetic_preferences(2, num_responses=5)


@pytest.mark.parametrize("k, fmt", [(2, "explicit"), (3, "ranked")])
def test_synthetic_write_jsonl_roundtrip(tmp_path, k, fmt):
    exs = make_synthetic_preferences(10, seed=1, num_responses=k)
    loaded, report = load_preferences(write_jsonl(exs, tmp_path / "syn.jsonl"))
    assert report.format == fmt and report.loaded == 10
    assert [(e.prompt, e.responses) for e in loaded] == [(e.prompt, e.responses) for e in exs]
