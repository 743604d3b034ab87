"""Extend a SentencePiece BPE model with new-language pieces, old-language segmentation untouched.

Why not the copied recipe (append the new pieces with score 0): in SentencePiece BPE there is no merge list. Encoding
starts from characters and repeatedly merges the adjacent pair whose concatenation is a piece with the HIGHEST score;
the score is the merge priority. A new piece with score 0 outranks every base piece and fires in the middle of
English words (``pre|train`` -> ``pret|rain``).

What this module does instead, and why it is exact:

1. New pieces get scores strictly BELOW every base score (keeping their own relative order). Then, on any text, all
   base merges happen first, so encoding reaches the base's final segmentation S; only afterwards can a new piece
   fire, and only where two ADJACENT tokens of S concatenate to it (or where a character the base had to spell in
   bytes is now a piece).
2. So the set of new pieces that can change a given old-language text is computable exactly: encode the text with the
   base, collect ``a+b`` for every adjacent token pair and every byte-fallback character (``old_conflicts``), and
   prune exactly those pieces. Invariance is then guaranteed on that text and is verified on held-out text that was
   not used to choose (``cpt.tok.fertility.changed_lines``).
3. Pruning can strand a longer piece whose only splits used a pruned one; ``reachable`` drops those, so no vocab slot
   is spent on a piece that can never be produced.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from cpt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NORMAL = pb.ModelProto.SentencePiece.NORMAL
USER_DEFINED = pb.ModelProto.SentencePiece.USER_DEFINED
BYTE = pb.ModelProto.SentencePiece.BYTE
BPE = pb.TrainerSpec.BPE
UNIGRAM = pb.TrainerSpec.UNIGRAM
SPACE = "\u2581"  # the whitespace marker


def load_proto(path: str | Path) -> pb.ModelProto:
    path = Path(path)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError
        raise DataError(f"{path}: not a SentencePiece model: {exc}") from exc
    if not proto.pieces:
        raise DataError(f"{path}: SentencePiece model has no pieces")
    return proto


def processor(proto: pb.ModelProto, *, add_dummy_prefix: bool | None = None) -> spm.SentencePieceProcessor:
    """A processor for an in-memory proto; ``add_dummy_prefix=False`` gives the mid-sentence view of a piece."""
    if add_dummy_prefix is not None:
        proto = _copy(proto)
        proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _copy(proto: pb.ModelProto) -> pb.ModelProto:
    out = pb.ModelProto()
    out.CopyFrom(proto)
    return out


def check_base(proto: pb.ModelProto, where: str | Path) -> None:
    if proto.trainer_spec.model_type != BPE:
        name = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ConfigError(
            f"{where}: base SentencePiece model is {name}; only BPE bases can be extended without changing the old "
            "language's segmentation (a unigram base re-solves the whole lattice when pieces are added)"
        )


# -- 1. train the new language's pieces -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 8000
    model_type: str = "bpe"  # or "unigram"
    character_coverage: float = 0.9995
    max_sentence_length: int = 16384
    num_threads: int = 2
    seed: int = 1234


def train_new_model(lines: Iterable[str], base: pb.ModelProto, cfg: TrainConfig) -> pb.ModelProto:
    """Train a SentencePiece model on new-language lines with the base's text conventions (normaliser, dummy
    prefix, whitespace and digit handling), so its pieces are spelled the way the base will see the text."""
    if cfg.model_type not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer.model_type: {cfg.model_type!r}; expected 'bpe' or 'unigram'")
    norm, ts = base.normalizer_spec, base.trainer_spec
    lines = list(lines)
    vocab_size = max(cfg.vocab_size, required_chars(lines, cfg.character_coverage) + cfg.vocab_size // 4)
    if vocab_size != cfg.vocab_size:
        log.info("vocab_size %d < the characters this text needs; training %d", cfg.vocab_size, vocab_size)
    buf = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    kwargs = dict(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type=cfg.model_type,
        vocab_size=vocab_size,
        character_coverage=cfg.character_coverage,
        normalization_rule_name=norm.name or "identity",
        add_dummy_prefix=norm.add_dummy_prefix,
        remove_extra_whitespaces=norm.remove_extra_whitespaces,
        split_digits=ts.split_digits,
        split_by_whitespace=ts.split_by_whitespace,
        split_by_unicode_script=ts.split_by_unicode_script,
        treat_whitespace_as_suffix=ts.treat_whitespace_as_suffix,
        max_sentencepiece_length=ts.max_sentencepiece_length or 16,
        max_sentence_length=cfg.max_sentence_length,
        byte_fallback=False,  # the base's byte pieces already cover every byte
        hard_vocab_limit=False,  # a small language sample may not support the requested size: take what it does
        shuffle_input_sentence=True,
        num_threads=cfg.num_threads,
        minloglevel=2,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
    )
    if norm.name not in ("", "identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf"):
        kwargs["normalization_rule_name"] = "identity"  # custom charsmap: the merged model keeps the base's anyway
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as exc:
        raise DataError(f"sentencepiece training failed: {exc}") from exc
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    return proto


def required_chars(lines: list[str], coverage: float) -> int:
    """How many characters SentencePiece will insist on for ``character_coverage`` (zh/ja need thousands): the
    new model's size is raised past it rather than failing on a script with a large alphabet."""
    from collections import Counter

    counts = Counter()
    for line in lines:
        counts.update(line.replace(" ", ""))
    total, acc = sum(counts.values()), 0
    for k, (_, n) in enumerate(counts.most_common(), 1):
        acc += n
        if acc >= coverage * total:
            return k + 2
    return len(counts) + 2


def ranked_pieces(new: pb.ModelProto) -> list[str]:
    """The new model's NORMAL pieces, best first (BPE: merge order; unigram: log-probability)."""
    pieces = [(p.score, -i, p.piece) for i, p in enumerate(new.pieces) if p.type == NORMAL]
    pieces.sort(reverse=True)
    return [p for _, _, p in pieces]


# -- 2. which new pieces would fire on old-language text -----------------------------------------------------------


def _symbols(ids: list[int], sp: spm.SentencePieceProcessor, is_byte: np.ndarray) -> Iterator[str]:
    """The base's final symbols for one encoded line: pieces, with each byte-fallback run decoded back into the
    characters BPE actually worked on (one symbol per character)."""
    i, n = 0, len(ids)
    while i < n:
        t = ids[i]
        if is_byte[t]:
            j = i
            while j < n and is_byte[ids[j]]:
                j += 1
            raw = bytes(int(sp.id_to_piece(k)[3:5], 16) for k in ids[i:j])
            yield from raw.decode("utf-8", errors="replace")
            i = j
        else:
            yield sp.id_to_piece(t)
            i += 1


def old_conflicts(base: pb.ModelProto, lines: Iterable[str], *, batch: int = 2048, num_threads: int = 2,
                  encoded: Iterable[list[int]] = ()) -> set[str]:
    """Every string a new piece must not be, given the old-language ``lines``: concatenations of adjacent tokens of
    the base's segmentation, and characters the base could only spell in bytes. ``encoded``: further base id lists
    already at hand (the whole documents, encoded by the base's ``tokenizer.json`` as the shards stage does; its ids
    are the ``.model``'s)."""
    sp = processor(base)
    is_byte = np.zeros(sp.get_piece_size(), dtype=bool)
    for i, p in enumerate(base.pieces):
        is_byte[i] = p.type == BYTE
    byte_ids = set(np.flatnonzero(is_byte).tolist())
    pieces = [p.piece for p in base.pieces]
    vocab = set(pieces)
    conflicts: set[str] = set()
    id_pairs: set[tuple[int, int]] = set()  # adjacent id pairs of byte-free lists: concatenated once, at the end

    def add(ids: list[int]) -> None:
        if byte_ids.isdisjoint(ids):
            id_pairs.update(zip(ids, ids[1:]))
            return
        syms = list(_symbols(list(ids), sp, is_byte))
        conflicts.update(s for s in syms if len(s) == 1 and s not in vocab)
        conflicts.update(a + b for a, b in zip(syms, syms[1:]))

    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= batch:
            for ids in sp.encode(chunk, num_threads=num_threads):
                add(ids)
            chunk.clear()
    if chunk:
        for ids in sp.encode(chunk, num_threads=num_threads):
            add(ids)
    for ids in encoded:
        add(ids)
    conflicts.update(pieces[a] + pieces[b] for a, b in id_pairs)
    return conflicts


def reachable(candidates: list[str], base_pieces: set[str]) -> list[str]:
    """Keep candidates that BPE can actually build: a single character, or some split into two pieces that are
    themselves base pieces or kept candidates. Iterates to a fixpoint (short pieces first)."""
    keep: set[str] = set()
    pool = sorted(set(candidates), key=len)
    changed = True
    while changed:
        changed = False
        for p in pool:
            if p in keep:
                continue
            if len(p) == 1 or any(
                (p[:i] in base_pieces or p[:i] in keep) and (p[i:] in base_pieces or p[i:] in keep)
                for i in range(1, len(p))
            ):
                keep.add(p)
                changed = True
    return [p for p in candidates if p in keep]


# -- 3. merge -------------------------------------------------------------------------------------------------------


def score_floor(base: pb.ModelProto) -> tuple[float, float]:
    """(first new score, step): just below the lowest base score, with a step that float32 (the proto's score type)
    still tells apart at that magnitude. Mistral's whitespace pieces sit at -1e9, where float32 steps are 64."""
    low = min(p.score for p in base.pieces if p.type in (NORMAL, USER_DEFINED))
    step = float(max(1.0, 4 * np.spacing(np.float32(abs(low) + 1))))
    return low - step, step


def merge(base: pb.ModelProto, new_pieces: list[str]) -> tuple[pb.ModelProto, list[str]]:
    """The base proto with ``new_pieces`` (best first) appended as NORMAL pieces scored below every base score.
    Base pieces keep their ids, text, scores and types; new ids start at the base size, consecutive."""
    merged = _copy(base)
    have = {p.piece for p in base.pieces}
    start, step = score_floor(base)
    added: list[str] = []
    for piece in new_pieces:
        if piece in have or not piece:
            continue
        have.add(piece)
        sp_piece = merged.pieces.add()
        sp_piece.piece = piece
        sp_piece.score = start - step * len(added)
        sp_piece.type = NORMAL
        added.append(piece)
    # float32 must keep the new pieces strictly ordered and below the base, or priorities would tie.
    scores = np.array([p.score for p in merged.pieces[len(base.pieces):]], dtype=np.float32)
    if len(scores) and (np.any(np.diff(scores) >= 0) or scores[0] >= np.float32(start + step)):
        raise DataError("new piece scores collapse in float32; too many pieces for this base's score range")
    # The merged model trains nothing further; the trainer spec describes the merged vocabulary.
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged, added


def write_proto(proto: pb.ModelProto, path: str | Path) -> None:
    from cpt.io import atomic_open

    with atomic_open(path, "wb") as fh:
        fh.write(proto.SerializeToString())
