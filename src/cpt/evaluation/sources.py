"""What eval scores: every ``role: eval`` source (byte-budgeted prefixes) and the held-out training-distribution
documents per language (``heldout_<lang>``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from cpt.data.records import iter_docs, select_sources
from cpt.errors import ConfigError, DataError
from cpt.io import read_jsonl
from cpt.layout import Layout


@dataclass
class EvalSource:
    name: str
    lang: str
    domain: str
    origin: str  # "eval" (a role: eval source) or "heldout" (split off by the shards stage)
    texts: list[str]  # the documents scored (whole documents, within the budget)
    available: int  # documents before the budget
    truncated: int = 0  # 1 when the last document was cut to the byte budget


def prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` within ``max_bytes`` UTF-8 bytes, cut at a line (else a space) boundary when
    one lies in the second half; the scored bytes are then exactly this prefix's."""
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    for sep in ("\n", " "):
        cut = head.rfind(sep)
        if cut >= len(head) // 2:
            return head[:cut]
    return head


def budget(texts: list[str], max_docs: int | None, max_bytes: int | None) -> tuple[list[str], int]:
    """Documents in file order until ``max_docs`` or ``max_bytes``; returns (texts, documents cut). The document that
    crosses the byte budget contributes its prefix up to the budget (``prefix``), so every source is scored on about
    ``max_bytes`` whatever its document sizes (one WikiText article can be 30 KB, one Gutenberg book 1 MB)."""
    out, total = [], 0
    for text in texts:
        if max_docs is not None and len(out) >= max_docs:
            break
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            head = prefix(text, max_bytes - total)
            if head.strip():
                out.append(head)
                return out, 1
            break
        out.append(text)
        total += size
    return out, 0


def collect_sources(layout: Layout, cfg: dict) -> list[EvalSource]:
    try:
        infos = select_sources(layout.clean, role="eval")
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    wanted = cfg["sources"]
    if wanted is not None:
        known = {s.name for s in infos}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ConfigError(f"eval.sources: {unknown} are not role: eval sources in {layout.clean}; known: {sorted(known)}")
        infos = [s for s in infos if s.name in wanted]
    out = []
    for info in infos:
        texts = [d["text"] for d in iter_docs(layout.clean, role="eval", name=info.name) if d["text"].strip()]
        chosen, cut = budget(texts, cfg["max_docs"], cfg["max_bytes"])
        out.append(EvalSource(info.name, info.lang, info.domain, "eval", chosen, len(texts), cut))
    for name, (lang, domain, texts) in heldout_groups(layout, cfg).items():
        chosen, cut = budget(texts, cfg["max_docs"], cfg["max_bytes"])
        out.append(EvalSource(name, lang, domain, "heldout", chosen, len(texts), cut))
    out = [s for s in out if s.texts]
    if not out:
        raise DataError(f"{layout.clean}: no role: eval documents and no held-out documents to evaluate")
    return out


def heldout_groups(layout: Layout, cfg: dict) -> dict[str, tuple[str, str, list[str]]]:
    """``heldout_<lang>`` -> (lang, domain, texts) from the shards stage's held-out records."""
    if not cfg["heldout"]:
        return {}
    path = layout.resolve(cfg["heldout"])
    if not path.exists():
        raise DataError(f"{path}: held-out documents not found; run `cpt shards` first (or set eval.heldout: null)")
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in read_jsonl(path):
        if row.get("role", "train") != "train":
            raise DataError(f"{path}: record {row.get('id')!r} has role {row.get('role')!r}; held-out must be train")
        if row.get("text", "").strip():
            groups[(row.get("lang", "und"), row.get("domain", "new"))].append(row["text"])
    langs = defaultdict(int)
    for lang, _ in groups:
        langs[lang] += 1
    return {
        (f"heldout_{lang}" if langs[lang] == 1 else f"heldout_{lang}_{domain}"): (lang, domain, texts)
        for (lang, domain), texts in sorted(groups.items())
    }
