"""Stage ``sft``: instruction-tune the continually pretrained model (the third step of the Vistral recipe).

Reads data/models/cpt (model + extended tokenizer), the instruction files of ``sft.sources`` (under
``ingest.corpus_dir``) and data/clean's ``role: eval`` documents (decontamination); writes data/sft/ (the cleaned
conversations, quarantine, the chat tokenizer), data/models/sft (HF folder: AutoModelForCausalLM + AutoTokenizer with
``chat_template`` set), data/sft_checkpoints/ (resumable), reports/sft/ and metrics/sft.json. The work lives in
``cpt.sft`` (data, template, packing, loop, evaluate); the training parts are train's own (``cpt.training``).

Loss on assistant tokens only; conversations packed with position-id resets (attention never crosses two
conversations); English instructions replayed (``replay_ratio``: share of training rows from ``domain: old``
sources); the LR schedule, checkpoints and exact resume are train's. docs/sft.md has the why of each choice.
"""

from __future__ import annotations

from typing import Any


from cpt.errors import ConfigError
from cpt.layout import Layout
from cpt.params import section, stage_config, with_defaults
from cpt.training import adapters
from cpt.training.loop_config import LOOP_DEFAULTS, check_loop

DEFAULTS: dict[str, Any] = {
    "model": "data/models/cpt",  # the CPT model to tune (HF folder + tokenizer)
    "out": "data/models/sft",
    "chat_template": "auto",  # auto (the model's own, else cpt's default) | default | path/to/template.jinja
    "model_name": "cpt-sft",  # registered model name (MLflow)
    "sources": [],
    "eval_fraction": 0.15,
    "max_eval": 80,
    "max_length": 256,
    "decontam": {"enabled": True, "word_ngram": 13, "char_ngram": 25},
    "replay_ratio": 0.25,
    "steps": 30,
    "micro_batch": 8,
    "grad_accum": 1,
    "lr": 3.0e-3,
    "min_lr": 3.0e-4,
    "warmup": 0.1,
    "schedule": "cosine",
    "decay_fraction": 0.2,
    "embed_lr_mult": 1.0,
    "weight_decay": 0.0,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "eval_interval": 10,
    "plain_eval": {"sources": None, "max_docs": 50, "max_bytes": 10000, "heldout": "data/shards/heldout.jsonl",
                   "max_bytes_old": None, "unit_bytes": 4096, "max_length": 1024, "stride": 768, "batch_size": 8},
    "bootstrap_resamples": 1000,  # paired bootstrap draws of the gate's 95% intervals (cpt.sft.intervals)
    "samples": {"max_new_tokens": 48, "temperature": 0.8, "top_p": 0.95,
                "prompts": {"vi": ["Hà Nội là thủ đô của nước nào?"], "en": ["Give three tips for staying healthy."]}},
    "gate": {"min_gain": 0.02, "max_forgetting": 0.05, "champion_min_gain": None, "champion_max_forgetting": None,
             "min_documents": 5, "alias": "champion"},
    **LOOP_DEFAULTS,
    **adapters.DEFAULTS,  # method: full | lora | qlora, as train (cpt.training.adapters)
}


def config(params: dict) -> dict[str, Any]:
    cfg = stage_config(params, "sft", DEFAULTS)
    for sub in ("decontam", "plain_eval", "samples", "gate"):
        cfg[sub] = with_defaults(f"sft.{sub}", cfg[sub], DEFAULTS[sub])
    check_loop("sft", cfg, ints=("max_length", "bootstrap_resamples"))
    adapters.check_method("sft", cfg)
    for key, lo, hi in (("replay_ratio", 0.0, 1.0), ("eval_fraction", 0.0, 0.9), ("warmup", 0.0, 0.99)):
        if not lo <= float(cfg[key]) <= hi:
            raise ConfigError(f"params.yaml: sft.{key}={cfg[key]} must be in [{lo}, {hi}]")
    cfg["embed_only_steps"] = 0  # train's schedule function reads it; sft has no embeddings-only phase
    return cfg


def run(params: dict, layout: Layout) -> dict:
    from cpt.sft import pipeline
    from cpt.training import distributed

    cfg = config(params)
    seed = int(params.get("seed", 0))
    with distributed.session(cfg["device"], cfg["threads"]) as (info, device):
        return pipeline.run(cfg, seed, layout, params, info, device, given=set(section(params, "sft")))
