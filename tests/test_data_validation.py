"""The data validation report: every bad-row kind, written by a fuzzer into a JSONL file, is counted exactly and
named by file:line (and field); without --skip-bad-rows the run stops with the whole report, with it the counts
add up to the rows read; no traceback reaches the user."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.data import load_preferences
from prefopt.data.prompts import read_prompts
from prefopt.data.sft import load_sft
from prefopt.data.validation import WARNINGS, DataValidationError, ValidationReport
from prefopt.errors import DataError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=25, deadline=None, derandomize=True)


def _j(row) -> bytes:
    return json.dumps(row).encode()


# kind -> (reason code, field, line bytes for line number i); None reason: not a row (blank line)
def _explicit(text: str):
    return {
        "good": (None, None, lambda i: _j({"prompt": f"{text} #{i}", "chosen": f"{text} a", "rejected": f"{text} b"})),
        "blank": (None, None, lambda i: b"   "),
        "duplicate": ("duplicate", "LINE1", None),  # a copy of line 1
        "malformed_json": ("malformed_json", None, lambda i: b'{"prompt": "p", "chosen": '),
        "not_an_object": ("not_an_object", None, lambda i: _j([text, "a", "b"])),
        "missing_field": ("missing_field", "rejected", lambda i: _j({"prompt": f"p{i}", "chosen": text + "a"})),
        "null_field": ("missing_field", "rejected", lambda i: _j({"prompt": "p", "chosen": "a", "rejected": None})),
        "empty_field": ("empty_field", "chosen", lambda i: _j({"prompt": f"p{i}", "chosen": " \t", "rejected": "b"})),
        "wrong_type": ("wrong_type", "chosen", lambda i: _j({"prompt": f"p{i}", "chosen": i, "rejected": "b"})),
        "identical": ("identical_responses", "chosen",
                      lambda i: _j({"prompt": f"p{i}", "chosen": text + "x", "rejected": text + "x"})),
        "non_utf8_bytes": ("non_utf8", None, lambda i: b'{"prompt": "caf\xe9 \xff", "chosen": "a", "rejected": "b"}'),
        "non_utf8_escape": ("non_utf8", "prompt", lambda i: b'{"prompt": "x\\ud800", "chosen": "a", "rejected": "b"}'),
    }


def _ranked(text: str):
    return {
        "good": (None, None, lambda i: _j({"prompt": f"{text} #{i}", "responses": [text + "a", text + "b", text + "c"],
                                           "ranks": [2, 1, 3]})),
        "duplicate": ("duplicate", "LINE1", None),
        "malformed_json": ("malformed_json", None, lambda i: b'{"prompt": "p", "responses": ["a"'),
        "too_few": ("too_few_responses", "responses",
                    lambda i: _j({"prompt": f"p{i}", "responses": [text + "a"], "ranks": [1]})),
        "ties": ("ties", "ranks", lambda i: _j({"prompt": f"p{i}", "responses": ["a", "b", "c"], "ranks": [1, 2, 1]})),
        "identical": ("identical_responses", "responses",
                      lambda i: _j({"prompt": f"p{i}", "responses": ["a", "a"], "ranks": [1, 2]})),
        "non_utf8_bytes": ("non_utf8", None,
                           lambda i: b'{"prompt": "\xc3\x28", "responses": ["a", "b"], "ranks": [1, 2]}'),
    }


KINDS = {"explicit": _explicit, "ranked": _ranked}


def write_fuzzed(path: Path, fmt: str, kinds: list[str], text: str):
    """Line 1 is a good row (it names the format), then ``kinds``. Returns the expected (rows, kept, occurrences)."""
    table = KINDS[fmt](text)
    lines, expected, rows = [], {}, 0
    for i, kind in enumerate(["good", *kinds], start=1):
        reason, field, make = table[kind]
        lines.append(lines[0] if kind == "duplicate" else make(i))
        if kind == "blank":
            continue
        rows += 1
        if reason is not None:
            expected.setdefault(reason, []).append((f"{path}:{i}", f"{path}:1" if field == "LINE1" else field))
    path.write_bytes(b"\n".join(lines) + b"\n")
    kept = rows - sum(len(v) for k, v in expected.items() if k not in WARNINGS)
    return rows, kept, expected


def check_report(report: ValidationReport, rows: int, kept: int, expected: dict) -> None:
    assert report.rows == rows and report.kept == kept
    assert dict(report.counts) == {k: len(v) for k, v in expected.items()}
    assert report.occurrences == {k: v[:3] for k, v in expected.items()}
    assert report.kept + report.skipped == report.rows  # nothing dropped without being counted
    report.check()
    text = report.summary()
    for kind, occ in expected.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(kind + " "))
        assert f" {len(occ)} " in line and occ[0][0] in line


@pytest.mark.parametrize("fmt", sorted(KINDS))
@FUZZ
@given(data=st.data())
def test_fuzzed_bad_rows_are_counted_exactly(fmt, data):
    kinds = data.draw(st.lists(st.sampled_from(sorted(KINDS[fmt](""))), max_size=25), label="kinds")
    text = data.draw(st.text(min_size=1, max_size=12), label="text")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        rows, kept, expected = write_fuzzed(path, fmt, kinds, text)

        examples, report = load_preferences(path, skip_bad=True)
        assert report.format == fmt and len(examples) == kept == report.loaded
        check_report(report.validation, rows, kept, expected)
        assert sum(report.skipped.values()) + report.loaded == rows

        errors = {k: v for k, v in expected.items() if k not in WARNINGS}
        if not errors:
            assert len(load_preferences(path)[0]) == kept
            return
        with pytest.raises(DataValidationError) as e:  # without skip_bad: the whole file, then one stop
            load_preferences(path)
        first_line = min((int(src.rsplit(":", 1)[1]), k, f) for k, v in errors.items() for src, f in v)
        assert e.value.source == f"{path}:{first_line[0]}" and e.value.reason == first_line[1]
        assert e.value.field == first_line[2]
        check_report(e.value.report, rows, kept, expected)
        message = str(e.value)
        assert message.startswith(f"{path}:{first_line[0]}:") and "--skip-bad-rows" in message
        assert all(k in message for k in expected)


def test_lone_surrogate_in_message_content_is_non_utf8(tmp_path):
    path = tmp_path / "m.jsonl"
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    bad = json.dumps(good).replace('"a"', '"\\udfff"')
    path.write_text(json.dumps(good) + "\n" + bad + "\n")
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert (e.value.reason, e.value.field, e.value.source) == ("non_utf8", "chosen", f"{path}:2")


def test_sft_duplicates_are_kept_and_counted(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r"}, {"prompt": "p", "response": ""},
            {"prompt": "p", "response": "other"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_sft(path, skip_bad=True)
    v = report.validation
    assert len(examples) == 3 and (v.rows, v.kept, v.skipped) == (4, 3, 1)
    assert v.occurrences == {"duplicate": [(f"{path}:2", f"{path}:1")], "empty_field": [(f"{path}:3", "response")]}
    with pytest.raises(DataError, match=r"sft.jsonl:3: field 'response' is empty"):
        load_sft(path)


def test_read_prompts_and_samples_report_every_bad_row(tmp_path):
    from prefopt.label import read_samples
    from prefopt.score import read_scoring_data

    bad = tmp_path / "samples.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "x"}\n{"prompt": "a"}\n{"prompt": \n'
                    b'{"prompt": "b", "response": "\xff"}\n{"prompt": "", "response": "y"}\n')
    for read in (read_samples, read_scoring_data):
        with pytest.raises(DataValidationError) as e:
            read(bad)
        assert e.value.source == f"{bad}:2" and e.value.reason == "missing_field"
        counts = dict(e.value.report.counts)
        assert counts == {"missing_field": 1, "malformed_json": 1, "non_utf8": 1, "empty_field": 1}
        assert e.value.report.rows == 5 and e.value.report.kept == 1
    with pytest.raises(DataValidationError) as e:
        read_prompts(bad)  # rows with a prompt field: only the prompt matters
    assert dict(e.value.report.counts) == {"malformed_json": 1, "non_utf8": 1, "empty_field": 1}
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"first\n\nsec\xffond\nthird\n")
    with pytest.raises(DataValidationError) as e:
        read_prompts(txt)
    assert e.value.source == f"{txt}:3" and e.value.reason == "non_utf8"
    assert (e.value.report.rows, e.value.report.kept) == (3, 2)


# ---- through the CLI: one clear message, no traceback ----------------------------------------------------------

def _mixed_pairs(path: Path) -> Path:
    good = [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}."} for i in range(6)]
    long = " and the same long answer goes on" * 40
    lines = [_j(r) for r in good[:3]]
    lines += [b'{"prompt": "q", "chosen": ', _j({"prompt": "q", "chosen": "same", "rejected": "same"}),
              b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}', _j(good[0]),  # lines 4-7
              _j({"prompt": "Long?", "chosen": long + " yes", "rejected": long + " no"})]  # line 8: too long once cut
    lines += [_j(r) for r in good[3:]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _dpo_args(model, data, out):
    return ["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--optimizer", "adamw",
            "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "48", "--max-prompt-length", "16",
            "--warmup-steps", "0", "--progress", "false"]


def test_cli_stops_with_the_full_report(tiny_model_dir, tmp_path, capsys):
    data = _mixed_pairs(tmp_path / "pairs.jsonl")
    assert main(_dpo_args(tiny_model_dir, data, tmp_path / "run")) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out
    assert err.startswith(f"prefopt: error: {data}:4: malformed JSON")
    for kind, line in [("malformed_json", 4), ("identical_responses", 5), ("non_utf8", 6), ("duplicate", 7)]:
        assert any(ln.strip().startswith(kind) and f"{data}:{line}" in ln for ln in err.splitlines()), kind
    assert "3 bad rows" in err and "--skip-bad-rows" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("command, rows", [
    ("sft", [{"prompt": "p", "response": "r"}, {"prompt": "p"}, {"prompt": "p", "response": 3}]),
    ("rm", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"},
            {"prompt": "p", "chosen": "a"}]),
])
def test_cli_sft_and_rm_stop_with_the_report(tiny_model_dir, tmp_path, capsys, command, rows):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([command, "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefopt: error: {data}:2:") and "Traceback" not in err
    assert f"{data}:3" in err and "2 bad rows" in err


def test_cli_skip_bad_rows_reports_and_trains(tiny_model_dir, tmp_path, capsys):
    data = _mixed_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    assert main(_dpo_args(tiny_model_dir, data, out) + ["--skip-bad-rows", "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    block = printed[printed.index("data validation:"):]
    head = block.splitlines()[0]
    # 11 rows read = 7 kept (the duplicate among them) + 3 bad (skipped) + 1 too long once tokenized (dropped)
    assert head.endswith(f"11 rows read from {data}: 7 kept, 4 skipped, 1 warning"), head
    for kind, line in [("malformed_json", 4), ("identical_responses", 5), ("non_utf8", 6), ("duplicate", 7),
                       ("too_long", 8)]:
        assert any(ln.strip().startswith(kind) and f"{data}:{line}" in ln for ln in block.splitlines()), kind
    assert (out / "metrics.jsonl").exists()
