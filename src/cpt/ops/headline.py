"""After eval and the gate: the answer, where people look first.

* ``metrics/summary.json``: the headline file (``cpt.ops.summary``), the one DVC metric (``dvc metrics show``,
  ``dvc exp show``);
* the eval run and the pipeline's parent run: ``summary/...`` metrics, the description (``mlflow.note.content``,
  shown at the top of the run page) with the gain / forgetting table and the gate's decision, the gate's tags;
* the registered model version: described by the gate itself (``cpt.ops.registry_view``: decision first);
* the experiment: its primary metric is the forgetting the gate watches (logged first, so the compare page plots
  it first), not a training loss that a lower replay ratio makes look better; and a saved runs-table view with the
  headline columns (``cpt.ops.mlflow_views.headline_view``).

After train: the old- and new-language validation loss drawn on one chart (``loss_chart``), logged to the train run
and the parent run as an image chart and as the artifact ``charts/loss_new_vs_old.png`` (full size), which the
descriptions show and link. A train run that only re-exported a finished checkpoint says so in its description, and
no headline quotes a throughput for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cpt.ops import summary as summary_mod

log = logging.getLogger("cpt.ops.headline")

# in the "summary" section of the chart view, which sorts first (sections are the key up to its last "/")
LOSS_CHART_KEY = "summary/loss_new_vs_old"
# the same chart as a plain artifact: the artifacts view shows it at full size (the chart card is a thumbnail)
CHART_ARTIFACT = "charts/loss_new_vs_old.png"


def publish(layout: Any, tracker: Any, decision: dict[str, Any]) -> dict[str, Any]:
    """Write metrics/summary.json and show it in MLflow; returns the summary."""
    summary = summary_mod.write(layout)
    if not getattr(tracker, "active", False):
        return summary
    trained = last_train_trained(layout)
    metrics = summary_mod.mlflow_metrics(summary)
    if trained is False:  # a re-export measured no throughput; the recorded one belongs to an earlier run
        metrics = {k: v for k, v in metrics.items() if k not in ("summary/tokens_per_s", "summary/mfu")}
    tracker.log_metrics(metrics)
    tracker.log_parent_metrics(metrics)
    # the chart goes to the parent (the eval run links it there); a run without a parent keeps its own copy
    drawn = loss_chart_file(layout, tracker, parent_only=bool(getattr(tracker, "parent_run_id", None)))
    chart = chart_markdown(tracker) if drawn else None
    text = summary_mod.markdown(summary, decision, trained=trained, chart=chart)
    tracker.set_tags({"mlflow.note.content": text})
    tracker.set_parent_tags({"mlflow.note.content": text, "cpt.gate.decision": summary["decision"],
                             "cpt.gate.promoted": decision.get("promoted"),
                             "cpt.gate.reason": str(decision.get("reason", ""))[:5000],
                             "cpt.headline": summary_mod.headline(summary, decision)})
    forgetting = sorted(summary.get("forgetting", {}))
    primary = f"summary/forgetting/{forgetting[0]}" if forgetting else "summary/passed"
    from cpt.ops.mlflow_views import EXPERIMENT_TAGS, headline_view

    tracker.set_experiment_tags({**EXPERIMENT_TAGS, "mlflow.experiment.primaryMetric.name": primary,
                                 **headline_view(sorted(metrics))})
    return summary  # the registered version was described by the gate (cpt.ops.registry_view)


def last_train_trained(layout: Any) -> bool | None:
    """False when the last train run only re-exported a finished checkpoint (its timings say ``retrained:
    false``), True when it trained, None when no train timings are on disk."""
    from cpt.ops.timings import timings_file

    path = timings_file(layout, "train")
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("retrained")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def chart_markdown(tracker: Any, parent: bool = True) -> tuple[str, str] | None:
    """The loss chart in a description: (a link to it in the run's artifacts view, where it opens at full size; the
    image itself). Both relative to the UI's root (``#/experiments/...`` and the server's ``get-artifact``), so they
    work whatever address the UI is reached at."""
    run_id = (getattr(tracker, "parent_run_id", None) if parent else None) or getattr(tracker, "run_id", None)
    link = tracker.link(parent=parent, artifact=CHART_ARTIFACT, relative=True)
    if not run_id or not link:
        return None
    return (f"Validation loss, old and new language, full size: [{CHART_ARTIFACT}]({link})",
            f"![validation loss, old and new language](get-artifact?path={CHART_ARTIFACT}&run_uuid={run_id})")


def loss_chart_file(layout: Any, tracker: Any, parent_only: bool = False) -> bool:
    """Draw the old/new validation loss chart (large, readable full size) from metrics/train_curve.csv and log it as
    the artifact ``charts/loss_new_vs_old.png`` of the parent run (and of this run unless ``parent_only``)."""
    from cpt.evaluation.figures import loss_chart as draw
    from cpt.evaluation.report import read_curve

    curve = read_curve(Path(layout.metrics) / "train_curve.csv")
    if not curve:
        return False
    out = Path(layout.data) / "tracking_charts" / Path(CHART_ARTIFACT).name
    out.parent.mkdir(parents=True, exist_ok=True)
    if not draw(out, curve):
        return False
    tracker.log_parent_artifact(out, str(Path(CHART_ARTIFACT).parent))
    if not parent_only:
        tracker.log_artifact(out, str(Path(CHART_ARTIFACT).parent))
    return True


def loss_chart(layout: Any, tracker: Any, metrics: dict[str, Any] | None = None) -> None:
    """After train: old and new validation loss on one chart, as an artifact (full size) and an image chart of the
    train run and the parent; the train run's description says what it holds, and when it only re-exported a
    finished checkpoint, says that (no curves, no throughput in this run)."""
    if not getattr(tracker, "active", False):
        return
    drawn = loss_chart_file(layout, tracker)
    if drawn:
        out = Path(layout.data) / "tracking_charts" / Path(CHART_ARTIFACT).name
        from cpt.evaluation.report import read_curve

        steps = [s for s in read_curve(Path(layout.metrics) / "train_curve.csv").get("step", []) if s == s]
        tracker.log_image(out, LOSS_CHART_KEY, step=int(max(steps)) if steps else 0)
    lines = []
    if (metrics or {}).get("retrained") is False:
        lines.append(f"**Re-exported, not trained**: data/models/cpt was exported from the final checkpoint (step "
                     f"{(metrics or {}).get('resumed_from')}) of an earlier run with the same fingerprint; this run "
                     "has no per-step curves and no throughput (set train.resume=false to retrain).")
    chart = chart_markdown(tracker, parent=False) if drawn else None
    if chart:
        lines += list(chart)
    if lines:
        tracker.set_tags({"mlflow.note.content": "\n\n".join(lines), "cpt.train.retrained":
                          str((metrics or {}).get("retrained", True)).lower()})
