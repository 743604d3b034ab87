"""Text normalisation for every document (train and eval): Unicode NFC, control characters, whitespace, MediaWiki
remnants.

Why NFC first: Vietnamese arrives in NFD (base letter + combining tone marks) and in mixed forms; the same word in
two forms would be two tokens to the tokenizer and two texts to dedup. After ``normalize``, NFD and NFC inputs of the
same text are byte-identical.

MediaWiki: plain-text dumps (viwiki) keep section headings (``== Tham khảo ==``) and the reference / external-link
lists under them. Content headings become plain title lines (the text under them is real prose); reference-like
sections are dropped with their content, up to the next heading of the same or a higher level.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable

# C0/C1 controls except \t \n (\r is handled as a newline first), plus invisible format characters that only
# fragment words: zero-width space, LRM/RLM, word joiner, BOM, soft hyphen.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u200e\u200f\u2060\ufeff]")
# Two cheap passes instead of one "[ \t...]+" rewrite of every single space (~5x faster on viwiki): other horizontal
# spaces become " ", then runs of 2+ spaces collapse.
_OTHER_SPACES = re.compile("[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUNS = re.compile("  +")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_HEADING = re.compile(r"^[ \t]*(={2,6})[ \t]*([^=\n](?:.*?[^=\n])?)[ \t]*\1[ \t]*$", re.M)

# Section titles whose content is references, link lists or galleries, not prose (casefolded, compared exactly).
DEFAULT_DROP_SECTIONS: tuple[str, ...] = (
    # vi
    "tham khảo", "chú thích", "liên kết ngoài", "liên kết", "xem thêm", "đọc thêm", "ghi chú", "nguồn",
    "thư mục", "hình ảnh", "thư viện ảnh", "tài liệu tham khảo", "nguồn tham khảo", "chú giải",
    # en
    "references", "external links", "see also", "notes", "further reading", "bibliography", "sources",
    "citations", "gallery", "footnotes",
    # zh / ja / ko
    "参考文献", "外部链接", "外部連結", "参见", "參見", "注释", "註釋", "脚注", "関連項目", "外部リンク",
    "각주", "참고 문헌", "외부 링크", "같이 보기",
)


def nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def normalize_whitespace(text: str) -> str:
    """Newlines to \\n, controls removed, runs of spaces to one, no spaces at line edges, at most one blank line."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _OTHER_SPACES.sub(" ", text)
    text = _SPACE_RUNS.sub(" ", text)
    if " \n" in text or "\n " in text:  # substring tests are memchr-fast; most documents need neither rewrite
        text = "\n".join(line.strip(" ") for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def strip_wiki_sections(text: str, drop_sections: Iterable[str] = DEFAULT_DROP_SECTIONS) -> str:
    """Headings -> title lines; reference-like sections removed with their content."""
    if "==" not in text:
        return text
    drop = {s.casefold() for s in drop_sections}
    out: list[str] = []
    pos = 0
    skip_level = 0  # >0 while inside a dropped section of that level
    for m in _HEADING.finditer(text):
        if not skip_level:
            out.append(text[pos:m.start()])
        level, title = len(m.group(1)), m.group(2).strip()
        if skip_level and level > skip_level:
            pos = m.end()
            continue  # a subsection of a dropped section
        skip_level = 0
        if title.casefold() in drop:
            skip_level = level
        else:
            out.append(title)
        pos = m.end()
    if not skip_level:
        out.append(text[pos:])
    return "".join(out)


def normalize(text: str, *, wiki: bool = True, drop_sections: Iterable[str] = DEFAULT_DROP_SECTIONS) -> str:
    """The full normalisation every document gets (idempotent: normalize(normalize(x)) == normalize(x))."""
    text = nfc(text)
    if wiki:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = strip_wiki_sections(text, drop_sections)
    return normalize_whitespace(text)


def text_hash(text: str) -> str:
    """The exact-duplicate key of a normalised text (also used by validate's uniqueness and eval/train checks)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
