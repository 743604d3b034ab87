"""What a pipeline run is called in MLflow: named for what changed, so two runs can be told apart at a glance.

* ``dvc exp run -n replay10 -S train.replay_ratio=0.1`` -> ``replay10 (replay_ratio=0.1)``;
* a plain ``dvc repro`` with params edited since the commit -> ``replay_ratio=0.1 @ 49c8a31``;
* a plain ``dvc repro`` of the commit as it is -> ``baseline @ 49c8a31``.

"What changed" is the params diff against the commit the run starts from (``DVC_EXP_BASELINE_REV`` under ``dvc exp``,
else HEAD), the same thing ``dvc params diff`` shows. The tag ``cpt.dvc_exp`` says which kind of run it is (the
experiment's name, ``baseline`` or ``workspace``) so one MLflow filter finds a baseline and its experiments.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

MAX_NAME = 80


def committed_params(root: str, rev: str = "HEAD") -> dict[str, Any] | None:
    """params.yaml as committed at ``rev`` (None outside git or when it is not there)."""
    try:
        out = subprocess.run(["git", "show", f"{rev}:params.yaml"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    from cpt.params import parse_yaml

    try:
        data = parse_yaml(out.stdout)
    except Exception:  # noqa: BLE001 - a broken committed file names nothing
        return None
    return data if isinstance(data, dict) else None


def changed(params: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """Flat ``{"train.replay_ratio": 0.1}`` of the params that differ from ``before`` (tracking settings excluded:
    they do not change results)."""
    from cpt.params import flatten

    if before is None:
        return {}
    now = {k: v for k, v in flatten(params).items() if not k.startswith("tracking.")}
    old = {k: v for k, v in flatten(before).items() if not k.startswith("tracking.")}
    return {k: now.get(k) for k in sorted(set(now) | set(old)) if now.get(k) != old.get(k)}


def describe(diff: dict[str, Any]) -> str:
    """``replay_ratio=0.1, lr=0.001``: each key by its last part unless two changed keys share it."""
    lasts = [k.rsplit(".", 1)[-1] for k in diff]
    parts = []
    for key, value in diff.items():
        short = key.rsplit(".", 1)[-1]
        name = short if lasts.count(short) == 1 else key
        text = value if isinstance(value, str) else json.dumps(value, default=str) \
            if not isinstance(value, (int, float, bool)) else str(value)
        text = text.replace("'", '"')  # the name is searched by an MLflow filter string (mlflow_sink.unique_name)
        parts.append(f"{name}={text if len(text) <= 20 else text[:17] + '...'}")
    out = ", ".join(parts)
    if len(out) > MAX_NAME - 14:
        keep = []
        for p in parts:
            if len(", ".join(keep + [p])) > MAX_NAME - 24:
                break
            keep.append(p)
        out = ", ".join(keep) + f" +{len(parts) - len(keep)} more"
    return out


def pipeline_label(params: dict[str, Any], root: str, commit: str | None) -> tuple[str, dict[str, str]]:
    """``(run name, tags)`` for the parent run of one pipeline execution."""
    exp = os.environ.get("DVC_EXP_NAME")
    base_rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    diff = changed(params, committed_params(root, base_rev)) if commit else {}
    what = describe(diff)
    short = (commit or "")[:7]
    if exp:
        name, kind = (f"{exp} ({what})" if what else exp), exp
    elif not commit:
        name, kind = "pipeline (no git)", "workspace"
    elif what:
        name, kind = f"{what} @ {short}", "workspace"
    else:
        name, kind = f"baseline @ {short}", "baseline"
    tags = {"cpt.dvc_exp": kind, "cpt.params_changed": what or "(none)"}
    return name[:MAX_NAME], tags
