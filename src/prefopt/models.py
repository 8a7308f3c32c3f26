"""Models and tokenizers: build tiny Llama-style models from scratch, load checkpoints,
make frozen reference models (a copy, or the LoRA base with adapters off), fingerprint weights.

    init_model("tiny", "out/tiny")          # tokenizer + randomly initialised model, saved locally
    policy = load_model("out/tiny"); tok = load_tokenizer("out/tiny")
    ref = make_reference(policy)            # frozen deep copy of the initial policy
    policy = apply_lora(policy)             # or: LoRA, and `with reference_mode(policy): ...`
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError

MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=688),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
}
MAX_POSITIONS = 1024
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each message renders as "<|role|>\n{content}</s>\n"; the generation prompt is "<|assistant|>\n".
# Rendering is a pure concatenation, so a prompt with the generation prompt is a string prefix of
# the same prompt followed by an assistant reply.
CHAT_TEMPLATE = (
    r"{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------- tokenizer

def check_model_path(name: str, what: str = "model") -> None:
    """A local-looking path that does not exist is an error here, not a confusing hub lookup later."""
    p = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or p.suffix in (".json", ".safetensors")
    if looks_local and not p.exists():
        raise ConfigError(f"{what} not found: {name} (give a folder written by save_pretrained, e.g. by "
                          f"'prefopt model init', or a hub name when online)")



def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer; encode adds no BOS/EOS (the data layer adds them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def load_tokenizer(path, *, trust_remote_code: bool = False):
    """AutoTokenizer from a local path or name; a missing pad token falls back to EOS (with a warning)."""
    from transformers import AutoTokenizer

    check_model_path(str(path))
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer at {path} has neither a pad nor an eos token; set one of them")
        warnings.warn(f"tokenizer at {path} has no pad token; using eos {tok.eos_token!r} as pad", stacklevel=2)
        tok.pad_token = tok.eos_token
    return tok


# -------------------------------------------------------------------------------------------- corpus

def default_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """A few hundred varied English lines built from small word lists (deterministic)."""
    rng = random.Random(seed)
    names = ["Alice", "Bob", "the teacher", "my friend", "a small robot", "the old farmer", "Dr. Lee", "our team"]
    verbs = ["found", "built", "painted", "explained", "carried", "wrote about", "fixed", "described", "shared"]
    adjs = ["red", "quiet", "bright", "heavy", "strange", "simple", "useful", "ancient", "tiny", "happy"]
    nouns = ["house", "river", "question", "garden", "machine", "letter", "story", "bridge", "answer", "cat"]
    places = ["in the city", "near the lake", "at school", "on Monday", "after dinner", "in 1999", "at home"]
    common = ("the of and to a in is it you that he was for on are with as his they be at one have this from "
              "or had by word but what some we can out other were all there when up use your how said an each "
              "she which do their time if will way about many then them write would like so these her long make "
              "thing see him two has look more day could go come did number sound no most people my over know "
              "water than call first who may down side been now find any new work part take get place made live "
              "where after back little only round man year came show every good me give our under name very "
              "through just form sentence great think say help low line differ turn cause much mean before move "
              "right boy old too same tell does set three want air well also play small end put home read hand "
              "port large spell add even land here must big high such follow act why ask men change went light "
              "kind off need house picture try us again animal point mother world near build self earth father").split()
    questions = ["What is", "Why is", "How do I find", "Can you describe", "Where is"]
    out = []
    for i in range(n):
        a, v, j, o, p = (rng.choice(x) for x in (names, verbs, adjs, nouns, places))
        kind = i % 5
        if kind == 0:
            out.append(f"{a[0].upper() + a[1:]} {v} the {j} {o} {p}.")
        elif kind == 1:
            out.append(f"{rng.choice(questions)} the {j} {o}?")
        elif kind == 2:
            out.append(f"Sure! The {o} is {j}, and {a} {v} it {p}. It has {rng.randint(2, 99)} parts.")
        elif kind == 3:
            words = rng.sample(common, rng.randint(6, 14))
            out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "..."]))
        else:
            out.append(f"I think {a} {v} a {j} {o}; however, the {rng.choice(nouns)} was {rng.choice(adjs)}.")
    return out


def _read_corpus(corpus) -> tuple[list[str], str]:
    if corpus is None:
        lines = default_corpus()
        return lines, f"built-in default ({len(lines)} lines)"
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines, f"file {path} ({len(lines)} lines)"
    lines = [str(t) for t in corpus]
    return lines, f"iterable ({len(lines)} texts)"


# --------------------------------------------------------------------------------------------- model

@contextmanager
def quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def init_model(size: str, output_dir, *, corpus=None, vocab_size: int | None = None, seed: int = 0) -> Path:
    """Train a tokenizer, build a randomly initialised Llama-style model of `size`, save both to output_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of: {', '.join(MODEL_SIZES)}")
    texts, corpus_desc = _read_corpus(corpus)
    tok = train_tokenizer(texts, vocab_size=vocab_size or 4096)
    dims = MODEL_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **dims,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    info = {
        "size": size, "parameters": parameter_count(model), "vocab_size": len(tok),
        "corpus": corpus_desc, "seed": seed, **dims,
    }
    (out / "prefopt_model.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def load_model(path, *, dtype="float32", trust_remote_code: bool = False, device=None,
               allow_pickle: bool = False):
    """AutoModelForCausalLM from safetensors. `allow_pickle=True` also accepts .bin checkpoints
    (still loaded with torch's weights_only)."""
    from transformers import AutoModelForCausalLM

    check_model_path(str(path))
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype)
    if torch_dtype not in DTYPES.values():
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch_dtype,  # transformers 5 name (torch_dtype= is deprecated)
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            weights_only=True,
        )
    return model.to(device) if device is not None else model


def parameter_count(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_fingerprint(model) -> str:
    """sha256 over (name, shape, dtype, bytes) of every parameter, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- reference model

def freeze(model):
    """eval mode and no gradients; returns the model."""
    model.eval()
    model.requires_grad_(False)
    return model


def make_reference(policy, ref_path=None, **load_kwargs):
    """A frozen reference: a deep copy of `policy` as it is now, or a model loaded from `ref_path`."""
    if ref_path is None:
        return freeze(copy.deepcopy(policy))
    if "device" not in load_kwargs:
        load_kwargs["device"] = next(policy.parameters()).device
    return freeze(load_model(ref_path, **load_kwargs))


def apply_lora(model, *, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules=None,
               task_type: str = "CAUSAL_LM"):
    """Wrap `model` with LoRA adapters (in place); only the adapter weights are trainable (with task_type
    "SEQ_CLS", a sequence-classification head is trained in full too)."""
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        target_modules = [t for t in LORA_TARGETS if t in names] or "all-linear"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=task_type)
    return get_peft_model(model, config)


@contextmanager
def reference_mode(model) -> Iterator:
    """Inside the block a PeftModel runs as its base model (adapters off): the LoRA reference."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"reference_mode needs a peft PeftModel (from apply_lora), got {type(model).__name__}; "
            "for a full model use make_reference(policy) instead"
        )
    with model.disable_adapter():
        yield model


def disable_dropout(model) -> None:
    """Set every dropout probability to 0 (modules and config), so train-mode forwards are deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                    "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass (transformers renamed the switch in 5.x; use what exists)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
