"""Eval's summary: scores pooled per language and domain (summed NLL over summed bytes) and the assembled
metrics/eval.json dict."""

from __future__ import annotations

from typing import Any

from cpt.evaluation.bpb import Score
from cpt.evaluation.sources import EvalSource


def pooled(scores: dict[str, Score], sources: list[EvalSource], *, domain: str | None = None) -> dict[str, Score]:
    """Per-language Score summed over the sources of that language (and domain)."""
    out: dict[str, Score] = {}
    for s in sources:
        if domain is None or s.domain == domain:
            out[s.lang] = out.get(s.lang, Score()).add(scores[s.name])
    return out


def assemble(scores: dict[str, dict[str, Score]], sources: list[EvalSource], xacc: dict, overlap_result: dict) -> dict:
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
    metrics["xcopa"] = {
        lang: {
            "base": xacc["base"][lang]["acc"], "cpt": xacc["cpt"][lang]["acc"], "n": xacc["base"][lang]["n"],
            "base_per_byte": xacc["base"][lang]["acc_per_byte"], "cpt_per_byte": xacc["cpt"][lang]["acc_per_byte"],
        }
        for lang in xacc.get("base", {})
    }
    metrics["overlap"] = overlap_result
    return metrics
