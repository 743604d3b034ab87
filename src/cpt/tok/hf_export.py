"""Write the HF tokenizer folder for a merged SentencePiece model: ``tokenizer.model`` + a ``tokenizer.json`` that
encodes exactly like it.

Why build ``tokenizer.json`` by hand instead of letting transformers convert the ``.model``: the converter orders
BPE merges by piece id, while SentencePiece ranks them by score. For Mistral v1 that already differs on the base
(its whitespace pieces ``▁▁``.. have id 259+ but score -1e9: the converter encodes "  hello" as ``▁▁|hello``, the
``.model`` as ``▁|▁h|ello``), and for a merged model whose new pieces are scored below the base it would be wrong
everywhere. Here every pair ``(a, b)`` with ``a+b`` in the vocabulary becomes a merge, ranked by the score of
``a+b`` (the SentencePiece rule), and the result is checked against ``sentencepiece`` line by line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from cpt.io import atomic_open, read_json, write_json
from cpt.tok.spm_extend import NORMAL, SPACE, USER_DEFINED, write_proto

CONTROL_TYPES = (2, 3)  # UNKNOWN, CONTROL


def bpe_merges(proto) -> list[tuple[str, str]]:
    """SentencePiece BPE as an explicit merge list: all splits of every NORMAL piece into two NORMAL pieces, ranked
    by the piece's score (higher first); ties keep piece-id order, then the split position."""
    mergeable = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, (score, pid) in mergeable.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in mergeable and b in mergeable:
                ranked.append((-score, pid, k, a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def build_tokenizer(proto, *, add_bos: bool = True, add_eos: bool = False) -> Tokenizer:
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next((p.piece for p in proto.pieces if p.type == 2), None)
    model = BPE(
        vocab=vocab,
        merges=bpe_merges(proto),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
        ignore_merges=False,
    )
    tok = Tokenizer(model)
    norm = proto.normalizer_spec
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    # SentencePiece adds the dummy prefix unconditionally (even before a leading space): Prepend, not Metaspace's
    # "first" scheme, which skips text that already starts with a space.
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
        if user:
            # The normaliser also runs on each user-defined piece's own text (they are matched on normalised text,
            # as SentencePiece matches them): take the prefix back off a string that is exactly one of them.
            alt = "|".join(re.escape(p) for p in sorted(user, key=len, reverse=True))
            steps.append(normalizers.Replace(Regex(f"^{SPACE}(?=(?:{alt})$)"), ""))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    specials = [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in CONTROL_TYPES]
    tok.add_special_tokens(specials)
    if user:
        # normalized=True: matched inside the normalised text, so the dummy prefix goes once before the whole text
        # and "hello<br>world" stays [▁hello, <br>, w, orld] as in SentencePiece (normalized=False split the text
        # first and gave every segment its own prefix: [▁hello, <br>, ▁world])
        tok.add_tokens([AddedToken(p, special=False, normalized=True) for p in user])
    bos = proto.trainer_spec.bos_piece if proto.trainer_spec.bos_id >= 0 else None
    eos = proto.trainer_spec.eos_piece if proto.trainer_spec.eos_id >= 0 else None
    single, pair, special = ["$A"], ["$A", "$B"], []
    if add_bos and bos:
        single, pair = [bos] + single, [bos, "$A", bos, "$B"]
        special.append((bos, vocab[bos]))
    if add_eos and eos:
        single, pair = single + [eos], [x for x in pair] + [eos]
        special.append((eos, vocab[eos]))
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)
    return tok


def tokenizer_config(proto, base_config: dict[str, Any] | None) -> dict[str, Any]:
    """The base's tokenizer_config.json with what we must own: the class that loads our tokenizer.json verbatim
    (``TokenizersBackend``: transformers 5's LlamaTokenizer rebuilds normalizer/pre-tokenizer in code and would drop a
    SentencePiece normaliser) and special tokens named after the merged model's control pieces."""
    cfg = dict(base_config or {})
    for k in ("added_tokens_decoder", "tokenizer_file", "vocab_file", "auto_map", "name_or_path", "is_local"):
        cfg.pop(k, None)
    ts = proto.trainer_spec
    cfg["tokenizer_class"] = "TokenizersBackend"
    if ts.unk_id >= 0:
        cfg.setdefault("unk_token", ts.unk_piece)
    if ts.bos_id >= 0:
        cfg.setdefault("bos_token", ts.bos_piece)
    if ts.eos_id >= 0:
        cfg.setdefault("eos_token", ts.eos_piece)
    cfg.setdefault("add_bos_token", ts.bos_id >= 0)
    cfg.setdefault("add_eos_token", False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg.setdefault("model_max_length", 1_000_000_000_000_000_019_884_624_838_656)
    return cfg


def write_folder(proto, out: Path, base_dir: Path | None) -> None:
    """tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = None
    if base_dir is not None and (base_dir / "tokenizer_config.json").exists():
        base_cfg = read_json(base_dir / "tokenizer_config.json")
    cfg = tokenizer_config(proto, base_cfg)
    tok = build_tokenizer(proto, add_bos=bool(cfg.get("add_bos_token")), add_eos=bool(cfg.get("add_eos_token")))
    write_proto(proto, out / "tokenizer.model")
    with atomic_open(out / "tokenizer.json") as fh:
        fh.write(tok.to_str(pretty=False))
    write_json(out / "tokenizer_config.json", cfg)
    smap = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    write_json(out / "special_tokens_map.json", smap)


def carry_chat_template(base_dir: Path | None, out: Path) -> bool:
    """Copy the base's chat template into the extended tokenizer folder: transformers 5 keeps it in
    ``chat_template.jinja`` (not tokenizer_config.json), and without it sft would fall back to cpt's default
    template instead of the base's own, and the codec could no longer tell a chat marker from a document EOS."""
    if base_dir is None:
        return False
    copied = False
    for name in ("chat_template.jinja", "chat_template.json"):
        if (base_dir / name).is_file():
            (out / name).write_bytes((base_dir / name).read_bytes())
            copied = True
    cfg = out / "tokenizer_config.json"
    return copied or (cfg.exists() and bool(read_json(cfg).get("chat_template")))

