"""Models and tokenizers: build tiny Llama-style models from scratch, load checkpoints,
make frozen reference models (a copy, or the LoRA base with adapters off), fingerprint weights.

    init_model("tiny", "out/tiny")          # tokenizer + randomly initialised model, saved locally
    policy = load_model("out/tiny"); tok = load_tokenizer("out/tiny")
    ref = make_reference(policy)            # frozen deep copy of the initial policy
    policy = apply_lora(policy)             # or: LoRA, and `with reference_mode(policy): ...`
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .config import DTYPES as DTYPE_NAMES
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
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # name -> torch.dtype
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
    from .data.synthetic import read_corpus

    texts, corpus_desc = read_corpus(corpus)
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
               allow_pickle: bool = False, attn_implementation: str | None = None):
    """AutoModelForCausalLM from safetensors. `allow_pickle=True` also accepts .bin checkpoints
    (still loaded with torch's weights_only). `attn_implementation`: the attention kernel (None: the model's
    default); one this machine cannot run (flash_attention_2 without the flash_attn package or a GPU) is a
    ConfigError saying why."""
    from transformers import AutoModelForCausalLM

    check_model_path(str(path))
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype)
    if torch_dtype not in DTYPES.values():
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    with quiet_progress_bars():
        model = load_with_attention(
            AutoModelForCausalLM.from_pretrained, path, attn_implementation,
            dtype=torch_dtype,  # transformers 5 name (torch_dtype= is deprecated)
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            weights_only=True,
        )
    return model.to(device) if device is not None else model


def load_with_attention(load: Callable, path: Any, attn_implementation: str | None, **kwargs: Any):
    """``load(path, **kwargs)`` (a ``from_pretrained``) with the attention kernel asked for, if any. A kernel this
    machine cannot run (flash_attention_2 without the flash_attn package or a GPU) is a ConfigError naming it; any
    other error is raised as it is."""
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return load(str(path), **kwargs, **extra)
    except (ImportError, ValueError) as e:
        if attn_implementation and re.search(r"attn|attention|flash|sdpa|flex", str(e), re.IGNORECASE):
            raise ConfigError(f"attn_implementation {attn_implementation!r} cannot be used with {path}: "
                              f"{str(e).strip()}") from e
        raise


def parameter_count(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_fingerprint(model) -> str:
    """sha256 over (name, shape, dtype, bytes) of every parameter, in name order. A sharded (FSDP, DTensor) or
    partitioned (DeepSpeed ZeRO-3) parameter is gathered first, so every rank gets the key of the whole model (a
    collective then)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        with gathered_parameter(p):
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def is_partitioned(model: torch.nn.Module) -> bool:
    """The weights were loaded in partitions (DeepSpeed ZeRO-3's ``zero.Init``): each rank holds a slice, and a
    parameter's own tensor is empty until gathered."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_parameter(p: torch.nn.Parameter):
    """A DeepSpeed ZeRO-3 parameter whole for the duration (every rank must enter); else nothing to do."""
    if not hasattr(p, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p], modifier_rank=None)


# ---------------------------------------------------------------------------------- reference model

def freeze(model):
    """eval mode and no gradients; returns the model."""
    model.eval()
    model.requires_grad_(False)
    return model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / torch.compile / peft wrappers (LoRA layers stay injected in it)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    return model


@functools.lru_cache(maxsize=None)
def forward_accepts(cls: type, name: str) -> bool:
    """Does ``cls.forward`` take a parameter called ``name`` (e.g. ``logits_to_keep``, ``position_ids``)?"""
    import inspect

    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def decoder_of(base: torch.nn.Module) -> torch.nn.Module:
    """The decoder (backbone) of a causal LM: the module whose output the LM head reads."""
    dec = base.get_decoder() if hasattr(base, "get_decoder") else None
    if dec is None:
        dec = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if not isinstance(dec, torch.nn.Module) or dec is base:
        raise TypeError(f"cannot find the decoder (backbone) of {type(base).__name__} ")
    return dec


@contextmanager
def evaluating(model) -> Iterator:
    """Inside the block ``model`` is in eval mode; afterwards it is back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def make_reference(policy, ref_path=None, **load_kwargs):
    """A frozen reference: a deep copy of `policy` as it is now, or a model loaded from `ref_path`."""
    if ref_path is None and is_partitioned(policy):
        raise ValueError("a partitioned (ZeRO-3) model cannot be deep-copied: load the reference from its path")
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
    """Set every dropout probability to 0, so train-mode forwards are deterministic: ``nn.Dropout`` modules, the
    config's rates, and the rates attention modules copy from the config as plain floats (Llama, Qwen2, Mistral,
    Gemma and Phi-3 attention keep ``self.attention_dropout`` and pass it to the attention kernel in training)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for obj in [getattr(model, "config", None), *model.modules()]:
        for key in _DROPOUT_KEYS:
            if type(getattr(obj, key, None)) is float:
                setattr(obj, key, 0.0)


_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_p", "attn_dropout")


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass (transformers renamed the switch in 5.x; use what exists)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
