"""The pipeline's stages, in order. One name everywhere: dvc.yaml stage = ``cpt <stage>`` = module ``cpt.<stage>``
= Prefect task = MLflow step."""

STAGES: tuple[str, ...] = ("ingest", "clean", "validate", "base", "tokenizer", "shards", "train", "eval", "downstream", "merge", "sft")

DESCRIPTIONS: dict[str, str] = {
    "ingest": "read the configured sources into data/raw (bad records quarantined with file, line and reason)",
    "clean": "normalise, filter, deduplicate and decontaminate into data/clean",
    "validate": "great-expectations gate over data/clean; fails the pipeline on a broken expectation",
    "base": "load (or, for builtin:tiny, pretrain) the base model into data/base",
    "tokenizer": "extend the base tokenizer for the new languages into data/tokenizer",
    "shards": "tokenise and pack the training text into data/shards",
    "train": "continual pretraining with replay into data/models/cpt (checkpoints in data/checkpoints)",
    "eval": "bits per byte, forgetting and gain, XCOPA, samples: base vs cpt",
    "downstream": "lm-evaluation-harness tasks, base vs cpt: English accuracy kept, new-language accuracy gained",
    "merge": "interpolate base and cpt over a grid of a; frontier; the largest a the gate passes -> data/models/merged",
    "sft": "instruction-tune data/models/cpt into the chat model data/models/sft (assistant-only loss, replay)",
}
