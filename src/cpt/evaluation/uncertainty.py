"""95% intervals for bits-per-byte differences: a seeded, paired, stratified bootstrap over documents.

A gain or a forgetting figure is a difference of two ratios (summed NLL / summed bytes) measured on a sample of
documents; how much it would move on another sample of the same kind of text is what the gate must know before it
trusts the figure. The documents (scoring units, see ``cpt.evaluation.select``) are resampled with replacement,
the SAME resample for both models (paired: the models' errors on a document are correlated, and pairing cancels
what the two share), independently within each source (stratified: a language pooled over sources keeps each
source's share). Percentile interval of ``resamples`` draws; deterministic for a fixed seed.

    delta = bpb(base) - bpb(candidate)       # one sign everywhere: positive = the candidate is better
    gain = delta on new-domain text;  forgetting = -delta on old-domain text (positive = forgot)

numpy only: ``counts (R, n) @ per-document sums`` is the whole resample, milliseconds for 1,000 x 1,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

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
    sources of a language); None when there is nothing to resample, or fewer than 2 ``units`` (one document
    resampled is always itself: a zero-width interval that would claim certainty)."""
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
