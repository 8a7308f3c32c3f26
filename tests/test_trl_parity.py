"""Parity with TRL's ``DPOTrainer`` (TRL 1.16): the same tiny model, reference and preference rows through TRL
and through prefopt must give the same losses, implicit rewards and policy log-probs.

How TRL 1.16 is driven (no training step is taken):

* ``DPOTrainer(model=..., ref_model=..., args=DPOConfig(...), train_dataset=Dataset, processing_class=tok)``
  tokenizes the dataset at construction time (``trainer.train_dataset`` then holds ``prompt_ids``,
  ``chosen_ids``, ``rejected_ids``), and ``trainer.data_collator`` pads a list of those rows into
  ``input_ids``/``attention_mask``/``completion_mask`` with all chosen rows first, then all rejected rows,
  right-padded -- the same response-major layout as ``prefopt.data.collate_preferences``.
* ``trainer.compute_loss(trainer.model, batch)`` returns the batch-MEAN loss and appends batch means of
  ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen`` and
  ``logps/rejected`` to ``trainer._metrics[mode]`` (mode is "eval" here: the model is not in train mode).
  TRL exposes no per-example values, so per-example parity is checked by feeding TRL one-example batches
  (which also checks that prefopt's padded batch agrees with unpadded sequences); the whole-batch parity
  is checked on a batch from ``trainer.get_train_dataloader()`` against prefopt's batch means.
* TRL patches ``forward`` of the models it is given (a fused, chunked LM head that returns per-token
  log-probs) and writes the pad id into their configs, so it gets deep copies; prefopt's own models stay
  untouched. The fused head computes the same float32 log-softmax in chunks: differences are rounding only.

Tokenization conventions (plain-text rows), and why both sides see identical ids here:

* BOS: TRL tokenizes ``prompt`` and ``prompt + completion`` with the tokenizer's default special tokens, so
  a tokenizer that adds BOS gets exactly one BOS at the start; prefopt prepends BOS once when the tokenizer
  normally adds one. The tiny tokenizer adds none (both sides then have no BOS); a BOS-adding variant of it
  is checked too.
* EOS: TRL appends the ``eos_token`` *string* to chosen/rejected unless the text already ends with it;
  prefopt appends the EOS *id* unless the ids already end with it. Same ids.
* Boundary: TRL tokenizes prompt+completion jointly and lets the completion start where that diverges from
  the tokenized prompt; prefopt tokenizes prompt and completion separately. They agree whenever the tokenizer
  does not merge across the join -- true here because every completion starts with a space (byte-level BPE
  pre-splits words before a space). Rows that merge across the join (e.g. "Hello" + "world") would differ.
* Truncation: ``max_length=None`` on both sides, so nothing is cut.
* Conversational rows are NOT identical: with a chat template that puts text after EOS (here "</s>\\n"),
  TRL scores those trailing template tokens as completion tokens while prefopt ends the response at EOS.
  ``test_conversational_rows_differ_only_by_template_text_after_eos`` pins that difference.

Loss correspondences: prefopt ``sigmoid``/``robust``/``hinge`` = TRL ``sigmoid``/``robust``/``hinge``;
prefopt ``ipo_per_token`` = TRL ``ipo`` (TRL divides each log-ratio by its completion length); prefopt
``exo_pair``/``nca_pair``/``sppo_hard``/``apo_zero``/``apo_down``/``discopop``/``sigmoid_norm`` = the TRL loss of
the same name (``exo_pair``'s epsilon is ``label_smoothing`` on both sides; prefopt's 0 means 1e-3, TRL's 0 is
refused); prefopt ``bco_pair`` at reward shift 0 = TRL ``bco_pair`` (which keeps no shift); prefopt ``aot`` /
``aot_pair`` = TRL ``aot`` / ``aot_unpaired`` (see ``FAMILY_CASES``). Every TRL loss reports rewards beta * (pi - ref) on summed log-probs, as prefopt does. TRL 1.16's
``sigmoid`` ignores ``label_smoothing``, so conservative DPO (prefopt ``cdpo``) has no direct TRL loss; on a
single pair TRL's ``aot``/``aot_unpaired`` (which sort log-ratios across the batch, a no-op for one pair)
reduce exactly to the cDPO formula and are used for it.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import pytest
import torch

trl = pytest.importorskip(
    "trl", minversion="1.16",
    reason="TRL >= 1.16 is needed for the TRL parity tests (install the test extra: pip install -e '.[test]')")
datasets = pytest.importorskip("datasets")

from prefopt.data import tokenize_examples  # noqa: E402
from prefopt.data.types import PreferenceExample  # noqa: E402
from prefopt.models import init_model, load_model, load_tokenizer  # noqa: E402
from prefopt.logprobs import forward_logps  # noqa: E402
from prefopt.train.dpo import DPO, ld_logps_fn, live_reference, make_collate  # noqa: E402

# Prompts end without whitespace and every completion starts with a space, so byte-level BPE cannot merge
# tokens across the prompt/completion join (see the module docstring). Lengths differ, so batches are padded.
ROWS = [
    dict(prompt="What is the red house?",
         chosen=" Sure! The house is red, and Alice built it at home.", rejected=" No."),
    dict(prompt="Why is the quiet river?",
         chosen=" It is quiet.", rejected=" I think Bob fixed a quiet river; however, the cat was happy."),
    dict(prompt="Alice found the tiny cat near the lake.",
         chosen=" The cat has 12 parts.", rejected=" The cat has 99 parts!"),
    dict(prompt="Can you describe the bright garden?",
         chosen=" A bright garden after dinner.", rejected=" The garden is bright"),
]
N = len(ROWS)
NOISE_STD = 0.05  # reference = policy + N(0, 0.05^2) on every weight: rewards of order 0.1-1 at beta = 0.5

# log-probs are ~ -30 to -110; rewards ~ 0.1-3; losses ~ 0.1-30
RTOL, ATOL = 1e-5, 1e-5

# (case id, prefopt loss, TRL loss_type, beta, label_smoothing)
CASES = [
    ("sigmoid", "sigmoid", "sigmoid", 0.5, 0.0),
    ("robust", "robust", "robust", 0.5, 0.1),
    ("ipo", "ipo_per_token", "ipo", 0.5, 0.0),
    # beta = 1 puts one pair past the hinge (beta * h > 1, loss 0) and three before it
    ("hinge", "hinge", "hinge", 1.0, 0.0),
    # exo_pair reads label_smoothing as EXO's epsilon on both sides; TRL 1.16 refuses 0, which prefopt takes to
    # mean the paper's 1e-3 (test_exo_pair_eps0_is_trl_eps_1e3 below), so both cases here give eps > 0
    ("exo_pair", "exo_pair", "exo_pair", 0.5, 1e-3),
    ("exo_pair_eps0.2", "exo_pair", "exo_pair", 0.5, 0.2),
    ("nca_pair", "nca_pair", "nca_pair", 0.5, 0.0),
    ("sppo_hard", "sppo_hard", "sppo_hard", 0.5, 0.0),
    ("apo_zero", "apo_zero", "apo_zero", 0.5, 0.0),
    ("apo_down", "apo_down", "apo_down", 0.5, 0.0),
    # prefopt's tau defaults to TRL's discopop_tau (0.05), which DPOConfig leaves at its default here
    ("discopop", "discopop", "discopop", 0.5, 0.0),
    # both divide each log-ratio by its completion token count (TRL: completion_mask sums, prefopt: lengths)
    ("sigmoid_norm", "sigmoid_norm", "sigmoid_norm", 0.5, 0.0),
    # TRL 1.16's bco_pair keeps no running reward shift: prefopt's with delta = 0, its value before the first step
    # (the shift itself is state of the DPO method, tested in test_losses_family.py)
    ("bco_pair", "bco_pair", "bco_pair", 0.5, 0.0),
]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_model(tiny_dir).eval()


@pytest.fixture(scope="module")
def reference(policy):
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(NOISE_STD * torch.randn(p.shape, generator=g))
    return ref.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def items(tokenizer):
    examples = [PreferenceExample(r["prompt"], [r["chosen"], r["rejected"]], source=f"rows[{i}]")
                for i, r in enumerate(ROWS)]
    out, report = tokenize_examples(examples, tokenizer)
    assert report.kept == N and report.truncated == 0
    return out


@pytest.fixture(scope="module")
def make_trainer(tmp_path_factory, policy, reference, tokenizer):
    """DPOTrainer factory (cached per config) over deep copies of the policy and reference."""
    cache: dict = {}

    def build(loss_type, beta: float, label_smoothing: float, rows, tok, extra: dict):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. transformers 5 renaming gradient_checkpointing
            args = trl.DPOConfig(
                output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", use_cpu=True,
                bf16=False, fp16=False,  # DPOConfig defaults bf16 to True
                gradient_checkpointing=False,  # DPOConfig defaults it to True
                per_device_train_batch_size=len(rows), max_length=None, disable_dropout=True,
                loss_type=[loss_type] if isinstance(loss_type, str) else list(loss_type), beta=beta,
                label_smoothing=label_smoothing, seed=0, **extra,
            )
            trainer = trl.DPOTrainer(
                model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                train_dataset=datasets.Dataset.from_list(list(rows)), processing_class=tok)
        assert not trainer.args.bf16 and not trainer.args.gradient_checkpointing
        return trainer

    def make(loss_type, beta: float, label_smoothing: float = 0.0, *, rows=ROWS, tok=None, **extra):
        """``loss_type``: a TRL loss name or a list of them; ``extra``: more DPOConfig fields (loss_weights,
        use_weighting, ld_alpha)."""
        if rows is not ROWS or tok is not None:  # only trainers over the default rows and tokenizer are cached
            return build(loss_type, beta, label_smoothing, rows, tok or tokenizer, extra)
        key = (tuple([loss_type] if isinstance(loss_type, str) else loss_type), beta, label_smoothing,
               repr(sorted(extra.items())))
        if key not in cache:
            cache[key] = build(loss_type, beta, label_smoothing, rows, tokenizer, extra)
        return cache[key]

    return make


# ------------------------------------------------------------------------------------------------ helpers


def prefopt_step(loss: str, beta: float, label_smoothing: float, policy, reference, items, tokenizer, **opts):
    """Per-example losses and metrics ([B] tensors) from prefopt's DPO method on one padded batch. ``opts``: the
    DPO method's options (loss_weights, wpo, ld_alpha; with ld_alpha the reference gets LD-DPO's log-probs too,
    as train_dpo wires it)."""
    batch = make_collate(tokenizer.pad_token_id)(items)
    logps_fn = ld_logps_fn(opts["ld_alpha"]) if opts.get("ld_alpha") is not None else forward_logps
    with torch.no_grad():
        res = DPO(loss, beta, live_reference(reference, logps_fn), label_smoothing=label_smoothing,
                  logps_fn=logps_fn, **opts).step(policy, batch)
    return {"loss": res.losses.detach(), **{k: v.detach() for k, v in res.metrics.items()}}


def prefopt_one_at_a_time(loss: str, beta: float, label_smoothing: float, policy, reference, items, tokenizer,
                          **opts):
    """Per-example values with each example as a batch of one (what TRL's one-row batches are compared with)."""
    per = [prefopt_step(loss, beta, label_smoothing, policy, reference, [ex], tokenizer, **opts) for ex in items]
    return {k: torch.cat([p[k] for p in per]) for k in per[0]}


METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")


def trl_step(trainer, batch) -> dict[str, float]:
    """TRL's loss (batch mean) and the batch-mean metrics it logs for this batch, via compute_loss."""
    logged = trainer._metrics["train" if trainer.model.training else "eval"]  # the mode TRL logs under
    before = {k: len(logged[k]) for k in METRIC_KEYS}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trainer.compute_loss(trainer.model, batch)
    assert all(len(logged[k]) == before[k] + 1 for k in METRIC_KEYS), "TRL logged no metrics for this batch"
    return {"loss": float(loss), **{k: logged[k][-1] for k in METRIC_KEYS}}


_TRL_RESULTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> {what: values}, saves time


def trl_single_rows(trainer) -> dict[str, torch.Tensor]:
    """Per-example TRL values: each row of the (ordered) tokenized dataset as a batch of one."""
    memo = _TRL_RESULTS.setdefault(trainer, {})
    if "rows" not in memo:
        per = [trl_step(trainer, trainer.data_collator([trainer.train_dataset[i]])) for i in range(N)]
        memo["rows"] = {k: torch.tensor([p[k] for p in per], dtype=torch.float64) for k in per[0]}
    return memo["rows"]


def trl_whole_batch(trainer) -> dict[str, float]:
    """TRL's batch-mean values on one batch of its own train dataloader (padded, in shuffled order)."""
    memo = _TRL_RESULTS.setdefault(trainer, {})
    if "batch" not in memo:
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 2 * N  # the whole data set, chosen rows then rejected rows
        memo["batch"] = trl_step(trainer, batch)
    return memo["batch"]


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64),
        rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: prefopt and TRL disagree\n{m}")


# ------------------------------------------------------------------------------------------------ tokenization


def _bos_adding(tokenizer):
    """A copy of the tiny tokenizer whose default encoding prepends BOS (like Llama's)."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
        special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    assert tok("hi", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    return tok


@pytest.mark.parametrize("with_bos", [False, True], ids=["no_bos", "bos"])
def test_trl_sees_the_same_token_ids(with_bos, tokenizer, make_trainer):
    tok = _bos_adding(tokenizer) if with_bos else tokenizer
    examples = [PreferenceExample(r["prompt"], [r["chosen"], r["rejected"]]) for r in ROWS]
    ours, _ = tokenize_examples(examples, tok)
    trainer = make_trainer("sigmoid", 0.5, tok=tok)
    for ex, row in zip(ours, trainer.train_dataset):
        assert ex.prompt_ids == row["prompt_ids"]
        assert ex.response_ids == [row["chosen_ids"], row["rejected_ids"]]
        assert (ex.prompt_ids[0] == tok.bos_token_id) is with_bos
        assert tok.bos_token_id not in ex.prompt_ids[1:]
        assert all(r[-1] == tok.eos_token_id and tok.eos_token_id not in r[:-1] for r in ex.response_ids)

    # the padded batches are the same tensors too: TRL's completion_mask is prefopt's loss_mask
    ours_batch = make_collate(tok.pad_token_id)(ours)
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(N)])
    assert torch.equal(theirs["input_ids"], ours_batch["input_ids"])
    assert torch.equal(theirs["attention_mask"], ours_batch["attention_mask"])
    assert torch.equal(theirs["completion_mask"].bool(), ours_batch["loss_mask"])


def test_conversational_rows_differ_only_by_template_text_after_eos(tokenizer, make_trainer):
    """A known convention difference, pinned: TRL scores what the chat template renders after EOS.

    The tiny chat template ends every turn with "</s>\\n". TRL's completion is the full rendering minus the
    prompt rendering, so it includes the "\\n" after EOS; prefopt ends the response at EOS and drops it.
    Log-probs of conversational data therefore differ by those trailing tokens.
    """
    rows = [dict(prompt=[{"role": "user", "content": "What is the red house?"}],
                 chosen=[{"role": "assistant", "content": "A house."}],
                 rejected=[{"role": "assistant", "content": "No idea at all."}])]
    trainer = make_trainer("sigmoid", 0.5, rows=rows)
    row = trainer.train_dataset[0]
    ours, _ = tokenize_examples([PreferenceExample(rows[0]["prompt"], [rows[0]["chosen"], rows[0]["rejected"]])],
                                tokenizer)
    tail = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert ours[0].prompt_ids == row["prompt_ids"]
    assert ours[0].response_ids[0] + tail == row["chosen_ids"]
    assert ours[0].response_ids[1] + tail == row["rejected_ids"]


# ------------------------------------------------------------------------------------------------ losses


def test_reference_really_differs_from_policy(policy, reference, items, tokenizer):
    """Guard for the parity tests: with a reference equal to the policy every reward would be 0."""
    out = prefopt_step("sigmoid", 0.5, 0.0, policy, reference, items, tokenizer)
    assert out["rewards/chosen"].abs().min() > 0.05 and out["rewards/rejected"].abs().min() > 0.02
    assert 0 < out["rewards/accuracies"].sum() < N  # some pairs ranked right, some wrong


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_and_logps_match_trl_per_example(case, policy, reference, items, tokenizer, make_trainer):
    _, loss, trl_loss, beta, eps = case
    ours = prefopt_step(loss, beta, eps, policy, reference, items, tokenizer)
    theirs = trl_single_rows(make_trainer(trl_loss, beta, eps))
    for key in ("loss", "logps/chosen", "logps/rejected"):
        close(ours[key], theirs[key], f"{case[0]} {key}")
    if loss == "hinge":  # both sides of the hinge are exercised
        assert (ours["loss"] == 0).sum() >= 1 and (ours["loss"] > 0).sum() >= 1


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_and_logps_match_trl_on_a_whole_batch(case, policy, reference, items, tokenizer, make_trainer):
    """TRL's own dataloader batch (padded, shuffled order: only batch means are compared)."""
    _, loss, trl_loss, beta, eps = case
    ours = prefopt_step(loss, beta, eps, policy, reference, items, tokenizer)
    theirs = trl_whole_batch(make_trainer(trl_loss, beta, eps))
    for key in ("loss", "logps/chosen", "logps/rejected"):
        close(ours[key].mean(), theirs[key], f"{case[0]} mean {key}")


REWARD_CASES = [pytest.param(*c, id=c[0]) for c in CASES]


@pytest.mark.parametrize("name, loss, trl_loss, beta, eps", REWARD_CASES)
def test_rewards_match_trl(name, loss, trl_loss, beta, eps, policy, reference, items, tokenizer, make_trainer):
    ours = prefopt_step(loss, beta, eps, policy, reference, items, tokenizer)
    trainer = make_trainer(trl_loss, beta, eps)
    per_example = trl_single_rows(trainer)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(ours[key], per_example[key], f"{name} {key}")
    whole = trl_whole_batch(trainer)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(ours[key].mean(), whole[key], f"{name} mean {key}")


@pytest.mark.parametrize("trl_loss", ["aot", "aot_unpaired"])
def test_cdpo_matches_trl_aot_on_single_pairs(trl_loss, policy, reference, items, tokenizer, make_trainer):
    """cDPO: -(1-eps) log sigma(beta h) - eps log sigma(-beta h). TRL's aot/aot_unpaired apply exactly this to
    log-ratio margins after sorting them across the batch; for a batch of one pair the sort is the identity."""
    beta, eps = 0.5, 0.2
    ours = prefopt_step("cdpo", beta, eps, policy, reference, items, tokenizer)
    theirs = trl_single_rows(make_trainer(trl_loss, beta, eps))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        close(ours[key], theirs[key], f"cdpo vs TRL {trl_loss} {key}")
    plain = prefopt_step("sigmoid", beta, 0.0, policy, reference, items, tokenizer)
    assert (ours["loss"] - plain["loss"]).abs().min() > 1e-3  # the smoothing really changes the loss


def test_trl_sigmoid_ignores_label_smoothing(policy, reference, items, tokenizer, make_trainer):
    """Why cdpo is not compared with TRL 'sigmoid' + label_smoothing: TRL 1.16 silently ignores it there."""
    beta, eps = 0.5, 0.2
    theirs = trl_single_rows(make_trainer("sigmoid", beta, eps))
    close(prefopt_step("sigmoid", beta, 0.0, policy, reference, items, tokenizer)["loss"], theirs["loss"],
          "TRL sigmoid with label_smoothing vs prefopt sigmoid")
    cdpo = prefopt_step("cdpo", beta, eps, policy, reference, items, tokenizer)["loss"]
    assert (cdpo.double() - theirs["loss"]).abs().max() > 1e-3


def test_exo_pair_eps0_is_trl_eps_1e3(policy, reference, items, tokenizer, make_trainer):
    """Convention: TRL 1.16 raises for exo_pair with label_smoothing = 0; prefopt reads 0 as the paper's 1e-3."""
    ours = prefopt_step("exo_pair", 0.5, 0.0, policy, reference, items, tokenizer)
    theirs = trl_single_rows(make_trainer("exo_pair", 0.5, 1e-3))
    close(ours["loss"], theirs["loss"], "exo_pair eps 0 vs TRL eps 1e-3")
    with pytest.raises(ValueError, match="exo_pair"):
        make_trainer("exo_pair", 0.5, 0.0)


# ------------------------------------------------------------------------------------------------ the wider family

# (case id, prefopt loss, prefopt DPO options, TRL loss_type list, TRL DPOConfig options, beta, label_smoothing)
FAMILY_CASES = [
    # aot / aot_pair sort log-ratios across the batch: per example they are compared on batches of one (the sort is
    # the identity there), on the whole batch by their mean (a sum over sorted positions does not depend on the
    # order of the examples). TRL 1.16 calls aot_pair "aot_unpaired".
    ("aot", "aot", {}, ["aot"], {}, 0.5, 0.0),
    ("aot_eps0.2", "aot", {}, ["aot"], {}, 0.5, 0.2),
    ("aot_pair", "aot_pair", {}, ["aot_unpaired"], {}, 0.5, 0.0),
    ("aot_pair_eps0.2", "aot_pair", {}, ["aot_unpaired"], {}, 0.5, 0.2),
    # weighted lists: TRL's batch loss is sum_k w_k mean(loss_k), prefopt's per-example sum_k w_k loss_k
    ("sigmoid+bco_pair", "sigmoid,bco_pair", {"loss_weights": [0.7, 0.3]}, ["sigmoid", "bco_pair"],
     {"loss_weights": [0.7, 0.3]}, 0.5, 0.0),
    # TRL's MPO recipe; TRL's sft part is a mean over the chosen tokens of the batch (see test_sft_in_a_list_...)
    ("mpo", "sigmoid,bco_pair,sft", {"loss_weights": [0.8, 0.2, 1.0]}, ["sigmoid", "bco_pair", "sft"],
     {"loss_weights": [0.8, 0.2, 1.0]}, 0.5, 0.0),
    # WPO = TRL use_weighting; LD-DPO = TRL ld_alpha (TRL applies it to the policy and the reference, as prefopt)
    ("wpo", "sigmoid", {"wpo": True}, ["sigmoid"], {"use_weighting": True}, 0.5, 0.0),
    ("ld_alpha", "sigmoid", {"ld_alpha": 0.5}, ["sigmoid"], {"ld_alpha": 0.5}, 0.5, 0.0),
    ("ld_wpo_ipo", "ipo_per_token", {"ld_alpha": 0.3, "wpo": True}, ["ipo"], {"ld_alpha": 0.3, "use_weighting": True},
     0.5, 0.0),
    ("wpo_mpo", "sigmoid,bco_pair,sft", {"loss_weights": [0.8, 0.2, 1.0], "wpo": True},
     ["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0], "use_weighting": True}, 0.5, 0.0),
]
FAMILY_IDS = [c[0] for c in FAMILY_CASES]
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected")


@pytest.mark.parametrize("case", FAMILY_CASES, ids=FAMILY_IDS)
def test_family_matches_trl_per_example(case, policy, reference, items, tokenizer, make_trainer):
    name, loss, opts, trl_losses, trl_opts, beta, eps = case
    ours = prefopt_one_at_a_time(loss, beta, eps, policy, reference, items, tokenizer, **opts)
    theirs = trl_single_rows(make_trainer(trl_losses, beta, eps, **trl_opts))
    for key in KEYS:
        close(ours[key], theirs[key], f"{name} {key}")


# TRL 1.16 cannot run sft with use_weighting on a batch of more than one pair (its sft part is an expanded scalar
# that the weighting then multiplies in place: test_trl_wpo_with_sft_fails_on_a_batch), so wpo_mpo is compared per
# example only.
WHOLE_BATCH_CASES = [c for c in FAMILY_CASES if c[0] != "wpo_mpo"]


@pytest.mark.parametrize("case", WHOLE_BATCH_CASES, ids=[c[0] for c in WHOLE_BATCH_CASES])
def test_family_matches_trl_on_a_whole_batch(case, policy, reference, items, tokenizer, make_trainer):
    name, loss, opts, trl_losses, trl_opts, beta, eps = case
    ours = prefopt_step(loss, beta, eps, policy, reference, items, tokenizer, **opts)
    theirs = trl_whole_batch(make_trainer(trl_losses, beta, eps, **trl_opts))
    expected_loss = ours["loss"].mean()
    if "sft" in trl_losses:
        # TRL's sft part: -sum of chosen token log-probs / number of chosen tokens over the whole batch (times the
        # pair's WPO weight); prefopt's: each example's per-token NLL. Swap ours for TRL's to compare the rest.
        w = opts["loss_weights"][trl_losses.index("sft")]
        counts = torch.tensor([float(len(ex.response_ids[0])) for ex in items], dtype=torch.float64)
        token_mean = -ours["logps/chosen"].double().sum() / counts.sum()
        expected_loss = expected_loss.double() - w * ours["loss/sft"].double().mean() + w * token_mean
    close(expected_loss, theirs["loss"], f"{name} mean loss")
    for key in KEYS[1:]:
        close(ours[key].mean(), theirs[key], f"{name} mean {key}")


def test_trl_wpo_with_sft_fails_on_a_batch(make_trainer):
    """Pinned so that the wpo_mpo whole-batch comparison is added once TRL can run it."""
    trainer = make_trainer(["sigmoid", "sft"], 0.5, loss_weights=[1.0, 1.0], use_weighting=True)
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.raises(RuntimeError, match="memory location"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.compute_loss(trainer.model, batch)


def test_batch_coupled_losses_really_couple(policy, reference, items, tokenizer):
    """Guard for the aot cases: on the whole batch the per-example values are not those of one-row batches."""
    for loss in ("aot", "aot_pair"):
        whole = prefopt_step(loss, 0.5, 0.0, policy, reference, items, tokenizer)["loss"]
        single = prefopt_one_at_a_time(loss, 0.5, 0.0, policy, reference, items, tokenizer)["loss"]
        assert (whole - single).abs().max() > 1e-3


def test_modifiers_really_change_the_loss(policy, reference, items, tokenizer):
    """Guard for the wpo / ld_alpha cases: each modifier moves the loss away from plain DPO's."""
    plain = prefopt_step("sigmoid", 0.5, 0.0, policy, reference, items, tokenizer)
    for opts in ({"wpo": True}, {"ld_alpha": 0.5}):
        other = prefopt_step("sigmoid", 0.5, 0.0, policy, reference, items, tokenizer, **opts)
        assert (other["loss"] - plain["loss"]).abs().max() > 1e-3
