"""After eval and the gate: the answer, where people look first.

* ``metrics/summary.json``: the headline file (``cpt.ops.summary``), the one DVC metric (``dvc metrics show``,
  ``dvc exp show``);
* the eval run and the pipeline's parent run: ``summary/...`` metrics, the description (``mlflow.note.content``,
  shown at the top of the run page) with the gain / forgetting table and the gate's decision, the gate's tags;
* the registered model version: a one-line description ("vi +7.8 bpb, en +0.045 bpb forgotten, gate passed");
* the experiment: its primary metric (the compare view's default axis) is the forgetting the gate watches, not a
  training loss that a lower replay ratio makes look better.

After train: the old- and new-language validation loss drawn on one chart (``loss_chart``), logged as an image
chart to the train run and the parent run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cpt.ops import summary as summary_mod

log = logging.getLogger("cpt.ops.headline")

# in the "summary" section of the chart view, which sorts first (sections are the key up to its last "/")
LOSS_CHART_KEY = "summary/loss_new_vs_old"


def publish(layout: Any, tracker: Any, decision: dict[str, Any]) -> dict[str, Any]:
    """Write metrics/summary.json and show it in MLflow; returns the summary."""
    summary = summary_mod.write(layout)
    if not getattr(tracker, "active", False):
        return summary
    metrics = summary_mod.mlflow_metrics(summary)
    tracker.log_metrics(metrics)
    tracker.log_parent_metrics(metrics)
    text = summary_mod.markdown(summary, decision)
    tracker.set_tags({"mlflow.note.content": text})
    tracker.set_parent_tags({"mlflow.note.content": text, "cpt.gate.decision": summary["decision"],
                             "cpt.gate.promoted": decision.get("promoted"),
                             "cpt.gate.reason": str(decision.get("reason", ""))[:5000],
                             "cpt.headline": summary_mod.headline(summary, decision)})
    forgetting = sorted(summary.get("forgetting", {}))
    primary = f"summary/forgetting/{forgetting[0]}" if forgetting else "summary/passed"
    from cpt.ops.mlflow_views import EXPERIMENT_TAGS

    tracker.set_experiment_tags({**EXPERIMENT_TAGS, "mlflow.experiment.primaryMetric.name": primary})
    if decision.get("version"):
        try:
            tracker.describe_version(str(decision["version"]), summary_mod.headline(summary, decision))
        except Exception as exc:  # noqa: BLE001 - a description must never fail eval
            log.warning("could not describe model version %s: %s", decision["version"], exc)
    return summary


def loss_chart(layout: Any, tracker: Any) -> None:
    """Old and new validation loss on one chart, as an image in the train run's and the parent's chart view."""
    if not getattr(tracker, "active", False):
        return
    from cpt.evaluation.figures import loss_chart as draw
    from cpt.evaluation.report import read_curve

    curve = read_curve(Path(layout.metrics) / "train_curve.csv")
    if not curve:
        return
    out = Path(layout.data) / "tracking_charts" / "loss_new_vs_old.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    if draw(out, curve):
        steps = [s for s in curve.get("step", []) if s == s]
        tracker.log_image(out, LOSS_CHART_KEY, step=int(max(steps)) if steps else 0)
