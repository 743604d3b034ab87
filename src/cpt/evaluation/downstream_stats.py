"""Paired results of the downstream tasks: base vs cpt accuracy per task, the delta and its 95% interval.

Both models answer the same items, so the comparison is paired: a seeded bootstrap resamples ITEMS (with
replacement), the SAME draw for both models, and the percentile interval of ``mean(cpt) - mean(base)`` is the
delta's interval (pairing cancels the items' shared difficulty, so the interval is narrower than two independent
binomial ones). Each task is resampled on its own stream seeded by (seed, task key), as ``cpt.evaluation.
uncertainty.bootstrap`` seeds sources, so adding a task never moves another's draws. Aggregates resample every task
at once (stratified: each task keeps its items) and average the per-task deltas with equal weight per task.

Units are accuracy POINTS (percent). One sign everywhere in cpt: ``delta = cpt - base`` per task (> 0: cpt is
better); ``forgetting_en`` = mean over English tasks of ``base - cpt`` (> 0: forgotten); ``gain_new`` = mean over
new-language tasks of ``cpt - base`` (> 0: learned).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cpt.evaluation.uncertainty import negate


def _rng(seed: int, key: str) -> np.random.Generator:
    tag = int.from_bytes(key.encode("utf-8")[:16].ljust(16, b"\0"), "little")
    return np.random.default_rng([int(seed), tag % (2**63), len(key)])


def paired_draws(base: np.ndarray, cpt: np.ndarray, resamples: int, seed: int, key: str) -> np.ndarray:
    """(resamples,) bootstrap means of ``cpt - base`` in points; items resampled, the same draw for both models."""
    n = len(base)
    counts = _rng(seed, key).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    return 100.0 * (counts @ (np.asarray(cpt, float) - np.asarray(base, float))) / n


def percentile(draws: np.ndarray, level: float = 0.95) -> list[float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def paired(base: Mapping[int, float], cpt: Mapping[int, float], *, resamples: int = 1000, seed: int = 0,
           key: str = "task", level: float = 0.95) -> dict[str, Any]:
    """``{n, base, cpt, delta, delta_ci95}`` (accuracies and delta in points) over the items both models answered
    (paired by item id); ``delta_ci95`` None with fewer than 2 items."""
    ids = sorted(set(base) & set(cpt))
    b = np.array([base[i] for i in ids], dtype=np.float64)
    c = np.array([cpt[i] for i in ids], dtype=np.float64)
    if not ids:
        return {"n": 0, "base": None, "cpt": None, "delta": None, "delta_ci95": None}
    out = {"n": len(ids), "base": round(100 * float(b.mean()), 4), "cpt": round(100 * float(c.mean()), 4),
           "delta": round(100 * float((c - b).mean()), 4), "delta_ci95": None}
    if len(ids) >= 2:
        out["delta_ci95"] = percentile(paired_draws(b, c, resamples, seed, key), level)
    return out


def table(results: dict[str, dict[str, dict[str, Any]]], tasks: list[Any], *, resamples: int,
          seed: int) -> dict[str, dict[str, Any]]:
    """``{task: {lang, n, metric, base, cpt, delta, delta_ci95, chance}}`` from ``downstream.run_models``'s output
    (``tasks``: the ``TaskSpec`` list)."""
    rows: dict[str, dict[str, Any]] = {}
    for spec in tasks:
        side = {m: {i: v[spec.metric] for i, v in results[m][spec.key]["items"].items()} for m in ("base", "cpt")}
        rows[spec.key] = {"lang": spec.lang, "metric": spec.metric, "chance": round(100 * spec.chance, 1),
                          **paired(side["base"], side["cpt"], resamples=resamples, seed=seed, key=spec.key)}
    return rows


def aggregate(results: dict[str, dict[str, dict[str, Any]]], tasks: list[Any], *, sign: int, resamples: int,
              seed: int, level: float = 0.95) -> dict[str, Any] | None:
    """Mean over ``tasks`` of ``sign * (cpt - base)`` in points, with the stratified paired bootstrap interval
    (every task resampled on its own stream, the per-task deltas averaged with equal weight); None without tasks."""
    draws, values, names = [], [], []
    for spec in tasks:
        b_items, c_items = results["base"][spec.key]["items"], results["cpt"][spec.key]["items"]
        ids = sorted(set(b_items) & set(c_items))
        if len(ids) < 2:
            continue
        b = np.array([b_items[i][spec.metric] for i in ids], dtype=np.float64)
        c = np.array([c_items[i][spec.metric] for i in ids], dtype=np.float64)
        draws.append(paired_draws(b, c, resamples, seed, spec.key))
        values.append(100 * float((c - b).mean()))
        names.append(spec.key)
    if not names:
        return None
    ci = percentile(np.mean(draws, axis=0), level)
    return {"value": round(sign * float(np.mean(values)), 4), "ci95": ci if sign > 0 else negate(ci),
            "tasks": names}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def markdown(rows: dict[str, dict[str, Any]], aggregates: dict[str, Any], gate: dict[str, Any] | None,
             info: dict[str, Any]) -> str:
    """reports/downstream.md: the paired table, the aggregates and the gate rule's verdict."""
    L = ["# Downstream tasks: base vs cpt (lm-evaluation-harness)", "",
         f"{info.get('num_fewshot', 0)}-shot, lm-eval {info.get('lm_eval', '?')}, at most "
         f"{info.get('max_items') or 'all'} items per task (the first of each file); accuracy in points; "
         "delta = cpt - base with its 95% paired bootstrap interval (items resampled, "
         f"{info.get('resamples')} draws). `acc_norm` = summed log-likelihood per character of the choice. "
         "BOS: `add_bos_token=False`, every context conditioned on the model's own prefix token, as cpt's bits "
         "per byte (docs/downstream.md).", "",
         "| task | lang | metric | items | chance | base | cpt | delta | 95% interval |",
         "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for key, r in rows.items():
        ci, delta = r.get("delta_ci95"), r.get("delta")
        shown = "n/a" if delta is None else f"{delta:+.1f}"
        interval = f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "n/a"
        L.append(f"| {key} | {r['lang']} | {r['metric']} | {r['n']} | {r.get('chance', 0):.0f} | {_pct(r['base'])} "
                 f"| {_pct(r['cpt'])} | {shown} | {interval} |")
    L.append("")
    for name, means in (("forgetting_en", "English forgetting: mean drop over the English tasks (> 0 forgotten)"),
                        ("gain_new", "new-language gain: mean rise over the new-language tasks (> 0 learned)")):
        a = aggregates.get(name)
        if a:
            L.append(f"- {means}: **{a['value']:+.1f} points**, 95% interval [{a['ci95'][0]:+.1f}, "
                     f"{a['ci95'][1]:+.1f}] ({len(a['tasks'])} tasks)")
    L.append("")
    if gate:
        L.append(f"Gate rule `gate.max_downstream_drop`: {gate.get('rule')}. Decision after this stage: "
                 f"**{gate.get('decision')}** (eval's gate: {gate.get('eval_decision')}). {gate.get('reason', '')}")
    return "\n".join(L) + "\n"
