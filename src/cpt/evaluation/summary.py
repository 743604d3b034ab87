"""Eval's summary: scores pooled per language and domain (summed NLL over summed bytes), their bootstrap 95%
intervals (``cpt.evaluation.uncertainty``), and the assembled metrics/eval.json dict.

Signs in eval.json: ``gain = bpb(base) - bpb(cpt)`` (new domain, > 0 learned), ``forgetting = bpb(cpt) - bpb(base)``
(old domain, > 0 forgot): one sign everywhere cpt shows them (report, figure, README, MLflow, Prefect), so no
per-source ``delta`` of the opposite sign is kept."""

from __future__ import annotations

from typing import Any

from cpt.evaluation.bpb import Score
from cpt.evaluation.sources import EvalSource
from cpt.evaluation.uncertainty import Paired, bootstrap, interval, negate


def pooled(scores: dict[str, Score], sources: list[EvalSource], *, domain: str | None = None) -> dict[str, Score]:
    """Per-language Score summed over the sources of that language (and domain)."""
    out: dict[str, Score] = {}
    for s in sources:
        if domain is None or s.domain == domain:
            out[s.lang] = out.get(s.lang, Score()).add(scores[s.name])
    return out


def intervals(scores: dict[str, dict[str, Score]], sources: list[EvalSource], *, resamples: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """``sources`` (per source: gain or forgetting, each > 0 = learned / forgotten, and its ``gain_ci95`` / ``forgetting_ci95``) and the
    per-language ``gain_ci95`` / ``forgetting_ci95``: a paired bootstrap over the scored documents (units), stratified
    by source, ``resamples`` draws, seeded."""
    groups = {s.name: Paired(scores["base"][s.name].doc_nll, scores["cpt"][s.name].doc_nll,
                             scores["base"][s.name].doc_bytes) for s in sources}
    draws = bootstrap(groups, resamples=resamples, seed=seed)
    out: dict[str, Any] = {"sources": {}, "gain_ci95": {}, "forgetting_ci95": {}}
    for s in sources:
        base, cpt = scores["base"][s.name], scores["cpt"][s.name]
        delta, ci = base.bpb - cpt.bpb, interval([draws[s.name]], units=base.docs)
        kind = "gain" if s.domain == "new" else "forgetting"
        out["sources"][s.name] = {
            "lang": s.lang, "domain": s.domain, "units": base.docs, "bytes": base.bytes,
            "base_bpb": round(base.bpb, 6), "cpt_bpb": round(cpt.bpb, 6),
            kind: round(delta if kind == "gain" else -delta, 6),
            f"{kind}_ci95": ci if kind == "gain" else negate(ci),
        }
    for kind, domain in (("gain", "new"), ("forgetting", "old")):
        langs = sorted({s.lang for s in sources if s.domain == domain})
        for lang in langs:
            mine = [s for s in sources if s.domain == domain and s.lang == lang]
            ci = interval([draws[s.name] for s in mine], units=sum(scores["base"][s.name].docs for s in mine))
            out[f"{kind}_ci95"][lang] = ci if kind == "gain" else negate(ci)
    out["bootstrap"] = {"resamples": resamples, "seed": seed, "level": 0.95, "paired": True,
                        "strata": "source", "unit": "scored document (eval.unit_bytes pieces)"}
    return out


def assemble(scores: dict[str, dict[str, Score]], sources: list[EvalSource], xacc: dict, overlap_result: dict,
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
    metrics["xcopa"] = {
        lang: {
            "base": xacc["base"][lang]["acc"], "cpt": xacc["cpt"][lang]["acc"], "n": xacc["base"][lang]["n"],
            "base_per_byte": xacc["base"][lang]["acc_per_byte"], "cpt_per_byte": xacc["cpt"][lang]["acc_per_byte"],
        }
        for lang in xacc.get("base", {})
    }
    metrics["overlap"] = overlap_result
    return metrics
