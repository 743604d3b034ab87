"""What eval scores: every ``role: eval`` source and the held-out training-distribution documents per language
(``heldout_<lang>``), each cut into units of at most ``eval.unit_bytes`` and sampled (seeded, spread over the whole
source) up to ``eval.max_bytes``. Units are what the models score; each remembers its document, and whole
documents are what the bootstrap resamples (``cpt.evaluation.uncertainty``)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

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
    texts: list[str]  # the units scored (documents cut at line ends into <= eval.unit_bytes pieces, sampled)
    available: int  # units before the budget
    truncated: int = 0  # kept for the report's columns: units are never cut (always 0)
    docs: list[int] = field(default_factory=list)  # per unit: index of its document in the source (bootstrap cluster)

    def __post_init__(self) -> None:
        if not self.docs:
            self.docs = list(range(len(self.texts)))  # no document labels given: every unit is its own document
        if len(self.docs) != len(self.texts):
            raise ValueError(f"{self.name}: {len(self.docs)} document labels for {len(self.texts)} units")

    @property
    def documents(self) -> int:
        return len(set(self.docs))


def units(text: str, unit_bytes: int | None) -> list[str]:
    """``text`` cut into pieces of at most ``unit_bytes`` UTF-8 bytes: at line ends, a longer line at its last space
    before the limit (else at a character), each piece keeping its separators so the pieces add up to the text. The
    scoring and resampling unit of eval: a Gutenberg book or a 30 KB WikiText article becomes many units, so an
    interval can be measured on it."""
    if not unit_bytes or len(text.encode("utf-8")) <= unit_bytes:
        return [text]
    out, cur, size = [], [], 0
    for line in _pieces(text, unit_bytes):
        n = len(line.encode("utf-8"))
        if cur and size + n > unit_bytes:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += n
    if cur:
        out.append("".join(cur))
    return out


def _pieces(text: str, unit_bytes: int):
    """Lines (with their newline), a line longer than ``unit_bytes`` cut after a space (else anywhere) below it."""
    for line in text.splitlines(keepends=True):
        while len(line.encode("utf-8")) > unit_bytes:
            head = line.encode("utf-8")[:unit_bytes].decode("utf-8", errors="ignore")
            # at least one character: a budget smaller than one character (unit_bytes 1-3 before a 4-byte
            # character) used to cut nothing and loop forever
            cut = head.rfind(" ") + 1 or len(head) or 1
            yield line[:cut]
            line = line[cut:]
        if line:
            yield line


def budget(texts: list[str], max_docs: int | None, max_bytes: int | None, *, unit_bytes: int | None = None,
           seed: int = 0, name: str = "") -> tuple[list[str], int]:
    """``budget_units`` without the document labels: (texts, units available)."""
    chosen, _, pool = budget_units(texts, max_docs, max_bytes, unit_bytes=unit_bytes, seed=seed, name=name)
    return chosen, pool


def budget_units(texts: list[str], max_docs: int | None, max_bytes: int | None, *, unit_bytes: int | None = None,
                 seed: int = 0, name: str = "") -> tuple[list[str], list[int], int]:
    """A seeded uniform sample of units (``units``) within ``max_docs`` units and ``max_bytes`` bytes, in corpus
    order; returns (texts, the index in ``texts`` of each one's document, units available). Spread over the whole
    source instead of its first documents, so the budget measures the source (heldout_en used to be a 19.5 KB prefix
    of one book) and the bootstrap resamples documents that are representative of it. Deterministic for a fixed
    seed and source name."""
    pool = [(u, d) for d, t in enumerate(texts) for u in units(t, unit_bytes) if u.strip()]
    key = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
    order = np.random.default_rng([int(seed), key]).permutation(len(pool))
    chosen, total = [], 0
    for i in order:
        size = len(pool[i][0].encode("utf-8"))
        if max_docs is not None and len(chosen) >= max_docs:
            break
        if max_bytes is not None and total + size > max_bytes:
            if chosen:
                break
            continue  # a first unit bigger than the whole budget: try the next one
        chosen.append(int(i))
        total += size
    chosen.sort()
    return [pool[i][0] for i in chosen], [pool[i][1] for i in chosen], len(pool)


def _max_bytes(cfg: dict, domain: str) -> int | None:
    """Old-domain sources get their own, larger budget: forgetting is a few hundredths of a bit per byte and its
    interval must be narrower than ``gate.max_forgetting``; a new language's gain is whole bits and needs less text."""
    if domain == "old" and cfg.get("max_bytes_old"):
        return cfg["max_bytes_old"]
    return cfg["max_bytes"]


def collect_sources(layout: Layout, cfg: dict, seed: int = 0) -> list[EvalSource]:
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
        chosen, docs, pool = budget_units(texts, cfg["max_docs"], _max_bytes(cfg, info.domain),
                                          unit_bytes=cfg["unit_bytes"], seed=seed, name=info.name)
        out.append(EvalSource(info.name, info.lang, info.domain, "eval", chosen, pool, docs=docs))
    for name, (lang, domain, texts) in heldout_groups(layout, cfg).items():
        chosen, docs, pool = budget_units(texts, cfg["max_docs"], _max_bytes(cfg, domain),
                                          unit_bytes=cfg["unit_bytes"], seed=seed, name=name)
        out.append(EvalSource(name, lang, domain, "heldout", chosen, pool, docs=docs))
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
