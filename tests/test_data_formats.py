"""Loading and format handling: every input kind, every format, every bad-row kind, and the HH sample."""

import gzip
import json
import os
from pathlib import Path

import pytest

from prefopt.data import detect_format, iter_rows, load_preferences
from prefopt.errors import ConfigError, DataError

HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-sample.jsonl.gz"
MARKER = "\n\nAssistant:"


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


EXPLICIT = {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Go away."}


# ---- formats -------------------------------------------------------------------------------------------------

def test_explicit_text(tmp_path):
    exs, report = load_preferences(write_lines(tmp_path / "d.jsonl", [EXPLICIT, EXPLICIT]))
    assert report.format == "explicit" and report.loaded == 2 and not report.skipped
    assert exs[0].prompt == "Say hi." and exs[0].responses == [" Hi!", " Go away."]
    assert exs[1].source == f"{tmp_path / 'd.jsonl'}:2"


def test_explicit_conversational():
    row = {"prompt": msgs(("system", "Be kind."), ("user", "Hi")),
           "chosen": msgs(("assistant", "Hello!")), "rejected": msgs(("assistant", "What."))}
    assert detect_format(row) == "explicit"
    (ex,), _ = load_preferences([row])
    assert ex.prompt == row["prompt"] and ex.chosen == row["chosen"] and ex.rejected == row["rejected"]


def test_conversational_implicit():
    prefix = msgs(("user", "Hi"), ("assistant", "Hello."), ("user", "Tell a joke"))
    row = {"chosen": prefix + msgs(("assistant", "A pun.")), "rejected": prefix + msgs(("assistant", "No."))}
    assert detect_format(row) == "conversational"
    (ex,), report = load_preferences([row])
    assert report.format == "conversational"
    assert ex.prompt == prefix
    assert ex.responses == [msgs(("assistant", "A pun.")), msgs(("assistant", "No."))]


def test_implicit_hh_split_keeps_leading_space():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Any tips?\n\nAssistant:"
    row = {"chosen": prompt + " Sleep well.", "rejected": prompt + " Sleep less."}
    assert detect_format(row) == "implicit"
    (ex,), _ = load_preferences([row])
    assert ex.prompt == prompt  # never the char-level common prefix "... Sleep "
    assert ex.responses == [" Sleep well.", " Sleep less."]


@pytest.mark.parametrize("key, values, best_first", [
    ("ranks", [2, 1, 3], ["b", "a", "c"]),
    ("scores", [0.5, 2.0, -1.0], ["b", "a", "c"]),
])
def test_ranked_orders_best_first(key, values, best_first):
    row = {"prompt": "p", "responses": ["a", "b", "c"], key: values}
    assert detect_format(row) == "ranked"
    (ex,), _ = load_preferences([row])
    assert ex.responses == best_first and ex.chosen == "b" and ex.rejected == "c"


def test_named_format_and_unknown_format():
    row = {"prompt": msgs(("user", "Hi")), "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))}
    (ex,), report = load_preferences([row], format="conversational")
    assert report.format == "conversational" and ex.chosen == msgs(("assistant", "a"))
    with pytest.raises(ConfigError, match="unknown data format"):
        load_preferences([row], format="pairs")
    with pytest.raises(DataError, match="cannot detect"):
        load_preferences([{"text": "x"}])


# ---- input kinds ---------------------------------------------------------------------------------------------

def test_input_kinds(tmp_path):
    import datasets

    rows = [EXPLICIT, dict(EXPLICIT, chosen=" Hey!")]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=2))
    write_lines(tmp_path / "lines.json", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))

    expected_sources = {"d.jsonl.gz": ":2", "arr.json": "[1]", "lines.json": ":2", "d.parquet": "[1]", "ds": "[1]"}
    for name, suffix in expected_sources.items():
        got = list(iter_rows(tmp_path / name))
        assert [r for r, _ in got] == rows, name
        assert got[1][1] == f"{tmp_path / name}{suffix}"
        exs, _ = load_preferences(str(tmp_path / name))
        assert [e.chosen for e in exs] == [" Hi!", " Hey!"]
    assert len(load_preferences(tmp_path / "dd")[0]) == 1  # default split: train
    assert len(load_preferences(tmp_path / "dd", split="test")[0]) == 2
    with pytest.raises(DataError, match="split 'valid' not found; available splits: train, test"):
        load_preferences(tmp_path / "dd", split="valid")
    exs, report = load_preferences(datasets.Dataset.from_list(rows))
    assert len(exs) == 2 and exs[1].source == "<dataset>[1]" and report.source == "Dataset"


def test_missing_local_path_does_not_try_hub(monkeypatch, tmp_path):
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("must not query the hub for a local-looking path")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    for name in ("./nope.jsonl", "nope.jsonl", str(tmp_path / "missing_dir/x"), "data.parquet"):
        with pytest.raises(DataError, match="file not found") as e:
            load_preferences(name)
        assert e.value.reason == "not_found" and name in str(e.value)


def test_limit(tmp_path):
    exs, report = load_preferences(write_lines(tmp_path / "d.jsonl", [EXPLICIT] * 5), limit=3)
    assert len(exs) == 3 and report.loaded == 3


# ---- bad rows ------------------------------------------------------------------------------------------------

HH_PROMPT = "\n\nHuman: Hi\n\nAssistant:"
BAD_ROWS = [  # (row as written on line 2, expected reason, expected field); line 1 is a good row of the same format
    ('{"prompt": "p", "chosen": "a", ', "malformed_json", None),
    ('["p", "a", "b"]', "not_an_object", None),
    ({"prompt": "p", "chosen": "a"}, "missing_field", "rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "missing_field", "rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_field", "chosen"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_field", "prompt"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong_type", "chosen"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"}, "wrong_type", "chosen"),
    ({"prompt": "p", "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))}, "wrong_type",
     "prompt"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_responses", "chosen"),
]
HH_BAD = [
    ({"chosen": HH_PROMPT + " a", "rejected": "\n\nHuman: Hello\n\nAssistant: b"}, "diverging", "rejected"),
    ({"chosen": HH_PROMPT + " a\n\nHuman: more?\n\nAssistant: x", "rejected": HH_PROMPT + " b"}, "diverging",
     "rejected"),
    ({"chosen": HH_PROMPT + " a", "rejected": "\n\nHuman: Hi there"}, "missing_marker", "rejected"),
    ({"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " "}, "empty_field", "rejected"),
    ({"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " a"}, "identical_responses", "chosen"),
]
RANKED_BAD = [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 2]}, "ties", "ranks"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [0.5, 0.5]}, "ties", "scores"),
    ({"prompt": "p", "responses": ["a"], "ranks": [1]}, "too_few_responses", "responses"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1]}, "length_mismatch", "ranks"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": ["1", "2"]}, "wrong_type", "ranks"),
    ({"prompt": "p", "responses": ["a", "a"], "ranks": [1, 2]}, "identical_responses", "responses"),
]
CONV_BAD = [
    ({"chosen": msgs(("user", "Hi"), ("assistant", "a")), "rejected": msgs(("user", "Yo"), ("assistant", "b"))},
     "diverging", "rejected"),
    ({"chosen": msgs(("user", "Hi"), ("assistant", "a")), "rejected": msgs(("user", "Hi"))}, "missing_field",
     "rejected"),
]
GOOD = {
    "explicit": EXPLICIT,
    "implicit": {"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " b"},
    "ranked": {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]},
    "conversational": {"chosen": msgs(("user", "Hi"), ("assistant", "a")),
                       "rejected": msgs(("user", "Hi"), ("assistant", "b"))},
}
CASES = ([("explicit", *c) for c in BAD_ROWS] + [("implicit", *c) for c in HH_BAD]
         + [("ranked", *c) for c in RANKED_BAD] + [("conversational", *c) for c in CONV_BAD])


@pytest.mark.parametrize("fmt, row, reason, field", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_bad_row_names_file_and_line(tmp_path, fmt, row, reason, field):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD[fmt], row, GOOD[fmt]])
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert e.value.reason == reason and e.value.field == field
    assert e.value.source == f"{path}:2" and f"{path}:2" in str(e.value)
    exs, report = load_preferences(path, skip_bad=True)
    assert len(exs) == 2 and report.skipped == {reason: 1} and report.examples == {reason: [f"{path}:2"]}


def test_skip_bad_counts_by_reason(tmp_path):
    rows = [EXPLICIT] + [r for r, _, _ in BAD_ROWS] + [EXPLICIT, {"prompt": "p", "chosen": "x", "rejected": "x"}]
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    exs, report = load_preferences(path, skip_bad=True)
    assert len(exs) == report.loaded == 2
    assert report.skipped == {"malformed_json": 1, "not_an_object": 1, "missing_field": 2, "empty_field": 2,
                              "wrong_type": 3, "identical_responses": 2}
    assert report.examples["identical_responses"] == [f"{path}:11", f"{path}:13"]
    summary = report.summary()
    assert "\n" not in summary and summary.startswith(f"loaded 2 of 13 rows from {path} (format: explicit)")
    assert "skipped 11" in summary and f"wrong_type=3 (e.g. {path}:8, {path}:9, {path}:10)" in summary


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n {"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": }\n]')
    with pytest.raises(DataError, match="malformed JSON") as e:
        load_preferences(path)
    assert e.value.source == f"{path}:3"


# ---- Anthropic HH sample -------------------------------------------------------------------------------------

def test_hh_sample_split_at_last_assistant_marker():
    if not HH_SAMPLE.exists():
        pytest.skip(f"shared HH sample not found at {HH_SAMPLE}")
    with gzip.open(HH_SAMPLE, "rt") as f:
        raw = [json.loads(line) for line in f]
    exs, report = load_preferences(HH_SAMPLE, skip_bad=True)
    print(report.summary())
    assert report.format == "implicit" and len(exs) >= 0.95 * len(raw)
    assert set(report.skipped) <= {"diverging", "empty_field", "identical_responses", "missing_marker"}
    for ex in exs:
        row = raw[int(ex.source.rsplit(":", 1)[1]) - 1]
        assert ex.prompt.endswith(MARKER) and ex.prompt.rfind(MARKER) == len(ex.prompt) - len(MARKER)
        assert not any("\n\nHuman:" in r or MARKER in r for r in ex.responses)
        assert row["chosen"] == ex.prompt + ex.chosen and row["rejected"] == ex.prompt + ex.rejected

    # Why not a character-level common prefix: it runs past the marker into the responses.
    leaks_space = leaks_text = 0
    for row in raw:
        cut = row["chosen"].rfind(MARKER) + len(MARKER)
        common = len(os.path.commonprefix([row["chosen"], row["rejected"]]))
        leaks_space += common > cut
        leaks_text += common > cut + 1  # beyond the leading space: actual response characters
    print(f"char-level common prefix mis-splits {leaks_space}/{len(raw)} pairs ({leaks_space / len(raw):.0%}); "
          f"{leaks_text}/{len(raw)} ({leaks_text / len(raw):.0%}) leak response text beyond the leading space")
    assert leaks_text > 0


def test_hh_sample_diverging_rows_are_reported(tmp_path):
    if not HH_SAMPLE.exists():
        pytest.skip(f"shared HH sample not found at {HH_SAMPLE}")
    with gzip.open(HH_SAMPLE, "rt") as f:
        raw = [json.loads(line) for line in f][:20]
    div = dict(raw[3], rejected="\n\nHuman: something else" + raw[3]["rejected"])
    path = write_lines(tmp_path / "hh.jsonl", raw[:3] + [div] + raw[4:])
    exs, report = load_preferences(path, skip_bad=True)
    assert report.skipped["diverging"] == 1 and report.examples["diverging"] == [f"{path}:4"]
    with pytest.raises(DataError, match=f"{path}:4") as e:
        load_preferences(path)
    assert e.value.reason == "diverging"
