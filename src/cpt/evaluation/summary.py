"""Eval's summary: scores pooled per language and domain (summed NLL over summed bytes), their bootstrap 95%
intervals (``cpt.evaluation.uncertainty``), and the assembled metrics/eval.json dict.

Signs in eval.json: ``gain = bpb(base) - bpb(cpt)`` (new domain, > 0 learned), ``forgetting = bpb(cpt) - bpb(base)``
(old domain, > 0 forgot): one sign everywhere cpt shows them (report, figure, README, MLflow, Prefect), so no
per-source ``delta`` of the opposite sign is kept."""

from __future__ import annotations

from typing import Any

from cpt.evaluation.bpb import Score
from cpt.evaluation.sources import EvalSource
from cpt.evaluation.uncertainty import compare, negate


def pooled(scores: dict[str, Score], sources: list[EvalSource], *, domain: str | None = None) -> dict[str, Score]:
    """Per-language Score summed over the sources of that language (and domain)."""
    out: dict[str, Score] = {}
    for s in sources:
        if domain is None or s.domain == domain:
            out[s.lang] = out.get(s.lang, Score()).add(scores[s.name])
    return out


def unit_table(ref: dict[str, Score], cand: dict[str, Score], sources: list[EvalSource]) -> dict[str, list]:
    """The per-unit inputs of ``uncertainty.compare`` for two models' scores on ``sources``: ref/cand NLL, bytes,
    document label, source."""
    out: dict[str, list] = {"ref": [], "cand": [], "bytes": [], "doc": [], "source": []}
    for s in sources:
        r, c = ref[s.name], cand[s.name]
        if not len(r.doc_nll) == len(c.doc_nll) == len(s.docs):
            raise ValueError(f"{s.name}: {len(r.doc_nll)} / {len(c.doc_nll)} scored units for {len(s.docs)} units")
        out["ref"] += r.doc_nll
        out["cand"] += c.doc_nll
        out["bytes"] += r.doc_bytes
        out["doc"] += s.docs
        out["source"] += [s.name] * len(s.docs)
    return out


def intervals(scores: dict[str, dict[str, Score]], sources: list[EvalSource], *, resamples: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """``sources`` (per source: gain or forgetting, each > 0 = learned / forgotten, and its ``gain_ci95`` / ``forgetting_ci95``, the units
    scored and the ``documents`` they come from) and the per-language ``gain_ci95`` / ``forgetting_ci95``: a paired
    bootstrap over whole documents, stratified by source, ``resamples`` draws, seeded (``uncertainty.compare``)."""
    t = unit_table(scores["base"], scores["cpt"], sources)
    pools = {f"{'gain' if s.domain == 'new' else 'forgetting'}:{s.lang}": [] for s in sources}
    for s in sources:
        pools[f"{'gain' if s.domain == 'new' else 'forgetting'}:{s.lang}"].append(s.name)
    cmp = compare(t["ref"], t["cand"], t["bytes"], t["doc"], t["source"], lang={s.name: s.lang for s in sources},
                  pools=pools, resamples=resamples, seed=seed)
    out: dict[str, Any] = {"sources": {}, "gain_ci95": {}, "forgetting_ci95": {}}
    for s in sources:
        base, cpt, row = scores["base"][s.name], scores["cpt"][s.name], cmp["sources"][s.name]
        delta, ci = base.bpb - cpt.bpb, row["ci95"]
        kind = "gain" if s.domain == "new" else "forgetting"
        out["sources"][s.name] = {
            "lang": s.lang, "domain": s.domain, "units": base.docs, "documents": row["documents"],
            "bytes": base.bytes, "base_bpb": round(base.bpb, 6), "cpt_bpb": round(cpt.bpb, 6),
            kind: round(delta if kind == "gain" else -delta, 6),
            f"{kind}_ci95": ci if kind == "gain" else negate(ci),
        }
    for name, row in sorted(cmp["pools"].items()):
        kind, lang = name.split(":", 1)
        out[f"{kind}_ci95"][lang] = row["ci95"] if kind == "gain" else negate(row["ci95"])
    out["bootstrap"] = {**cmp["bootstrap"], "documents": "a role: eval record, or one held-out training document; "
                        "its units (eval.unit_bytes pieces) are resampled together"}
    return out


def assemble(scores: dict[str, dict[str, Score]], sources: list[EvalSource], overlap_result: dict,
             *, resamples: int = 1000, seed: int = 0) -> dict:
    meta = {s.name: {"lang": s.lang, "domain": s.domain, "truncated": s.truncated} for s in sources}
    metrics: dict[str, Any] = {
        name: {s: {**sc.to_dict(), **meta[s]} for s, sc in per.items()} for name, per in scores.items()
    }
    metrics["bpb_by_lang"] = {name: {lang: round(sc.bpb, 6) for lang, sc in pooled(per, sources).items()}
                              for name, per in scores.items()}
    old_b, old_c = pooled(scores["base"], sources, domain="old"), pooled(scores["cpt"], sources, domain="old")
    new_b, new_c = pooled(scores["base"], sources, domain="new"), pooled(scores["cpt"], sources, domain="new")
    metrics["forgetting"] = {lang: round(old_c[lang].bpb - old_b[lang].bpb, 6) for lang in sorted(old_b)}
    metrics["gain"] = {lang: round(new_b[lang].bpb - new_c[lang].bpb, 6) for lang in sorted(new_b)}
    metrics.update(intervals(scores, sources, resamples=resamples, seed=seed))
    metrics["overlap"] = overlap_result
    return metrics
