"""One point of the frontier: a model's per-unit scores on eval's units, compared with the base's as eval compares
the cpt model's, and judged by the gate's rules.

Same units: eval's sources are rebuilt with eval's own budget and seed (``cpt.evaluation.sources``) and each
source's content hash (units, documents and the scoring configuration, ``cpt.evaluation.record``) must equal the
hash in the records eval wrote for the base (data/eval/base.json) and the cpt model (data/eval/sources.json); a
changed eval configuration is an error that names the source, never a silent comparison of other text.

Same scorer, same intervals: a merged model is scored by ``cpt.evaluation.bpb.BpbScorer`` with eval's window,
stride and batch, and its gain / forgetting and their 95% intervals come from ``cpt.evaluation.summary`` (the paired,
document-level, source-stratified bootstrap) with eval's resamples and seed, so a = 1 reproduces metrics/eval.json.
The point is an eval.json-shaped dict, and ``cpt.ops.gate.decide`` judges it: the gate's checks, budgets and
``min_documents``, vs the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt.errors import DataError
from cpt.evaluation import record, scoring
from cpt.evaluation.bpb import BpbScorer, Score
from cpt.evaluation.sources import EvalSource, collect_sources
from cpt.evaluation.summary import intervals, pooled
from cpt.io import read_json
from cpt.ops import gate


def _read_record(path: Path, who: str) -> dict[str, dict]:
    if not path.exists():
        raise DataError(f"{path}: the {who}'s per-unit scores are missing; run `cpt eval` first (it writes them)")
    rec = read_json(path)
    if not record.is_record(rec):
        raise DataError(f"{path}: not a per-unit record (an older eval wrote it); rerun `cpt eval`")
    return rec


def eval_records(layout: Any, eval_cfg: dict, seed: int) -> tuple[list[EvalSource], dict, dict, dict]:
    """(eval's sources, the base's record, the cpt's record, the scoring configuration), after checking that both
    records hold exactly these units under this scoring configuration."""
    sources = collect_sources(layout, eval_cfg, seed)
    config = scoring.scoring_config(eval_cfg)
    now = {s.name: record.unit_hash(config, s.texts, s.docs) for s in sources}
    recs = {"base": _read_record(record.base_path(layout), "base"),
            "cpt": _read_record(record.path(layout), "cpt model")}
    for who, rec in recs.items():
        missing = sorted(set(now) - set(rec))
        if missing:
            raise DataError(f"eval's {who} record has no scores for {missing}; rerun `cpt eval`")
        changed = sorted(n for n in now if rec[n].get("hash") != now[n])
        if changed:
            raise DataError(f"eval's {who} record was scored on other units or another eval configuration for "
                            f"{changed} (content hash differs); rerun `cpt eval` before `cpt merge`")
    return sources, recs["base"], recs["cpt"], config


def scores_of(rec: dict[str, dict], sources: list[EvalSource]) -> dict[str, Score]:
    """A record's per-unit NLL as eval's ``Score`` per source (sums in unit order, as ``BpbScorer.score`` adds them:
    the same floats). Token counts are not recorded: 0 (only bits per byte and the units are used)."""
    out = {}
    for s in sources:
        u = rec[s.name]["units"]
        out[s.name] = Score(float(sum(u["nll"], 0.0)), 0, int(sum(u["bytes"])), len(u["nll"]),
                            tuple(float(x) for x in u["nll"]), tuple(int(b) for b in u["bytes"]))
    return out


def score(lm: Any, sources: list[EvalSource], eval_cfg: dict) -> dict[str, Score]:
    """A loaded model scored on every source's units by eval's scorer, with eval's window, stride and batch."""
    scorer = BpbScorer(lm, eval_cfg["max_length"], eval_cfg["stride"], eval_cfg["batch_size"])
    return {s.name: scorer.score(s.texts, desc=s.name) for s in sources}


def compared(base: dict[str, Score], cand: dict[str, Score], sources: list[EvalSource], *, resamples: int,
             seed: int) -> dict[str, Any]:
    """The candidate vs the base, shaped as metrics/eval.json's comparison keys (``base`` / ``cpt`` per-source bpb,
    per-language ``gain`` / ``forgetting`` and their ``_ci95``, per-source rows in ``sources``, ``bootstrap``)."""
    meta = {s.name: {"lang": s.lang, "domain": s.domain} for s in sources}
    out: dict[str, Any] = {
        who: {n: {"bpb": round(sc.bpb, 6), "bytes": sc.bytes, **meta[n]} for n, sc in scores.items()}
        for who, scores in (("base", base), ("cpt", cand))}
    old_b, old_c = pooled(base, sources, domain="old"), pooled(cand, sources, domain="old")
    new_b, new_c = pooled(base, sources, domain="new"), pooled(cand, sources, domain="new")
    out["forgetting"] = {lang: round(old_c[lang].bpb - old_b[lang].bpb, 6) for lang in sorted(old_b)}
    out["gain"] = {lang: round(new_b[lang].bpb - new_c[lang].bpb, 6) for lang in sorted(new_b)}
    out.update(intervals({"base": base, "cpt": cand}, sources, resamples=resamples, seed=seed))
    return out


def point(alpha: float, base: dict[str, Score], cand: dict[str, Score], sources: list[EvalSource],
          params: dict, *, resamples: int, seed: int, scored: str) -> dict[str, Any]:
    """One frontier point: its comparison with the base (eval.json's shape) and the gate's decision on it (vs the
    base: per source and per language, the gate's budgets and min_documents). ``scored`` says where the scores come
    from (eval's records, or this stage)."""
    cmp = compared(base, cand, sources, resamples=resamples, seed=seed)
    decision = gate.decide(cmp, params, None, "merge points are judged vs the base; the chosen one meets the "
                                              "champion when it is registered")
    rows = {n: {k: v for k, v in r.items() if k not in ("base_bpb", "cpt_bpb")} | {"bpb": r["cpt_bpb"]}
            for n, r in cmp["sources"].items()}
    return {"alpha": float(alpha), "scored": scored,
            **{k: cmp[k] for k in ("gain", "gain_ci95", "forgetting", "forgetting_ci95")},
            "sources": rows, "decision": decision["decision"], "reason": decision["reason"],
            "_eval_like": cmp}
