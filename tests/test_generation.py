import json

import pytest
import torch

from prefopt.cli import main
from prefopt.errors import DataError
from prefopt.generation import generate, generate_samples, read_prompts, warp_logits
from prefopt.models import load_model, load_tokenizer

PROMPTS = ["Write a review of the film The Golden River.", "Hi", [{"role": "user", "content": "Write a review."}]]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_same_seed_same_samples_any_batch_size(model_and_tok):
    model, tok = model_and_tok
    kw = dict(num_samples=2, temperature=1.0, max_new_tokens=8)
    a = generate_samples(model, tok, PROMPTS, seed=3, batch_size=6, **kw)
    b = generate_samples(model, tok, PROMPTS, seed=3, batch_size=6, **kw)
    c = generate_samples(model, tok, PROMPTS, seed=3, batch_size=4, **kw)
    d = generate_samples(model, tok, PROMPTS, seed=4, batch_size=6, **kw)
    ids = lambda xs: [x.response_ids for x in xs]  # noqa: E731
    assert ids(a) == ids(b) == ids(c)
    assert ids(a) != ids(d)
    # two samples of the same prompt differ (each (prompt, sample) has its own generator)
    assert a[0].response_ids != a[1].response_ids


def _argmax_loop(model, prompt_ids, steps, eos_id):
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos_id:
                break
    return ids[len(prompt_ids):]


def test_temperature_zero_is_greedy(model_and_tok):
    model, tok = model_and_tok
    out = generate_samples(model, tok, PROMPTS, temperature=0, max_new_tokens=6, batch_size=3)
    for s in out:
        assert s.response_ids == _argmax_loop(model, s.prompt_ids, 6, tok.eos_token_id)
    # sampling at temperature 1 differs from greedy for some prompt (random tiny model: near-uniform logits)
    sampled = generate_samples(model, tok, PROMPTS, temperature=1.0, max_new_tokens=6, seed=0)
    assert [s.response_ids for s in sampled] != [s.response_ids for s in out]


def test_rows_well_formed_and_num_samples(model_and_tok):
    model, tok = model_and_tok
    out = generate_samples(model, tok, PROMPTS, num_samples=3, max_new_tokens=5, seed=0, top_k=20, top_p=0.9)
    assert [(s.prompt_index, s.sample_index) for s in out] == [(i, j) for i in range(3) for j in range(3)]
    for s in out:
        assert s.prompt == PROMPTS[s.prompt_index]
        assert 1 <= s.response_tokens == len(s.response_ids) <= 5
        assert s.ended_with_eos == (s.response_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in s.response_ids[:-1]
        assert s.response == tok.decode([t for t in s.response_ids if t != tok.eos_token_id],
                                        skip_special_tokens=True)
        assert set(s.row()) == {"prompt", "response", "prompt_index", "sample_index", "prompt_tokens",
                                "response_tokens", "ended_with_eos"}
    texts = generate(model, tok, PROMPTS, num_samples=3, max_new_tokens=5, seed=0, top_k=20, top_p=0.9)
    assert texts == [[s.response for s in out[i * 3:(i + 1) * 3]] for i in range(3)]
    # the chat prompt was rendered with the generation prompt
    assert tok.decode(out[6].prompt_ids).endswith("<|assistant|>\n")


def test_warp_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(warp_logits(logits, 1.0, 2, 1.0)[0, 2:]).all()
    assert torch.isfinite(warp_logits(logits, 1.0, 2, 1.0)[0, :2]).all()
    kept = torch.isfinite(warp_logits(logits, 1.0, 0, 0.8))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(warp_logits(logits, 1.0, 0, 0.1))[0].tolist() == [True, False, False, False]


def test_read_prompts_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'prompt'"):
        read_prompts(bad)
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert read_prompts(txt) == ["first", "second"]


def test_cli_generate_end_to_end(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    out = tmp_path / "out" / "samples.jsonl"
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output", str(out),
               "--num-samples", "2", "--max-new-tokens", "4", "--seed", "1", "--batch-size", "4",
               "--progress", "false"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(2)]
    assert all(isinstance(r["response"], str) and r["response_tokens"] <= 4 for r in rows)
    assert "wrote 6 samples" in capsys.readouterr().out
    # a missing file is reported with its path, exit status 2
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "nope.txt"),
               "--output", str(out)])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err
