"""The prepared data path (batched tokenization, worker processes, Arrow table, cache) gives exactly the ids,
boundaries, truncation counts, reports and batches of the plain one-example-at-a-time path."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefopt.data import PreferenceExample, load_preferences, tokenize_examples, write_jsonl
from prefopt.data.collate import collate_preferences
import prefopt.data.prepare as prepare
from prefopt.data.prepare import cache_key, input_files, prepare_data
from prefopt.data.sft import collate_sft, load_sft, tokenize_sft
from prefopt.data.table import Chain, fingerprint
from prefopt.data.tokenize import SpecialTokens, splits_at_line_starts, tokenize_batch, tokenize_example
from prefopt.errors import DataError
from prefopt.models import load_tokenizer

from test_tokenizers import byte_level, sentencepiece

LIMITS = [dict(), dict(max_length=48, max_prompt_length=24), dict(max_length=12, max_prompt_length=6)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def tokenizers(tiny_tok):
    return {"tiny (GPT-2 byte level)": tiny_tok,
            "llama3 split": byte_level(["<|end|>", "<|begin|>"], eos="<|end|>", bos="<|begin|>", add_bos=True),
            "gpt2 regex": byte_level(["<|endoftext|>"], eos="<|endoftext|>", llama3_regex=False),
            "sentencepiece": sentencepiece("first")}


def same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (a.prompt_ids, a.response_ids, a.source, a.meta) == (b.prompt_ids, b.response_ids, b.source, b.meta)


O200K_SPLIT = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
               "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
               "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def o200k_like():
    """Byte-level BPE with GPT-4o's (o200k) style split, whose punctuation runs go on across newlines into "/"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    corpus = ["a:\n x", "?b ?b", "code // x", "x // y"] * 30  # merges "//", "?b" and ":\n", never "//?" or ":\n//"
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


def test_which_tokenizers_split_at_line_starts(tok):
    got = {name: splits_at_line_starts(t) for name, t in tokenizers(tok).items()}
    assert got == {"tiny (GPT-2 byte level)": True, "llama3 split": True, "gpt2 regex": True, "sentencepiece": False}
    assert not splits_at_line_starts(o200k_like())  # a regex not checked to cut at line starts: the plain way


def test_a_regex_that_runs_across_line_starts_is_tokenized_the_plain_way():
    t = o200k_like()
    cases = [PreferenceExample(p, [r, " other"], "<o200k>") for p, r in
             [("Comment:\n//", "?b"), ("b?\n//", "?b"), ("a!\n/", "/ x")]]
    plain = [tokenize_example(ex, t) for ex in cases]
    assert all(same(a, b) for a, b in zip(plain, tokenize_batch(cases, t)))
    forced = tokenize_batch(cases, t, line_cuts=True)  # what the cut would have given: other ids
    assert not all(same(a, b) for a, b in zip(plain, forced))


TEXT = st.lists(st.sampled_from(list("ab cd\n\t.,!1é/?'\r") + ["  ", "\n\n", "Human:", "Assistant:", " the", "12345",
                                                             "\u0301", "//"]),
                max_size=16).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXT.filter(lambda t: t.strip()), responses=st.lists(TEXT.filter(lambda t: t.strip()), min_size=2,
                                                                    max_size=3, unique=True))
def test_batch_equals_one_at_a_time_on_random_text(tok, prompt, responses):
    for name, t in tokenizers(tok).items():
        ex = PreferenceExample(prompt, responses, "<rand>")
        for limits in LIMITS:
            plain = tokenize_example(ex, t, **limits)
            (batched,) = tokenize_batch([ex], t, **limits)
            assert same(plain, batched), (name, limits, prompt, responses)
            if splits_at_line_starts(t):  # the cut path itself, forced on, must agree too
                (forced,) = tokenize_batch([ex], t, line_cuts=True, **limits)
                assert same(plain, forced), (name, limits, prompt, responses)


def test_batch_equals_one_at_a_time_on_every_format(tok, tmp_path):
    rows = {
        "explicit": [{"prompt": "Q: hi\nA:", "chosen": " yes\nmore", "rejected": " no"},
                     {"prompt": "line one\nline two", "chosen": "\nthree", "rejected": " 3"}],
        "conversational": [{"chosen": [{"role": "user", "content": "Hello\nthere"},
                                       {"role": "assistant", "content": "Hi!\nHow are you"}],
                            "rejected": [{"role": "user", "content": "Hello\nthere"},
                                         {"role": "assistant", "content": "Go away"}]}],
        "implicit": [{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4, of course.",
                      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Five"}],
        "ranked": [{"prompt": "Rank:\nthese", "responses": [" a", " b b", "\nc"], "ranks": [2, 1, 3]}],
        "exact": [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, tok.eos_token_id],
                   "chosen_ended_with_eos": False, "rejected_ended_with_eos": True}],
    }
    for fmt, data in rows.items():
        path = write_jsonl(data, tmp_path / f"{fmt}.jsonl")
        examples, _ = load_preferences(path, vocab_size=len(tok))
        for limits in LIMITS:
            plain, plain_report = tokenize_examples(examples, tok, **limits)
            prepared = prepare_data(path, tok, **limits, num_proc=1, progress=False)
            assert len(prepared.table) == len(plain), (fmt, limits)
            assert all(same(a, b) for a, b in zip(plain, prepared.table)), (fmt, limits)
            assert (prepared.tokenize_report.truncated, prepared.tokenize_report.dropped) == \
                (plain_report.truncated, plain_report.dropped)
            if plain:
                assert_same_batches(plain, prepared.table, tok.pad_token_id)


def assert_same_batches(a, b, pad_id, collate=collate_preferences):
    import torch

    for start in range(0, len(a), 4):
        x, y = collate(list(a[start:start + 4]), pad_id), collate([b[i] for i in range(start, min(start + 4, len(b)))],
                                                                 pad_id)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]


def test_hh_sample_in_worker_processes_equals_the_plain_path(tok, hh_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK", 64)
    examples, report = load_preferences(hh_sample, skip_bad=True)
    limits = dict(max_length=256, max_prompt_length=128)
    plain, plain_report = tokenize_examples(examples, tok, **limits)
    prepared = prepare_data(hh_sample, tok, skip_bad=True, num_proc=2, progress=False, cache_dir=tmp_path, **limits)
    assert len(plain) > 4 * prepare.CHUNK  # several chunks, so the workers ran
    assert [ex.source for ex in prepared.table] == [ex.source for ex in plain]
    assert all(same(a, b) for a, b in zip(plain, prepared.table))
    assert prepared.tokenize_report.truncated == plain_report.truncated > 0
    v, w = prepared.load_report.validation, report.validation
    drops = {"too_long": plain_report.dropped} if plain_report.dropped else {}
    assert v.rows == w.rows and dict(v.counts) == dict(w.counts) | drops
    assert {k: o for k, o in v.occurrences.items() if k != "too_long"} == w.occurrences
    assert_same_batches(plain, prepared.table, tok.pad_token_id)


def hh_rows(n: int, bad_every: int = 0, long_every: int = 0) -> list:
    rows = []
    for i in range(n):
        if bad_every and i % bad_every == 3:
            rows.append({"chosen": f"\n\nHuman: q{i}\n\nAssistant: same", "rejected": f"\n\nHuman: q{i}\n\nAssistant: same"})
        elif long_every and i % long_every == 5:
            rows.append({"chosen": f"\n\nHuman: q{i}\n\nAssistant:" + " word" * 100 + " a",  # identical once cut
                         "rejected": f"\n\nHuman: q{i}\n\nAssistant:" + " word" * 100 + " b"})
        else:
            rows.append({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}.",
                         "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no"})
    return rows


def test_bad_rows_from_every_worker_are_counted_with_file_and_line(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK", 64)
    n = 4 * 64 + 37
    path = write_jsonl(hh_rows(n, bad_every=97, long_every=131), tmp_path / "d.jsonl")
    limits = dict(max_length=64, max_prompt_length=32)  # the long responses, cut, are identical: dropped
    one = prepare_data(path, tok, skip_bad=True, num_proc=1, progress=False, **limits)
    two = prepare_data(path, tok, skip_bad=True, num_proc=2, progress=False, **limits)
    a, b = one.load_report.validation, two.load_report.validation
    assert a.counts == b.counts and a.occurrences == b.occurrences and (a.rows, a.kept) == (b.rows, b.kept)
    assert a.counts["identical_responses"] == len([i for i in range(n) if i % 97 == 3])
    assert a.counts["too_long"] == len([i for i in range(n) if i % 131 == 5 and i % 97 != 3])
    assert a.occurrences["too_long"][0] == (f"{path}:6", None)  # row index 5 is line 6
    assert a.rows == a.kept + a.skipped == n
    assert [ex.source for ex in one.table] == [ex.source for ex in two.table]
    assert one.table.digest == two.table.digest  # the same ids, whichever process tokenized them
    with pytest.raises(DataError, match=r"d\.jsonl:4"):  # without skip_bad the run stops at the first bad row
        prepare_data(path, tok, num_proc=2, progress=False, **limits)


def test_cache_hit_and_every_miss(tok, tmp_path, tiny_model_dir):
    path = write_jsonl(hh_rows(50), tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    first = prepare_data(path, tok, max_length=64, cache_dir=cache, progress=False)
    again = prepare_data(path, tok, max_length=64, cache_dir=cache, progress=False)
    assert (first.cached, again.cached) == (False, True) and first.location == again.location
    assert all(same(x, y) for x, y in zip(first.table, again.table))
    assert again.load_report.summary() == first.load_report.summary()
    assert again.table.fingerprint() == first.table.fingerprint()

    def cached(p=path, t=tok, **kw):
        return prepare_data(p, t, cache_dir=cache, progress=False, **{"max_length": 64, **kw}).cached

    assert not cached(max_length=63)                                     # a limit
    assert not cached(max_prompt_length=10)
    other = load_tokenizer(tiny_model_dir)
    other.chat_template = "{{ messages[0]['content'] }}"
    assert not cached(t=other)                                            # the chat template
    grown = load_tokenizer(tiny_model_dir)
    grown.add_tokens(["<new>"])
    assert not cached(t=grown)                                            # the tokenizer
    rows = hh_rows(50)
    rows[7]["rejected"] += " changed"
    write_jsonl(rows, path)
    assert not cached()                                                   # the file's content
    assert cached()
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not cached()                                                   # its mtime
    assert cached(), "the same inputs again hit the cache"
    assert len(list((cache / "data").iterdir())) == 7
    assert not list((cache / "data").glob("*.tmp-*"))


def test_no_cache_and_input_in_memory(tok, tmp_path):
    rows = hh_rows(20)
    mem = prepare_data(rows, tok, cache_dir=tmp_path / "cache", progress=False)  # a list: nothing to key on
    assert not mem.cached and not (tmp_path / "cache").exists() and len(mem.table) == 20
    work = tmp_path / "run" / "data" / "train"
    path = write_jsonl(rows, tmp_path / "d.jsonl")
    made = prepare_data(path, tok, cache_dir=None, work_dir=work, progress=False)
    assert made.location == work and (work / "tokenized.arrow").is_file()
    other_rank = prepare_data(path, tok, cache_dir=None, work_dir=work, reuse=True, progress=False)
    assert other_rank.cached and all(same(x, y) for x, y in zip(made.table, other_rank.table))
    with pytest.raises(DataError, match="missing"):
        prepare_data(path, tok, cache_dir=None, work_dir=tmp_path / "nothing", reuse=True, progress=False)
    again = prepare_data(path, tok, cache_dir=None, work_dir=work, progress=False)  # its own table: replaced
    assert not again.cached and len(again.table) == 20
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(DataError, match="other files"):  # a folder that is not a table of ours is never deleted
        prepare_data(path, tok, cache_dir=None, work_dir=mine, progress=False)
    assert (mine / "notes.txt").read_text() == "a user's file"


def test_a_failed_preparation_leaves_no_cache_entry(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK", 64)
    path = write_jsonl(hh_rows(3 * 64), tmp_path / "d.jsonl")
    calls = {"n": 0}
    real = prepare.record_batch

    def dies(items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(items)

    monkeypatch.setattr(prepare, "record_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(path, tok, cache_dir=tmp_path / "cache", num_proc=1, progress=False)
    assert not list((tmp_path / "cache" / "data").iterdir())
    monkeypatch.setattr(prepare, "record_batch", real)
    assert not prepare_data(path, tok, cache_dir=tmp_path / "cache", num_proc=1, progress=False).cached


def test_views_select_chain_reference_and_fingerprint(tok, tmp_path):
    import torch

    path = write_jsonl(hh_rows(30), tmp_path / "d.jsonl")
    table = prepare_data(path, tok, progress=False).table
    plain, _ = tokenize_examples(load_preferences(path)[0], tok)
    order = list(range(30))
    random.Random(0).shuffle(order)
    held = sorted(order[:5])
    ev, tr = table.select(held), table.select(i for i in range(30) if i not in held)
    assert [x.source for x in ev] == [plain[i].source for i in held]
    assert len(tr) == 25 and tr.response_counts() == {2}
    assert fingerprint(tr) != fingerprint(ev) and fingerprint(tr) == fingerprint(table.select(
        i for i in range(30) if i not in held))
    both = Chain(tr, ev)
    assert len(both) == 30 and both[25].source == ev[0].source
    logps = torch.arange(60, dtype=torch.float32).view(30, 2)
    ref = tr.with_reference(logps[:25])
    assert torch.equal(ref[3].meta["reference_logps"], logps[3]) and "reference_logps" not in tr[3].meta
    assert torch.equal(ref.select([4, 2])[1].meta["reference_logps"], logps[2])
    assert fingerprint(table) == fingerprint(prepare_data(path, tok, progress=False).table)  # content, not path


def test_sft_table_equals_the_plain_path_multi_turn_masks_included(tok, tmp_path):
    rows = [{"prompt": "Say hi\n", "response": "hi\nthere"},
            {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
                          {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}]},
            {"prompt": "Count\nnow", "response": " 1 2 3"}]
    path = write_jsonl(rows[1:2] * 2 + [rows[1]], tmp_path / "conv.jsonl")
    for p in (path, write_jsonl([rows[0], rows[2]], tmp_path / "sft.jsonl")):
        examples, _ = load_sft(p)
        plain, _ = tokenize_sft(examples, tok, max_length=64)
        table = prepare_data(p, tok, kind="sft", max_length=64, progress=False).table
        assert all(same(a, b) for a, b in zip(plain, table)) and len(plain) == len(table)
        assert_same_batches(plain, table, tok.pad_token_id, collate=collate_sft)
    assert "loss_mask" in prepare_data(path, tok, kind="sft", progress=False).table[0].meta


def test_cache_key_names_the_files_content(tok, tmp_path, tiny_model_dir):
    a = write_jsonl(hh_rows(3), tmp_path / "a.jsonl")
    files = input_files(a)
    key = cache_key(files, tok, {"x": 1})
    assert key == cache_key(files, tok, {"x": 1}) != cache_key(files, tok, {"x": 2})
    splitting = load_tokenizer(tiny_model_dir)
    splitting.split_special_tokens = True  # changes ids without changing the serialized pipeline
    assert cache_key(files, splitting, {"x": 1}) != key
    table = prepare_data(a, tok, progress=False).table
    assert [x.source for x in table.select([-1, 0])] == [table[2].source, table[0].source]
    with pytest.raises(IndexError):
        table.select([3])
    assert input_files([{"a": 1}]) is None and input_files("some/hub-name") is None


def test_training_reads_the_cached_table(tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch, capsys):
    from prefopt.config import DPOConfig
    from prefopt.train.dpo import train_dpo

    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))

    def run(name, **kw):
        train_dpo(DPOConfig(model=str(tiny_model_dir), data=str(synthetic_pairs), output_dir=str(tmp_path / name),
                            max_steps=2, batch_size=8, micro_batch_size=4, eval_fraction=0.1, progress=False,
                            precompute_ref=False, **kw))
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    first = run("a")
    assert "prepared and cached" in capsys.readouterr().out
    second = run("b")
    assert "read from the cache" in capsys.readouterr().out
    third = run("c", no_data_cache=True)
    out = capsys.readouterr().out
    assert "read from the cache" not in out and (tmp_path / "c" / "tokenized" / "train" / "tokenized.arrow").is_file()
    key = lambda rows: [(r.get("step"), r.get("loss"), r.get("eval/loss")) for r in rows]  # noqa: E731
    assert key(first) == key(second) == key(third)


def test_ended_with_eos_is_checked_against_the_ids(tok, tmp_path):
    row = {"prompt_ids": [1, 5], "chosen_ids": [7, 8], "rejected_ids": [9, tok.eos_token_id],
           "chosen_ended_with_eos": False, "rejected_ended_with_eos": True}
    assert len(prepare_data(write_jsonl([row], tmp_path / "ok.jsonl"), tok, progress=False).table) == 1
    bad = dict(row, chosen_ended_with_eos=True)  # says it ended, but 8 is no end token
    path = write_jsonl([row, bad], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'chosen_ids' ends with id 8, not an end token"):
        prepare_data(path, tok, progress=False)
    skipped = prepare_data(path, tok, skip_bad=True, progress=False)
    assert skipped.load_report.validation.counts == {"ended_mismatch": 1} and len(skipped.table) == 1


def test_sft_from_exact_pairs_trains_the_chosen_ids(tok, tmp_path):
    eos = tok.eos_token_id
    rows = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, eos], "rejected_ids": [9, eos],
             "chosen_ended_with_eos": True, "rejected_ended_with_eos": True},  # ids only, no text at all
            {"prompt": "p", "chosen": " cut", "rejected": " r", "prompt_ids": [1, 5], "chosen_ids": [11, 12],
             "rejected_ids": [13, eos], "chosen_ended_with_eos": False, "rejected_ended_with_eos": True}]
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    (a, b), _ = tokenize_sft(load_sft(path, from_preferences=True)[0], tok)
    assert (a.prompt_ids, a.response_ids) == ([1, 5, 6], [[7, 8, eos]])
    assert (b.prompt_ids, b.response_ids) == ([1, 5], [[11, 12]])  # cut at the limit: no EOS added
    table = prepare_data(path, tok, kind="sft", from_preferences=True, progress=False).table
    assert [(x.prompt_ids, x.response_ids) for x in table] == [(a.prompt_ids, a.response_ids),
                                                               (b.prompt_ids, b.response_ids)]
    bad = dict(rows[0], chosen_ids=[7, len(tok) + 5, eos])
    with pytest.raises(DataError, match="outside the vocabulary"):
        prepare_data(write_jsonl([bad], tmp_path / "bad.jsonl"), tok, kind="sft", from_preferences=True,
                     progress=False)


def test_another_run_finishing_first_shares_its_cache_entry(tok, tmp_path, monkeypatch):
    path = write_jsonl(hh_rows(30), tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    real = prepare.finish_report
    other = {}

    def other_run_finishes_first(report):  # right before this run renames its table into place
        real(report)
        monkeypatch.setattr(prepare, "finish_report", real)
        other["run"] = prepare_data(path, tok, cache_dir=cache, progress=False)

    monkeypatch.setattr(prepare, "finish_report", other_run_finishes_first)
    mine = prepare_data(path, tok, cache_dir=cache, progress=False)
    assert not other["run"].cached and not mine.cached and mine.location == other["run"].location
    assert all(same(a, b) for a, b in zip(mine.table, other["run"].table)) and len(mine.table) == 30
    assert [p.name for p in (cache / "data").iterdir()] == [mine.location.name]  # no temporary folder left
