"""``cpt train --plan``: what a run will need per GPU and how long a step takes, before paying for the GPUs.

Memory per rank, in bytes, for AdamW with fp32 master weights (what ``cpt train`` runs):

- parameters 4N, gradients 4N, optimizer 8N (Adam's two moments); divided by the world size under FSDP2, whole
  on every rank otherwise;
- FSDP2's working set: the root's parameters (embeddings, final norm, head) stay gathered in the compute dtype for
  the step, plus two decoder layers at a time (the current one and the prefetched next), plus one layer's gradients
  in fp32 for the reduce-scatter;
- under autocast without FSDP, the compute-dtype copies of the weights autocast caches during the forward;
- activations: ``8d + 4f + 2k + 2h`` values per token per decoder layer (d width, f FFN width, k the K/V width,
  h heads): the tensors an HF Llama/Mistral layer with SDPA keeps for backward, counted on CPU with
  ``saved_tensors_hooks`` (tests/test_train_plan.py measures it); with activation checkpointing only the layer
  input stays (d per token per layer) plus one layer being recomputed; plus ``4d`` per token outside the layers
  and the chunked loss (one chunk of fp32 logits and the head's fp32 gradient, cpt.training.loss);
- under autocast, fp32 tensors beside the compute-dtype activations: over fp32 weights the residual stream and
  RMSNorm's inputs/outputs, 8 values of width d per token per layer (measured); under FSDP2's bf16 gather only
  RMSNorm's two upcasts, 2 values of width d (read from the code);
- the peak is the parameters and optimizer state plus the larger of the forward's peak (activations, loss, FSDP
  working set, and with grad_accum > 1 the gradients accumulated so far) and the gradients; on CUDA the context
  and allocator slack are added (``overhead_gib``).

Step time = FLOPs per token (6N + 12·L·d·T, cpt.training.flops) x tokens per rank per step / (peak FLOP/s x MFU).

``train.method: lora | qlora`` (cpt.training.adapters): the body is frozen and stored in the compute dtype (lora,
2 bytes per parameter) or in 4-bit NF4 with double quantization (qlora, 4.127 bits per parameter as in the QLoRA
paper, plus one layer dequantized at a time); gradients and AdamW state exist only for the LoRA matrices and the
vocabulary matrices (kept whole: the old rows' gradients are masked, cpt.training.adapters says why); LoRA adds,
with dropout on, a dropped copy of each target's input (6d + f values per token per layer) and its mask. FLOPs per
token drop from 6N to 4N + 2N_trainable (no weight gradients for frozen matrices).

The estimate is checked against a measured CPU run (torch's ``MemTracker``, which counts every live tensor by
category during real train steps) within 20% (tests/test_train_plan.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpt.errors import ConfigError

GIB = 2**30

# Architectures by name, so a plan needs no download: the config.json values of the published models.
PRESETS: dict[str, dict[str, Any]] = {
    "mistral-7b": {"_name": "Mistral-7B-v0.1", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "vocab_size": 32000, "tie_word_embeddings": False},
    "llama-2-7b": {"_name": "Llama-2-7b", "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "vocab_size": 32000, "tie_word_embeddings": False},
    "tinyllama-1.1b": {"_name": "TinyLlama-1.1B", "hidden_size": 2048, "intermediate_size": 5632,
                       "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                       "vocab_size": 32000, "tie_word_embeddings": False},
}


@dataclass
class Shape:
    name: str
    layers: int
    d: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv(self) -> int:
        return self.d // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        attn = self.d * self.d * 2 + self.d * self.kv * 2  # q, o + k, v
        return attn + 3 * self.d * self.ffn + 2 * self.d  # gate, up, down + two norms

    @property
    def root_params(self) -> int:
        return self.vocab * self.d * (1 if self.tied else 2) + self.d

    @property
    def n_params(self) -> int:
        return self.layers * self.layer_params + self.root_params


def shape_from_config(config: dict, vocab_rows: int | None = None, name: str = "model") -> Shape:
    """A Llama-family ``config.json`` (Llama, Mistral, Qwen2 names); ``vocab_rows`` overrides the vocabulary (the
    extended, padded one)."""
    try:
        heads = int(config["num_attention_heads"])
        return Shape(name=str(config.get("_name", name)), layers=int(config["num_hidden_layers"]),
                     d=int(config["hidden_size"]), ffn=int(config["intermediate_size"]), heads=heads,
                     kv_heads=int(config.get("num_key_value_heads") or heads),
                     vocab=int(vocab_rows or config["vocab_size"]),
                     tied=bool(config.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise ConfigError(f"{name}: config has no {exc} (the plan knows Llama-family configs)") from exc


def load_shape(model: str, root: Path, vocab_rows: int | None = None) -> Shape:
    """``model``: a preset name (PRESETS), a config.json, or a model folder holding one."""
    if model in PRESETS:
        return shape_from_config(PRESETS[model], vocab_rows, model)
    path = Path(model) if Path(model).is_absolute() else Path(root) / model
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"--model {model}: not a preset ({', '.join(PRESETS)}) and {path} does not exist")
    return shape_from_config(json.loads(path.read_text(encoding="utf-8")), vocab_rows, str(path))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES = 4.127 / 8  # QLoRA: NF4 + double-quantized absmax constants, per parameter


def lora_params(shape: Shape, rank: int, targets=LORA_TARGETS) -> int:
    """LoRA's A and B matrices: r x (in + out) per target module per layer."""
    dims = {"q_proj": (shape.d, shape.d), "k_proj": (shape.d, shape.kv), "v_proj": (shape.d, shape.kv),
            "o_proj": (shape.d, shape.d), "gate_proj": (shape.d, shape.ffn), "up_proj": (shape.d, shape.ffn),
            "down_proj": (shape.ffn, shape.d)}
    return shape.layers * sum(rank * sum(dims[t]) for t in targets if t in dims)


def trainable_params(shape: Shape, method: str = "full", lora_rank: int = 16, targets=LORA_TARGETS) -> int:
    return shape.n_params if method == "full" else lora_params(shape, lora_rank, targets) + shape.root_params


def estimate_adapter(shape: Shape, *, method: str, lora_rank: int, lora_dropout: float, targets, tokens: int,
                     compute_bytes: int, activations: float, loss: float, cuda: bool, overhead_gib: float,
                     checkpointed: bool = False, grad_accum: int = 1) -> dict:
    """lora / qlora, one GPU (or DDP: each rank the same)."""
    body = shape.layers * shape.layer_params
    trainable = lora_params(shape, lora_rank, targets) + shape.root_params
    frozen = body * (NF4_BYTES if method == "qlora" else compute_bytes)
    if lora_dropout > 0:
        layers = 1 if checkpointed else shape.layers  # recomputed one layer at a time under checkpointing
        activations += layers * tokens * (6 * shape.d + shape.ffn) * (compute_bytes + 1)
    # autocast's copy of the fp32 vocabulary matrices; qlora: one layer dequantized at a time
    working = shape.root_params * compute_bytes + (shape.layer_params * compute_bytes if method == "qlora" else 0)
    out = {"parameters": 4 * trainable + frozen, "gradients": 4 * trainable, "optimizer": 8 * trainable,
           "fsdp_or_autocast_copies": working, "activations": activations, "loss": loss,
           "overhead": overhead_gib * GIB if cuda else 0.0}
    live_grads = out["gradients"] if grad_accum > 1 else 0.0  # accumulated beside later micro-batches (as full)
    out["peak"] = (out["parameters"] + out["optimizer"] + max(activations + loss + working + live_grads,
                                                              out["gradients"]) + out["overhead"])
    return out


def estimate(shape: Shape, *, world_size: int = 1, micro_batch: int = 1, seq: int = 2048, grad_accum: int = 1,
             parallel: str = "fsdp", compute_bytes: int = 2, activation_checkpointing: bool = False,
             loss_chunk: int = 4096, cuda: bool = True, overhead_gib: float = 2.0, method: str = "full",
             lora_rank: int = 16, lora_dropout: float = 0.05, lora_targets=LORA_TARGETS) -> dict[str, float]:
    """Per-rank memory in bytes by category, and ``peak``. ``compute_bytes``: 2 for bf16 compute, 4 for fp32."""
    n = shape.n_params
    shard = world_size if parallel == "fsdp" and world_size > 1 else 1
    tokens = micro_batch * seq
    per_layer = 8 * shape.d + 4 * shape.ffn + 2 * shape.kv + 2 * shape.heads
    if activation_checkpointing:
        layers = shape.layers * tokens * shape.d + tokens * per_layer
    else:
        layers = shape.layers * tokens * per_layer
    activations = (layers + tokens * 4 * shape.d) * compute_bytes
    if compute_bytes < 4:
        # fp32 tensors kept beside the compute-dtype ones. Autocast over fp32 weights (one process, DDP) leaves the
        # residual stream in fp32 (the embedding output is fp32) and HF's RMSNorm keeps fp32 inputs and outputs:
        # 8 fp32 values of width d per token per layer, measured on CPU with MemTracker (bf16 ACT 93.8 MiB vs
        # 61.6 MiB without this term; tests/test_train_sharded.py). FSDP2 gathers bf16 weights (MixedPrecisionPolicy):
        # the residual stream is bf16 and only RMSNorm's two fp32 upcasts stay: 2 values of width d, read from the
        # code, not measured (no GPU in CI). With checkpointing, only the recomputed layer's.
        fp32_values = 2 * shape.d if shard > 1 else 8 * shape.d
        activations += (1 if activation_checkpointing else shape.layers) * tokens * fp32_values * 4
    loss = shape.vocab * shape.d * 4 + min(loss_chunk, tokens) * shape.vocab * 4
    if method != "full":
        return estimate_adapter(shape, method=method, lora_rank=lora_rank, lora_dropout=lora_dropout,
                                targets=lora_targets, tokens=tokens, compute_bytes=compute_bytes,
                                activations=activations, loss=loss, cuda=cuda, overhead_gib=overhead_gib,
                                checkpointed=activation_checkpointing, grad_accum=grad_accum)
    working = 0.0
    if shard > 1:
        working = (shape.root_params + 2 * shape.layer_params) * compute_bytes + shape.layer_params * 4
    elif compute_bytes < 4:
        working = n * compute_bytes  # autocast's weight cache
    out = {"parameters": 4 * n / shard, "gradients": 4 * n / shard, "optimizer": 8 * n / shard,
           "fsdp_or_autocast_copies": working, "activations": activations, "loss": loss,
           "overhead": overhead_gib * GIB if cuda else 0.0}
    # With grad_accum > 1 the gradients of the earlier micro-batches stay alive through the later ones' forward and
    # backward, beside their activations; with one micro-batch they only exist once the activations are freed.
    live_grads = out["gradients"] if grad_accum > 1 else 0.0
    out["peak"] = (out["parameters"] + out["optimizer"] + max(activations + loss + working + live_grads,
                                                              out["gradients"]) + out["overhead"])
    return out


def step_time(shape: Shape, *, world_size: int, micro_batch: int, seq: int, grad_accum: int, mfu: float,
              peak_tflops: float, trainable: int | None = None) -> dict[str, float]:
    from cpt.training.flops import flops_per_token

    per_token = flops_per_token(shape.n_params, shape.layers, shape.d, seq)
    if trainable is not None:  # frozen matrices: no weight gradient (2 FLOPs per parameter per token fewer)
        per_token -= 2 * (shape.n_params - trainable)
    tokens_rank = micro_batch * seq * grad_accum
    seconds = per_token * tokens_rank / (peak_tflops * 1e12 * mfu)
    return {"flops_per_token": per_token, "tokens_per_step": tokens_rank * world_size, "step_seconds": seconds,
            "tokens_per_s": tokens_rank * world_size / seconds, "mfu": mfu, "peak_tflops": peak_tflops}


def render(shape: Shape, mem: dict[str, float], time: dict[str, float], *, world_size: int, micro_batch: int,
           seq: int, grad_accum: int, parallel: str, gpu_gib: float, activation_checkpointing: bool,
           method: str = "full", trainable: int | None = None) -> str:
    mode = f"FSDP2 over {world_size} ranks" if parallel == "fsdp" and world_size > 1 else (
        f"DDP over {world_size} ranks" if world_size > 1 else "one GPU")
    lines = [
        f"{shape.name}: {shape.n_params / 1e9:.2f}B parameters ({shape.layers} layers, d {shape.d}, FFN "
        f"{shape.ffn}, GQA {shape.heads}/{shape.kv_heads}, vocab {shape.vocab}{', tied' if shape.tied else ''})",
        f"{mode}, {gpu_gib:g} GiB per GPU; micro_batch {micro_batch} x seq {seq} x grad_accum {grad_accum} x "
        f"{world_size} ranks = {time['tokens_per_step']:,} tokens per step; "
        + ("fp32 master weights, AdamW" if method == "full" else
           f"{method}: body frozen in {'4-bit NF4' if method == 'qlora' else 'bf16'}, {trainable / 1e6:.0f}M "
           "trainable (LoRA + vocabulary matrices) in fp32 with AdamW")
        + f", bf16 compute{', activation checkpointing' if activation_checkpointing else ''}",
        "",
        "| per GPU | GiB |",
        "|---|---:|",
    ]
    for key in ("parameters", "gradients", "optimizer", "fsdp_or_autocast_copies", "activations", "loss", "overhead"):
        lines.append(f"| {key.replace('_', ' ')} | {mem[key] / GIB:.2f} |")
    fits = mem["peak"] <= gpu_gib * GIB
    lines.append(f"| **peak** | **{mem['peak'] / GIB:.2f}** |")
    lines += ["", f"{'fits' if fits else 'DOES NOT FIT'}: peak {mem['peak'] / GIB:.1f} of {gpu_gib:g} GiB",
              f"step: {time['step_seconds']:.2f} s at {100 * time['mfu']:.0f}% MFU of {time['peak_tflops']:g} "
              f"TFLOP/s per GPU ({time['flops_per_token'] / 1e9:.1f} GFLOP per token), "
              f"{time['tokens_per_s']:,.0f} tokens/s in all"]
    if not fits:
        lines.append("to fit: train.method: lora or qlora (one GPU), train.activation_checkpointing: true, a smaller train.micro_batch (raise "
                     "train.grad_accum to keep the batch), or more GPUs with train.parallel: fsdp")
    return "\n".join(lines)


def plan(shape: Shape, **kw: Any) -> tuple[str, dict]:
    """The printed plan and its numbers. Keywords: world_size, micro_batch, seq, grad_accum, parallel, gpu_gib,
    activation_checkpointing, loss_chunk, mfu, peak_tflops."""
    common = {k: kw[k] for k in ("world_size", "micro_batch", "seq", "grad_accum")}
    method = kw.get("method", "full")
    lora = {"lora_rank": int(kw.get("lora_rank", 16)), "lora_dropout": float(kw.get("lora_dropout", 0.05)),
            "lora_targets": tuple(kw.get("lora_targets", LORA_TARGETS))}
    trainable = trainable_params(shape, method, lora["lora_rank"], lora["lora_targets"])
    mem = estimate(shape, parallel=kw["parallel"], activation_checkpointing=kw["activation_checkpointing"],
                   loss_chunk=kw["loss_chunk"], method=method, **lora, **common)
    time = step_time(shape, mfu=kw["mfu"], peak_tflops=kw["peak_tflops"],
                     trainable=None if method == "full" else trainable, **common)
    text = render(shape, mem, time, parallel=kw["parallel"], gpu_gib=kw["gpu_gib"],
                  activation_checkpointing=kw["activation_checkpointing"], method=method, trainable=trainable,
                  **common)
    return text, {"shape": asdict(shape), "n_params": shape.n_params, "method": method,
                  "trainable_params": trainable, "memory_bytes": mem, "time": time,
                  "fits": mem["peak"] <= kw["gpu_gib"] * GIB}
