"""``guard: lexicon``: old-spelled new pieces are admitted unless they would change an English word form.

The pieces ``guard: distinct`` refuses (spelled only in letters English writes: ``▁trong``, ``anh``, ``▁cho``) are
most of Vietnamese's frequent syllables. Whether such a piece can change English text is decidable per word, by the
same argument as the analytic pruning: new pieces rank below every base piece/merge, so on any pre-tokenized word
the base's own segmentation S is reached first, and a new piece can fire only where two ADJACENT tokens of S
concatenate to it (SentencePiece; byte-level BPE: where they are exactly its merge pair, or, for ``ignore_merges``
bases, where the whole word is the new token). So this module encodes a large English lexicon with the base and
collects those adjacent pairs; a candidate equal to one of them is refused.

The lexicon: wordfreq's English list (``top_n_list("en", N)``, ``tokenizer.lexicon_size``; web, news, subtitles,
books, so it holds names and loanwords English writes: ``nguyen``, ``khan``, ``kearney``) plus the words of the
old-language chooser text, each as it occurs, lower-cased, Capitalised and UPPER-cased. Each form is encoded the ways
the shards stage meets a word: after a space (SentencePiece: with the ``▁`` marker; byte-level: with the leading
space its pre-tokenizer attaches) and without (line start, after a newline or tab), and, where the pre-tokenizer
attaches one leading punctuation mark to a word (Llama-3, Tekken: ``(word``, ``"word``), after the marks the
chooser text puts there most.

What is PROVED: no word form of the lexicon, encoded alone in those contexts, is segmented differently by the
extension (whatever subset of the admitted pieces is kept). Where the tokenizer splits on whitespace (every
SentencePiece base with ``split_by_whitespace``, every byte-level base), a text's segmentation is the concatenation
of its pre-tokenized words', so a held-out English text all of whose words are lexicon forms in those contexts
cannot change. What is MEASURED: text with words outside the lexicon (rare names, typos, ``word,`` where a
SentencePiece base merges across punctuation, numbers glued to letters): the whole-document fixed point
(``cpt.tok.exact``) proves the chooser text, and the held-out English lines and documents of ``role: eval`` are
counted (``strict`` fails the stage on any change).
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from typing import Any, Iterable

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


@functools.lru_cache(maxsize=4)
def wordfreq_words(n: int, lang: str = "en") -> tuple[str, ...]:
    """The ``n`` most frequent word forms of wordfreq's list for ``lang`` (lower-cased, as wordfreq stores them)."""
    if n <= 0:
        return ()
    from wordfreq import top_n_list

    return tuple(top_n_list(lang, n))


# A wordfreq word is quoted new-language text, not English, in its lower-case form when the new language uses it
# more than NEW_RATIO times as often and English less than ENGLISH_COMMON (zipf 2.75, about once in 1.8 million
# words): the "trong", "khi", "thanh" of English web text are Vietnamese spelled without its marks. Their Capitalised
# and UPPER forms (the way English writes Vietnamese names: "Nguyen Thi Lan", "Tran") stay in the lexicon. Measured:
# at zipf 4, "qua" (2.84: "quavery", Latin "quaerit"), "soi" ("soi-disant") and "vu" ("déjà vu") left the lexicon
# and ▁qua, ▁soi, ▁vu changed held-out books.
NEW_RATIO = 10.0
ENGLISH_COMMON = 10 ** (2.75 - 9)


def new_language_words(words: Iterable[str], new_langs: Iterable[str]) -> set[str]:
    """The lower-case ``words`` that are new-language words quoted in English (see NEW_RATIO)."""
    from wordfreq import available_languages, get_frequency_dict

    en = get_frequency_dict("en")
    out: set[str] = set()
    for lang in new_langs:
        if lang == "en" or lang not in available_languages():
            continue
        freq = get_frequency_dict(lang)
        out |= {w for w in words
                if en.get(w, 0.0) < ENGLISH_COMMON and freq.get(w, 0.0) > NEW_RATIO * en.get(w, 0.0)}
    return out


def word_forms(lexicon_size: int, old_lines: Iterable[str], new_langs: Iterable[str] = ()) -> list[str]:
    """The lexicon's word forms, sorted: wordfreq's top ``lexicon_size`` English words and the chooser's words, as
    they occur, lower-cased, Capitalised and UPPER-cased (str.lower/upper may change a word's length: "İ".lower() is
    i + U+0307; each variant is a form of its own); minus the lower-case form of wordfreq words that are a new
    language's (``new_language_words``) unless the chooser writes it."""
    listed = set(wordfreq_words(lexicon_size))
    corpus = {m for line in old_lines for m in _WORD.findall(line)}
    lower = {w.lower() for w in listed | corpus}
    forms = corpus | lower | {w.upper() for w in lower} | {w[:1].upper() + w[1:] for w in lower}
    forms -= new_language_words(listed, new_langs) - corpus
    forms.discard("")
    return sorted(forms)


def spm_conflicts(base, forms: list[str], num_threads: int = 2) -> set[str]:
    """Concatenations of adjacent base tokens (and byte-spelled characters) over every form, encoded with and
    without the dummy-prefix ``▁``: a new SentencePiece piece in this set would change that form."""
    from cpt.tok import spm_extend as se

    ids: list[list[int]] = []
    for prefix in (True, False):
        sp = se.processor(base, add_dummy_prefix=prefix)
        ids += sp.encode(forms, num_threads=num_threads)
    return se.old_conflicts(base, [], encoded=ids)


def attached_marks(tok, old_lines: list[str], top: int = 8) -> list[str]:
    """The leading punctuation marks the byte-level base's pre-tokenizer glues to a following word (``(word`` is one
    pre-token under the Llama-3/Tekken regex, not under GPT-2's), most frequent in the chooser text first."""
    pre = tok.pre_tokenizer
    if pre is None:
        return []
    counts: Counter[str] = Counter()
    for line in old_lines[:20000]:
        counts.update(m.group(1) for m in re.finditer(r"(?:^|\s)([^\w\s])[^\W\d_]", line))
    marks = []
    for mark, _ in counts.most_common():
        pieces = [p for p, _ in pre.pre_tokenize_str(mark + "word")]
        if len(pieces) == 1:
            marks.append(mark)
        if len(marks) >= top:
            break
    return marks


def bpe_conflicts(tok, forms: list[str], ignore_merges: bool, marks: Iterable[str] = (),
                  spell=lambda text: text) -> tuple[set, set]:
    """(merge pairs, token concatenations) of the byte-level base's segmentation of every form, alone, after a
    space and after each attached mark: a new merge among the pairs (or, for ignore_merges bases, a new token equal
    to a form's tokens) would change that form. ``spell``: a pre-token word as the model's vocabulary writes it
    (byte-level: " word" -> "Ġword").

    Fast: the forms go 2,000 to a text, each on its own line (``"\n" + prefix + form``): every byte-level
    pre-tokenizer splits at the newline, so each form is pre-tokenized as it would be alone, and one Encoding per
    2,000 forms keeps Python out of the loop. Pairs are taken over the whole id sequence: the extra pairs (across a
    newline, or inside "don't", which pre-tokenizes into two words) can only refuse more, never less."""
    inv = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    id_pairs: set[tuple[int, int]] = set()
    for prefix in ("", " ", *marks):
        texts = ["".join("\n" + prefix + w for w in forms[i:i + 2000]) for i in range(0, len(forms), 2000)]
        for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
            ids = enc.ids
            id_pairs.update(zip(ids, ids[1:]))
    pairs = {(inv[a], inv[b]) for a, b in id_pairs}
    words: set[str] = set()
    if ignore_merges:  # a new token equal to a whole pre-token word would be emitted directly
        words = {spell(prefix + w) for prefix in ("", " ", *marks) for w in forms}
    return pairs, words


def summary(forms: list[str], conflicts: Any) -> dict[str, int]:
    return {"lexicon_forms": len(forms), "lexicon_conflicts": len(conflicts)}
