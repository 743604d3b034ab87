"""The sft gate's numbers with their 95% intervals: per-unit scores of the CPT and the SFT model, paired bootstrap.

The gate (``cpt.ops.gate`` / ``cpt.ops.verdict``) decides on interval bounds, not on point estimates, so every figure
it reads must come with the interval ``cpt.evaluation.uncertainty`` draws. The units resampled:

* assistant-token bits per byte: one held-out conversation (all its assistant tokens, the UTF-8 bytes behind them);
  ``PackedSplit.spans`` says where each conversation sits in the packed rows;
* plain-text bits per byte: one document of eval's sources (the sum of its scored ``unit_bytes`` pieces), exactly
  as the eval stage scores and resamples them (``Score.doc_nll`` / ``doc_bytes``, ``EvalSource.docs``).

Paired (the same draws for both models), stratified by group (one held-out language's conversations, or one plain
source), seeded by the run's seed: the same run gives the same intervals. Sign as eval.json:
``gain = bpb(cpt) - bpb(sft)`` (> 0: tuning helped), ``forgetting = bpb(sft) - bpb(cpt)`` (> 0: tuning cost bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cpt.device import autocast
from cpt.evaluation.uncertainty import LN2, Paired, bootstrap, by_document, interval, negate
from cpt.sft.packing import PackedSplit, to_device
from cpt.training.loss import CausalLMLoss


@torch.no_grad()
def conversation_nll(lm, split: PackedSplit, micro_batch: int, loss_chunk: int = 4096) -> np.ndarray:
    """NLL (nats) of each held-out conversation's assistant tokens, in ``split.spans`` order. ``lm`` is a
    ``cpt.evaluation.models.LoadedModel``; the loss is train's own (``CausalLMLoss``, position ids reset per
    conversation), so its sum over all conversations is what the training curve's held-out score sums."""
    core = CausalLMLoss(lm.model, chunk_size=loss_chunk)
    out = np.zeros(len(split.spans), dtype=np.float64)
    rows = split.spans[:, 0]
    for lo in range(0, split.n_blocks, micro_batch):
        hi = min(lo + micro_batch, split.n_blocks)
        inputs, targets, positions = to_device(split.rows(range(lo, hi)), lm.device)
        with autocast(lm.device, lm.amp_dtype):
            _, losses = core(inputs, targets, positions)
        losses = losses.double().cpu().numpy()
        for k in np.flatnonzero((rows >= lo) & (rows < hi)):
            r, start, end, _ = split.spans[k]
            out[k] = losses[r - lo, start:end].sum()
    return out


@dataclass
class Group:
    """One resampled stratum: a held-out language's conversations ("assistant") or one plain-text source."""

    name: str
    lang: str
    domain: str  # "new" | "old"
    kind: str  # "assistant" | "plain"
    paired: Paired  # ref = the CPT model, cand = the SFT model
    docs: list | None = None  # per unit: its document (plain text); None: every unit is its own (conversations)

    @property
    def resampled(self) -> Paired:
        """What the bootstrap draws: whole documents."""
        return self.paired if self.docs is None else by_document(self.paired, self.docs)

    def bpb(self, side: str) -> float:
        nll = self.paired.ref if side == "ref" else self.paired.cand
        total = self.paired.nbytes.sum()
        return float(nll.sum() / (LN2 * total)) if total else float("nan")


def _pooled(groups: list[Group], draws: dict[str, np.ndarray], metric: str) -> tuple[float | None, list | None]:
    """(value, 95% interval) of ``metric`` ("gain" | "forgetting") pooled over ``groups`` (summed NLL and bytes)."""
    ref = sum(float(g.paired.ref.sum()) for g in groups)
    cand = sum(float(g.paired.cand.sum()) for g in groups)
    nbytes = sum(float(g.paired.nbytes.sum()) for g in groups)
    if not nbytes:
        return None, None
    delta = (ref - cand) / (LN2 * nbytes)
    ci = interval([draws[g.name] for g in groups], units=sum(len(g.resampled.ref) for g in groups))
    return (round(delta, 6), ci) if metric == "gain" else (round(-delta, 6), negate(ci))


def summarize(groups: list[Group], *, resamples: int = 1000, seed: int = 0) -> dict:
    """What metrics/sft.json reports and what the gate reads.

    Report (every language): ``gain`` / ``gain_ci95`` on held-out assistant tokens, ``forgetting`` /
    ``forgetting_ci95`` on all plain-text sources of the language, ``sources`` per group. ``gate``: the subset the
    gate decides on, as eval.json has it: gain of new-domain languages (assistant tokens), forgetting of old-domain
    plain text (per language over its old-domain sources)."""
    draws = bootstrap({g.name: g.resampled for g in groups}, resamples=resamples, seed=seed)
    out: dict = {"sources": {}, "gain": {}, "gain_ci95": {}, "forgetting": {}, "forgetting_ci95": {},
                 "gate": {"gain": {}, "gain_ci95": {}, "forgetting": {}, "forgetting_ci95": {}}}
    for g in groups:
        metric = "gain" if g.kind == "assistant" else "forgetting"
        value, ci = _pooled([g], draws, metric)
        out["sources"][g.name] = {"lang": g.lang, "domain": g.domain, "kind": g.kind, "units": len(g.paired.ref),
                                  "documents": len(g.resampled.ref),
                                  "bytes": int(g.paired.nbytes.sum()), "cpt_bpb": round(g.bpb("ref"), 6),
                                  "sft_bpb": round(g.bpb("cand"), 6), metric: value, f"{metric}_ci95": ci}
    for lang in sorted({g.lang for g in groups}):
        for metric, kind, gate_domain in (("gain", "assistant", "new"), ("forgetting", "plain", "old")):
            mine = [g for g in groups if g.lang == lang and g.kind == kind]
            if mine:
                out[metric][lang], out[f"{metric}_ci95"][lang] = _pooled(mine, draws, metric)
            gated = [g for g in mine if g.domain == gate_domain]
            if gated:
                out["gate"][metric][lang], out["gate"][f"{metric}_ci95"][lang] = _pooled(gated, draws, metric)
    out["bootstrap"] = {"resamples": resamples, "seed": seed, "level": 0.95, "paired": True, "strata": "group",
                        "unit": "document", "documents": "a held-out conversation (assistant tokens); a document of "
                        "the plain-text sources (its scored units resampled together)"}
    return out


def gate_inputs(summary: dict, groups: list[Group]) -> dict:
    """The eval-metrics shape ``cpt.ops.gate.decide`` reads (the CPT model as ``base``, the SFT model as ``cpt``):
    per-source bpb blocks and ``sources.<name>.{gain,forgetting}_ci95`` for the groups the gate judges
    (new-domain assistant tokens, old-domain plain text), and per-language ``gain``/``forgetting`` + ``*_ci95``."""
    out: dict = {"base": {}, "cpt": {}, "sources": {}, **{k: dict(v) for k, v in summary["gate"].items()}}
    for g in groups:
        if (g.kind, g.domain) not in (("assistant", "new"), ("plain", "old")):
            continue
        nbytes = int(g.paired.nbytes.sum())
        if not nbytes or not np.isfinite(g.bpb("ref")):
            continue
        out["base"][g.name] = {"bpb": g.bpb("ref"), "bytes": nbytes, "domain": g.domain}
        out["cpt"][g.name] = {"bpb": g.bpb("cand"), "bytes": nbytes, "domain": g.domain}
        out["sources"][g.name] = summary["sources"][g.name]
    return out
