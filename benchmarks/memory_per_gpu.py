"""Memory per GPU of a DPO run, by option (one GPU, DDP, FSDP2, DeepSpeed ZeRO-2/3, LoRA), computed from a model config.

Nothing here is measured: the numbers follow from the parameter count (the model is built on the meta device,
so the count is exact and costs no memory) and from what each engine keeps on each GPU:

* policy weights: float32 master weights (prefopt's full fine-tuning setup: --dtype float32 --mixed-precision
  bf16), 4 bytes a parameter; LoRA: bfloat16 base weights, 2 bytes, plus the float32 adapters;
* gradients: as the trained weights (4 bytes a trained parameter);
* optimizer: AdamW's two float32 moments, 8 bytes a trained parameter;
* reference: a live frozen copy in the policy's dtype (4 bytes a parameter), or nothing when precomputed (the
  default) or with LoRA (the policy with its adapters switched off);
* sharding over N GPUs: DDP keeps everything whole; FSDP2 full shard splits weights, gradients, optimizer state
  and a live reference, plus the gathered bfloat16 weights of the unit being computed and the one prefetched (two
  decoder layers);
* DeepSpeed (its bf16 mode, as examples/accelerate/zero*.yaml set it): the module's weights and gradients are
  bfloat16 (2 bytes each), the float32 master weights live in the optimizer state beside AdamW's moments (12 bytes
  a trained parameter); ZeRO-2 splits gradients and optimizer state, ZeRO-3 also the weights (plus two gathered
  decoder layers) and a live reference (a bfloat16 inference engine, 2 bytes a parameter);
* activations: what autograd keeps for the backward of one micro-batch (bfloat16), itemised per decoder layer
  below, plus the logits (bfloat16 logits and their float32 log-softmax, 6 bytes a position and vocabulary entry;
  prefopt's chunked LM head caps that at --logits-memory-mb on one GPU, under DDP and ZeRO-2, but under FSDP2 and
  ZeRO-3 the model's own full logits are used). With gradient checkpointing only each layer's input is kept, plus one layer's worth.

Not counted: the CUDA context and allocator fragmentation (often 1-3 GB), communication buffers, temporaries of
the optimizer step. So these are lower bounds, good for comparing options.

    python benchmarks/memory_per_gpu.py                  # Llama-2-7B shape, 8 GPUs, 1 pair of 1024 tokens
    python benchmarks/memory_per_gpu.py --gpus 4 --pairs 2 --seq-len 2048 --config path/to/config.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GiB = 1024 ** 3


def llama2_7b_config():
    """The shape of Llama-2-7B (its published config.json), built locally: no download."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def load_config(path: str | None):
    if path is None:
        return llama2_7b_config()
    from transformers import AutoConfig

    p = Path(path)
    return AutoConfig.from_pretrained(str(p.parent if p.is_file() else p))


def count_parameters(config) -> int:
    """Exact parameter count of the causal LM of ``config``, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def lora_parameters(config, r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> int:
    """Adapter parameters of LoRA rank r on the named projections of every layer (peft's default for Llama)."""
    h = config.hidden_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shape = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    return config.num_hidden_layers * sum(r * (i + o) for i, o in (shape[t] for t in targets))


def layer_parameters(config) -> int:
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def activation_bytes(config, tokens: int, *, checkpointing: bool, full_logits: bool,
                     logits_cap: float = 256 * 1024 ** 2) -> float:
    """What the backward needs of one micro-batch of ``tokens`` positions (bfloat16, 2 bytes an element).

    Per decoder layer and token, the tensors autograd saves: the attention input norm's input and output (2h),
    q, k, v (h + 2 kv), the attention output (h, fused SDPA keeps no scores), the MLP norm's input and output
    (2h), gate, up, their SiLU and product (4 i). With checkpointing: the layer input (h) per layer, plus one
    layer's full set recomputed during its backward."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = 2 * tokens * (2 * h + (h + 2 * kv) + h + 2 * h + 4 * i)
    layers = config.num_hidden_layers
    body = (layers * 2 * tokens * h + per_layer) if checkpointing else layers * per_layer
    logits = 6.0 * tokens * config.vocab_size
    if not full_logits:
        logits = min(logits, logits_cap)
    return body + logits


@dataclass
class Option:
    name: str
    gpus: int
    shard_weights: bool = False
    shard_grads_optim: bool = False
    reference: str = "precomputed"  # "live", "precomputed", "adapters"
    lora: bool = False
    full_logits: bool = False  # under FSDP2 and ZeRO-3 the chunked LM head is off
    deepspeed: bool = False  # bf16 module weights and gradients, float32 master weights in the optimizer state


def per_gpu(option: Option, n: int, n_lora: int, layer: int, act: float, act_ckpt: float) -> dict[str, float]:
    g = option.gpus
    if option.lora:
        weights = 2 * n + 4 * n_lora
        trained = n_lora
    else:
        weights = 4 * n
        trained = n
    grads, optim = 4 * trained, 8 * trained
    ref = 4 * n if option.reference == "live" else 0.0
    if option.deepspeed:
        weights, grads, optim = 2 * n, 2 * trained, 12 * trained
        ref = 2 * n if option.reference == "live" else 0.0
    gathered = 0.0
    if option.shard_weights:
        weights, ref = weights / g, ref / g
        gathered = 2 * 2 * layer  # two units' weights gathered in bfloat16: the one computing, the prefetched
    if option.shard_grads_optim or option.shard_weights:
        grads, optim = grads / g, optim / g
    row = {"policy": weights + gathered, "reference": ref, "gradients": grads, "optimizer": optim,
           "activations": act, "activations (grad ckpt)": act_ckpt}
    row["total"] = row["policy"] + ref + grads + optim + act
    row["total (grad ckpt)"] = row["total"] - act + act_ckpt
    return row


def table(config, *, gpus: int, pairs: int, seq_len: int) -> tuple[str, dict]:
    n = count_parameters(config)
    n_lora = lora_parameters(config)
    layer = layer_parameters(config)
    tokens = pairs * 2 * seq_len  # a pair is two sequences, chosen and rejected, in one forward
    options = [
        Option("1 GPU, live reference", 1, reference="live"),
        Option("1 GPU, precomputed reference", 1),
        Option("1 GPU, LoRA r=8 (bf16 base)", 1, reference="adapters", lora=True),
        Option(f"DDP x{gpus}, precomputed", gpus),
        Option(f"FSDP2 x{gpus}, live reference (sharded)", gpus, shard_weights=True, reference="live",
               full_logits=True),
        Option(f"FSDP2 x{gpus}, precomputed", gpus, shard_weights=True, full_logits=True),
        Option(f"ZeRO-2 x{gpus} (bf16), precomputed", gpus, shard_grads_optim=True, deepspeed=True),
        Option(f"ZeRO-2 x{gpus} (bf16), live reference", gpus, shard_grads_optim=True, reference="live",
               deepspeed=True),
        Option(f"ZeRO-3 x{gpus} (bf16), live reference (partitioned)", gpus, shard_weights=True, reference="live",
               full_logits=True, deepspeed=True),
        Option(f"ZeRO-3 x{gpus} (bf16), precomputed", gpus, shard_weights=True, full_logits=True, deepspeed=True),
    ]
    cols = ["policy", "reference", "gradients", "optimizer", "activations", "total", "total (grad ckpt)"]
    lines = ["| option | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    data = {}
    for opt in options:
        act = activation_bytes(config, tokens, checkpointing=False, full_logits=opt.full_logits)
        act_ckpt = activation_bytes(config, tokens, checkpointing=True, full_logits=opt.full_logits)
        row = per_gpu(opt, n, n_lora, layer, act, act_ckpt)
        data[opt.name] = {k: round(v / GiB, 2) for k, v in row.items()}
        lines.append(f"| {opt.name} | " + " | ".join(f"{row[c] / GiB:.1f}" for c in cols) + " |")
    head = (f"{n / 1e9:.2f}B parameters ({n:,}; LoRA adapters {n_lora:,}); micro-batch {pairs} pair(s) x 2 "
            f"sequences x {seq_len} tokens; GiB per GPU")
    return head + "\n\n" + "\n".join(lines), {"parameters": n, "lora_parameters": n_lora, "rows": data}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a model folder or config.json (default: the Llama-2-7B shape, built locally)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (--micro-batch-size)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (--max-length)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    args = ap.parse_args(argv)
    text, data = table(load_config(args.config), gpus=args.gpus, pairs=args.pairs, seq_len=args.seq_len)
    print(json.dumps(data, indent=1) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
