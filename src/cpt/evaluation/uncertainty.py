"""95% intervals for bits-per-byte differences: a seeded, paired, stratified bootstrap over whole documents.

A gain or a forgetting figure is a difference of two ratios (summed NLL / summed bytes) measured on a sample of
documents; how much it would move on another sample of the same kind of text is what the gate must know before it
trusts the figure. Documents are scored in units (``eval.unit_bytes`` pieces, ``cpt.evaluation.sources``), but the
units of one document are not independent: 53 pieces of two books are two observations, not 53 (two books that
forget +0.150 and +0.015 give [+0.065, +0.103] when their pieces are resampled, [+0.015, +0.153] when the books
are). So whole documents (clusters of units) are resampled with replacement, the SAME resample for both models
(paired: the models' errors on a document are correlated, and pairing cancels what the two share), independently
within each source (stratified: a language pooled over sources keeps each source's share). Percentile interval of
``resamples`` draws; deterministic for a fixed seed. ``compare`` is the whole recipe as one reusable call (eval's
base-vs-cpt, the gate's champion-vs-candidate, sft, merge).

    delta = bpb(base) - bpb(candidate)       # one sign everywhere: positive = the candidate is better
    gain = delta on new-domain text;  forgetting = -delta on old-domain text (positive = forgot)

numpy only: ``counts (R, n) @ per-document sums`` is the whole resample, milliseconds for 1,000 x 1,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

LN2 = math.log(2.0)


@dataclass
class Paired:
    """Per-document NLL (nats) of the reference and the candidate on the same documents, and their UTF-8 bytes."""

    ref: np.ndarray
    cand: np.ndarray
    nbytes: np.ndarray

    def __post_init__(self) -> None:
        self.ref = np.asarray(self.ref, dtype=np.float64)
        self.cand = np.asarray(self.cand, dtype=np.float64)
        self.nbytes = np.asarray(self.nbytes, dtype=np.float64)
        if not self.ref.shape == self.cand.shape == self.nbytes.shape:
            raise ValueError("paired scores need the same documents on both sides")

    @property
    def delta(self) -> float:
        """bpb(ref) - bpb(cand) on all documents."""
        total = self.nbytes.sum()
        return float((self.ref.sum() - self.cand.sum()) / (LN2 * total)) if total else float("nan")


def _draw(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) counts: how often each document is drawn in each resample."""
    if n == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bootstrap(groups: dict[str, Paired], *, resamples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Resampled sums per group: ``{name: (resamples, 3) [ref NLL, cand NLL, bytes]}``. Each group (a source) is
    resampled on its own stream, seeded by (seed, group name), so adding a source never moves another's draws."""
    out = {}
    for name, p in groups.items():
        key = int.from_bytes(name.encode("utf-8")[:16].ljust(16, b"\0"), "little")
        rng = np.random.default_rng([int(seed), key % (2**63), len(name)])
        counts = _draw(len(p.ref), resamples, rng)
        out[name] = np.stack([counts @ p.ref, counts @ p.cand, counts @ p.nbytes], axis=1)
    return out


def interval(draws: Iterable[np.ndarray], level: float = 0.95, units: int | None = None) -> list[float] | None:
    """Percentile interval of ``bpb(ref) - bpb(cand)`` over the summed draws of some groups (a source, or all the
    sources of a language); None when there is nothing to resample, or fewer than 2 ``units`` (the resampled items:
    documents; one document resampled is always itself, a zero-width interval that would claim certainty)."""
    draws = list(draws)
    if not draws or (units is not None and units < 2):
        return None
    total = np.sum(draws, axis=0)
    ok = total[:, 2] > 0
    if not ok.any():
        return None
    delta = (total[ok, 0] - total[ok, 1]) / (LN2 * total[ok, 2])
    lo, hi = np.quantile(delta, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [round(float(lo), 6), round(float(hi), 6)]


def negate(ci: list[float] | None) -> list[float] | None:
    """The interval of ``-x`` (gain -> forgetting sign)."""
    return None if ci is None else [-ci[1], -ci[0]]


def by_document(p: Paired, doc: Sequence[Hashable]) -> Paired:
    """Units summed into their documents (first-seen order): what ``bootstrap`` must resample."""
    if len(doc) != len(p.ref):
        raise ValueError(f"{len(doc)} document labels for {len(p.ref)} units")
    keys: dict[Hashable, int] = {}
    index = np.fromiter((keys.setdefault(d, len(keys)) for d in doc), dtype=np.int64, count=len(doc))
    n = len(keys)
    return Paired(np.bincount(index, p.ref, n), np.bincount(index, p.cand, n), np.bincount(index, p.nbytes, n))


def compare(ref_nll: Sequence[float], cand_nll: Sequence[float], nbytes: Sequence[float],
            doc: Sequence[Hashable], source: Sequence[str], *, lang: Mapping[str, str],
            pools: Mapping[str, Sequence[str]] | None = None, resamples: int = 1000, seed: int = 0,
            level: float = 0.95) -> dict[str, Any]:
    """Two models on the same scored units, compared source by source and pooled (by language), with intervals.

    Inputs, one entry per unit: the reference's and the candidate's NLL (nats), the unit's UTF-8 bytes, its document
    (any hashable label, unique within its source) and its source; ``lang``: source -> language. ``pools``: name ->
    sources to pool (default: one pool per language, over all of that language's sources).

    Returns ``{"sources": {name: row}, "pools": {name: row}, "bootstrap": {...}}`` with, in every row, ``units``,
    ``documents``, ``bytes``, ``ref_bpb``, ``cand_bpb``, ``delta`` (= bpb(ref) - bpb(cand): > 0, the candidate is
    better) and ``ci95`` (the paired, document-level, source-stratified percentile interval of ``delta``; None with
    fewer than 2 documents); source rows also carry ``lang``, pool rows ``sources``. Gain is ``delta``, forgetting
    ``-delta`` (``negate`` the interval)."""
    ref, cand, nb = (np.asarray(x, dtype=np.float64) for x in (ref_nll, cand_nll, nbytes))
    source = np.asarray(source, dtype=object)
    if not len(ref) == len(cand) == len(nb) == len(doc) == len(source):
        raise ValueError("compare: every per-unit input needs one entry per unit")
    names = list(dict.fromkeys(source.tolist()))
    unknown = [n for n in names if n not in lang]
    if unknown:
        raise ValueError(f"compare: no language for sources {unknown}")
    units, docs = {}, {}
    for name in names:
        mask = source == name
        units[name] = Paired(ref[mask], cand[mask], nb[mask])
        docs[name] = by_document(units[name], [d for d, m in zip(doc, mask) if m])
    draws = bootstrap(docs, resamples=resamples, seed=seed)
    if pools is None:
        pools = {}
        for name in names:
            pools.setdefault(lang[name], []).append(name)  # type: ignore[union-attr]

    def row(members: Sequence[str]) -> dict[str, Any]:
        n_docs = sum(len(docs[m].ref) for m in members)
        r, c, b = (sum(float(getattr(units[m], k).sum()) for m in members) for k in ("ref", "cand", "nbytes"))
        return {"units": sum(len(units[m].ref) for m in members), "documents": n_docs, "bytes": int(b),
                "ref_bpb": round(r / (LN2 * b), 6) if b else None, "cand_bpb": round(c / (LN2 * b), 6) if b else None,
                "delta": round((r - c) / (LN2 * b), 6) if b else None,
                "ci95": interval([draws[m] for m in members], level, units=n_docs)}

    return {
        "sources": {n: {"lang": lang[n], **row([n])} for n in names},
        "pools": {p: {"sources": list(m), **row([x for x in m if x in units])} for p, m in pools.items()
                  if any(x in units for x in m)},
        "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "paired": True, "strata": "source",
                      "unit": "document"},
    }
