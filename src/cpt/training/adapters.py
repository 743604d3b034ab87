"""``train.method`` (and ``sft.method``): full fine-tuning, LoRA, or QLoRA, with the new vocabulary rows trainable.

- ``full``: every parameter trains (the default; nothing here runs).
- ``lora``: peft's LoRA on the attention and MLP projections (``lora_targets``), the body frozen. peft injects the
  LoRA layers IN PLACE (``get_peft_model(model).base_model.model is model``), so the HF model the loop holds,
  ``CausalLMLoss`` (the fused head + cross-entropy), DCP checkpoints and the step are the same code as for ``full``.
- ``qlora``: the same, the frozen base loaded in 4-bit NF4 through bitsandbytes. bitsandbytes' 4-bit kernels are
  CUDA-only: ``check_method`` refuses qlora on any other device, or when bitsandbytes is not installed
  (``pip install 'cpt[qlora]'``), with the reason.

New vocabulary rows train, old rows stay frozen. The input embedding (and the untied lm_head) stays a full
trainable parameter, but a gradient hook zeroes the gradient of its first ``base_vocab`` rows (the base's tokens)
and the embedding group has no weight decay (``cpt.training.optim``): AdamW's moments of those rows stay 0, its
update there is exactly 0, and the old rows are bit-identical at the end (tests/test_train_lora.py reads them).
Why a masked full matrix rather than a separate delta for the new rows (or peft's ``trainable_token_indices``):
the fused loss, the calibration, DCP checkpoints, FSDP sharding and the export see the same parameter as in
``full``, and a tied head is naturally one parameter with one hook and one learning rate (``embed_lr_mult``);
the cost is the Adam moments of the old rows (2 x V x d fp32, counted by ``cpt train --plan``). The new rows use
``embed_lr_mult`` x the LoRA LR, as in ``full``.

The adapter is peft's: ``save_adapter`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA
weights only, which vLLM loads; embeddings inside an adapter are what it refuses) and ``new_rows.safetensors`` (the
trained rows ``base_vocab..`` of the embedding and the untied head), so users who keep the base can rebuild the
model (``load_unmerged``). The default export merges the adapter into a plain HF folder (``merge``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpt.errors import ConfigError

log = logging.getLogger("cpt.stages.train")

METHODS = ("full", "lora", "qlora")
ADAPTER_DIR = "adapter"
NEW_ROWS = "new_rows.safetensors"
DEFAULTS: dict[str, Any] = {
    "method": "full",
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def check_method(stage: str, cfg: dict, device_type: str | None = None) -> None:
    """Raise a ConfigError naming ``<stage>.<key>`` for a method or LoRA param out of its domain; with
    ``device_type`` (the device the run uses; the loop passes it before loading anything) qlora also needs CUDA and
    bitsandbytes. The params check leaves the device out, so ``cpt train --plan`` can plan a qlora run anywhere."""
    method = cfg.get("method", "full")
    if method not in METHODS:
        raise ConfigError(f"params.yaml: {stage}.method={method!r}: expected one of {METHODS}")
    if method == "full":
        return
    for key in ("lora_rank", "lora_alpha"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise ConfigError(f"params.yaml: {stage}.{key}={cfg[key]!r} must be a number > 0")
    if not 0.0 <= float(cfg["lora_dropout"]) < 1.0:
        raise ConfigError(f"params.yaml: {stage}.lora_dropout={cfg['lora_dropout']} must be in [0, 1)")
    if not cfg["lora_targets"] or not all(isinstance(t, str) for t in cfg["lora_targets"]):
        raise ConfigError(f"params.yaml: {stage}.lora_targets={cfg['lora_targets']!r}: a list of module names")
    if cfg.get("parallel") == "fsdp":
        raise ConfigError(f"params.yaml: {stage}.method={method} with {stage}.parallel=fsdp is not supported: "
                          "LoRA's point is a model that fits one GPU; use parallel: ddp")
    if method == "qlora" and device_type is not None:  # at the start of the run (not for `cpt train --plan`)
        if device_type != "cuda":
            raise ConfigError(f"params.yaml: {stage}.method=qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels are "
                              f"CUDA-only) and this run is on {device_type}; use method: lora on {device_type}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"params.yaml: {stage}.method=qlora needs bitsandbytes (pip install 'cpt[qlora]', "
                              f"CUDA only): {exc}") from exc


def load_quantized(base_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """qlora: the base with its linear layers in 4-bit NF4 (double quantization, bf16 compute), as QLoRA does."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.float32,
                                                device_map={"": torch.cuda.current_device()},
                                                trust_remote_code=trust_remote_code)


def vocab_params(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and (if untied) the lm_head weight: one parameter when tied."""
    out = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not out[0]:
        out.append(head.weight)
    return out


def freeze_old_rows(param: nn.Parameter, n_old: int) -> None:
    """Zero the gradient of rows ``:n_old`` (registered once per parameter: a tied head is one parameter)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_old] = 0
        return grad

    param.requires_grad_(True)
    param.register_hook(hook)


def apply_lora(model: nn.Module, cfg: dict, n_old: int, frozen_dtype: torch.dtype | None = None):
    """Inject LoRA into ``model`` in place; the vocabulary matrices stay trainable with rows ``:n_old`` frozen.
    ``frozen_dtype`` (bf16 on GPU): the frozen matrices are stored in it (half the memory; autocast computes in it
    anyway). Returns the PeftModel (for ``merge`` / ``save_adapter``); ``model`` keeps being the HF model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(
            cfg.get("activation_checkpointing")))
    lcfg = LoraConfig(r=int(cfg["lora_rank"]), lora_alpha=float(cfg["lora_alpha"]),
                      lora_dropout=float(cfg["lora_dropout"]), target_modules=list(cfg["lora_targets"]),
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    assert peft_model.base_model.model is model  # injected in place: the loop's references stay valid
    for p in vocab_params(model):
        if n_old < p.shape[0]:  # sft adds no rows: its vocabulary matrices stay frozen
            freeze_old_rows(p, n_old)
    if frozen_dtype is not None and frozen_dtype != torch.float32 and cfg["method"] == "lora":
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad and p.ndim >= 2 and p.is_floating_point():
                    p.data = p.data.to(frozen_dtype)
    return peft_model


def trainable_report(model: nn.Module, n_old: int) -> dict[str, int]:
    """Parameters that change: LoRA's, plus the new rows of the vocabulary matrices (not their frozen old rows)."""
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    rows = sum(max(0, p.shape[0] - n_old) * p.shape[1] for p in vocab_params(model))
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"lora_params": lora, "new_row_params": rows, "trainable_params": lora + rows, "total_params": total}


def save_adapter(peft_model, model: nn.Module, n_old: int, out: Path) -> None:
    """``out/adapter_model.safetensors`` + ``adapter_config.json`` (peft) and ``out/new_rows.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    rows = {"embed_tokens": model.get_input_embeddings().weight.detach()[n_old:].float().cpu().contiguous()}
    # (empty for sft, which adds no rows: the file still says where they would start)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        rows["lm_head"] = head.weight.detach()[n_old:].float().cpu().contiguous()
    save_file(rows, str(out / NEW_ROWS), metadata={"first_row": str(n_old),
                                                    "rows": str(model.get_input_embeddings().weight.shape[0])})
    (out / "README.md").write_text(
        "LoRA adapter + the trained new vocabulary rows (cpt).\n\n"
        "The merged model is the folder above this one. To rebuild it from the base instead:\n"
        "`cpt.training.adapters.load_unmerged(base_dir, this_folder)` (resizes the base to the extended vocab, "
        "writes rows first_row.. from new_rows.safetensors, loads the adapter with peft).\n", encoding="utf-8")


def load_unmerged(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base + the new rows + the adapter (a PeftModel, not merged): what ``save_adapter`` saved, rebuilt."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(Path(adapter_dir) / NEW_ROWS), framework="pt") as f:
        meta = f.metadata()
        rows = {k: f.get_tensor(k) for k in f.keys()}
    first, total = int(meta["first_row"]), int(meta["rows"])
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.resize_token_embeddings(total, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[first:] = rows["embed_tokens"].to(dtype)
        if "lm_head" in rows:
            model.get_output_embeddings().weight[first:] = rows["lm_head"].to(dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir))


def merge(peft_model) -> None:
    """Fold the LoRA weights into the base weights in place (peft's ``merge_and_unload``): the HF model is then a
    plain model of the base's class again. The frozen matrices go back to fp32 first, so the merge is exact."""
    base = peft_model.base_model.model
    with torch.no_grad():
        for p in base.parameters():
            if p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16) and p.ndim >= 2:
                p.data = p.data.float()
    peft_model.merge_and_unload(safe_merge=True)


def export(core: nn.Module, model: nn.Module, peft_model, cfg: dict, base_dir: Path, tokenizer_dir: Path, out: Path,
           n_old: int, save_dtype: torch.dtype, info) -> None:
    """The model folder ``out`` (train: data/models/cpt; sft: data/models/sft, ``base_dir`` its input model): for ``full`` the plain export; for lora / qlora the merged HF folder (a
    plain model: eval, sft and serving need nothing else) with ``adapter/`` (adapter + new rows) inside it.

    lora merges in place (after the final checkpoint, so nothing is lost); qlora merges into the base re-read in
    fp32 on CPU (merging into 4-bit weights would round the update away) from the adapter just saved."""
    import shutil

    from cpt.training.export import export_model

    if peft_model is None:
        export_model(core, model, tokenizer_dir, out, save_dtype, info)
        return
    out = Path(out)
    main = info is None or info.main  # DDP: every rank merges and takes part in the export, rank 0 writes
    staged = out.parent / f".tmp-{out.name}-{ADAPTER_DIR}"
    if main:
        shutil.rmtree(staged, ignore_errors=True)
        save_adapter(peft_model, model, n_old, staged)
        (staged / "cpt_adapter.json").write_text(json.dumps(
            {"method": cfg["method"], "base": str(base_dir), **trainable_report(model, n_old)}, indent=2) + "\n")
    if cfg["method"] == "qlora":
        from cpt.training.loss import CausalLMLoss

        merged = load_unmerged(base_dir, staged).merge_and_unload()
        export_model(CausalLMLoss(merged), merged, tokenizer_dir, out, save_dtype, info)
    else:
        merge(peft_model)
        export_model(core, model, tokenizer_dir, out, save_dtype, info)
    if main:
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
        staged.rename(out / ADAPTER_DIR)
