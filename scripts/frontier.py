"""The frontier over experiments: `dvc exp` sweeps (replay ratio, peak learning rate) and the merge points on one
pair of gain-vs-forgetting axes, with the budget, in one PNG (and in the MLflow experiment when mlflow is there).

    python scripts/frontier.py                        # runs `dvc exp show --json` in the project
    python scripts/frontier.py --exp-json show.json   # a saved `dvc exp show --json`
    python scripts/frontier.py --no-mlflow --out reports/frontier_experiments.png

Each experiment (and each baseline commit) is one marker at the numbers the gate binds on (``cpt.merge.frontier
.binding``: the old-domain source or language whose forgetting interval reaches highest, the new-domain one whose
gain interval reaches lowest), read from its commit's metrics/eval.json (``git show <rev>:metrics/eval.json``: DVC
commits every experiment) and, for the workspace, from the file itself. Where no eval.json can be read (a synthetic
exp show, a rev git no longer has) the per-language numbers of metrics/summary.json (the DVC metric `dvc exp show`
carries) are used and the label says "(per language)". The merge points are the workspace's metrics/merge.json.
Labels: the experiment's name and its ``train.replay_ratio`` / ``train.lr``. docs/merge.md has the sweep queue.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from cpt.merge.frontier import binding, plot  # noqa: E402

KNOBS = (("replay_ratio", "replay"), ("lr", "lr"))


def _file(data: dict[str, Any] | None, section: str, name: str) -> dict[str, Any]:
    block = ((data or {}).get(section) or {}).get(name) or {}
    return block.get("data") or {} if isinstance(block, dict) else {}


def states(show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every baseline commit and experiment of a `dvc exp show --json` as ``{"name", "rev", "params", "summary"}``
    (the newest rev of each experiment; queued or failed ones, without metrics, are left out)."""
    out = []

    def add(state: dict[str, Any], name: str | None) -> None:
        data = state.get("data") or {}
        summary = _file(data, "metrics", "metrics/summary.json")
        if not summary or state.get("error"):
            return
        out.append({"name": name or state.get("name") or str(state.get("rev", ""))[:7],
                    "rev": data.get("rev") or state.get("rev"), "params": _file(data, "params", "params.yaml"),
                    "summary": summary})

    for base in show:
        add(base, base.get("name") or ("workspace" if base.get("rev") == "workspace" else None))
        for exp in base.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs:
                add(revs[0], exp.get("name") or revs[0].get("name"))
    return out


def eval_metrics(root: Path, rev: str | None) -> dict[str, Any] | None:
    """metrics/eval.json at ``rev`` (the workspace's file for "workspace"), or None."""
    if rev == "workspace":
        path = root / "metrics" / "eval.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    try:
        res = subprocess.run(["git", "show", f"{rev}:metrics/eval.json"], cwd=root, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout)
    except ValueError:
        return None


def label(state: dict[str, Any], per_language: bool) -> str:
    train = state["params"].get("train") or {}
    knobs = ", ".join(f"{short} {train[key]:g}" for key, short in KNOBS if isinstance(train.get(key), (int, float)))
    return f"{state['name']}" + (f" ({knobs})" if knobs else "") + (" (per language)" if per_language else "")


def points(root: Path, show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One plotted marker per experiment: ``{"label", "binding", "name", "rev", "params"}``."""
    out = []
    for s in states(show):
        ev = eval_metrics(root, s["rev"])
        b = binding(ev if ev else s["summary"])
        out.append({"label": label(s, ev is None), "binding": b, "name": s["name"], "rev": s["rev"],
                    "replay_ratio": (s["params"].get("train") or {}).get("replay_ratio"),
                    "lr": (s["params"].get("train") or {}).get("lr")})
    return out


def budgets(root: Path, show: list[dict[str, Any]]) -> tuple[float, float]:
    """(max_forgetting, min_gain): metrics/merge.json's, else the first state's params.yaml gate section."""
    merge = root / "metrics" / "merge.json"
    if merge.exists():
        m = json.loads(merge.read_text(encoding="utf-8"))
        return float(m["max_forgetting"]), float(m["min_gain"])
    for s in states(show):
        g = s["params"].get("gate") or {}
        if "max_forgetting" in g:
            return float(g["max_forgetting"]), float(g.get("min_gain", 0.02))
    return 0.05, 0.02


def log_to_mlflow(root: Path, png: Path, data: Path) -> str | None:
    """The PNG and its numbers as artifacts of a run ``frontier`` in the project's MLflow experiment; None when
    mlflow is not installed or tracking is off."""
    try:
        import mlflow
    except ImportError:
        return None
    from cpt.layout import Layout
    from cpt.ops.run_meta import configure_mlflow_env, settings
    from cpt.params import load_params

    params = load_params(root / "params.yaml") if (root / "params.yaml").exists() else {}
    cfg = settings(params, Layout(root))
    if not cfg["enabled"]:
        return None
    configure_mlflow_env(cfg)
    mlflow.set_tracking_uri(cfg["uri"])
    if mlflow.get_experiment_by_name(cfg["experiment"]) is None:
        mlflow.create_experiment(cfg["experiment"], artifact_location=Path(cfg["artifact_root"]).as_uri())
    mlflow.set_experiment(cfg["experiment"])
    with mlflow.start_run(run_name="frontier", tags={"cpt.view": "frontier"}) as run:
        mlflow.log_artifact(str(png), "frontier")
        mlflow.log_artifact(str(data), "frontier")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--exp-json", type=Path, help="a saved `dvc exp show --json` (default: run it)")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: <root>/reports/frontier_experiments.png)")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.exp_json:
        show = json.loads(args.exp_json.read_text(encoding="utf-8"))
    else:
        res = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"frontier: `dvc exp show --json` failed in {root}: {res.stderr.strip()}", file=sys.stderr)
            return 1
        show = json.loads(res.stdout)
    exps = points(root, show)
    merge_file = root / "metrics" / "merge.json"
    merge = json.loads(merge_file.read_text(encoding="utf-8")) if merge_file.exists() else {}
    max_forgetting, min_gain = budgets(root, show)
    out = (args.out or root / "reports" / "frontier_experiments.png").resolve()
    plot(out, merge.get("points") or [], max_forgetting=max_forgetting, min_gain=min_gain,
         chosen=merge.get("chosen"), experiments=exps,
         title="frontier: dvc experiments (replay, peak lr) and merge points")
    data = out.with_suffix(".json")
    data.write_text(json.dumps({"experiments": exps, "merge_points": [
        {"alpha": p["alpha"], "binding": p["binding"]} for p in merge.get("points") or []],
        "max_forgetting": max_forgetting, "min_gain": min_gain}, indent=2) + "\n", encoding="utf-8")
    for e in exps:
        f, g = e["binding"]["forgetting"] or {}, e["binding"]["gain"] or {}
        print(f"{e['label']}: forgetting {f.get('value')} {f.get('ci95')} ({f.get('name')}), "
              f"gain {g.get('value')} {g.get('ci95')} ({g.get('name')})")
    run_id = None if args.no_mlflow else log_to_mlflow(root, out, data)
    print(f"wrote {out}" + (f"; MLflow run {run_id}" if run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
