"""What a run settles before its first step: the length limits a user left unset."""

from __future__ import annotations

import pytest

from prefopt.config import DPOConfig
from prefopt.errors import ConfigError
from prefopt.train.setup import MAX_LENGTH_CAP, context_size, resolve_length_limits


def small_context_model(tmp_path, positions: int):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=positions).save_pretrained(tmp_path)
    return tmp_path


def test_max_length_alone_is_accepted_and_the_prompt_limit_follows_it(tiny_model_dir):
    cfg = DPOConfig(model=str(tiny_model_dir), data="d.jsonl", output_dir="o", max_length=128)
    cfg.validate()  # the prompt default (half of max_length) does not exceed a small max_length
    said = []
    resolve_length_limits(cfg, said.append)
    assert (cfg.max_length, cfg.max_prompt_length) == (128, 64)
    assert said == ["length limits: max_prompt_length 64 (half of max_length) (--max-length / --max-prompt-length "
                    "set them)"]


def test_default_max_length_is_the_model_context_capped_and_printed(tiny_model_dir, tmp_path):
    cfg = DPOConfig(model=str(small_context_model(tmp_path, 256)), data="d.jsonl", output_dir="o")
    said = []
    resolve_length_limits(cfg, said.append)
    assert (cfg.max_length, cfg.max_prompt_length) == (256, 128)
    assert "max_length 256 (the model's context size 256)" in said[0]
    assert context_size(str(tiny_model_dir)) == 1024
    big = DPOConfig(model=str(small_context_model(tmp_path / "big", 131072)), data="d", output_dir="o")
    resolve_length_limits(big, said.append)
    assert big.max_length == MAX_LENGTH_CAP and "capped at 1024" in said[-1]


def test_inconsistent_limits_name_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"max_prompt_length = 200: must be between 1 and max_length - 1 \(127\)"):
        DPOConfig(model="m", data="d", output_dir="o", max_length=128, max_prompt_length=200).validate()
    cfg = DPOConfig(model=str(small_context_model(tmp_path, 256)), data="d", output_dir="o", max_prompt_length=300)
    cfg.validate()  # max_length is not known yet
    with pytest.raises(ConfigError, match=r"max_prompt_length = 300: must be between 1 and max_length - 1 \(255\)"):
        resolve_length_limits(cfg, print)


def test_attn_implementation_is_the_kernel_the_models_load_with(tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    """--attn-implementation reaches the policy and the reference (eager and sdpa give the same DPO numbers); one
    this machine cannot run, or an unknown name, stops before training with a reason."""
    import json

    from prefopt.cli import main
    from prefopt.config import TrainConfig
    from prefopt.train.setup import load_policy

    cfg = TrainConfig(model=str(tiny_model_dir), data="-", output_dir=str(tmp_path / "x"),
                      attn_implementation="eager")
    policy, reference = load_policy(cfg, with_reference=True, ref_model=str(tiny_model_dir))
    assert policy.config._attn_implementation == reference.config._attn_implementation == "eager"
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(synthetic_pairs), "--max-steps", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--progress", "false", "--precompute-ref", "false"]
    for impl in ("eager", "sdpa"):
        assert main(args + ["--attn-implementation", impl, "--output-dir", str(tmp_path / impl)]) == 0
    eager, sdpa = ([json.loads(x) for x in (tmp_path / i / "metrics.jsonl").read_text().splitlines()]
                   for i in ("eager", "sdpa"))
    assert [r["loss"] for r in eager] == pytest.approx([r["loss"] for r in sdpa], abs=1e-5)
    capsys.readouterr()
    assert main(args + ["--attn-implementation", "flash_attention_2", "--output-dir", str(tmp_path / "fa")]) == 2
    assert "attn_implementation 'flash_attention_2' cannot be used with" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="attn_implementation"):
        TrainConfig(model="m", data="d", output_dir="o", attn_implementation="fast").validate()
