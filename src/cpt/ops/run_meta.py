"""Tracking settings (the ``tracking`` params section) and the metadata every run carries: provenance tags, flattened
metric names, parameter values. No mlflow import."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENV_PARENT = "CPT_MLFLOW_RUN_ID"
ENV_SWITCH = "CPT_TRACKING"  # "0"/"false"/"off" turns tracking off whatever params say

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "uri": "sqlite:///mlflow.db",  # MLFLOW_TRACKING_URI wins; a relative sqlite path is relative to the project root
    "artifact_root": "mlartifacts",  # for sqlite/file stores; a server stores artifacts itself (--serve-artifacts)
    "experiment": "cpt",
    "model_name": "cpt",  # registered model name (the gate aliases its versions)
    "log_model": True,  # log data/models/cpt into the eval run and register it
    "group_stages": True,  # plain `dvc repro`: stages of one (commit, params) share a parent run
    # per-step metrics also go to the parent run. Off: the parent shows the headline (summary/...) first and alone,
    # and its chart view the old/new loss image; the curves are in the train run (compare train runs for overlays)
    "mirror_to_parent": False,
    "http_timeout": 5,  # seconds per HTTP request to a tracking server
    "http_retries": 0,  # retries per request inside mlflow; cpt retries the whole queue itself
    "flush_interval": 5.0,  # seconds between background sends
    "close_timeout": 10.0,  # seconds close() keeps retrying before spooling to disk
    "spool_dir": "data/tracking_spool",
    "system_metrics": ["train"],  # stages whose runs get CPU/GPU/memory samples (mlflow's system metrics)
    "system_metrics_interval": 10,  # seconds between samples
}

# Reports each stage writes (docs/architecture.md); logged as artifacts when the stage closes, with metrics/<stage>.json.
STAGE_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "ingest": ("data/raw/manifest.json",),
    "clean": ("data/clean/manifest.json",),
    "validate": ("reports/data_docs",),
    "base": ("data/base/cpt_base.json", "data/base/config.json"),
    "tokenizer": ("reports/fertility.md", "data/tokenizer/new_tokens.json"),
    "shards": ("data/shards/meta.json",),
    "train": ("metrics/train_curve.csv",),
    "eval": (),  # the eval stage logs reports/eval/* itself (artifact folder eval/)
}


def settings(params: dict[str, Any], layout: Any) -> dict[str, Any]:
    """The ``tracking`` section with defaults, the env overrides applied and paths resolved."""
    sec = params.get("tracking") or {}
    cfg = {**DEFAULTS, **(sec if isinstance(sec, dict) else {})}
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "off", "no"):
        cfg["enabled"] = False
    # relative to the project DVC was started in: a `dvc exp run --temp` / queued run works in a copy that is deleted
    # afterwards, and its runs belong in the project's store (cpt.dvc_paths.origin_root)
    from cpt.dvc_paths import origin_root

    home = type(layout)(origin_root(layout.root))
    uri = os.environ.get("MLFLOW_TRACKING_URI") or str(cfg["uri"])
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(home.resolve(uri[len("sqlite:///"):]))
    cfg["uri"] = uri
    cfg["artifact_root"] = str(home.resolve(cfg["artifact_root"]))
    cfg["spool_dir"] = str(home.resolve(cfg["spool_dir"]))
    cfg["root"] = str(layout.root)
    return cfg


def configure_mlflow_env(cfg: dict[str, Any]) -> None:
    """Short timeouts before mlflow reads them (user-set env vars win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg["http_timeout"])))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(cfg["http_retries"])))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _git(root: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def params_hash(params: dict[str, Any]) -> str:
    """Hash of the params that shape results (the tracking section does not)."""
    shaped = {k: v for k, v in params.items() if k != "tracking"}
    return hashlib.sha256(json.dumps(shaped, sort_keys=True, default=str).encode()).hexdigest()


def device_tag() -> str:
    torch = sys.modules.get("torch")  # only ask torch if the stage already imported it (it costs seconds)
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.get_device_name(0)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cpu (CUDA_VISIBLE_DEVICES={visible})" if visible else "cpu"


def base_model(params: dict[str, Any], layout: Any) -> str:
    meta = Path(layout.base) / "cpt_base.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return str(json.loads(meta.read_text(encoding="utf-8")).get("source"))
    base = params.get("base") or {}
    for key in ("source", "model", "name", "id"):
        if isinstance(base, dict) and base.get(key):
            return str(base[key])
    return "unknown"


def run_tags(params: dict[str, Any], layout: Any) -> dict[str, str]:
    """Provenance every run carries: git commit (+dirty), dvc.lock hash, base model, device, DVC experiment."""
    root = str(layout.root)
    tags = {"mlflow.user": safe_user(), "mlflow.source.type": "LOCAL", "cpt.params_hash": params_hash(params)[:12],
            "cpt.base_model": base_model(params, layout), "cpt.device": device_tag()}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["cpt.git.dirty"] = str(bool(_git(root, "status", "--porcelain", "--untracked-files=no")))
    lock = Path(root) / "dvc.lock"
    tags["cpt.dvc_lock"] = hashlib.sha256(lock.read_bytes()).hexdigest()[:12] if lock.exists() else "none"
    if os.environ.get("DVC_EXP_NAME"):
        tags["cpt.dvc_exp"] = os.environ["DVC_EXP_NAME"]
        tags["cpt.dvc_exp_baseline"] = os.environ.get("DVC_EXP_BASELINE_REV", "")
    return tags


def safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_name(key: str) -> str:
    return _NAME_BAD.sub("_", key)[:250]


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested stage metrics -> ``{"a/b": float}``; non-numbers and non-finite values are left out (MLflow can't
    plot them; the JSON file keeps them)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, bool):
            out[metric_name(name)] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[metric_name(name)] = float(value)
    return out


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 6000 else text[:5990] + "...[cut]"


def now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------------------------------
