"""Tokenizer extension: add new-language pieces to a base tokenizer without changing how the old language tokenizes.

One concern per module:

- ``spm_extend``  SentencePiece ``ModelProto`` surgery (train new pieces, merge them below the base's merge
  priorities, prune the ones that would still fire on old-language text).
- ``bpe_extend``  the same idea for byte-level BPE ``tokenizer.json`` bases (GPT-2 / Llama-3 / Qwen family);
  ``bpe_learn`` continues BPE training on top of the base's segmentation.
- ``exact``       the proof: encode the chooser documents (whole) and lines with base and extension, prune what
  fired, repeat to a fixed point.
- ``guard``       which pieces are safe on old-language text nobody has seen.
- ``hf_export``   the HF tokenizer folder (``tokenizer.json`` built to encode exactly like the merged ``.model``).
- ``fertility``   tokens per word, chars per token, old-language invariance and round-trip checks.
"""
