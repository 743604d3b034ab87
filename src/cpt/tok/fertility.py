"""How well a tokenizer fits a language, and whether an extension left the old language alone.

- tokens per word: whitespace words for alphabetic languages; for zh/ja (no spaces) tokens per CHARACTER, so the
  number still means "units of meaning per token" and stays comparable between base and extended tokenizer.
- chars per token: the tokenizer-independent view (higher is better).
- ``changed_lines``: old-language lines whose token ids differ between base and extended tokenizer. The extension's
  whole promise is 0 on held-out text.
- ``roundtrip_failures``: lines where decode(encode(x)) != x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Encode = Callable[[list[str]], list[list[int]]]
Decode = Callable[[list[int]], str]

CHAR_LANGS = frozenset({"zh", "ja"})


def word_count(text: str, lang: str) -> int:
    if lang in CHAR_LANGS:
        return sum(1 for c in text if not c.isspace())
    return len(text.split())


@dataclass
class Fertility:
    lines: int
    words: int
    chars: int
    tokens: int

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words if self.words else float("nan")

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else float("nan")


def fertility(lines: Sequence[str], lang: str, encode: Encode) -> Fertility:
    ids = encode(list(lines))
    return Fertility(
        lines=len(lines),
        words=sum(word_count(t, lang) for t in lines),
        chars=sum(len(t) for t in lines),
        tokens=sum(len(x) for x in ids),
    )


def changed_lines(lines: Sequence[str], base: Encode, new: Encode) -> list[int]:
    """Indices of lines that the two tokenizers encode differently."""
    a, b = base(list(lines)), new(list(lines))
    return [i for i, (x, y) in enumerate(zip(a, b)) if list(x) != list(y)]


def roundtrip_failures(lines: Sequence[str], encode: Encode, decode: Decode) -> list[int]:
    ids = encode(list(lines))
    return [i for i, (t, x) in enumerate(zip(lines, ids)) if decode(list(x)) != t]


def table(rows: dict[str, dict[str, float]]) -> str:
    """The markdown fertility table for reports/fertility.md."""
    head = (
        "| language | eval lines | words (zh/ja: chars) | tokens/word base | tokens/word extended | gain "
        "| chars/token base | chars/token extended |\n|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for lang, r in rows.items():
        gain = r["tokens_per_word_base"] / r["tokens_per_word"] if r["tokens_per_word"] else float("nan")
        body.append(
            f"| {lang} | {r['lines']} | {r['words']} | {r['tokens_per_word_base']:.3f} | {r['tokens_per_word']:.3f} "
            f"| {gain:.2f}x | {r['chars_per_token_base']:.3f} | {r['chars_per_token']:.3f} |"
        )
    return head + "\n".join(body) + "\n"
