"""cpt: continual pretraining of causal language models on a new language.

The pipeline is a chain of stages, each one artifact (see ``cpt.stages.STAGES``):
ingest -> clean -> validate -> base -> tokenizer -> shards -> train -> eval.
Each stage lives in the module of the same name and exposes ``run(params, layout) -> metrics``.
"""

__version__ = "0.1.0"
