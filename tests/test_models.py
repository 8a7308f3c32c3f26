import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.models import (
    MODEL_SIZES,
    apply_lora,
    freeze,
    init_model,
    load_model,
    load_tokenizer,
    make_reference,
    model_fingerprint,
    parameter_count,
    reference_mode,
)

CORPUS = [f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs, again and again." for i in range(200)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("tiny"))


def _ids(n=12, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (2, n), generator=g)


def test_init_model_files_load_with_plain_transformers(tiny_dir):
    files = {p.name for p in tiny_dir.iterdir()}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == MODEL_SIZES["tiny"]["hidden_size"]
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    info = json.loads((tiny_dir / "prefopt_model.json").read_text())
    assert info["size"] == "tiny" and info["vocab_size"] == len(tok)
    assert info["parameters"] == parameter_count(model)


def test_tokenizer_roundtrip_no_special_tokens_and_chat_template(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    text = "Hello world!  How are you, Dr. Lee?\nSee 42 zebras."
    ids = tok(text)["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert ids == tok.encode(text)
    assert tok.decode(ids) == text

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cat?"}]
    reply = [{"role": "assistant", "content": "A small animal."}]
    p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + reply, tokenize=False)
    assert p == "<|system|>\nBe brief.</s>\n<|user|>\nWhat is a cat?</s>\n<|assistant|>\n"
    assert full == p + "A small animal.</s>\n"


def test_fingerprint_determinism(tmp_path):
    a = init_model("tiny", tmp_path / "a", corpus=CORPUS, seed=1)
    b = init_model("tiny", tmp_path / "b", corpus=CORPUS, seed=1)
    c = init_model("tiny", tmp_path / "c", corpus=CORPUS, seed=2)
    ma, mb, mc = (load_model(p) for p in (a, b, c))
    fa = model_fingerprint(ma)
    assert len(fa) == 64 and fa == model_fingerprint(mb)
    assert fa != model_fingerprint(mc)
    with torch.no_grad():
        ma.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(ma) != fa


def test_corpus_from_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    out = init_model("tiny", tmp_path / "m", corpus=path, vocab_size=300)
    info = json.loads((out / "prefopt_model.json").read_text())
    assert info["vocab_size"] <= 300 and "corpus.txt" in info["corpus"]


def test_load_model_dtypes_and_errors(tiny_dir, tmp_path):
    model = load_model(tiny_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in load_model(tiny_dir).parameters())
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(tiny_dir, dtype="float64")
    with pytest.raises(ValueError, match="tiny.*small.*medium"):
        init_model("huge", tmp_path / "x")


def test_make_reference_is_frozen_copy(tiny_dir):
    policy = load_model(tiny_dir)
    ref = make_reference(policy)
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    ref_ptrs = {p.data_ptr() for p in ref.parameters()}
    assert not ref_ptrs & {p.data_ptr() for p in policy.parameters()}
    before = model_fingerprint(ref)
    assert before == model_fingerprint(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    assert model_fingerprint(ref) == before != model_fingerprint(policy)

    loaded = make_reference(policy, tiny_dir, dtype="bfloat16")
    assert not loaded.training and loaded.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in loaded.parameters())
    assert freeze(policy) is policy and not policy.training


def test_lora_reference_mode_is_exact_base(tiny_dir):
    model = load_model(tiny_dir)
    ids = _ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        base_out = model(ids).logits
    base_fp = model_fingerprint(model)

    peft_model = apply_lora(model, r=4, alpha=8)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)

    peft_model.train()
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    opt.step()

    with torch.no_grad():
        adapted = peft_model(ids).logits
        with reference_mode(peft_model):
            ref_out = peft_model(ids).logits
        again = peft_model(ids).logits
    assert not torch.allclose(adapted, base_out)
    assert torch.equal(ref_out, base_out)
    assert torch.equal(again, adapted)  # adapters are back on after the block
    assert model_fingerprint(peft_model.get_base_model()) != base_fp  # lora params are part of it
    base_only = {n: p for n, p in peft_model.get_base_model().named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for p in base_only.values())

    with pytest.raises(TypeError, match="PeftModel"):
        with reference_mode(load_model(tiny_dir)):
            pass


def test_load_tokenizer_pad_fallback(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    with pytest.warns(UserWarning, match="pad"):
        loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id

    tok.eos_token = None
    tok.save_pretrained(tmp_path / "neither")
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path / "neither")


def test_disable_dropout_reaches_attention_rates_stored_as_floats():
    """Llama-family attention keeps config.attention_dropout as a float and passes it to the kernel in training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.models import disable_dropout

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=64, attention_dropout=0.5))
    ids = torch.randint(0, 64, (2, 12))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)  # attention dropout is live
    disable_dropout(model)
    rates = [m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")]
    assert rates and all(r == 0.0 for r in rates)
    train_logits = model(ids).logits
    model.eval()
    torch.testing.assert_close(train_logits, model(ids).logits)

