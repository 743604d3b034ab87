"""Helpers for the ops tests (no tests here): real servers on loopback, a temporary copy of the project.

Every process started here is started in its own process group and stopped by its pid (SIGTERM to the group, then
SIGKILL), in a finally, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update({"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "CPT_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group (twice: `prefect worker` ignores the first), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    for _ in range(2):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace / 2)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def mlflow_server_cmd(port: int, store: Path) -> list[str]:
    return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art")]


@contextlib.contextmanager
def mlflow_server(store: Path, port: int | None = None) -> Iterator[str]:
    port = port or free_port()
    store.mkdir(parents=True, exist_ok=True)
    if not (store / "mlflow.db").exists():
        mlflow_db(store)  # a migrated store: the server then starts in seconds
    log = store / "server.log"
    proc = spawn(mlflow_server_cmd(port, store), log, base_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def project_copy(dest: Path, params_text: str, corpora: Path | None = None) -> Path:
    """The tracked files of this repo (plus the stage modules that exist in the working tree) in ``dest``, as a
    fresh git repo with one commit and DVC initialised, with ``params_text`` as its params.yaml: the tests run the
    real dvc.yaml there and never touch the developer's data/, mlflow.db or DVC cache."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "tests/", "bench/", "demos/")):  # demos/: a second pipeline
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(params_text, encoding="utf-8")
    # dvc.yaml names the corpus files as remote://corpora/... deps: the repo's default (../shared/corpora, from the
    # project) in .dvc/config, and what `make setup` writes into .dvc/config.local (DVC copies that one into its
    # --temp / queued workspaces; cpt.dvc_paths)
    shared = dest.parent / "shared"
    if corpora is not None and not shared.exists():
        shared.mkdir()
        (shared / "corpora").symlink_to(corpora)
    (dest / ".dvc" / "config").write_text("[core]\n    analytics = false\n['remote \"corpora\"']\n"
                                          "    url = ../../shared/corpora\n", encoding="utf-8")  # no shared remote
    if corpora is not None:
        (dest / ".dvc" / "config.local").write_text(f"['remote \"corpora\"']\n    url = {corpora}\n", encoding="utf-8")
    env = base_env(GIT_AUTHOR_NAME="cpt-test", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="cpt-test",
                   GIT_COMMITTER_EMAIL="t@example.invalid")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.name", "cpt-test"],
                ["git", "config", "user.email", "t@example.invalid"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "test project"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


_TEMPLATE_DB: Path | None = None


def mlflow_db(dest_dir: Path) -> Path:
    """An empty, fully migrated MLflow SQLite store at ``dest_dir/mlflow.db``. Migrating a new store takes 5-15 s
    (alembic, ~60 revisions); it is done once per test process and copied after that."""
    global _TEMPLATE_DB
    if _TEMPLATE_DB is None:
        import tempfile

        from mlflow import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="cpt-mlflow-template-"))
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _TEMPLATE_DB = folder / "mlflow.db"
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_TEMPLATE_DB, dest_dir / "mlflow.db")
    return dest_dir / "mlflow.db"


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_params_text(corpora: Path, extra: dict | None = None) -> str:
    """params.yaml with tests/params_tiny.yaml merged over it (and ``extra`` over that), corpora made absolute."""
    import yaml

    from cpt.params import load_params

    params = deep_merge(load_params(REPO / "params.yaml"), load_params(REPO / "tests" / "params_tiny.yaml"))
    params = deep_merge(params, extra or {})
    params["ingest"]["corpus_dir"] = str(corpora)
    return yaml.safe_dump(params, sort_keys=False, allow_unicode=True)
