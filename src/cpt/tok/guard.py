"""Which new pieces are safe for the old language beyond the text we can check exactly.

Modes (``tokenizer.guard``): ``lexicon`` (the default) admits an old-spelled piece unless it would change an English
word form of a large lexicon, decided by encoding the lexicon with the base (``cpt.tok.lexicon``: proved for every
lexicon form, measured on other held-out text); ``distinct`` admits only pieces with a letter the old language never
meets (proved on held-out text written in the old language's letters, at a large fertility cost); ``native`` is the
heuristic described below (measured only); ``exact`` has no guard. Every mode keeps the pieces with letters the new
language writes and the old one does not, and refuses pieces of digits/punctuation only.

``spm_extend.old_conflicts`` is exact for the old-language text it sees. On held-out old text, the pieces that still
fire are new pieces spelled ONLY in the old alphabet that also happen to be old-language substrings the chooser text
never showed: loanwords and names in the new-language corpus (``▁NATO``, ``instein``, ``▁neutron``, ``▁sulf`` in
Vietnamese Wikipedia). A piece that contains a character the old language does not use can never fire on
old-language text, so the risk is confined to old-alphabet pieces, and the guard keeps such a piece only when the new
language itself vouches for it:

- it is a substring of NATIVE new-language words (ones containing a letter outside the old alphabet) with the
  diacritics stripped: ``▁trong`` (from trọng), ``▁nh`` (nhà), ``anh`` (thành) stay; for zh/ja/ko no
  old-alphabet piece is native, so all go;
- and it is not mostly FOREIGN in the new text: the old-spelled words of the new text that are not the skeleton
  of a native word (``dioxide``, ``herzegovina``, ``einstein``) that contain it weigh at most ``foreign_ratio`` x
  the native words that do (each word type weighted 1 + log2 of its count). This catches Vietnamised loans (đioxit -> ``▁diox``) that the
  skeleton test alone lets through;
- it is not a substring of any word of the old-language chooser text (whatever the old language spells is risky);
- it has no uppercase letter (capitalised old-alphabet pieces are names, and names cross languages in news);
- (pieces with letters outside the old alphabet) those letters are ones the new language writes with: its major
  scripts, and in a script shared with the old language only its frequent letters (``▁α``, ``ος`` and ``▁Île``
  from formulas and names in viwiki fired on held-out English before this rule);
- it has at least one letter: pieces of digits, punctuation or symbols only are shared by every language (a ``"``
  the chooser text happened never to contain must not start merging in the old language).

Measured on Mistral v1 + 20 MB of viwiki, 8k-piece Vietnamese BPE (bench/bench_tokenizer.py has the full table):
exact pruning alone gives 1.237 Vietnamese tokens/word with 56 of 1,997 held-out English news lines (ntrex) and 123
of 2,891 WikiText lines changed; with the guard at foreign_ratio 1: 1.331 and 0/0 (ratio 2: 1.318, 0/0; ratio 4:
1.282, 0/3). The thresholds were compared on those held-out lines, so the bench also reports a second English set.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Iterable

from cpt.tok.spm_extend import SPACE


def old_alphabet(lines: Iterable[str], min_freq: float) -> set[str]:
    """Characters with at least ``min_freq`` relative frequency in the old-language text (plus the space marker)."""
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line.lower())
    total = sum(counts.values()) or 1
    common = {c for c, n in counts.items() if n / total >= min_freq and not c.isspace()}
    # case-blind: 'X' is rare in English books but 'x' is not, and names start with capitals
    return common | {c.upper() for c in common if len(c.upper()) == 1} | {SPACE}


# Unicode blocks of the Latin script: a language that writes one letter of a block meets the rest of it in names and
# loanwords (English text has é and á, so it will meet ã in "São Paulo"); other scripts count as one block each.
_LATIN_BLOCKS = ((0x00, 0x7F), (0x80, 0xFF), (0x100, 0x17F), (0x180, 0x24F), (0x250, 0x2AF), (0x1E00, 0x1EFF))


def lower1(c: str) -> str:
    """``c.lower()`` when that is one character; else ``c`` ("İ".lower() is i + U+0307: two code points)."""
    low = c.lower()
    return low if len(low) == 1 else c


def block(c: str) -> str:
    o = ord(c)
    for lo, hi in _LATIN_BLOCKS:
        if lo <= o <= hi:
            return f"LATIN-{lo:04X}"
    return script(c)


def in_letters_of(old_lines: list[str]):
    """A test for text written only in letters of the Unicode blocks the old-language text uses ("São" passes for
    English, "Trần" does not): held-out text that fails it quotes a new language, whose pieces may fire there."""
    blocks = {block(lower1(c)) for line in old_lines for c in set(line) if c.isalpha()}
    memo: dict[str, bool] = {}

    def test(text: str) -> bool:
        for c in set(text):
            ok = memo.get(c)
            if ok is None:
                ok = memo[c] = not c.isalpha() or block(lower1(c)) in blocks
            if not ok:
                return False
        return True

    return test


def script(c: str) -> str:
    """The Unicode script of a letter, from its name: LATIN, GREEK, CJK, HIRAGANA, KATAKANA, HANGUL, ..."""
    try:
        return unicodedata.name(c).split(" ", 1)[0]
    except ValueError:
        return "UNKNOWN"


def skeleton(word: str) -> str:
    """Lower-cased, diacritics stripped (NFD minus combining marks; đ -> d)."""
    stripped = "".join(c for c in unicodedata.normalize("NFD", word) if not unicodedata.combining(c))
    return stripped.replace("đ", "d").replace("Đ", "D").lower()


_NON_WORD = re.compile(r"[^\w]+")


class Guard:
    """Built once from the old chooser text and the new training text; ``allows(piece)`` per candidate.

    Substring tests run on one joined string of unique words per side (``"\0▁word\0▁word..."``): a C-speed
    ``in``/``count`` per candidate instead of materialising every substring of every word."""

    def __init__(self, old_lines: list[str], new_text: dict[str, list[str]], *, min_freq: float = 1e-4,
                 foreign_ratio: float = 1.0, script_share: float = 0.01, distinct_only: bool = False,
                 mode: str = ""):
        self.alphabet = alphabet = old_alphabet(old_lines, min_freq)
        self.foreign_ratio = foreign_ratio
        # native | distinct (no piece spelled only in letters the old text meets) | lexicon (such pieces are
        # admitted here and judged by cpt.tok.lexicon against English word forms)
        self.mode = mode or ("distinct" if distinct_only else "native")
        self.lexicon: set[str] = set()  # pieces cpt.tok.lexicon found in English word forms (SentencePiece bases)
        old_scripts = {script(c) for c in alphabet if c.isalpha()}
        # Letters the new languages actually write with: a script that carries >= script_share of a language's
        # letters, and, in a script the old language shares (Latin for vi), only letters frequent in that
        # language. Keeps ạ/ằ/ỹ and every CJK/Hangul character; refuses α, β (formulas) and Î (French names).
        self.native_letters: set[str] = set()
        for lines in new_text.values():
            counts: Counter[str] = Counter()
            for line in lines:
                counts.update(c for c in line if c.isalpha())
            total = sum(counts.values()) or 1
            per_script: Counter[str] = Counter()
            for c, n in counts.items():
                per_script[script(c)] += n
            major = {s for s, n in per_script.items() if n / total >= script_share}
            self.native_letters |= {
                c for c, n in counts.items()
                if script(c) in major and (script(c) not in old_scripts or n / total >= min_freq)
            }
        # Letters the old language can meet: every letter of a block it writes at all. A piece spelled only in
        # those is "old-spelled" and must be vouched for, even with a rare letter ("ão" from bão fires on São).
        seen = {lower1(c) for line in old_lines for c in line if c.isalpha()}
        blocks = {block(c) for c in seen}
        self.possible = alphabet | {c for c in self.native_letters if block(lower1(c)) in blocks}
        self.rare = self.possible - alphabet
        old_words = {w: 1 for line in old_lines for w in line.split()}
        self.old_words = _joined(old_words.items())
        new_words: Counter[str] = Counter(
            _NON_WORD.sub("", w) for lines in new_text.values() for line in lines for w in line.lower().split())
        new_words.pop("", None)
        # native words carry a letter of the new language that the old one never meets (ư, ạ, ệ; not the ō of
        # pinyin or the é of French names, which would vouch for 'zh' or 'éon')
        self.distinct = self.native_letters - self.possible
        native: Counter[str] = Counter()
        for w, n in new_words.items():
            if any(c in self.distinct for c in w):
                native[skeleton(w)] += n
        foreign = {w: n for w, n in new_words.items()
                   if not any(c in self.distinct for c in w) and skeleton(w) not in native}
        # each word type repeated 1 + log2(count) times: ``str.count`` then weighs frequent words more (Singapore
        # x500 outweighs one stray 'singaporé') without the joined strings growing with the corpus
        self.native_words, self.foreign_words = _joined(native.items()), _joined(foreign.items())

    def old_spelled(self, piece: str) -> bool:
        """No letter the old language cannot meet (digits, punctuation and symbols are shared by every language)."""
        return all(c in self.possible for c in piece if c.isalpha())

    def allows(self, piece: str) -> bool:
        if not self.old_spelled(piece):
            # a letter the old language does not use: safe, if the new language really writes with it
            return all(c in self.alphabet or c in self.native_letters for c in piece if c.isalpha())
        if not any(c.isalpha() for c in piece) or self.mode == "distinct":
            return False  # punctuation/digits/symbols only: the base decides how those are spelled
        if not piece.startswith(SPACE) and any(c in self.rare for c in piece):
            return False  # a rare letter inside a word: names (Napoléon, São) are where the old language meets it
        if self.mode == "lexicon":  # refused if it would change an English word form (cpt.tok.lexicon)
            if piece in self.lexicon:
                return False
            # capitalised old-spelled pieces are names, and names cross languages (measured with the lexicon alone:
            # ▁Tsush, ▁Harth, ▁Khu of Khuzestan, ▁Kalen of Kalenjin fired on held-out English); inside a word an
            # old-spelled piece must also be the new language's own (amshire fired on Hexamshire); lower-case
            # word-initial pieces (▁trong, ▁khi) need only the lexicon
            if any(c.isupper() for c in piece):
                return False
            return piece.startswith(SPACE) or self._vouched(piece)
        if any(c.isupper() for c in piece) or piece in self.old_words:
            return False
        return self._vouched(piece)

    def _vouched(self, piece: str) -> bool:
        """Native new-language words vouch for it and foreign ones in the new text do not outweigh them."""
        native = self.native_words.count(skeleton(piece))
        return native > 0 and self.foreign_words.count(piece) <= self.foreign_ratio * native


def _joined(counted) -> str:
    return "\0" + "\0".join(
        "\0".join([SPACE + w] * (1 + int(math.log2(n)))) for w, n in sorted(counted)) + "\0"
