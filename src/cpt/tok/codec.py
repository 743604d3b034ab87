"""The one text -> token ids rule of cpt, shared by every stage that turns text into ids.

The shards stage, the builtin tiny base, train-time eval, ``cpt eval`` (bits per byte, XCOPA, samples) and the
overlap check must encode a text identically, or eval scores targets no model was trained on and the overlap check
misses training documents. The rule:

- the fast ``tokenizers`` backend of the folder's ``tokenizer.json`` (what AutoTokenizer's fast tokenizer runs);
- special-token strings inside a text are text (``encode_special_tokens``, like ``split_special_tokens=True`` in
  transformers): a literal ``<unk>`` (WikiText-2 has 2,224), ``<s>``, ``</s>`` or ``<|endoftext|>`` in a document is
  spelled out in ordinary pieces, never a special id the model did not learn as a target;
- no automatic special tokens; a document is ``[BOS] ids EOS`` with BOS only when the tokenizer's own post-processor
  prepends one (Llama ``<s>`` yes, GPT-2 / Qwen no) and EOS from tokenizer_config.json (``special_ids``);
- a scored text is conditioned on ``prefix_id``: the BOS when documents get one, else the EOS, which is exactly the
  token that precedes a document inside the packed training stream;
- a chat marker is never a document boundary: chat models name their turn markers as BOS/EOS (SmolLM2 and Qwen
  Instruct: ``bos_token`` ``<|im_start|>``, ``eos_token`` ``<|im_end|>``) although they were pretrained on documents
  separated by ``<|endoftext|>``. A BOS/EOS that the folder's chat template spells out literally (or a well-known turn
  marker) is replaced by the pretraining separator (``_EOS_FALLBACKS``); sft keeps the chat EOS for its turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cpt.errors import DataError

_EOS_FALLBACKS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
# Turn markers of the common chat formats, recognised even in a folder that lost its chat template.
_CHAT_MARKERS = frozenset({"<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"})


def load_tokenizer(folder: str | Path):
    """``tokenizers.Tokenizer`` from an HF tokenizer folder's ``tokenizer.json``, special-token strings as text."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{path}: no tokenizer.json; the tokenizer stage (or an HF fast tokenizer) writes it")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust error says what is wrong with the file
        raise DataError(f"{path}: cannot load tokenizer: {exc}") from exc
    tok.encode_special_tokens = True
    return tok


def _config_token(folder: Path, key: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                return value
    return None


def chat_template_text(folder: str | Path) -> str:
    """The folder's chat template(s) as one string ("" when none): chat_template.jinja (transformers 5), or
    tokenizer_config.json's ``chat_template`` (a string or a list of named templates)."""
    folder = Path(folder)
    parts = []
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        parts.append(jinja.read_text(encoding="utf-8"))
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(str(v.get("template", "")) for v in value if isinstance(v, dict))
    return "\n".join(parts)


def is_chat_marker(token: str | None, template: str) -> bool:
    """A token that marks chat turns (spelled literally in the chat template, or a well-known turn marker)."""
    return bool(token) and (token in _CHAT_MARKERS or token in template)


def _document_eos(tok, folder: Path, name: str | None, template: str) -> tuple[int | None, list[str]]:
    """The id of the document separator: ``name`` unless it is a chat marker, else the first usual name in the
    vocabulary that is not one (``<|endoftext|>`` for SmolLM2/Qwen, ``<|end_of_text|>`` for Llama 3)."""
    if name and not is_chat_marker(name, template):
        return tok.token_to_id(name), [name]
    candidates = [c for c in _EOS_FALLBACKS if not is_chat_marker(c, template)]
    found = next((tok.token_to_id(c) for c in candidates if tok.token_to_id(c) is not None), None)
    if found is None:  # a chat model with no other separator: its own EOS (or a marker) is all there is
        last = [name] if name else [c for c in _EOS_FALLBACKS if c not in candidates]
        return next((tok.token_to_id(c) for c in last if tok.token_to_id(c) is not None), None), [*candidates, *last]
    return found, candidates


@dataclass(frozen=True)
class Specials:
    bos_id: int | None  # prepended to every document, or None when the tokenizer's convention has no BOS
    eos_id: int  # appended to every document


def special_ids(tok, folder: str | Path, *, eos_token: str = "auto", add_bos: str | bool = "auto") -> Specials:
    """EOS from the folder's tokenizer_config (or the usual names), never a chat marker under ``auto`` (module
    docstring); BOS from the tokenizer's own post-processor (``auto``: prepend exactly what
    ``add_special_tokens=True`` prepends, e.g. Llama's ``<s>``; GPT-2 has none; a chat marker never)."""
    folder = Path(folder)
    template = chat_template_text(folder)
    if eos_token == "auto":
        eos_id, candidates = _document_eos(tok, folder, _config_token(folder, "eos_token"), template)
    else:
        eos_id, candidates = tok.token_to_id(eos_token), [eos_token]
    if eos_id is None:
        raise DataError(f"{folder}: no EOS token found (tried {candidates}); set shards.eos_token")
    if add_bos == "auto":
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else full[:1]
        bos_id = prefix[0] if len(prefix) == 1 and prefix[0] != eos_id else None
        if bos_id is not None and is_chat_marker(tok.id_to_token(bos_id), template):
            bos_id = None
    elif add_bos in (True, "true"):
        name = _config_token(folder, "bos_token") or "<s>"
        if is_chat_marker(name, template):
            raise DataError(f"{folder}: shards.add_bos is true but the BOS token {name!r} is a chat marker, not a "
                            "document start; use add_bos: auto (documents are separated by the EOS)")
        bos_id = tok.token_to_id(name)
        if bos_id is None:
            raise DataError(f"{folder}: shards.add_bos is true but the tokenizer has no BOS token {name!r}")
    else:
        bos_id = None
    return Specials(bos_id=bos_id, eos_id=eos_id)


@dataclass
class TextCodec:
    """A tokenizer folder's text -> ids rule (module docstring). ``tok`` is the ``tokenizers.Tokenizer``."""

    tok: object
    specials: Specials
    folder: Path

    @classmethod
    def from_folder(cls, folder: str | Path, *, eos_token: str = "auto", add_bos: str | bool = "auto") -> "TextCodec":
        tok = load_tokenizer(folder)
        return cls(tok, special_ids(tok, folder, eos_token=eos_token, add_bos=add_bos), Path(folder))

    @property
    def prefix_id(self) -> int:
        """What a document is conditioned on: its BOS, else the previous document's EOS (as in the shards)."""
        return self.specials.bos_id if self.specials.bos_id is not None else self.specials.eos_id

    @property
    def bos_id(self) -> int | None:
        return self.specials.bos_id

    @property
    def eos_id(self) -> int:
        return self.specials.eos_id

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text: special-token strings as text, nothing added."""
        if not texts:
            return []
        return [enc.ids for enc in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def document(self, ids: Sequence[int]) -> list[int]:
        """``[BOS] ids EOS``: a document as the shards stage packs it."""
        pre = [self.specials.bos_id] if self.specials.bos_id is not None else []
        return [*pre, *ids, self.specials.eos_id]
