"""The headline of a pipeline run: ``metrics/summary.json`` (at most 12 keys), the words MLflow shows for it (run and
model version descriptions) and the ``summary/...`` metrics.

Read from what the stages already wrote, never recomputed: ``metrics/eval.json`` (gain / forgetting per language,
and their 95% intervals when eval computes them), ``metrics/gate.json`` (the promotion decision) and the train
stage's untracked timings (``metrics/timings/train.json``: tokens/s, MFU). One sign convention: bits per byte, and
both numbers read "more is more": gain > 0 is learned, forgetting > 0 is forgotten.

Throughput is a timing, but the headline wants it. A fresh clone retrains bit for bit and would otherwise rewrite
the committed file with its own tokens/s on every demo, so: when every result in the summary is unchanged, the
throughput already recorded (the run that first produced these results) is kept; the rerun's own throughput is in
MLflow and in ``metrics/timings/train.json``. When a result changes, the throughput is this run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

THROUGHPUT = ("tokens_per_s", "mfu")
DECISIONS = {True: "promote", False: "refuse"}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _num(value: Any, nd: int = 4) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return round(float(value), nd)


def _interval(value: Any) -> list[float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_num(v) is not None for v in value):
        return [_num(v) for v in value]
    if isinstance(value, dict) and _num(value.get("lo")) is not None and _num(value.get("hi")) is not None:
        return [_num(value["lo"]), _num(value["hi"])]
    return None


def decision_of(gate: dict[str, Any]) -> str:
    """``promote`` / ``refuse`` / ``undecided``: gate.json's own ``decision`` when it has one, else from ``passed``."""
    if gate.get("decision") in ("promote", "refuse", "undecided"):
        return gate["decision"]
    if isinstance(gate.get("passed"), bool):
        return DECISIONS[gate["passed"]]
    return "undecided"


def downstream_block(downstream: dict[str, Any] | None) -> dict[str, Any]:
    """metrics/downstream.json's two aggregates (accuracy points, > 0 = forgotten / learned) with intervals."""
    out: dict[str, Any] = {}
    for key in ("forgetting_en", "gain_new"):
        agg = (downstream or {}).get(key)
        if isinstance(agg, dict) and _num(agg.get("value")) is not None:
            out[key] = _num(agg["value"], 2)
            if _interval(agg.get("ci95")):
                out[f"{key}_ci95"] = [round(v, 2) for v in _interval(agg["ci95"])]
    return out


def build(eval_metrics: dict[str, Any], gate: dict[str, Any], timings: dict[str, Any],
          downstream: dict[str, Any] | None = None) -> dict[str, Any]:
    """The headline dict (<= 12 keys; nested per language so `dvc exp show` columns read ``gain.vi``).
    ``downstream``: metrics/downstream.json; its aggregates become ``downstream``, and when its gate rule added
    checks (``gate.max_downstream_drop`` set) its decision is the pipeline's (cpt.ops.downstream_gate)."""
    out: dict[str, Any] = {}
    for key in ("gain", "forgetting"):
        values = eval_metrics.get(key) if isinstance(eval_metrics.get(key), dict) else {}
        out[key] = {lang: _num(v) for lang, v in sorted(values.items()) if _num(v) is not None}
        cis = eval_metrics.get(f"{key}_ci95")
        if isinstance(cis, dict):
            ci = {lang: _interval(cis.get(lang)) for lang in out[key]}
            if any(ci.values()):
                out[f"{key}_ci95"] = {lang: v for lang, v in ci.items() if v}
    out["passed"] = bool(gate.get("passed")) if gate else None
    out["decision"] = decision_of(gate)
    rejudged = (downstream or {}).get("gate") if isinstance((downstream or {}).get("gate"), dict) else {}
    if rejudged.get("checks") and rejudged.get("decision") in ("promote", "refuse", "undecided"):
        out["decision"] = rejudged["decision"]
        out["passed"] = rejudged["decision"] == "promote"
    if downstream_block(downstream):
        out["downstream"] = downstream_block(downstream)
    out["tokens_per_s"] = _num(timings.get("tokens_per_s"), 1)
    out["mfu"] = _num(timings.get("mfu"))
    assert len(out) <= 12, sorted(out)
    return out


def write(layout: Any, downstream: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the summary from the files on disk and write ``metrics/summary.json`` (see the module docstring for
    why an unchanged result keeps its recorded throughput). ``downstream``: the downstream stage's results before
    they are on disk (else metrics/downstream.json is read). Returns what was written."""
    from cpt.io import write_json
    from cpt.ops.timings import timings_file

    metrics = Path(layout.metrics)
    downstream = downstream if downstream is not None else _read(metrics / "downstream.json")
    new = build(_read(metrics / "eval.json"), _read(metrics / "gate.json"), _read(timings_file(layout, "train")),
                downstream)
    path = metrics / "summary.json"
    old = _read(path)
    results = {k: v for k, v in new.items() if k not in THROUGHPUT}
    if old and {k: v for k, v in old.items() if k not in THROUGHPUT} == results:
        new.update({k: old.get(k) for k in THROUGHPUT})
    write_json(path, new, sort_keys=False)
    return new


def _signed(x: Any, nd: int) -> str:
    return "n/a" if _num(x) is None else f"{x:+.{nd}f}"


def _digits(x: Any) -> int:
    """Decimals that keep two significant digits: +7.8 bpb, +0.045 bpb."""
    v = abs(_num(x) or 0.0)
    return 1 if v >= 1 else 2 if v >= 0.1 else 3


def deciding(gate: dict[str, Any] | None) -> str:
    """What held the gate back, short: ``heldout_en forgetting +0.082 > 0.05`` (the first source or language whose
    verdict is not promote; per-source verdicts first, as the gate judges them, then those against the champion), or
    "" when nothing did."""
    champ = (gate or {}).get("vs_champion") or {}
    for key, block, prefix in (("per_source", gate, ""), ("per_lang", gate, ""),
                               ("per_source", champ, "vs champion: "), ("per_lang", champ, "vs champion: ")):
        for name, v in sorted(((block or {}).get(key) or {}).items()):
            name = prefix + name
            if isinstance(v, dict) and v.get("decision") not in (None, "promote"):
                value, ci, budget = _num(v.get("value")), v.get("ci95"), v.get("budget")
                bound = (ci[1] if v.get("metric") == "forgetting" else ci[0]) if isinstance(ci, list) and len(ci) == 2 else None
                if value is None:
                    return name
                op = ">" if v.get("metric") == "forgetting" else "<"
                shown = f"{v.get('metric')} {_signed(value, 3)}" + (
                    f" (95% interval [{_signed(ci[0], 3)}, {_signed(ci[1], 3)}])" if bound is not None else "")
                if v.get("decision") == "refuse":
                    return f"{name} {shown} {op} {budget}"
                why = ("too few documents" if "too few documents" in str(v.get("reason")) else
                       "no interval" if bound is None else "interval straddles the budget")
                return f"{name} {shown}: {why}"
    return ""


def headline(summary: dict[str, Any], gate: dict[str, Any] | None = None) -> str:
    """One line, e.g. ``vi +7.8 bpb, zh +13.2 bpb, en +0.045 bpb forgotten, gate passed``; a refusal names what
    decided it (the worst source, not the pooled figure: ``gate refused: heldout_en forgetting +0.082 ...``)."""
    parts = [f"{lang} {_signed(v, _digits(v))} bpb" for lang, v in summary.get("gain", {}).items()]
    parts += [f"{lang} {_signed(v, _digits(v))} bpb forgotten" for lang, v in summary.get("forgetting", {}).items()]
    verdict = {"promote": "gate passed", "refuse": "gate refused", "undecided": "gate undecided"}
    why = deciding(gate) if summary.get("decision") != "promote" else ""
    parts.append(verdict.get(summary.get("decision"), "no gate decision") + (f": {why}" if why else ""))
    return ", ".join(parts)


def markdown(summary: dict[str, Any], gate: dict[str, Any] | None = None, run_link: str | None = None,
             trained: bool | None = None, chart: tuple[str, str] | None = None) -> str:
    """The table MLflow descriptions and the Prefect artifact show: gain / forgetting per language with intervals,
    the gate's decision and thresholds. ``trained=False``: the last train run only re-exported a finished checkpoint,
    so no throughput is quoted; ``chart``: (a link line, an image line) for the loss chart: the link right under the
    headline (visible before MLflow's "Show more"), the image at the end."""
    gate = gate or {}
    rows = ["| language | bits per byte | 95% interval | means |", "|---|---:|---|---|"]
    for key, means in (("gain", "learned (new language)"), ("forgetting", "forgotten (old language)")):
        cis = summary.get(f"{key}_ci95") or {}
        for lang, v in summary.get(key, {}).items():
            ci = cis.get(lang)
            rows.append(f"| {lang} | {_signed(v, 3)} | {f'[{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else 'n/a'} | {means} |")
    lines = [f"**{headline(summary, gate)}**", "", *([chart[0], ""] if chart else []), *rows, ""]
    down = summary.get("downstream") or {}
    if down:
        shown = [f"{what} {down[key]:+.1f} points" + (f" [{down[key + '_ci95'][0]:+.1f}, {down[key + '_ci95'][1]:+.1f}]"
                                                     if down.get(key + "_ci95") else "")
                 for key, what in (("forgetting_en", "English forgetting"), ("gain_new", "new-language gain"))
                 if key in down]
        lines += ["Downstream tasks (lm-evaluation-harness, mean accuracy change over tasks, 95% interval): "
                  + "; ".join(shown) + ".", ""]
    th = gate.get("thresholds") if isinstance(gate.get("thresholds"), dict) else {}
    if th.get("min_gain") is not None:
        lines.append(f"Gate: **{summary.get('decision')}**: on the 95% interval bounds, every new-language source and "
                     f"language gains >= {th['min_gain']} bpb and every old-language one forgets <= "
                     f"{th.get('max_forgetting')} bpb; the worst decides (the pooled figure is information only)"
                     f"{'; checked against the champion too' if (gate.get('vs_champion') or {}).get('checked') else ''}.")
    if gate.get("reason"):
        lines.append(f"Reason: {gate['reason']}.")
    if gate.get("version"):
        alias = gate.get("alias", "champion")
        lines.append(f"Registered: `{gate.get('registered_model')}` version {gate['version']}"
                     f"{f' (alias `{alias}`)' if gate.get('promoted') else ''}.")
    if trained is False:
        lines.append("Training: none in the last train run (it re-exported the finished checkpoint of an earlier "
                     "run), so no throughput is quoted.")
    elif summary.get("tokens_per_s") is not None:
        mfu = summary.get("mfu")
        lines.append(f"Training throughput: {summary['tokens_per_s']:,.0f} tokens/s"
                     f"{f', MFU {mfu:.1%}' if isinstance(mfu, float) else ''}.")
    if chart:
        lines += ["", chart[1]]
    if run_link:
        lines.append(f"MLflow run: {run_link}")
    return "\n".join(lines) + "\n"


def mlflow_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``summary/gain/vi``, ``summary/gain/vi/ci95_lo`` ...: the headline as MLflow metrics (first in the UI).
    Forgetting first: MLflow's compare page plots the first metric the runs share, in the order they were logged,
    and forgetting is the number the gate watches."""
    out: dict[str, float] = {}
    for key in ("forgetting", "gain"):
        for lang, v in summary.get(key, {}).items():
            out[f"summary/{key}/{lang}"] = float(v)
        for lang, ci in (summary.get(f"{key}_ci95") or {}).items():
            out[f"summary/{key}/{lang}/ci95_lo"], out[f"summary/{key}/{lang}/ci95_hi"] = float(ci[0]), float(ci[1])
    for key, v in (summary.get("downstream") or {}).items():
        if isinstance(v, list):
            out[f"summary/downstream/{key[:-5]}/ci95_lo"], out[f"summary/downstream/{key[:-5]}/ci95_hi"] = v
        else:
            out[f"summary/downstream/{key}"] = float(v)
    if summary.get("passed") is not None:
        out["summary/passed"] = float(bool(summary["passed"]))
    for key in THROUGHPUT:
        if _num(summary.get(key)) is not None:
            out[f"summary/{key}"] = float(summary[key])
    return out
