"""Shared fixtures: a tiny model built locally (never from the hub) and small preference files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_SAMPLE = SHARED_DATA / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
RT_POLARITY = SHARED_DATA / "rt-polarity"


@pytest.fixture(autouse=True, scope="session")
def _reference_cache(tmp_path_factory):
    """DPO precomputes reference log-probs by default: keep the tests' cache out of the home directory."""
    old = os.environ.get("PREFOPT_CACHE")
    os.environ["PREFOPT_CACHE"] = str(tmp_path_factory.mktemp("prefopt-cache"))
    yield
    if old is None:
        os.environ.pop("PREFOPT_CACHE", None)
    else:
        os.environ["PREFOPT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from prefopt.data import synthetic_text
    from prefopt.models import init_model

    return init_model("tiny", tmp_path_factory.mktemp("tiny") / "model", corpus=synthetic_text(800), seed=0)


@pytest.fixture(scope="session")
def synthetic_pairs(tmp_path_factory) -> Path:
    from prefopt.data import make_synthetic_preferences, write_jsonl

    return write_jsonl(make_synthetic_preferences(64, seed=0), tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture
def hh_sample() -> Path:
    if not HH_SAMPLE.is_file():
        pytest.skip(f"shared HH-RLHF sample not found at {HH_SAMPLE} (it lives in ../shared/data beside the repo)")
    return HH_SAMPLE


def make_tiny_reward_model(directory: Path, tokenizer) -> Path:
    """A randomly initialised one-label Llama reward model (seeded) saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
