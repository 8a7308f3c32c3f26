"""prefopt eval: win rates and intervals on known verdicts, the PNG and HTML outputs, and the command end to end
on a tiny model with a function judge."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest

from prefopt.cli import main
from prefopt.eval.run import read_eval_prompts, render_html, write_outputs
from prefopt.eval.winrate import (
    cluster_bootstrap_interval,
    count_verdicts,
    summarize_verdicts,
    wilson_interval,
    win_rate_of,
)
from prefopt.jsonl import read_jsonl, write_jsonl

# ------------------------------------------------------------------------------------------ win rates


def test_win_rate_ties_half_invalid_excluded_and_counted():
    verdicts = ["policy"] * 6 + ["tie"] * 2 + ["baseline"] * 2 + ["invalid"] * 3
    s = summarize_verdicts(verdicts)
    assert (s.wins, s.ties, s.losses, s.invalid, s.pairs) == (6, 2, 2, 3, 13)
    assert s.win_rate == pytest.approx(0.7)  # (6 + 2/2) / 10
    assert s.interval == "wilson"
    assert (s.ci_low, s.ci_high) == pytest.approx(wilson_interval(7, 10))
    # adding invalid verdicts changes nothing but their count
    t = summarize_verdicts(verdicts + ["invalid"] * 5)
    assert (t.win_rate, t.ci_low, t.ci_high, t.invalid) == (s.win_rate, s.ci_low, s.ci_high, 8)
    assert win_rate_of(0, 4, 0) == 0.5 and math.isnan(win_rate_of(0, 0, 0))
    with pytest.raises(ValueError, match="unknown verdict"):
        count_verdicts(["A"])


def test_wilson_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(7, 10), (0, 12), (12, 12), (33, 50), (1, 3)]:
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    # the closed form at 7/10: centre (p + z^2/2n) / (1 + z^2/n), half width z sqrt(p(1-p)/n + z^2/4n^2) / (...)
    assert wilson_interval(7, 10) == pytest.approx((0.39678, 0.89221), abs=1e-5)


def test_all_invalid_has_no_rate():
    s = summarize_verdicts(["invalid", "invalid"])
    assert math.isnan(s.win_rate) and math.isnan(s.ci_low) and s.interval == "none" and s.invalid == 2


def test_clustered_bootstrap_is_as_wide_as_the_number_of_prompts_says():
    """10 prompts with 4 identical verdicts each carry the information of 10 trials, not 40: the clustered
    interval is about the normal interval of 10 trials and much wider than Wilson's of 40."""
    verdicts = (["policy"] * 4 + ["baseline"] * 4) * 5
    clusters = [i // 4 for i in range(40)]
    s = summarize_verdicts(verdicts, clusters, resamples=4000, seed=1)
    assert s.interval.startswith("bootstrap") and s.win_rate == 0.5
    width = s.ci_high - s.ci_low
    normal10 = 2 * 1.96 * math.sqrt(0.25 / 10)
    assert width == pytest.approx(normal10, abs=0.12)
    lo, hi = wilson_interval(20, 40)
    assert width > 1.6 * (hi - lo)
    assert s.ci_low < 0.5 < s.ci_high
    # seeded: the same interval again; one pair per prompt falls back to Wilson
    assert summarize_verdicts(verdicts, clusters, resamples=4000, seed=1) == s
    assert summarize_verdicts(verdicts, list(range(40))).interval == "wilson"


def test_cluster_bootstrap_degenerate_and_ratio():
    assert cluster_bootstrap_interval([1.0] * 6, [0, 0, 1, 1, 2, 2]) == (1.0, 1.0)
    # unequal cluster sizes: every resample's value is the pooled mean, so it stays within [min, max] of scores
    lo, hi = cluster_bootstrap_interval([1, 1, 1, 0, 0.5], [0, 0, 0, 1, 2], resamples=500)
    assert 0 <= lo <= 0.7 <= hi <= 1


# ------------------------------------------------------------------------------------------ outputs

class TableParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: str | None = None
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a and not a[k].startswith("data:"):
                self.external.append(a[k])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "table":
            self.current = a.get("id", "")
            self.tables[self.current] = []
        elif tag == "tr" and self.current is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.tables[self.current].append(self.row)
            self.row = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _rows():
    rows = []
    by_temperature = [(0.0, ["policy", "tie", "baseline", "policy"]), (1.0, ["baseline", "invalid", "policy", "tie"])]
    for t, verdicts in by_temperature:
        for i, v in enumerate(verdicts):
            rows.append({"temperature": t, "prompt": f"<script>alert({i})</script> & prompt", "prompt_index": i,
                         "sample_index": 0, "policy": f"policy <b>{i}</b>", "baseline": "baseline",
                         "policy_first": i % 2 == 0, "verdict": v, "judge_verdict": "A", "raw": "Verdict: A"})
    return rows


def test_png_and_html_outputs(tmp_path):
    from PIL import Image

    from prefopt.eval.run import PLOT_DPI, PLOT_SIZE, per_temperature

    rows = _rows()
    results = {"per_temperature": per_temperature(rows, [0.0, 1.0]), "judge": "fn:x:y", "model": "m",
               "baseline": "dataset:chosen"}
    paths = write_outputs(tmp_path, results, rows, sample_pairs=5)
    with Image.open(paths["plot"]) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size == (round(PLOT_SIZE[0] * PLOT_DPI), round(PLOT_SIZE[1] * PLOT_DPI))
    page = paths["report"].read_text(encoding="utf-8")
    parser = TableParser()
    parser.feed(page)
    table = parser.tables["win-rates"]
    assert table[0] == ["temperature", "win rate", "95 % interval", "wins", "ties", "losses", "invalid", "pairs"]
    assert [r[0] for r in table[1:]] == ["0", "1"]
    assert table[1][1] == "0.625" and table[1][3:] == ["2", "1", "1", "0", "4"]  # (2 + 0.5) / 4
    assert table[2][1] == "0.500" and table[2][3:] == ["1", "1", "1", "1", "4"]
    assert parser.external == [] and len(parser.images) == 1 and parser.images[0].startswith("data:image/png;base64,")
    assert "<script>" not in page and "&lt;script&gt;alert(0)&lt;/script&gt; &amp; prompt" in page
    assert page.count("class='pair") == 5
    saved = json.loads(paths["results"].read_text())
    assert saved["per_temperature"][0]["win_rate"] == 0.625
    assert len(read_jsonl(paths["verdicts"])) == 8


def test_render_html_without_valid_verdicts():
    rows = [dict(_rows()[0], verdict="invalid")]
    from prefopt.eval.run import per_temperature

    page = render_html({"per_temperature": per_temperature(rows, [0.0])}, rows, None)
    parser = TableParser()
    parser.feed(page)
    assert parser.tables["win-rates"][1][1] == "–"


def test_read_eval_prompts_baseline_fields(tmp_path, hh_sample):
    f = write_jsonl([{"prompt": "a", "chosen": "A!", "reference": "ref a"},
                     {"prompt": [{"role": "user", "content": "b"}], "chosen": [{"role": "assistant", "content": "B!"}],
                      "reference": "ref b"}], tmp_path / "p.jsonl")
    assert read_eval_prompts(f, "chosen") == (["a", [{"role": "user", "content": "b"}]], ["A!", "B!"])
    assert read_eval_prompts(f, "reference")[1] == ["ref a", "ref b"]
    assert read_eval_prompts(f)[1] is None
    with pytest.raises(Exception, match="nothere"):
        read_eval_prompts(f, "nothere")
    with pytest.raises(Exception, match="empty"):  # the sample has a row whose chosen reply is empty
        read_eval_prompts(hh_sample, "chosen")
    prompts, chosen = read_eval_prompts(hh_sample, "chosen", skip_bad=True)  # HH transcripts: prompt, chosen reply
    assert len(prompts) == len(chosen) == 511
    assert prompts[0].rstrip().endswith("Assistant:") and "Human:" not in chosen[0]


# ------------------------------------------------------------------------------------------ end to end

LEN_JUDGE = "def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


@pytest.fixture
def eval_inputs(tmp_path):
    judge = tmp_path / "len_judge.py"
    judge.write_text(LEN_JUDGE)
    prompts = write_jsonl([{"prompt": f"The movie number {i} was", "chosen": "x" * (3 + 4 * i)} for i in range(4)],
                          tmp_path / "prompts.jsonl")
    return prompts, f"fn:{judge}:score"


def test_eval_end_to_end_dataset_baseline(tiny_model_dir, eval_inputs, tmp_path, capsys):
    prompts, judge = eval_inputs
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tiny_model_dir), "--baseline", "dataset", "--prompts", str(prompts),
               "--judge", judge, "--temperatures", "0,1.0", "--num-samples", "2", "--max-new-tokens", "6",
               "--output-dir", str(out), "--progress", "false", "--device", "cpu"])
    assert rc == 0
    assert "win rate" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"per_temperature", "judge", "model", "baseline"}
    assert results["judge"] == judge and results["model"] == str(tiny_model_dir)
    assert results["baseline"] == "dataset:chosen"
    rows = read_jsonl(out / "verdicts.jsonl")
    assert len(rows) == 2 * 4 * 2
    for r in rows:
        assert set(r) >= {"temperature", "prompt", "policy", "baseline", "policy_first", "verdict", "raw"}
        assert r["baseline"] == "x" * (3 + 4 * r["prompt_index"])
        expected = ("policy" if len(r["policy"]) > len(r["baseline"]) else
                    "baseline" if len(r["policy"]) < len(r["baseline"]) else "tie")
        assert r["verdict"] == expected
        scores = json.loads(r["raw"])
        assert scores["A" if r["policy_first"] else "B"] == len(r["policy"])
    greedy = [r for r in rows if r["temperature"] == 0.0]
    for i in range(4):  # greedy decoding: both samples of a prompt are the same text
        assert len({r["policy"] for r in greedy if r["prompt_index"] == i}) == 1
    for entry in results["per_temperature"]:
        mine = [r["verdict"] for r in rows if r["temperature"] == entry["temperature"]]
        assert set(entry) >= {"temperature", "win_rate", "ci_low", "ci_high", "wins", "ties", "losses", "invalid",
                              "pairs"}
        assert (entry["wins"], entry["ties"], entry["losses"], entry["invalid"], entry["pairs"]) == (
            mine.count("policy"), mine.count("tie"), mine.count("baseline"), mine.count("invalid"), len(mine))
        assert entry["interval"].startswith("bootstrap")  # two samples per prompt
        assert entry["ci_low"] <= entry["win_rate"] <= entry["ci_high"]
    assert (out / "win_rate_vs_temperature.png").stat().st_size > 0
    parser = TableParser()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(parser.tables["win-rates"]) == 3


def test_eval_model_baseline_against_itself(tiny_model_dir, eval_inputs, tmp_path):
    """The same model as its own baseline: greedy samples are identical (all ties: 0.5 exactly), sampled ones are
    drawn with another seed (not all identical)."""
    prompts, judge = eval_inputs
    out = tmp_path / "self"
    assert main(["eval", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--prompts", str(prompts),
                 "--judge", judge, "--temperatures", "0,1", "--max-new-tokens", "8", "--output-dir", str(out),
                 "--progress", "false", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    greedy, sampled = results["per_temperature"]
    assert (greedy["ties"], greedy["win_rate"], greedy["interval"]) == (4, 0.5, "wilson")
    rows = read_jsonl(out / "verdicts.jsonl")
    assert any(r["policy"] != r["baseline"] for r in rows if r["temperature"] == 1.0)
    assert all(r["policy"] == r["baseline"] for r in rows if r["temperature"] == 0.0)


def test_eval_bad_inputs_fail_before_sampling(tiny_model_dir, eval_inputs, tmp_path, capsys):
    prompts, judge = eval_inputs
    base = ["eval", "--model", str(tiny_model_dir), "--baseline", "dataset", "--prompts", str(prompts),
            "--output-dir", str(tmp_path / "x"), "--progress", "false"]
    assert main(base + ["--judge", "gpt4"]) == 2
    assert "invalid judge" in capsys.readouterr().err
    assert main(base + ["--judge", judge, "--temperatures", "0,-1"]) == 2
    assert main(base + ["--judge", judge, "--baseline-field", "missing_field"]) == 2
    assert "missing_field" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
