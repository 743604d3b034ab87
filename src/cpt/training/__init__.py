"""Training building blocks, one concern per module (torchtitan style): lr schedule, data, checkpoint, embeddings
init, distributed setup, throughput. ``cpt.stages.train`` (the stage) and ``cpt.stages.base`` (the builtin tiny base) use them."""
