"""--streaming: rows read, validated and tokenized as training goes; exact position through a checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from prefopt.config import DPOConfig
from prefopt.data import load_preferences, tokenize_examples, write_jsonl
from prefopt.data.stream import StreamedExamples, shuffled
from prefopt.data.validation import DataValidationError
from prefopt.errors import ConfigError
from prefopt.models import load_tokenizer
from prefopt.train.dpo import DPO, train_dpo


def test_shuffle_buffer_is_a_seeded_permutation():
    xs = list(range(100))
    a = list(shuffled(iter(xs), 10, random.Random(1)))
    assert sorted(a) == xs and a != xs and a == list(shuffled(iter(xs), 10, random.Random(1)))
    assert a != list(shuffled(iter(xs), 10, random.Random(2)))
    assert list(shuffled(iter(xs), 0, random.Random(1))) == xs
    assert max(abs(v - i) for i, v in enumerate(a)) < 100  # a local shuffle, not a global one
    assert all(v <= i + 10 for i, v in enumerate(a))       # nothing comes out before it was read


def rows_of(path):
    return [json.loads(line) for line in open(path)]


def test_stream_yields_every_example_once_per_epoch_in_buffered_order(tiny_model_dir, synthetic_pairs):
    tok = load_tokenizer(tiny_model_dir)
    plain, _ = tokenize_examples(load_preferences(synthetic_pairs)[0], tok)
    by_source = {ex.source: ex for ex in plain}
    stream = StreamedExamples(synthetic_pairs, tok, shuffle_buffer=16, seed=3, batch_size=8, chunk=5)
    n = len(plain)
    first = [stream[p] for p in range(n)]
    second = [stream[p] for p in range(n, 2 * n)]
    for epoch in (first, second):
        assert sorted(ex.source for ex in epoch) == sorted(by_source)
        for ex in epoch:
            assert (ex.prompt_ids, ex.response_ids) == (by_source[ex.source].prompt_ids,
                                                         by_source[ex.source].response_ids)
    assert [ex.source for ex in first] != [ex.source for ex in second]  # each epoch shuffled anew
    with pytest.raises(IndexError, match="already passed"):
        stream[0]
    with pytest.raises(TypeError):
        len(stream)


def test_restore_continues_at_the_same_row(tiny_model_dir, synthetic_pairs):
    tok = load_tokenizer(tiny_model_dir)
    a = StreamedExamples(synthetic_pairs, tok, shuffle_buffer=16, seed=3, batch_size=8)
    run = [a[p].source for p in range(100)]
    b = StreamedExamples(synthetic_pairs, tok, shuffle_buffer=16, seed=3, batch_size=8)
    for p in range(4 * 8 + 3):  # a process whose share of step 9 ends early: state() reads to the step's end
        b[p]
    state = json.loads(json.dumps(b.state(9)))  # through trainer_state.json
    c = StreamedExamples(synthetic_pairs, tok, shuffle_buffer=16, seed=3, batch_size=8)
    c.restore(state)
    assert [c[p].source for p in range(72, 100)] == run[72:]


def test_bad_rows_and_too_long_rows_in_a_stream(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    rows = [{"prompt": f"p{i}", "chosen": f" yes {i}", "rejected": " no"} for i in range(20)]
    rows[5] = {"prompt": "p5", "chosen": " same", "rejected": " same"}
    rows[9] = {"prompt": "p9", "chosen": " a" * 80 + " x", "rejected": " a" * 80 + " y"}  # identical once cut
    path = write_jsonl(rows, tmp_path / "d.jsonl")
    strict = StreamedExamples(path, tok, shuffle_buffer=0, batch_size=4, max_length=24, max_prompt_length=8)
    with pytest.raises(DataValidationError, match=r"d\.jsonl:6"):
        [strict[p] for p in range(20)]
    lenient = StreamedExamples(path, tok, shuffle_buffer=0, batch_size=4, max_length=24, max_prompt_length=8,
                               skip_bad=True)
    got = [lenient[p].source for p in range(18)]
    assert got == [f"{path}:{i + 1}" for i in range(20) if i not in (5, 9)]
    v = lenient.report.validation
    assert v.counts == {"identical_responses": 1, "too_long": 1}
    assert v.occurrences["too_long"] == [(f"{path}:10", None)]
    assert "too_long" in lenient.summary() and f"{path}:6" in lenient.summary()


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), batch_size=8, micro_batch_size=4,
                max_length=64, max_prompt_length=32, lr=1e-3, warmup_steps=0, seed=0, beta=0.1, progress=False,
                streaming=True, shuffle_buffer=16, max_steps=12)
    base.update(kw)
    return DPOConfig(**base)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_streaming_config_needs_max_steps_and_a_live_reference(tiny_model_dir, synthetic_pairs, tmp_path):
    with pytest.raises(ConfigError, match="max_steps"):
        cfg(tiny_model_dir, synthetic_pairs, tmp_path / "a", max_steps=None).validate()
    with pytest.raises(ConfigError, match="precompute"):
        cfg(tiny_model_dir, synthetic_pairs, tmp_path / "a", precompute_ref=True).validate()
    with pytest.raises(ConfigError, match="eval_fraction"):
        cfg(tiny_model_dir, synthetic_pairs, tmp_path / "a", eval_fraction=0.1).validate()
    assert not cfg(tiny_model_dir, synthetic_pairs, tmp_path / "a").precomputes_reference


def test_resumed_streaming_run_equals_uninterrupted(tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, full, save_every=2))  # 12 steps of 8: crosses the epoch (64)
    assert "streamed from" in capsys.readouterr().out
    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    real_step = DPO.step

    def interrupted(self, model, batch):  # SIGINT inside step 10 (2 micro-batches a step)
        calls["n"] += 1
        if calls["n"] == 19:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, model, batch)

    monkeypatch.setattr(DPO, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(cfg(tiny_model_dir, synthetic_pairs, crashed, save_every=2))
    monkeypatch.setattr(DPO, "step", real_step)
    assert max(r["step"] for r in metrics(crashed)) == 10
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, crashed, save_every=2, resume="auto"))
    a = {r["step"]: r for r in metrics(full) if "loss" in r}
    b = {r["step"]: r for r in metrics(crashed) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
        assert b[step]["rewards/margins"] == pytest.approx(a[step]["rewards/margins"], abs=1e-6), step


def test_a_stream_with_nothing_that_fits_stops_instead_of_looping(tiny_model_dir, synthetic_pairs):
    tok = load_tokenizer(tiny_model_dir)
    stream = StreamedExamples(synthetic_pairs, tok, shuffle_buffer=0, batch_size=4, max_length=2,
                              max_prompt_length=1)
    with pytest.raises(ConfigError, match="too long for max_length"):
        stream[0]


def test_sft_from_preferences_streams_the_chosen_responses(tiny_model_dir, synthetic_pairs):
    from prefopt.data.sft import load_sft, tokenize_sft

    tok = load_tokenizer(tiny_model_dir)
    plain, _ = tokenize_sft(load_sft(synthetic_pairs, from_preferences=True)[0], tok)
    stream = StreamedExamples(synthetic_pairs, tok, kind="sft", from_preferences=True, shuffle_buffer=0,
                              batch_size=4)
    assert [(stream[i].prompt_ids, stream[i].response_ids) for i in range(len(plain))] == \
        [(x.prompt_ids, x.response_ids) for x in plain]
