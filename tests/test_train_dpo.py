"""The DPO run end to end: first loss, accumulation, resume, reference modes, metrics, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli import main
from prefopt.config import DPOConfig
from prefopt.train.dpo import DPO, train_dpo

REQUIRED_KEYS = ["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "grad_weight", "pairs_per_second", "tokens_per_second"]
TIMING = {"pairs_per_second", "tokens_per_second"}


def cfg(model: Path, data: Path, out: Path, **kw) -> DPOConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), optimizer="adamw", lr=1e-3, warmup_steps=2,
                batch_size=8, micro_batch_size=8, max_steps=3, max_length=96, max_prompt_length=48, progress=False)
    base.update(kw)
    return DPOConfig(**base)


def rows(out: Path, eval_rows: bool = False) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if any(k.startswith("eval/") for k in r) == eval_rows]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if k not in TIMING:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=atol), (x["step"], k)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-5, msg=k)


def test_first_loss_is_ln2_and_metrics_complete(tiny_model_dir, synthetic_pairs, tmp_path):
    summary = train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "run", eval_data=str(synthetic_pairs),
                            eval_every=2, max_steps=3))
    train_rows = rows(tmp_path / "run")
    first = train_rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["grad_weight"] == 0.5
    for r in train_rows:
        assert set(REQUIRED_KEYS) <= r.keys()
    eval_rows = rows(tmp_path / "run", eval_rows=True)
    assert [r["step"] for r in eval_rows] == [2, 3]
    assert {f"eval/{k}" for k in REQUIRED_KEYS[1:9]} <= eval_rows[0].keys()
    assert summary["steps"] == 3
    # the final model is plain transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    AutoTokenizer.from_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_one_micro_batch_of_8_equals_eight_of_1(tiny_model_dir, synthetic_pairs, tmp_path):
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "mb8", micro_batch_size=8, max_steps=4))
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "mb1", micro_batch_size=1, max_steps=4))
    losses = [r["loss"] for r in rows(tmp_path / "mb8")]
    assert losses[-1] < losses[0]  # it trained
    assert_same_run(tmp_path / "mb8", tmp_path / "mb1")


def test_resumed_run_equals_uninterrupted(tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, full, max_steps=8, save_every=2, micro_batch_size=4))

    # Ctrl-C (a real SIGINT) in the middle of step 6 (its first of two micro-batches): the loop finishes the
    # step, saves a checkpoint at that boundary and stops.
    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    real_step = DPO.step

    def interrupted(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, model, batch)

    monkeypatch.setattr(DPO, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(cfg(tiny_model_dir, synthetic_pairs, crashed, max_steps=8, save_every=2, micro_batch_size=4))
    monkeypatch.setattr(DPO, "step", real_step)
    assert calls["n"] == 12  # step 6 ran to its end
    ckpts = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert ckpts == ["step-0000004", "step-0000006"]  # keep_checkpoints=2; step 6 saved once
    assert max(r["step"] for r in rows(crashed)) == 6
    (crashed / "checkpoints" / "step-0000007.tmp").mkdir()  # a half-written checkpoint is never picked up
    (crashed / "checkpoints" / "step-0000007.tmp" / "trainer_state.json").write_text("{}")

    summary = train_dpo(cfg(tiny_model_dir, synthetic_pairs, crashed, max_steps=8, save_every=2, micro_batch_size=4,
                            resume="auto"))
    assert summary["resumed_from"] == 6
    assert_same_run(full, crashed)

    # resuming from an explicit mid-run (save_every) checkpoint gives the same result too
    again = tmp_path / "again"
    again.mkdir()
    summary = train_dpo(cfg(tiny_model_dir, synthetic_pairs, again, max_steps=8, micro_batch_size=4,
                            resume=str(crashed / "checkpoints" / "step-0000004")))
    assert summary["resumed_from"] == 4
    wa, wb = weights(full), weights(again)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["live", "lora", "lora_live", "precompute", "default", "reference_free"])
def test_reference_modes(mode, tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    kw = {"live": dict(precompute_ref=False), "lora": dict(lora=True, lr=1e-2),
          "lora_live": dict(lora=True, lr=1e-2, precompute_ref=False), "precompute": dict(precompute_ref=True),
          "default": {}, "reference_free": dict(reference_free=True)}[mode]
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "run", max_steps=4, **kw))
    r = rows(tmp_path / "run")
    if mode == "reference_free":  # rewards are beta * policy log-probs: far from zero, loss not ln 2
        assert r[0]["rewards/chosen"] == pytest.approx(0.1 * r[0]["logps/chosen"], rel=1e-5)
    else:  # policy == reference at the first step (LoRA's B matrices start at zero)
        assert r[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert r[-1]["loss"] < r[0]["loss"]
    cached = list((tmp_path / "cache").glob("ref-logps-*.safetensors"))
    # the reference is precomputed unless asked not to (or there is none)
    assert len(cached) == (0 if mode in ("live", "lora_live", "reference_free") else 1)
    if mode.startswith("lora"):
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tmp_path / "run")  # merged: loads without peft


def test_default_precompute_makes_no_copy_of_the_policy(tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch):
    """Precomputing reads the initial policy itself: no frozen copy of the weights is ever made."""
    import prefopt.train.setup as setup

    def no_copy(*args, **kwargs):
        raise AssertionError("a reference copy was made")

    monkeypatch.setattr(setup, "make_reference", no_copy)
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "run", max_steps=2))
    assert rows(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(AssertionError, match="copy"):  # a live reference does need the copy
        train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "live", max_steps=2, precompute_ref=False))


def test_precomputed_reference_equals_live(tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "live", max_steps=3, precompute_ref=False))
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "pre", max_steps=3, precompute_ref=True))
    assert len(list((tmp_path / "cache").glob("ref-logps-*"))) == 1  # beside the tokenized-data cache (data/)
    assert_same_run(tmp_path / "live", tmp_path / "pre", atol=2e-5)


def test_rewards_rise_on_separable_set(tiny_model_dir, synthetic_pairs, tmp_path):
    summary = train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "run", max_steps=12, eval_fraction=0.25))
    r = rows(tmp_path / "run")
    assert r[0]["rewards/accuracies"] == 0.0  # all rewards are exactly 0 at the first step
    assert summary["eval"]["eval/rewards/accuracies"] > 0.5
    assert r[-1]["rewards/margins"] > 0


def test_config_errors(tiny_model_dir, synthetic_pairs, tmp_path):
    from prefopt.config import load_config
    from prefopt.errors import ConfigError

    good = dict(model="m", data="d", output_dir="o")
    with pytest.raises(ConfigError, match="beta"):
        load_config(DPOConfig, overrides={**good, "beta": 0})
    with pytest.raises(ConfigError, match="label_smoothing .* robust"):
        load_config(DPOConfig, overrides={**good, "loss": "robust", "label_smoothing": 0.5})
    with pytest.raises(ConfigError, match="label smoothing belongs to cdpo and robust"):
        load_config(DPOConfig, overrides={**good, "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        load_config(DPOConfig, overrides={**good, "betta": 0.1})
    with pytest.raises(ConfigError, match="loss"):
        load_config(DPOConfig, overrides={**good, "loss": "nope"})
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        load_config(DPOConfig, overrides={**good, "batch_size": 10, "micro_batch_size": 4})
    with pytest.raises(ConfigError, match="'model' is required"):
        load_config(DPOConfig, overrides={"data": "d", "output_dir": "o"})
    # YAML then command-line overrides
    yml = tmp_path / "run.yaml"
    yml.write_text("beta: 0.3\nloss: cdpo\nlabel_smoothing: 0.1\nmodel: m\ndata: d\noutput_dir: o\n")
    c = load_config(DPOConfig, yml, {"beta": "0.5"})
    assert (c.beta, c.loss, c.label_smoothing) == (0.5, "cdpo", 0.1)
    yml.write_text("beta: 0.3\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(DPOConfig, yml)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["dpo", "--model", "m", "--data", "d", "--output-dir", str(tmp_path), "--beta", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefopt: error: invalid beta = -1.0") and "Traceback" not in err


def test_cli_end_to_end_on_hh(hh_sample, tmp_path):
    model = tmp_path / "model"
    assert main(["model", "init", "--size", "tiny", "--output-dir", str(model)]) == 0
    out = tmp_path / "run"
    yml = tmp_path / "run.yaml"
    yml.write_text("loss: sigmoid\nbeta: 0.1\nmax_steps: 50\noptimizer: adamw\n")
    code = main(["dpo", "--config", str(yml), "--model", str(model), "--data", str(hh_sample),
                 "--output-dir", str(out), "--skip-bad-rows", "--max-steps", "3", "--batch-size", "4",
                 "--micro-batch-size", "2", "--max-length", "256", "--max-prompt-length", "192", "--lr", "1e-4",
                 "--warmup-steps", "0", "--progress", "false"])
    assert code == 0
    train_rows = rows(out)
    assert [r["step"] for r in train_rows] == [1, 2, 3]  # --max-steps on the command line beat the YAML's 50
    for r in train_rows:
        assert set(REQUIRED_KEYS) <= r.keys()
        assert all(math.isfinite(r[k]) for k in REQUIRED_KEYS)
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_ranked_data_needs_plackett_luce(tiny_model_dir, tmp_path):
    from prefopt.data import make_synthetic_preferences, write_jsonl
    from prefopt.errors import ConfigError

    data = write_jsonl(make_synthetic_preferences(16, seed=0, num_responses=3), tmp_path / "ranked.jsonl")
    with pytest.raises(ConfigError, match="plackett_luce"):
        train_dpo(cfg(tiny_model_dir, data, tmp_path / "a"))
    train_dpo(cfg(tiny_model_dir, data, tmp_path / "b", loss="plackett_luce", max_steps=2))
    assert rows(tmp_path / "b")[0]["loss"] == pytest.approx(math.log(6), abs=1e-5)  # log 3! at K=3



def test_lora_run_resumes_exactly(tiny_model_dir, synthetic_pairs, tmp_path):
    kw = dict(lora=True, lr=1e-2, max_steps=4, micro_batch_size=4)
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "full", **kw))
    part = tmp_path / "part"
    train_dpo(cfg(tiny_model_dir, synthetic_pairs, part, save_every=2, **kw))
    for p in part.iterdir():  # keep only the step-2 checkpoint: the adapters must come back from it
        if p.name != "checkpoints":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(part / "checkpoints" / "step-0000004", ignore_errors=True)
    summary = train_dpo(cfg(tiny_model_dir, synthetic_pairs, part, resume="auto", **kw))
    assert summary["resumed_from"] == 2
    wa, wb = weights(tmp_path / "full"), weights(part)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6, msg=k)
