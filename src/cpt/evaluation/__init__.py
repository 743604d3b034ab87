"""The pieces of the ``eval`` stage, one concern per module.

- ``models``   load a model folder (base or cpt) with its own tokenizer; the BOS/prefix-token rule
- ``bpb``      sliding-window log-likelihood of whole documents -> loss, perplexity, bits per UTF-8 byte
- ``downstream`` (+ ``downstream_stats``, ``tasks/``) the ``downstream`` stage's lm-evaluation-harness tasks
  (XCOPA among them; the hand-written XCOPA scorer it replaced gave the same per-item decisions)
- ``samples``  greedy and sampled generations from fixed prompts
- ``overlap``  the role barrier, checked on what training actually saw (decoded shards)
- ``report``   the one-page markdown report and the loss-curve figure

Everything here imports with only torch + transformers + tokenizers (+ numpy): matplotlib is imported lazily.
"""
