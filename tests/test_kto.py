"""KTO: the loss in closed form, the unpaired data layer (rows, pairs, KL rows), parity with TRL 1.16's
``KTOTrainer``, and a ``prefopt kto`` run on the shared loop (metrics, checkpoints, resume).

TRL parity: ``KTOTrainer`` tokenizes {prompt, completion, label} rows at construction (appending the EOS string,
as prefopt appends the EOS id: the same ids for these rows, checked below), builds each row's KL completion by
shifting the completions of each batch-sized chunk of the data by one (row j gets completion j-1, row 0 the last:
exactly ``collate_kto``'s mismatched rows for a batch in data order), and ``compute_loss`` returns the mean of the
weighted per-completion losses and logs ``kl`` and the means of ``rewards/chosen`` / ``logps/chosen`` over the
desirable completions (``rejected``: the undesirable ones). prefopt's ``rewards/desirable`` / ``desirable`` is that
desirable mean (see train/kto.py).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from prefopt import losses as L
from prefopt.config import KTOConfig
from prefopt.data.unpaired import collate_kto, kl_batch, load_unpaired, main_batch, tokenize_unpaired
from prefopt.errors import ConfigError, DataError
from prefopt.models import load_model, load_tokenizer
from prefopt.train.dpo import live_reference
from prefopt.train.kto import KTO


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7), (2.0, 0.0, 1.0)])
def test_kto_closed_form(beta, wd, wu):
    pi = [-10.0, -4.0, -7.0, -3.0]
    ref = [-11.0, -4.5, -6.0, -3.5]
    good = [True, False, True, False]
    pkl, rkl = [-8.0, -6.0, -9.0, -2.0], [-8.5, -5.0, -9.9, -3.0]
    kl_value = max(0.0, sum(p - r for p, r in zip(pkl, rkl)) / 4)  # (0.5 - 1 + 0.9 + 1) / 4 = 0.35
    kl = L.kto_kl(torch.tensor(pkl, dtype=torch.float64), torch.tensor(rkl, dtype=torch.float64))
    assert kl.item() == pytest.approx(kl_value)
    losses, rewards = L.kto(torch.tensor(pi, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                            torch.tensor(good), beta=beta, kl=kl, desirable_weight=wd, undesirable_weight=wu)
    exp = []
    for p, r, g in zip(pi, ref, good):
        x = beta * (p - r)
        exp.append(wd * (1 - sig(x - beta * kl_value)) if g else wu * (1 - sig(beta * kl_value - x)))
    assert losses.tolist() == pytest.approx(exp, abs=1e-12)
    assert rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(pi, ref)], abs=1e-12)
    assert not rewards.requires_grad


def test_kto_kl_is_clamped_and_detached():
    p = torch.tensor([-5.0, -6.0], requires_grad=True)
    kl = L.kto_kl(p, torch.tensor([-4.0, -4.0]))
    assert kl.item() == 0.0 and not kl.requires_grad
    with pytest.raises(ValueError, match="beta"):
        L.kto(p, p, torch.tensor([True, False]), beta=0.0, kl=kl)


# ------------------------------------------------------------------------------------------------ data


ROWS = [
    dict(prompt="What is the red house?", completion=" Sure! The house is red, and Alice built it.", label=True),
    dict(prompt="Why is the quiet river?", completion=" No.", label=False),
    dict(prompt="Alice found the tiny cat near the lake.", completion=" The cat has 12 parts.", label=True),
    dict(prompt="Can you describe the bright garden?", completion=" I think Bob fixed a quiet river; however.",
         label=False),
    dict(prompt="Where is the green hill?", completion=" Near the lake, after dinner.", label=False),
]
N = len(ROWS)


def test_load_unpaired_rows_and_pairs(tmp_path):
    exs, report = load_unpaired(ROWS)
    assert report.format == "unpaired" and [e.label for e in exs] == [r["label"] for r in ROWS]
    pairs = [dict(prompt="p1", chosen=" a", rejected=" b"), dict(prompt="p2", chosen=" c", rejected=" d")]
    exs, report = load_unpaired(pairs)
    assert [(e.prompt, e.completion, e.label) for e in exs] == [("p1", " a", True), ("p1", " b", False),
                                                                 ("p2", " c", True), ("p2", " d", False)]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(dict(prompt="p", completion=" c", label="yes")) + "\n")
    with pytest.raises(DataError, match="label"):
        load_unpaired(str(path))
    with pytest.raises(DataError, match="completion"):
        load_unpaired([dict(prompt="p", label=True)])
    kept, report = load_unpaired([ROWS[0], dict(prompt="p", completion=" c", label=1)], skip_bad=True)
    assert len(kept) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from prefopt.models import init_model

    d = init_model("tiny", tmp_path_factory.mktemp("tiny"))
    return d, load_tokenizer(d)


@pytest.fixture(scope="module")
def items(tiny):
    out, report = tokenize_unpaired(load_unpaired(ROWS)[0], tiny[1])
    assert report.kept == N
    return out


def test_collate_kto_pairs_each_prompt_with_the_previous_completion(items, tiny):
    batch = collate_kto(items, tiny[1].pad_token_id)
    assert batch["labels"].tolist() == [r["label"] for r in ROWS]
    kl = kl_batch(batch)
    for j, ex in enumerate(items):
        want = ex.prompt_ids + items[j - 1].response_ids[0]
        assert kl["input_ids"][j, :len(want)].tolist() == want
        assert kl["loss_mask"][j].sum().item() == len(items[j - 1].response_ids[0])
    main = main_batch(batch)
    assert "labels" not in main and not any(k.startswith("kl_") for k in main)
    assert main["input_ids"].shape[0] == N and main["num_responses"] == 1


# ------------------------------------------------------------------------------------------------ TRL parity


trl = pytest.importorskip("trl", minversion="1.16")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def models(tiny):
    policy = load_model(tiny[0]).eval()
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, ref.eval().requires_grad_(False)


def trl_kto(tmp_path, models, tok, beta, wd, wu):
    policy, ref = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, fp16=False,
                             gradient_checkpointing=False, per_device_train_batch_size=N, max_length=None,
                             disable_dropout=True, beta=beta, desirable_weight=wd, undesirable_weight=wu, seed=0)
        trainer = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                                 train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tok)
    return trainer


@pytest.mark.parametrize("beta,wd,wu", [(0.5, 1.0, 1.0), (0.1, 1.33, 0.8)])
def test_kto_matches_trl(beta, wd, wu, tmp_path, models, tiny, items):
    tok = tiny[1]
    trainer = trl_kto(tmp_path, models, tok, beta, wd, wu)
    rows = [trainer.train_dataset[i] for i in range(N)]
    for ex, row in zip(items, rows):  # the same token ids, and the same mismatched KL completions
        assert ex.prompt_ids == row["prompt_ids"] and ex.response_ids[0] == row["completion_ids"]
    for j, row in enumerate(rows):
        assert row["KL_completion_ids"] == items[j - 1].response_ids[0]
    logged = trainer._metrics["eval"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(rows)))

    policy, ref = models
    with torch.no_grad():
        res = KTO(beta, live_reference(ref), desirable_weight=wd, undesirable_weight=wu).step(
            policy, collate_kto(items, tok.pad_token_id))
    m = res.metrics
    good = m["desirable"].bool()
    assert 0 < good.sum() < N  # both labels present
    assert res.losses.mean().item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    assert m["kl"][0].item() == pytest.approx(logged["kl"][-1], abs=1e-5, rel=1e-5)
    assert m["kl"][0].item() > 0  # the KL point is not clamped away: it takes part in the loss
    frac = m["desirable"].mean()
    assert (m["rewards/desirable"].mean() / frac).item() == pytest.approx(logged["rewards/chosen"][-1], abs=1e-5,
                                                                         rel=1e-5)
    assert (m["rewards/undesirable"].mean() / (1 - frac)).item() == pytest.approx(logged["rewards/rejected"][-1],
                                                                                 abs=1e-5, rel=1e-5)
    assert m["logps"][good].mean().item() == pytest.approx(logged["logps/chosen"][-1], abs=1e-5, rel=1e-5)
    assert m["logps"][~good].mean().item() == pytest.approx(logged["logps/rejected"][-1], abs=1e-5, rel=1e-5)


# ------------------------------------------------------------------------------------------------ a run


def test_config_checks():
    base = dict(model="m", data="d", output_dir="o")
    KTOConfig(**base).validate()
    with pytest.raises(ConfigError, match="micro_batch_size"):
        KTOConfig(**base, micro_batch_size=1, batch_size=4).validate()
    with pytest.raises(ConfigError, match="undesirable_weight"):
        KTOConfig(**base, undesirable_weight=-1.0).validate()
    with pytest.raises(ConfigError, match="data_format"):
        KTOConfig(**base, data_format="text").validate()


def test_prefopt_kto_runs_on_the_loop_and_resumes(tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    from prefopt.cli import main

    out = tmp_path / "run"
    args = ["kto", "--model", str(tiny_model_dir), "--data", str(synthetic_pairs), "--output-dir", str(out),
            "--optimizer", "adamw", "--lr", "1e-3", "--warmup-steps", "0", "--batch-size", "8",
            "--micro-batch-size", "4", "--max-steps", "3", "--max-length", "64", "--save-every", "1",
            "--keep-checkpoints", "0", "--eval-fraction", "0.1", "--progress", "false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "desirable" in printed and "a frozen copy of the initial policy" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "kl" in r]
    assert len(train_rows) == 3 and all(math.isfinite(r["loss"]) for r in train_rows)
    assert all(0 < r["desirable"] < 1 for r in train_rows)  # from pairs: both labels in every step
    assert any("eval/loss" in r for r in rows)
    assert (out / "model.safetensors").is_file()
    # resume from step 2: the same step-3 row
    ckpt = out / "checkpoints" / "step-0000002"
    assert ckpt.is_dir()
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-0000003", ignore_errors=True)
    assert main(args + ["--resume", str(ckpt)]) == 0
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in again if "kl" in r][-1]
    assert last["step"] == 3 and last["loss"] == pytest.approx(train_rows[-1]["loss"], rel=1e-4)


def test_lora_reference_is_the_base_model(tiny, items):
    """With LoRA the reference is the policy with its adapters off: before any update (B = 0) the policy equals
    it, so every reward and the KL point are 0 and each loss is weight x (1 - sigma(0))."""
    from prefopt.models import apply_lora
    from prefopt.train.dpo import adapter_reference

    model = apply_lora(load_model(tiny[0]).eval(), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        res = KTO(0.5, adapter_reference(lambda m: m), desirable_weight=1.2, undesirable_weight=0.6).step(
            model, collate_kto(items, tiny[1].pad_token_id))
    assert res.metrics["rewards"].abs().max().item() < 1e-5 and res.metrics["kl"].abs().max().item() < 1e-5
    expected = [0.5 * (1.2 if r["label"] else 0.6) for r in ROWS]
    assert res.losses.tolist() == pytest.approx(expected, abs=1e-5)


def test_conversational_unpaired_rows_tokenize_as_preference_data(tiny):
    from prefopt.data import tokenize_examples
    from prefopt.data.types import PreferenceExample

    tok = tiny[1]
    prompt = [{"role": "user", "content": "What is the red house?"}]
    good = [{"role": "assistant", "content": "A house."}]
    bad = [{"role": "assistant", "content": "No idea."}]
    exs, report = load_unpaired([dict(prompt=prompt, completion=good, label=True),
                                 dict(prompt=prompt, completion=bad, label=False)])
    ours, _ = tokenize_unpaired(exs, tok)
    pair, _ = tokenize_examples([PreferenceExample(prompt, [good, bad])], tok)
    assert [ex.prompt_ids for ex in ours] == [pair[0].prompt_ids] * 2
    assert [ex.response_ids[0] for ex in ours] == pair[0].response_ids
    assert [ex.meta["label"] for ex in ours] == [True, False]
    with pytest.raises(DataError, match="both be strings or both message lists"):
        load_unpaired([dict(prompt="text", completion=good, label=True)])


def test_labelled_feedback_is_prepared_and_cached_like_preference_data(tiny, tmp_path, monkeypatch):
    """prepare_data(kind="unpaired"): unpaired rows and preference pairs (two examples a row) in one table, the
    same ids, labels and sources as tokenize_unpaired, in the file's order also when worker processes tokenize
    chunks; a rerun maps the cached table; another label is another table."""
    import prefopt.data.prepare as prepare
    from prefopt.data import write_jsonl
    from prefopt.data.prepare import prepare_data

    model_dir, tok = tiny
    rows = [dict(prompt=f"q{i}", completion=f" answer {i}", label=i % 3 == 0) for i in range(70)]
    pairs = [dict(prompt=f"p{i}", chosen=f" good {i}", rejected=f" bad {i}") for i in range(30)]
    path = write_jsonl(rows, tmp_path / "feedback.jsonl")
    monkeypatch.setattr(prepare, "CHUNK", 16)  # several chunks, so the workers run
    for source, n in ((path, 70), (write_jsonl(pairs, tmp_path / "pairs.jsonl"), 60)):
        expected, _ = tokenize_unpaired(load_unpaired(str(source))[0], tok, max_length=64)
        prepared = prepare_data(str(source), tok, kind="unpaired", max_length=64, num_proc=2,
                                cache_dir=tmp_path / "c", progress=False)
        assert not prepared.cached and len(prepared.table) == len(expected) == n
        assert [(e.prompt_ids, e.response_ids, e.meta["label"], e.source) for e in prepared.table] == \
            [(e.prompt_ids, e.response_ids, e.meta["label"], e.source) for e in expected]
        assert prepared.table.labels().tolist() == [e.meta["label"] for e in expected]
    first = prepare_data(str(path), tok, kind="unpaired", max_length=64, cache_dir=tmp_path / "c", progress=False)
    again = prepare_data(str(path), tok, kind="unpaired", max_length=64, cache_dir=tmp_path / "c", progress=False)
    assert again.cached and again.table.digest == first.table.digest
    rows[0]["label"] = not rows[0]["label"]
    flipped = prepare_data(str(write_jsonl(rows, tmp_path / "flipped.jsonl")), tok, kind="unpaired", max_length=64,
                           cache_dir=tmp_path / "c", progress=False)
    assert flipped.table.digest != first.table.digest  # the labels are part of the content
