"""SFT: data formats and masks, the loss (prompt tokens masked), overfitting a tiny set, --from-preferences, CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefopt.cli import main
from prefopt.config import SFTConfig
from prefopt.data import PreferenceExample, make_synthetic_preferences, tokenize_example, tokenize_examples, write_jsonl
from prefopt.data.sft import SFTExample, collate_sft, load_sft, tokenize_sft, tokenize_sft_example
from prefopt.errors import ConfigError, DataError
from prefopt.logprobs import masked_sequence_logps
from prefopt.models import init_model, load_model, load_tokenizer
from prefopt.train.sft import SFT, train_sft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------- data


def test_formats_detected_and_validated(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    cases = {
        "explicit": [{"prompt": "Q?", "response": " A."}, {"prompt": "Q2?", "response": " B."}],
        "completion": [{"prompt": "Q?", "completion": " A."}],
        "conversational": [{"messages": msgs}],
        "text": [{"text": "Just some text."}],
    }
    for name, rows in cases.items():
        examples, report = load_sft(write_rows(tmp_path / f"{name}.jsonl", rows))
        assert report.format == ("explicit" if name == "completion" else name)
        assert len(examples) == len(rows)
    ex = load_sft(tmp_path / "completion.jsonl")[0][0]
    assert (ex.prompt, ex.response) == ("Q?", " A.")
    ex = load_sft(tmp_path / "conversational.jsonl")[0][0]
    assert ex.prompt == msgs[:1] and ex.response == msgs[1:] and ex.conversation is None
    assert load_sft(tmp_path / "text.jsonl")[0][0].prompt == ""

    prefs = write_rows(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="from-preferences"):
        load_sft(prefs)
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "Q", "response": "a"}, {"prompt": "Q", "response": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'response' is empty"):
        load_sft(bad)
    examples, report = load_sft(bad, skip_bad=True)
    assert len(examples) == 1 and report.skipped["empty_field"] == 1
    no_reply = write_rows(tmp_path / "noreply.jsonl", [{"messages": msgs[:1]}])
    with pytest.raises(DataError, match="no assistant message"):
        load_sft(no_reply)
    with pytest.raises(ConfigError, match="from-preferences"):
        load_sft(prefs, format="ranked")


def test_text_format_trains_every_token(tok):
    item = tokenize_sft_example(SFTExample("", "The quick brown fox."), tok)
    assert item.prompt_ids == [] and item.response_ids == [ids(tok, "The quick brown fox.") + [tok.eos_token_id]]
    batch = collate_sft([item], tok.pad_token_id)
    assert batch["loss_mask"].all()


def test_single_turn_conversation_split_as_for_preferences(tok):
    user = [{"role": "user", "content": "What is a cat?"}]
    reply = [{"role": "assistant", "content": "A small animal."}]
    sft = tokenize_sft_example(SFTExample(user, reply), tok)
    pref = tokenize_example(PreferenceExample(user, [reply, [{"role": "assistant", "content": "No."}]]), tok)
    assert sft.prompt_ids == pref.prompt_ids and sft.response_ids[0] == pref.response_ids[0]
    assert "loss_mask" not in sft.meta


def test_multi_turn_conversation_trains_every_assistant_turn(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": "Blue."}]
    (ex,), _ = load_sft(write_rows(tmp_path / "chat.jsonl", [{"messages": msgs}]))
    assert ex.conversation == msgs
    items, _ = tokenize_sft([ex], tok)
    batch = collate_sft(items, tok.pad_token_id)
    row, mask = batch["input_ids"][0], batch["loss_mask"][0]
    assert tok.decode(row[mask]) == "Hello!</s>Blue.</s>"  # the assistant turns and their EOS, nothing else
    assert tok.decode(row[~mask]).startswith("<|system|>\nBe brief.</s>\n<|user|>\nHi there")
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(row) == rendered.rstrip("\n")  # the whole conversation, EOS once per turn
    assert tok.decode(items[0].prompt_ids) == "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    # truncation: the prompt keeps its end, the response (and its mask) its start
    full = items[0]
    (short,), report = tokenize_sft([ex], tok, max_length=len(full.prompt_ids) + 3, max_prompt_length=8)
    assert report.truncated == 1 and short.prompt_ids == full.prompt_ids[-8:]
    n = len(short.response_ids[0])
    assert n == len(full.prompt_ids) + 3 - 8
    assert short.response_ids[0] == full.response_ids[0][:n] and short.meta["loss_mask"] == full.meta["loss_mask"][:n]


# ------------------------------------------------------------------------------------------------- loss


def test_loss_masks_prompt_tokens(tiny, tok):
    model = load_model(tiny)
    item = tokenize_sft_example(SFTExample("Write a review of the film The Silent River.", " I loved it."), tok)
    batch = collate_sft([item], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = len(item.prompt_ids) - 2  # a prompt position that is a prediction target (not the first token)
    assert p >= 1 and not batch["loss_mask"][0, p]
    other = batch["input_ids"].clone()
    other[0, p] = (other[0, p] + 7) % model.config.vocab_size  # a different target for one prompt token
    full_mask = batch["attention_mask"].bool()
    for mask, should_change in ((batch["loss_mask"], False), (full_mask, True)):
        a = masked_sequence_logps(logits, batch["input_ids"], mask).sum
        b = masked_sequence_logps(logits, other, mask).sum
        assert bool((a - b).abs().max() > 1e-4) == should_change
    # the method's loss is exactly the masked (response-only) per-token NLL
    masked = masked_sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    with torch.no_grad():
        result = SFT().step(model, batch)
    assert masked.count.item() == len(item.response_ids[0])
    torch.testing.assert_close(result.losses, -masked.sum / masked.count, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.metrics["ppl"], torch.exp(result.losses))


def _loss_on(model_dir, items, tok):
    model = load_model(model_dir)
    with torch.no_grad():
        return float(SFT().step(model, collate_sft(items, tok.pad_token_id)).losses.mean())


def test_tiny_model_overfits_tiny_set(tiny, tok, tmp_path):
    prefs = make_synthetic_preferences(8, seed=3)
    rows = [{"prompt": ex.prompt, "response": ex.chosen} for ex in prefs]
    data = write_rows(tmp_path / "sft.jsonl", rows)
    items, _ = tokenize_sft(load_sft(data)[0], tok)
    untrained = _loss_on(tiny, items, tok)
    cfg = SFTConfig(model=str(tiny), data=str(data), output_dir=str(tmp_path / "out"), lr=3e-3, optimizer="adamw",
                    warmup_steps=0, batch_size=8, micro_batch_size=4, max_steps=40, progress=False)
    train_sft(cfg)
    trained = _loss_on(tmp_path / "out", items, tok)
    print(f"untrained {untrained:.3f} trained {trained:.3f}")
    assert untrained > 5.0  # close to uniform over the vocabulary
    assert trained < 1.5 < untrained / 3, (untrained, trained)


# ------------------------------------------------------------------------------------ from preferences


def test_from_preferences_uses_chosen_responses(tmp_path, tok):
    prefs = make_synthetic_preferences(6, seed=1)
    path = write_jsonl(prefs, tmp_path / "prefs.jsonl")
    examples, report = load_sft(path, from_preferences=True)
    assert report.format == "explicit"
    assert [(e.prompt, e.response) for e in examples] == [(p.prompt, p.chosen) for p in prefs]
    assert all(p.chosen != p.rejected for p in prefs)
    items, _ = tokenize_sft(examples, tok)
    pref_items, _ = tokenize_examples(prefs, tok)
    assert [i.response_ids[0] for i in items] == [p.response_ids[0] for p in pref_items]
    assert [i.prompt_ids for i in items] == [p.prompt_ids for p in pref_items]
    # conversational preference rows: the chosen assistant message
    conv = [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Good"}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad"}]}]
    (ex,), _ = load_sft(write_rows(tmp_path / "conv.jsonl", conv), from_preferences=True)
    assert ex.response == [{"role": "assistant", "content": "Good"}]
    with pytest.raises(ConfigError, match="data_format"):
        SFTConfig(model="m", data="d", output_dir="o", data_format="ranked").validate()
    SFTConfig(model="m", data="d", output_dir="o", data_format="ranked", from_preferences=True).validate()


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_from_preferences(tiny, tmp_path, capsys):
    data = write_jsonl(make_synthetic_preferences(8, seed=2), tmp_path / "prefs.jsonl")
    out = tmp_path / "run"
    common = ["--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
              "--batch-size", "4", "--micro-batch-size", "2", "--progress", "false"]
    assert main(["sft", *common]) == 2  # preference data without --from-preferences
    assert "from-preferences" in capsys.readouterr().err
    assert main(["sft", *common, "--from-preferences", "--eval-fraction", "0.25"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("loss", "nll_per_token", "ppl", "tokens_per_second", "examples_per_second"):
        assert all(key in r for r in train_rows), key
    assert any("eval/nll_per_token" in r for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "tokenizer.json").is_file() and model.config.vocab_size == len(load_tokenizer(out))
