"""train.method: lora / qlora. The old vocabulary rows come out bit-identical while the new rows and the LoRA
weights train (untied and tied heads), the merged export scores as the unmerged base + adapter + new rows, qlora is
refused off CUDA with the reason."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cpt.errors import ConfigError
from cpt.io import read_json
from cpt.layout import Layout
from train_fixture import make_project, tiny_params


@pytest.fixture(scope="module")
def untied(tmp_path_factory, corpora) -> Path:
    return make_project(tmp_path_factory.mktemp("lora_untied"), corpora, tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory, corpora) -> Path:
    return make_project(tmp_path_factory.mktemp("lora_tied"), corpora, tied=True)


def _run(src: Path, dst: Path, **train) -> tuple[Layout, dict]:
    import cpt.stages.train

    shutil.copytree(src / "data", dst / "data")
    layout = Layout(dst)
    return layout, cpt.stages.train.run(tiny_params(**train), layout)


def _base_vocab(layout: Layout) -> int:
    return int(read_json(layout.tokenizer / "new_tokens.json")["base_vocab"])


@pytest.mark.parametrize("embed_only_steps", [0, 3])
def test_lora_untied_old_rows_bit_identical_new_rows_and_adapter_train(untied, tmp_path, embed_only_steps):
    layout, metrics = _run(untied, tmp_path, method="lora", embed_lr_mult=2.0, embed_only_steps=embed_only_steps)
    n_old = _base_vocab(layout)
    base = load_file(layout.base / "model.safetensors")
    out = load_file(layout.model / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[key][:n_old], base[key]), f"{key}: an old row moved"
    rows = load_file(layout.model / "adapter" / "new_rows.safetensors")
    assert set(rows) == {"embed_tokens", "lm_head"}
    assert torch.equal(rows["lm_head"], out["lm_head.weight"][n_old:])
    # the new rows trained: they differ from the init the checkpoint-free rebuild gives (sub-token means)
    from cpt.training.embeddings import extend_embeddings
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(layout.base, dtype=torch.float32)
    extend_embeddings(ref, read_json(layout.tokenizer / "new_tokens.json"), seed=7)
    assert not torch.equal(ref.get_input_embeddings().weight[n_old:], rows["embed_tokens"])
    # the body moved only through the merged LoRA update; norms (not LoRA targets) are untouched
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.0.input_layernorm.weight"], base["model.layers.0.input_layernorm.weight"])
    # a plain HF folder: no LoRA names
    assert not any("lora" in k or "base_layer" in k for k in out)
    adapter = load_file(layout.model / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # vLLM-loadable: no embeddings in the adapter
    info = metrics["adapter"]
    assert info["method"] == "lora" and info["lora_params"] == sum(t.numel() for t in adapter.values())
    assert info["new_row_params"] == 2 * (out["lm_head.weight"].shape[0] - n_old) * out["lm_head.weight"].shape[1]


def test_lora_tied_head_is_one_parameter(tied, tmp_path):
    from cpt.training import adapters
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied / "data" / "base", dtype=torch.float32)
    cfg = {**adapters.DEFAULTS, "method": "lora"}
    adapters.apply_lora(model, cfg, n_old=10)
    assert len(adapters.vocab_params(model)) == 1  # one matrix, one hook, one LR
    from cpt.training.optim import EMBED, param_groups

    groups = param_groups(model)
    assert len(groups[EMBED]) == 1 and groups[EMBED][0] is model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    layout, _ = _run(tied, tmp_path, method="lora")
    n_old = _base_vocab(layout)
    base = load_file(layout.base / "model.safetensors")
    out = load_file(layout.model / "model.safetensors")
    assert "lm_head.weight" not in out and read_json(layout.model / "config.json")["tie_word_embeddings"]
    assert torch.equal(out["model.embed_tokens.weight"][:n_old], base["model.embed_tokens.weight"])
    rows = load_file(layout.model / "adapter" / "new_rows.safetensors")
    assert set(rows) == {"embed_tokens"}
    # a finished lora run is re-exported from its final checkpoint (LoRA structure rebuilt, merged again)
    import cpt.stages.train

    again = cpt.stages.train.run(tiny_params(method="lora"), layout)
    assert again["retrained"] is False
    b = load_file(layout.model / "model.safetensors")
    assert b.keys() == out.keys() and all(torch.equal(out[k], b[k]) for k in out)


def test_merged_folder_scores_as_unmerged(untied, tmp_path):
    """bits per byte of the merged HF folder == base + new rows + adapter through peft (unmerged), within 1e-5."""
    from cpt.training import adapters
    from cpt.training.data import open_shards
    from cpt.training.loss import CausalLMLoss
    from cpt.training.measure import split_bpb
    from transformers import AutoModelForCausalLM

    layout, _ = _run(untied, tmp_path, method="lora", lora_dropout=0.0)
    split = open_shards(layout.shards).split("new/val")
    rows = np.arange(split.n_blocks)
    merged = AutoModelForCausalLM.from_pretrained(layout.model, dtype=torch.float32).eval()
    unmerged = adapters.load_unmerged(layout.base, layout.model / "adapter").eval()
    assert any("lora_" in n for n, _ in unmerged.named_parameters())
    got = [split_bpb(CausalLMLoss(m), split, rows, 4, torch.device("cpu"), None, (2,))["bpb"]
           for m in (merged, unmerged.base_model.model)]
    assert math.isfinite(got[0]) and abs(got[0] - got[1]) < 1e-5, got
    # `cpt export` of a lora checkpoint says why it does not apply
    from cpt.errors import DataError
    from cpt.training import checkpoint
    from cpt.training.export import export_checkpoint

    with pytest.raises(DataError, match="lora"):
        export_checkpoint(checkpoint.latest(layout.checkpoints), layout.base, layout.tokenizer, tmp_path / "x")


def test_qlora_refused_off_cuda_with_the_reason(untied, tmp_path):
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        _run(untied, tmp_path, method="qlora", device="cpu")


def test_method_params_checked():
    import cpt.stages.train

    with pytest.raises(ConfigError, match="train.method='adapter'"):
        cpt.stages.train.config(tiny_params(method="adapter"))
    with pytest.raises(ConfigError, match="train.lora_rank"):
        cpt.stages.train.config(tiny_params(method="lora", lora_rank=0))
    assert cpt.stages.train.config(tiny_params())["method"] == "full"


def test_plan_counts_peft_lora_params_and_fits_mistral_qlora_on_24gb():
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.training import adapters
    from cpt.training.plan import PRESETS, GIB, estimate, lora_params, shape_from_config

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    adapters.apply_lora(model, {**adapters.DEFAULTS, "method": "lora", "lora_rank": 8}, n_old=200)
    peft_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params(shape_from_config(cfg.to_dict()), 8) == peft_count

    shape = shape_from_config(PRESETS["mistral-7b"], 40000)
    kw = {"micro_batch": 1, "seq": 4096, "activation_checkpointing": True, "parallel": "ddp"}
    peaks = {m: estimate(shape, method=m, **kw)["peak"] / GIB for m in ("full", "lora", "qlora")}
    assert peaks["qlora"] < 24 < peaks["full"] and peaks["qlora"] < peaks["lora"] < peaks["full"], peaks


LORA_WORKER = """
import json, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
import cpt.stages.train
from cpt.layout import Layout
metrics = cpt.stages.train.run(json.loads(os.environ["PARAMS"]), Layout(sys.argv[1]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_lora_two_gloo_ddp_processes_match_one(untied, tmp_path):
    """DDP with lora: 2 ranks x 2 sequences train like 1 process x 4 (losses within 1e-5), old rows still exact."""
    import json
    import os
    import subprocess
    import sys

    single, _ = _run(untied, tmp_path / "single", method="lora", lora_dropout=0.0, steps=4, eval_interval=2,
                     ckpt_interval=2, micro_batch=4)
    multi = tmp_path / "multi"
    shutil.copytree(untied / "data", multi / "data")
    script = tmp_path / "worker.py"
    script.write_text(LORA_WORKER)
    params = tiny_params(method="lora", lora_dropout=0.0, steps=4, eval_interval=2, ckpt_interval=2, micro_batch=2)
    env = {**os.environ, "PARAMS": json.dumps(params), "CPT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(multi)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def steps(root: Path) -> list[dict]:
        return [json.loads(x) for x in (root / "data" / "checkpoints" / "steps.jsonl").read_text().splitlines()]

    for a, b in zip(steps(multi), steps(single.root), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    n_old = _base_vocab(single)
    base = load_file(single.base / "model.safetensors")
    out = load_file(multi / "data" / "models" / "cpt" / "model.safetensors")
    assert torch.equal(out["lm_head.weight"][:n_old], base["lm_head.weight"])
