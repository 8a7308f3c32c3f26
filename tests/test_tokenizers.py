"""Tokenizers and chat templates users have, built locally: the rules of ``prefopt.data.tokenize`` on each.

* SentencePiece-style (Metaspace ``prepend_scheme`` "first" / "always", and the legacy ``Prepend("▁")``
  normalizer of older Llama 2 files), BOS ``<s>`` from the post-processor: a response continues its prompt, so
  its first word gets a "▁" only from a space the text has (never twice, never dropped).
* Llama-3-style byte-level BPE whose post-processor adds ``<|begin_of_text|>``: BOS once, never in a response.
* GPT-2-style: no BOS, EOS = BOS = ``<|endoftext|>``, no pad (``load_tokenizer`` pads with EOS): the response's
  EOS still carries loss.
* Chat templates (ChatML/Qwen, Llama 3, Gemma, Mistral, Phi-3) on conversational and explicit message rows: the
  prompt ends with the generation prompt, a response is the assistant content plus one end-of-turn token,
  BOS once.
"""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prefopt.data import PreferenceExample, collate_preferences, load_preferences, tokenize_example
from prefopt.data.sft import SFTExample, collate_sft, tokenize_sft_example
from prefopt.data.tokenize import SpecialTokens, encode_response

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Hello there. How are you? I am fine, thanks!", "The cat sat on the mat; the cats sat too.",
          "user assistant system model: Hi, hello, what is the capital of France? Paris is.",
          "Tell me a joke. Why did the chicken cross the road? To get to the other side."] * 20
WORDS = sorted({w.strip(".,!?;:") for s in CORPUS for w in s.split()} | {"Hi", "world", "there", "cats", "[INST]",
                                                                        "[/INST]"})


# ------------------------------------------------------------------------------------------------ tokenizers


def byte_level(specials, *, eos, bos=None, pad=None, unk=None, add_bos=False, llama3_regex=True):
    """Byte-level BPE trained on CORPUS (Llama-3 or GPT-2 pre-tokenizer); ``add_bos``: the post-processor adds BOS."""
    backend = Tokenizer(models.BPE())
    if llama3_regex:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    names = dict(eos_token=eos, bos_token=bos, pad_token=pad, unk_token=unk)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                  **{k: v for k, v in names.items() if v})
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in names.values()]})
    return tok


def sentencepiece(scheme="first", *, specials=("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>",
                  pad=None, add_bos=True, extra=(), rstrip=False):
    """A Unigram model over words, "▁"-words and characters, pre-tokenized as SentencePiece models are:
    scheme "first"/"always"/"never" is Metaspace's prepend_scheme, "legacy" the Prepend("▁") + Replace normalizer
    of older Llama 2 tokenizer.json files. ``extra``: special tokens of a chat format (``rstrip`` as Phi-3's)."""
    pieces = list(specials) + ["▁"] + list(string.ascii_letters + string.digits + string.punctuation) + ["\n"]
    for w in WORDS:
        pieces += ["▁" + w, w]
    pieces = list(dict.fromkeys(pieces))
    backend = Tokenizer(models.Unigram([(p, 0.0 if p in specials else -1.0) for p in pieces],
                                       unk_id=pieces.index(unk)))
    if scheme == "legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    names = dict(eos_token=eos, bos_token=bos, pad_token=pad, unk_token=unk)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in names.items() if v})
    if extra:
        tok.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, special=True, normalized=False, rstrip=rstrip) for t in extra]})
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pieces(tok, token_ids):
    return tok.convert_ids_to_tokens(token_ids)


# ------------------------------------------------------------------------------------------------ "▁" rule


@pytest.mark.parametrize("scheme", ["first", "always", "legacy"])
def test_sentencepiece_response_continues_its_prompt(scheme):
    tok = sentencepiece(scheme)
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id  # BOS from the post-processor, as Llama 2 / Mistral
    out = tokenize_example(PreferenceExample("Hello", [" world", "world"]), tok)
    assert out.prompt_ids == [tok.bos_token_id] + ids(tok, "Hello") and pieces(tok, out.prompt_ids)[1] == "▁Hello"
    # " world": one "▁" (from its space), never "▁" + "▁world" (the legacy normalizer's doubling)
    assert pieces(tok, out.response_ids[0]) == ["▁world", "</s>"]
    # "world": no "▁" the text does not have (tokenized alone it would start a text and get one)
    assert pieces(tok, out.response_ids[1]) == ["world", "</s>"]
    assert pieces(tok, ids(tok, "world")) == ["▁world"]
    for text, r in zip([" world", "world"], out.response_ids):  # the concatenation is the whole text's tokenization
        assert out.prompt_ids[1:] + r[:-1] == ids(tok, "Hello" + text)
    assert tok.decode(out.prompt_ids + out.response_ids[0], skip_special_tokens=True) == "Hello world"


@pytest.mark.parametrize("scheme", ["first", "always", "legacy"])
def test_sentencepiece_merge_across_join_never_moves_ids(scheme):
    tok = sentencepiece(scheme)
    joint = pieces(tok, ids(tok, "The cat" + "s sat"))
    assert joint == ["▁The", "▁cats", "▁sat"]  # the joint text merges "cat" + "s": the join is inside a token
    out = tokenize_example(PreferenceExample("The cat", ["s sat", " sat"]), tok)
    assert pieces(tok, out.prompt_ids) == ["<s>", "▁The", "▁cat"]
    assert pieces(tok, out.response_ids[0]) == ["s", "▁sat", "</s>"]  # apart from the prompt, still no "▁"
    assert pieces(tok, out.response_ids[1]) == ["▁sat", "</s>"]


def test_sentencepiece_response_without_prompt_context():
    """``encode_response`` without a prompt (as SFT's last turn uses it): continuing text, no start-of-text "▁"."""
    tok = sentencepiece("first")
    sp = SpecialTokens.of(tok)
    assert pieces(tok, encode_response("Hello there</s>\n", tok, sp)) == ["Hello", "▁there", "</s>"]
    assert pieces(tok, encode_response(" Hello", tok, sp)) == ["▁Hello", "</s>"]
    assert pieces(tok, encode_response("world", tok, sp, prompt_text="Hello")) == ["world", "</s>"]


def test_sentencepiece_text_without_prompt_starts_the_text():
    """An SFT 'text' row has no prompt: the response is the start of the text and keeps the tokenizer's "▁"."""
    tok = sentencepiece("first")
    out = tokenize_sft_example(SFTExample("", "Hello world"), tok)
    assert pieces(tok, out.prompt_ids) == ["<s>"]
    assert pieces(tok, out.response_ids[0]) == ["▁Hello", "▁world", "</s>"]


# ------------------------------------------------------------------------------------------------ BOS / EOS / pad


def test_llama3_bos_once_never_in_response():
    tok = byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], bos="<|begin_of_text|>",
                     eos="<|end_of_text|>", add_bos=True)
    bos = tok.bos_token_id
    assert tok("Hi")["input_ids"][0] == bos and ids(tok, "Hi")[0] != bos
    for prompt in ["Hello there.", "<|begin_of_text|>Hello there."]:  # BOS written in the text is not doubled
        out = tokenize_example(PreferenceExample(prompt, [" How are you?", " Fine."]), tok)
        assert out.prompt_ids == [bos] + ids(tok, "Hello there.")
        for r in out.response_ids:
            assert (out.prompt_ids + r).count(bos) == 1 and r.count(tok.eos_token_id) == 1
            assert r[-1] == tok.eos_token_id
        assert out.prompt_ids[1:] + out.response_ids[0][:-1] == ids(tok, "Hello there. How are you?")


@pytest.fixture
def gpt2_dir(tmp_path):
    tok = byte_level(["<|endoftext|>"], eos="<|endoftext|>", bos="<|endoftext|>", unk="<|endoftext|>",
                     llama3_regex=False)
    tok.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_gpt2_no_bos_pad_is_eos_and_eos_still_scored(gpt2_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefopt.logprobs import compute_logps, naive_logps
    from prefopt.models import load_tokenizer
    from prefopt.train.dpo import make_collate

    with pytest.warns(UserWarning, match="no pad token"):
        tok = load_tokenizer(gpt2_dir)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos == tok.bos_token_id and SpecialTokens.of(tok).bos_id is None
    ex = PreferenceExample("Hello there.", [" How are you?", " Fine, thanks!<|endoftext|>"])
    items = [tokenize_example(ex, tok), tokenize_example(PreferenceExample("Hi", [" Paris.", " No."]), tok)]
    for it in items:
        assert eos not in it.prompt_ids and all(r.count(eos) == 1 and r[-1] == eos for r in it.response_ids)

    batch = collate_preferences(items, tok.pad_token_id)
    k, b = 2, len(items)
    for j in range(k * b):
        it, r = items[j % b], items[j % b].response_ids[j // b]
        end = len(it.prompt_ids) + len(r)
        assert batch["input_ids"][j, end - 1] == eos and batch["loss_mask"][j, end - 1]  # the final EOS is scored
        assert batch["loss_mask"][j].sum() == len(r) and not batch["loss_mask"][j, end:].any()
    sft_items = [tokenize_sft_example(SFTExample(p, r), tok) for p, r in [("Hi", " Paris."), ("Hello there.", " No.")]]
    sft = collate_sft(sft_items, tok.pad_token_id)
    for j, it in enumerate(sft_items):
        end = len(it.prompt_ids) + len(it.response_ids[0])
        assert sft["input_ids"][j, end - 1] == eos and sft["loss_mask"][j, end - 1]
    assert sft["loss_mask"].sum(-1).tolist() == [len(ids(tok, " Paris.")) + 1, len(ids(tok, " No.")) + 1]

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos)).eval()
    expected = torch.tensor([naive_logps(model, items[j % b].prompt_ids, items[j % b].response_ids[j // b])
                             for j in range(k * b)])
    for packing, prefix_sharing in [(False, False), (True, False), (False, True)]:
        with torch.no_grad():
            out = compute_logps(model, make_collate(tok.pad_token_id, packing=packing,
                                                    prefix_sharing=prefix_sharing)(items),
                                packing=packing, prefix_sharing=prefix_sharing)
        assert out.count.tolist() == [len(items[j % b].response_ids[j // b]) for j in range(k * b)]
        torch.testing.assert_close(out.sum, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ chat templates

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}"
           "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _chatml_qwen():  # Qwen2.5-Instruct: no BOS, eos = <|im_end|>, pad = <|endoftext|>
    return byte_level(QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")


def _chatml_qwen_base():  # Qwen2.5 base with the ChatML template: eos = <|endoftext|>
    return byte_level(QWEN_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>")


def _chatml_sentencepiece():  # ChatML on a Mistral/Llama-2 tokenizer (e.g. OpenHermes): BOS from the tokenizer
    return sentencepiece("first", extra=("<|im_start|>", "<|im_end|>"), eos="<|im_end|>")


def _llama3():  # Llama 3.1 Instruct: eos = <|eot_id|>, BOS from the post-processor and in the template
    return byte_level(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True)


def _llama3_base_eos():  # Llama 3 with the base eos <|end_of_text|>: the turn still ends at <|eot_id|>
    return byte_level(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True)


def _gemma():  # SentencePiece without a dummy prefix; BOS from the tokenizer and in the template; eos <eos>
    return sentencepiece("never", specials=("<pad>", "<eos>", "<bos>", "<unk>"), bos="<bos>", eos="<eos>",
                         pad="<pad>", extra=("<start_of_turn>", "<end_of_turn>"))


def _mistral():  # Mistral v0.1: BOS in the template (and from the tokenizer), EOS after the assistant content
    return sentencepiece("first")


def _phi3():  # Phi-3: eos <|endoftext|>, turns end with <|end|>, the special tokens strip the newline after them
    return sentencepiece("first", eos="<|endoftext|>", extra=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                                               "<|endoftext|>"), rstrip=True)


# name: (tokenizer factory, template, generation prompt, end-of-turn token, BOS token or None)
TEMPLATES = {
    "chatml_qwen": (_chatml_qwen, CHATML, "<|im_start|>assistant\n", "<|im_end|>", None),
    "chatml_qwen_base_eos": (_chatml_qwen_base, CHATML, "<|im_start|>assistant\n", "<|im_end|>", None),
    "chatml_sentencepiece": (_chatml_sentencepiece, CHATML, "<|im_start|>assistant\n", "<|im_end|>", "<s>"),
    "llama3": (_llama3, LLAMA3, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
               "<|begin_of_text|>"),
    "llama3_base_eos": (_llama3_base_eos, LLAMA3, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                        "<|begin_of_text|>"),
    "gemma": (_gemma, GEMMA, "<start_of_turn>model\n", "<end_of_turn>", "<bos>"),
    "mistral": (_mistral, MISTRAL, " [/INST]", "</s>", "<s>"),
    "phi3": (_phi3, PHI3, "<|assistant|>\n", "<|end|>", "<s>"),
}

USER = [{"role": "user", "content": "Hi, how are you?"}]
MULTI = USER + [{"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "Tell me a joke."}]
ANSWERS = ["Hello there.", "Why did the chicken cross the road?"]


def _rows(prompt):
    chosen, rejected = ([{"role": "assistant", "content": a}] for a in ANSWERS)
    return [{"chosen": prompt + chosen, "rejected": prompt + rejected},  # conversational
            {"prompt": prompt, "chosen": chosen, "rejected": rejected}]  # explicit, message-list prompt


@pytest.mark.parametrize("prompt", [USER, MULTI], ids=["single_turn", "multi_turn"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_boundary_bos_and_end_of_turn(name, prompt):
    factory, template, generation_prompt, end, bos = TEMPLATES[name]
    tok = factory()
    tok.chat_template = template
    end_id = tok.convert_tokens_to_ids(end)
    bos_id = tok.convert_tokens_to_ids(bos) if bos else None
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(generation_prompt)

    examples, report = load_preferences(_rows(prompt))
    assert report.loaded == 2
    conv, explicit = (tokenize_example(ex, tok) for ex in examples)
    assert (conv.prompt_ids, conv.response_ids) == (explicit.prompt_ids, explicit.response_ids)

    # the prompt: the rendered text with the generation prompt at its end, BOS once at the start
    text_ids = ids(tok, rendered)
    assert conv.prompt_ids == ([bos_id] if bos_id is not None and text_ids[:1] != [bos_id] else []) + text_ids
    if bos_id is not None:
        assert conv.prompt_ids[0] == bos_id
    # the prompt ids end with the generation prompt (Phi-3's special tokens swallow the newline after them)
    assert tok.decode(conv.prompt_ids).endswith("<|assistant|>" if name == "phi3" else generation_prompt)

    for answer, r in zip(ANSWERS, conv.response_ids):
        full = conv.prompt_ids + r
        if bos_id is not None:
            assert full.count(bos_id) == 1 and bos_id not in r
        # the response is the assistant content + the end of turn, once, at the end, and nothing after it
        assert r[-1] == end_id and r.count(end_id) == 1
        if tok.eos_token_id != end_id:
            assert tok.eos_token_id not in r
        assert tok.decode(r, skip_special_tokens=True) == answer
        # continuation: prompt + response ids are the tokenization of the rendered text up to the end of turn
        assert [i for i in full if i != bos_id] == [i for i in ids(tok, rendered + answer + end) if i != bos_id]
        first = pieces(tok, r)[0]
        assert not first.startswith("▁") and not first.startswith("Ġ")  # no space the rendered text lacks


def test_chatml_end_of_turn_not_followed_by_another_eos():
    """ChatML with eos <|im_end|>: the response ends with one <|im_end|>; with eos <|endoftext|> it gets no
    <|endoftext|> after the <|im_end|> (nor the template's newline)."""
    for factory in (_chatml_qwen, _chatml_qwen_base):
        tok = factory()
        tok.chat_template = CHATML
        (ex,), _ = load_preferences(_rows(USER)[:1])
        out = tokenize_example(ex, tok)
        assert out.response_ids[0] == ids(tok, "Hello there.<|im_end|>")


def test_phi3_end_of_conversation_eos_dropped():
    tok = _phi3()
    tok.chat_template = PHI3
    full = tok.apply_chat_template(USER + [{"role": "assistant", "content": "Hello there."}], tokenize=False)
    assert full.endswith("Hello there.<|end|>\n<|endoftext|>")  # the template ends the conversation with EOS
    (ex,), _ = load_preferences(_rows(USER)[:1])
    out = tokenize_example(ex, tok)
    assert pieces(tok, out.response_ids[0]) == ["Hello", "▁there", ".", "<|end|>"]


def test_sft_single_turn_conversation_matches_preferences():
    for name in ("chatml_sentencepiece", "gemma", "phi3"):
        factory, template, *_ = TEMPLATES[name]
        tok = factory()
        tok.chat_template = template
        (ex,), _ = load_preferences(_rows(USER)[:1])
        pref = tokenize_example(ex, tok)
        sft = tokenize_sft_example(SFTExample(USER, [{"role": "assistant", "content": ANSWERS[0]}]), tok)
        assert (sft.prompt_ids, sft.response_ids[0]) == (pref.prompt_ids, pref.response_ids[0])
