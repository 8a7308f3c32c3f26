"""Tokenization: exact prompt/response boundaries, BOS/EOS exactly once, chat templates, truncation."""

import string

import pytest
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from prefopt.data import PreferenceExample, tokenize_example, tokenize_examples
from prefopt.errors import DataError

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_tokenizer(bos=False, chat_template=None):
    """Character-level BPE with one merge, "? ", that crosses the join of "...?" + " ..."."""
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, "<bos>": 3}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    vocab["? "] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("?", " ")], unk_token="<unk>"))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                  pad_token="<pad>", bos_token="<bos>")
    tok.chat_template = chat_template
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_boundary_exact_when_merge_crosses_join():
    tok = make_tokenizer()
    ex = PreferenceExample("Is it ok?", [" Yes.", " No!"])
    out = tokenize_example(ex, tok)
    assert out.prompt_ids == ids(tok, "Is it ok?")
    assert out.response_ids == [ids(tok, " Yes.") + [1], ids(tok, " No!") + [1]]
    # the joined string tokenizes differently at the join, so re-splitting it would be wrong
    assert ids(tok, "Is it ok? Yes.") != out.prompt_ids + out.response_ids[0][:-1]
    assert ids(tok, "Is it ok? Yes.")[len(out.prompt_ids) - 1] == tok.convert_tokens_to_ids("? ")


def test_eos_exactly_once():
    tok = make_tokenizer()
    out = tokenize_example(PreferenceExample("p", ["a<eos>", "b"]), tok)
    assert out.response_ids == [ids(tok, "a") + [1], ids(tok, "b") + [1]]
    for r in out.response_ids:
        assert r.count(tok.eos_token_id) == 1 and r[-1] == tok.eos_token_id
    assert tok.eos_token_id not in out.prompt_ids


def test_bos_once_only_when_tokenizer_adds_it():
    with_bos, without = make_tokenizer(bos=True), make_tokenizer()
    assert with_bos("a")["input_ids"] == [3] + ids(with_bos, "a")
    out = tokenize_example(PreferenceExample("Hi", [" a", " b"]), with_bos)
    assert out.prompt_ids == [3] + ids(with_bos, "Hi")
    assert all(3 not in r for r in out.response_ids)
    assert tokenize_example(PreferenceExample("<bos>Hi", [" a", " b"]), with_bos).prompt_ids == out.prompt_ids
    assert tokenize_example(PreferenceExample("Hi", [" a", " b"]), without).prompt_ids == ids(without, "Hi")


def test_chat_template_boundary_and_eos_not_doubled():
    tok = make_tokenizer(bos=True, chat_template=CHAT)
    prompt = [{"role": "user", "content": "Hi?"}]
    ex = PreferenceExample(prompt, [[{"role": "assistant", "content": "Hello"}],
                                    [{"role": "assistant", "content": "Bye"}]])
    out = tokenize_example(ex, tok)
    assert out.prompt_ids == [3] + ids(tok, "<user>Hi?<eos>\n<assistant>")
    assert out.response_ids[0] == ids(tok, "Hello") + [1]  # rendered "Hello<eos>\n": EOS once, newline dropped
    assert out.response_ids[1] == ids(tok, "Bye") + [1]
    assert all(r.count(1) == 1 for r in out.response_ids)


def test_chat_template_not_prefix_stable_raises():
    unstable = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT >{% endif %}")
    tok = make_tokenizer(chat_template=unstable)
    ex = PreferenceExample([{"role": "user", "content": "Hi"}], [[{"role": "assistant", "content": "a"}],
                                                                 [{"role": "assistant", "content": "b"}]], "f:7")
    with pytest.raises(DataError, match="not prefix-stable") as e:
        tokenize_example(ex, tok)
    assert e.value.source == "f:7"
    with pytest.raises(DataError, match="chat_template"):
        tokenize_example(ex, make_tokenizer())


def test_truncation_prompt_from_start_then_responses():
    tok = make_tokenizer(bos=True)
    ex = PreferenceExample("0123456789", ["abcdef", "xy"])
    full = tokenize_example(ex, tok)
    assert len(full.prompt_ids) == 11 and full.meta["truncated"] is False

    # prompt 11 + longest response 7 > 12: prompt cut to 5 (BOS + last 4 chars), responses cut to 7
    out = tokenize_example(ex, tok, max_length=12, max_prompt_length=5)
    assert out.prompt_ids == [3] + ids(tok, "6789") and out.meta["truncated"]
    assert out.response_ids == [ids(tok, "abcdef") + [1], ids(tok, "xy") + [1]]

    out = tokenize_example(ex, tok, max_length=9, max_prompt_length=5)
    assert out.response_ids == [ids(tok, "abcd"), ids(tok, "xy") + [1]]  # truncated response loses EOS
    assert max(len(out.prompt_ids) + len(r) for r in out.response_ids) <= 9

    out = tokenize_example(ex, tok, max_length=12)  # no prompt cap: the prompt stays, responses get 1 token
    assert out.prompt_ids == full.prompt_ids and out.response_ids == [ids(tok, "a"), ids(tok, "x")]
    assert tokenize_example(ex, tok, max_length=11) is None  # prompt alone fills the budget
    assert tokenize_example(ex, tok, max_length=100, max_prompt_length=5).prompt_ids == full.prompt_ids
    # truncation that makes the responses identical drops the row
    assert tokenize_example(PreferenceExample("p", ["same-a", "same-b"]), tok, max_length=6) is None


def test_tokenize_examples_report():
    tok = make_tokenizer()
    exs = [PreferenceExample("short", [" a", " b"], "f:1"),
           PreferenceExample("a long prompt here", [" a", " b"], "f:2"),
           PreferenceExample("x" * 30, [" a", " b"], "f:3")]
    out, report = tokenize_examples(exs, tok, max_length=12)  # prompts of 18 and 30 tokens cannot fit
    assert [t.source for t in out] == ["f:1"] and (report.kept, report.truncated, report.dropped) == (1, 0, 2)
    assert str(report) == "tokenized 1 of 3 examples (0 truncated, 2 dropped, e.g. f:2, f:3)"
    out, report = tokenize_examples(exs, tok, max_length=12, max_prompt_length=8)
    assert [t.source for t in out] == ["f:1", "f:2", "f:3"] and (report.truncated, report.dropped) == (2, 0)
    assert out[2].prompt_ids == ids(tok, "x" * 8) and out[1].prompt_ids == ids(tok, "mpt here")
