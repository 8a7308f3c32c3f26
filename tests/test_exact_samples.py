"""generate -> label -> dpo keeps the sampled token ids exactly (no re-tokenization, no EOS added to cut samples)."""

import json
import textwrap

import pytest

from prefopt.cli import main
from prefopt.data import PreferenceExample, load_preferences, tokenize_example, tokenize_examples
from prefopt.errors import DataError
from prefopt.models import load_tokenizer

PROMPTS = ["Write a review of the film The Golden River.", "Hi", "The plot was", "Tell me about the cast."]


def _dpo(model, data, out):
    return ["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--optimizer", "adamw",
            "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "64", "--max-prompt-length", "32",
            "--warmup-steps", "0", "--progress", "false", "--max-steps", "1"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    """Samples (some cut at the token limit) written by `prefopt generate`, and the reward-fn module."""
    tmp = tmp_path_factory.mktemp("exact")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    samples = tmp / "samples.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output", str(samples),
                 "--num-samples", "4", "--max-new-tokens", "5", "--seed", "3", "--temperature", "1.0",
                 "--progress", "false"]) == 0
    (tmp / "exact_rewards.py").write_text(textwrap.dedent("""
        def score(prompts, responses):
            return [len(r) + (sum((i + 1) * ord(c) for i, c in enumerate(r)) % 997) / 1000 for r in responses]
    """))
    return tmp, samples


def test_generate_writes_ids(pipeline, tiny_model_dir):
    _, samples = pipeline
    tok = load_tokenizer(str(tiny_model_dir))
    rows = _rows(samples)
    assert len(rows) == 16
    for r in rows:
        assert {"prompt", "response", "prompt_index", "sample_index", "prompt_tokens", "response_tokens",
                "ended_with_eos", "prompt_ids", "response_ids"} <= set(r)
        assert len(r["prompt_ids"]) == r["prompt_tokens"] and len(r["response_ids"]) == r["response_tokens"]
        assert r["ended_with_eos"] == (r["response_ids"][-1] == tok.eos_token_id)
    assert any(not r["ended_with_eos"] for r in rows), "max_new_tokens=5 should cut some samples"


def test_label_and_dpo_train_on_the_sampled_ids(pipeline, tiny_model_dir, tmp_path, monkeypatch):
    tmp, samples = pipeline
    monkeypatch.syspath_prepend(str(tmp))
    tok = load_tokenizer(str(tiny_model_dir))
    sampled = {(tuple(r["prompt_ids"]), tuple(r["response_ids"])): r for r in _rows(samples)}
    for mode, extra in [("pairs", ["--all-pairs"]), ("ranked", ["--ranking"])]:
        out = tmp_path / f"{mode}.jsonl"
        assert main(["label", "--samples", str(samples), "--output", str(out), "--reward-fn", "exact_rewards:score",
                     *extra]) == 0
        rows = _rows(out)
        assert rows
        examples, _ = load_preferences(out, vocab_size=len(tok))
        items, report = tokenize_examples(examples, tok)
        assert report.kept == len(rows) and report.dropped == 0 and report.truncated == 0
        cut = differs = resplit = 0
        for row, ex, item in zip(rows, examples, items):
            if mode == "pairs":
                ids, ended = [row["chosen_ids"], row["rejected_ids"]], [row["chosen_ended_with_eos"],
                                                                         row["rejected_ended_with_eos"]]
                texts = [row["chosen"], row["rejected"]]
            else:
                ids, ended, texts = row["response_ids"], row["responses_ended_with_eos"], row["responses"]
            # DPO trains on exactly the sampled ids
            assert item.prompt_ids == row["prompt_ids"] and item.response_ids == ids
            assert ex.responses == texts and ex.prompt == row["prompt"]  # texts kept for reports
            for r_ids, r_end, text in zip(ids, ended, texts):
                s = sampled[(tuple(row["prompt_ids"]), tuple(r_ids))]
                assert s["response"] == text and s["ended_with_eos"] == r_end
                if not r_end:  # cut at max_new_tokens: no EOS added
                    cut += 1
                    assert r_ids[-1] != tok.eos_token_id
                body = r_ids if not r_end else r_ids[:-1]
                resplit += tok(text, add_special_tokens=False)["input_ids"] != body  # text gives other ids
            # the text path would give other ids (EOS appended to cut samples, re-split tokens, ...)
            text_item = tokenize_example(PreferenceExample(row["prompt"], texts), tok)
            differs += text_item.response_ids != item.response_ids
        assert cut > 0 and differs > 0 and resplit > 0
    # one short DPO run on the exact pairs
    assert main(_dpo(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "run")) == 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_hand_made_ids_that_differ_from_the_text_tokenization(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    prompt = "Write a review of the film."
    prompt_ids = tok(prompt)["input_ids"]
    text = " the film was good"
    merged = tok(text, add_special_tokens=False)["input_ids"]
    split = [i for c in text for i in tok(c, add_special_tokens=False)["input_ids"]]  # one character at a time
    assert split != merged and tok.decode(split) == tok.decode(merged)
    row = {"prompt": prompt, "chosen": text, "rejected": " bad", "prompt_ids": prompt_ids, "chosen_ids": split,
           "rejected_ids": tok(" bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
           "chosen_ended_with_eos": False, "rejected_ended_with_eos": True}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ex,), report = load_preferences(path, vocab_size=len(tok))
    assert report.format == "explicit" and ex.response_ids == [split, row["rejected_ids"]]
    (item,), _ = tokenize_examples([ex], tok)
    assert item.prompt_ids == prompt_ids and item.response_ids == [split, row["rejected_ids"]]
    # truncation follows the usual rules (response cut to fit)
    cut = tokenize_example(ex, tok, max_length=len(prompt_ids) + 3)
    assert cut.response_ids == [split[:3], row["rejected_ids"][:3]] and cut.meta["truncated"]
    # ids without texts are accepted too
    bare = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    path.write_text(json.dumps(bare) + "\n")
    (ex,), _ = load_preferences(path, vocab_size=len(tok))
    assert tokenize_examples([ex], tok)[0][0].response_ids == [split, row["rejected_ids"]]


def test_bad_ids_reported_with_file_line_and_field(tiny_model_dir, tmp_path, capsys):
    tok = load_tokenizer(str(tiny_model_dir))
    good = {"prompt": "p", "chosen": " a", "rejected": " b", "prompt_ids": [5, 6], "chosen_ids": [7, 8],
            "rejected_ids": [9], "chosen_ended_with_eos": False, "rejected_ended_with_eos": False}
    rows = [good, {**good, "chosen_ids": [7, len(tok) + 5]}, {**good, "rejected_ids": []},
            {**good, "prompt_ids": "1 2"}, {**good, "chosen_ids": [3], "rejected_ids": [3]}, good]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_preferences(path, vocab_size=len(tok))
    msg = str(err.value)
    assert f"{path}:2" in msg and "chosen_ids" in msg and "bad_token_id" in msg
    _, report = load_preferences(path, vocab_size=len(tok), skip_bad=True)
    occ = report.validation.occurrences
    assert occ["bad_token_id"] == [(f"{path}:2", "chosen_ids")]
    assert occ["empty_field"] == [(f"{path}:3", "rejected_ids")]
    assert occ["wrong_type"] == [(f"{path}:4", "prompt_ids")]
    assert occ["identical_responses"] == [(f"{path}:5", "chosen_ids")]
    assert occ["duplicate"] == [(f"{path}:6", f"{path}:1")]
    # tokenize_example checks the vocabulary itself when the loader was not given it
    bad = PreferenceExample("p", [" a", " b"], "x:9", prompt_ids=[5], response_ids=[[len(tok)], [1]])
    with pytest.raises(DataError, match="outside the vocabulary") as e:
        tokenize_example(bad, tok)
    assert (e.value.source, e.value.field, e.value.reason) == ("x:9", "response_ids[0]", "bad_token_id")
    # dpo stops with the report naming file:line and field
    assert main(_dpo(tiny_model_dir, path, tmp_path / "run")) == 2
    printed = capsys.readouterr().err
    assert f"{path}:2" in printed and "chosen_ids" in printed and "bad_token_id" in printed


def test_old_sample_files_without_ids_work_as_before(pipeline, tiny_model_dir, tmp_path, monkeypatch):
    tmp, samples = pipeline
    monkeypatch.syspath_prepend(str(tmp))
    tok = load_tokenizer(str(tiny_model_dir))
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("prompt_ids", "response_ids")}) + "\n"
                           for r in _rows(samples)))
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "--samples", str(old), "--output", str(out), "--reward-fn", "exact_rewards:score"]) == 0
    rows = _rows(out)
    assert rows and all(set(r) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} for r in rows)
    examples, _ = load_preferences(out, vocab_size=len(tok))
    assert all(ex.response_ids is None for ex in examples)
    items, _ = tokenize_examples(examples, tok)
    assert all(r[-1] == tok.eos_token_id for it in items for r in it.response_ids)  # re-tokenized, EOS appended
    assert main(_dpo(tiny_model_dir, out, tmp_path / "run")) == 0


def test_label_dedups_by_ids_and_mixed_groups_fall_back_to_text(tmp_path):
    from prefopt.label import read_samples

    rows = [{"prompt": "p", "response": "x", "prompt_ids": [1], "response_ids": [4, 2], "ended_with_eos": True},
            {"prompt": "p", "response": "x", "prompt_ids": [1], "response_ids": [4], "ended_with_eos": False},
            {"prompt": "p", "response": "x", "prompt_ids": [1], "response_ids": [4, 2], "ended_with_eos": True},
            {"prompt": "q", "response": "y", "prompt_ids": [1], "response_ids": [5], "ended_with_eos": False},
            {"prompt": "q", "response": "y"}]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (p, q), duplicates = read_samples(path)
    assert p.response_ids == [[4, 2], [4]] and p.ended_with_eos == [True, False] and p.responses == ["x", "x"]
    assert q.response_ids is None and q.responses == ["y"] and duplicates == 2
