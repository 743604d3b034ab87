"""Training building blocks, one concern per module (torchtitan style): lr schedule, data, checkpoint, embeddings
init, distributed setup, throughput. ``cpt.train`` (the stage) and ``cpt.base`` (the builtin tiny base) use them."""
