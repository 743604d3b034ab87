"""Per-language quality filters and the Unicode-script check.

Script detection is by Unicode ranges, not a language-ID model: datatrove's fastText LanguageFilter downloads a model
at run time (fails offline) and the question we ask is simpler anyway — "is this 'vi' document mostly Latin letters
with Vietnamese diacritics, this 'ko' one mostly Hangul?". Written by hand because it is measurably cheap this way:
a document's code points become one uint32 array (``str.encode('utf-32')``), a 1.1 M-entry class table maps them to
classes in one numpy gather, and ``bincount`` gives every ratio the filters need in one pass (no per-character
Python loop).

Filters (thresholds per language, ``clean.filters`` in params.yaml; the first that fails names the drop reason):
``min_chars``/``max_chars`` length bounds, ``max_digit_ratio`` and ``max_symbol_ratio`` (of non-space characters:
tables, lists of numbers, markup debris), ``max_dup_line_ratio`` (Gopher-style repeated lines: boilerplate, menus),
``min_script_ratio`` (letters in the language's script(s) / all letters), and for vi ``min_vi_letter_ratio``
(Vietnamese-specific letters / Latin letters: a "vi" document in plain English fails it), for ja
``min_kana_ratio`` (kana / CJK letters: Chinese text labelled ja fails it).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

# character classes
OTHER, SPACE, DIGIT, LATIN, LATIN_VI, HAN, HIRAGANA, KATAKANA, HANGUL, OTHER_LETTER, CONTROL, MARK = range(12)
N_CLASSES = 12
CLASS_NAMES = ("other", "space", "digit", "latin", "latin_vi", "han", "hiragana", "katakana", "hangul",
               "other_letter", "control", "mark")

# Letters that only Vietnamese (among the languages here) writes: tone-marked vowels, ă â ê ô ơ ư đ.
VI_LETTERS = (
    "àáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵđ"
)

# Which classes count as "the language's script" (unknown languages skip the script check).
LANG_SCRIPTS: dict[str, tuple[int, ...]] = {
    "vi": (LATIN, LATIN_VI),
    "en": (LATIN, LATIN_VI),
    "fr": (LATIN, LATIN_VI), "de": (LATIN, LATIN_VI), "es": (LATIN, LATIN_VI), "id": (LATIN, LATIN_VI),
    "zh": (HAN,),
    "ja": (HAN, HIRAGANA, KATAKANA),
    "ko": (HANGUL,),  # hanja in academic Korean is rare; a Han-majority "ko" text is Chinese
}

_LETTER_CLASSES = (LATIN, LATIN_VI, HAN, HIRAGANA, KATAKANA, HANGUL, OTHER_LETTER)


@lru_cache(maxsize=1)
def class_table() -> np.ndarray:
    """Class of every code point (built once per process, ~0.3 s)."""
    table = np.full(0x110000, OTHER, dtype=np.uint8)
    for cp in range(0x30000):  # BMP + SMP + SIP: every script we care about, and Han extensions B-F
        ch = chr(cp)
        cat = unicodedata.category(ch)
        c0 = cat[0]
        if c0 == "L":
            if 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF or cp >= 0x20000:
                table[cp] = HAN
            elif 0x3040 <= cp <= 0x309F:
                table[cp] = HIRAGANA
            elif 0x30A0 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF or 0xFF66 <= cp <= 0xFF9F:
                table[cp] = KATAKANA
            elif 0xAC00 <= cp <= 0xD7AF or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F:
                table[cp] = HANGUL
            elif "LATIN" in unicodedata.name(ch, ""):
                table[cp] = LATIN_VI if ch.lower() in VI_LETTERS else LATIN
            else:
                table[cp] = OTHER_LETTER
        elif c0 == "N":
            table[cp] = DIGIT
        elif c0 == "Z" or ch in "\t\n\r":
            table[cp] = SPACE
        elif c0 == "M":
            table[cp] = MARK
        elif cat in ("Cc", "Cf"):
            table[cp] = CONTROL
    table[0x3005] = HAN  # 々 (iteration mark, category Lm) reads as Han
    table[0x30FC] = KATAKANA  # ー (prolonged sound mark)
    return table


@lru_cache(maxsize=1)
def word_char_table() -> tuple[np.ndarray, np.ndarray]:
    """(is word character, is digit) per code point: letters and digits, like the regex class [^\\W_]."""
    table = class_table()
    word = np.isin(table, np.array(_LETTER_CLASSES + (DIGIT,), dtype=np.uint8))
    return word, table == DIGIT


def char_classes(text: str) -> np.ndarray:
    """Counts per class for one text."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.bincount(class_table()[cps], minlength=N_CLASSES)


@dataclass(frozen=True)
class DocStats:
    chars: int
    letters: int
    counts: np.ndarray

    def ratio(self, classes: tuple[int, ...], of: tuple[int, ...] | None = None) -> float:
        num = int(sum(self.counts[c] for c in classes))
        den = self.letters if of is None else int(sum(self.counts[c] for c in of))
        return num / den if den else 0.0


def doc_stats(text: str) -> DocStats:
    counts = char_classes(text)
    return DocStats(chars=len(text), letters=int(sum(counts[c] for c in _LETTER_CLASSES)), counts=counts)


def script_ratio(text: str, lang: str) -> float | None:
    """Letters in ``lang``'s script(s) / all letters; None for a language without a script rule."""
    scripts = LANG_SCRIPTS.get(lang)
    if scripts is None:
        return None
    return doc_stats(text).ratio(scripts)


def dup_line_ratio(text: str) -> float:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


DEFAULT_FILTERS: dict[str, dict[str, Any]] = {
    "default": {
        "min_chars": 200, "max_chars": 20_000_000, "max_digit_ratio": 0.25, "max_symbol_ratio": 0.25,
        "max_dup_line_ratio": 0.3, "min_script_ratio": 0.8,
    },
    "vi": {"min_chars": 100, "min_vi_letter_ratio": 0.05},
    "zh": {"min_chars": 60, "min_script_ratio": 0.6},
    "ja": {"min_chars": 60, "min_script_ratio": 0.7, "min_kana_ratio": 0.05},
    "ko": {"min_chars": 100},
}
FILTER_KEYS = set(DEFAULT_FILTERS["default"]) | {"min_vi_letter_ratio", "min_kana_ratio"}


def thresholds(filters: dict[str, dict[str, Any]], lang: str) -> dict[str, Any]:
    """Effective thresholds for ``lang``: defaults, then ``filters.default``, then ``filters.<lang>``."""
    out = {**DEFAULT_FILTERS["default"], **DEFAULT_FILTERS.get(lang, {})}
    out.update(filters.get("default") or {})
    out.update(filters.get(lang) or {})
    return {k: v for k, v in out.items() if v is not None}


def check(text: str, lang: str, th: dict[str, Any]) -> tuple[str, str] | None:
    """None if the document passes, else (filter name, detail with the measured value)."""
    n = len(text)
    if "min_chars" in th and n < th["min_chars"]:
        return "min_chars", f"{n} chars < {th['min_chars']}"
    if "max_chars" in th and n > th["max_chars"]:
        return "max_chars", f"{n} chars > {th['max_chars']}"
    st = doc_stats(text)
    nonspace = max(1, n - int(st.counts[SPACE]))
    digit = int(st.counts[DIGIT]) / nonspace
    if "max_digit_ratio" in th and digit > th["max_digit_ratio"]:
        return "max_digit_ratio", f"digits {digit:.3f} > {th['max_digit_ratio']}"
    symbol = int(st.counts[OTHER] + st.counts[CONTROL]) / nonspace
    if "max_symbol_ratio" in th and symbol > th["max_symbol_ratio"]:
        return "max_symbol_ratio", f"symbols {symbol:.3f} > {th['max_symbol_ratio']}"
    if "max_dup_line_ratio" in th:
        dup = dup_line_ratio(text)
        if dup > th["max_dup_line_ratio"]:
            return "max_dup_line_ratio", f"repeated lines {dup:.3f} > {th['max_dup_line_ratio']}"
    scripts = LANG_SCRIPTS.get(lang)
    if scripts is not None and "min_script_ratio" in th:
        r = st.ratio(scripts)
        if r < th["min_script_ratio"]:
            top = CLASS_NAMES[max(_LETTER_CLASSES, key=lambda c: st.counts[c])]
            return "script", f"{lang} script ratio {r:.3f} < {th['min_script_ratio']} (mostly {top})"
    if lang == "vi" and "min_vi_letter_ratio" in th:
        r = st.ratio((LATIN_VI,), of=(LATIN, LATIN_VI))
        if r < th["min_vi_letter_ratio"]:
            return "script", f"Vietnamese letters {r:.3f} of Latin < {th['min_vi_letter_ratio']}"
    if lang == "ja" and "min_kana_ratio" in th:
        r = st.ratio((HIRAGANA, KATAKANA), of=(HAN, HIRAGANA, KATAKANA))
        if r < th["min_kana_ratio"]:
            return "script", f"kana {r:.3f} of CJK letters < {th['min_kana_ratio']}"
    return None
