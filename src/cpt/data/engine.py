"""Where the per-shard work of the data stages runs: ``engine: {kind: local | ray, workers: N, address: null}``.

A stage splits its work into independent tasks (one per shard, per band, per partition), each a module-level
function of picklable arguments that reads and writes files, and asks the engine to ``map`` them. Results come back
in task order, never in completion order, so a stage's output is the same byte for byte whatever the engine and the
worker count.

* ``local`` (default): ``workers`` processes on this machine (``concurrent.futures`` with ``spawn``, so a worker
  starts clean like a Ray worker and no forked thread state leaks in); ``workers: 1`` runs the tasks in this process,
  with no pool at all. A worker that dies (killed, out of memory) fails the stage with an ``EngineError`` that names
  the task: the stage's output folder is swapped in only at the end, so nothing half-written is left.
* ``ray``: ``ray.init(address=...)`` on an existing cluster (``address: auto`` or ``host:port``; null starts an
  embedded one-machine instance with ``workers`` CPUs). Ray retries a task whose worker died (``max_retries``).
  Ray is imported only here, lazily: ``pip install cpt[ray]``. Tasks read and write the stage's folders, so every
  node must see the project folder at the same path (a shared filesystem, as datatrove and NeMo Curator assume).
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cpt.errors import ConfigError, CptError
from cpt.progress import progress

log = logging.getLogger("cpt.engine")

DEFAULTS: dict[str, Any] = {"kind": "local", "workers": 1, "address": None, "max_retries": 3}
KINDS = ("local", "ray")


class EngineError(CptError):
    """A task could not run to the end (its worker died, or it raised)."""


@dataclass(frozen=True)
class EngineConfig:
    kind: str = "local"
    workers: int = 1
    address: str | None = None
    max_retries: int = 3


def config(params: dict[str, Any]) -> EngineConfig:
    """The top-level ``engine`` section (shared by every data stage), with ``CPT_ENGINE_*`` environment overrides
    so a deployment can point the same params at a cluster without editing them."""
    sec = dict(params.get("engine") or {})
    unknown = set(sec) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"engine: unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **sec}
    for key in ("kind", "workers", "address"):
        env = os.environ.get(f"CPT_ENGINE_{key.upper()}")
        if env:
            cfg[key] = env
    if cfg["kind"] not in KINDS:
        raise ConfigError(f"engine.kind: expected one of {KINDS}, got {cfg['kind']!r}")
    try:
        workers = int(cfg["workers"])
    except (TypeError, ValueError):
        raise ConfigError(f"engine.workers: expected a positive integer, got {cfg['workers']!r}") from None
    if workers < 1:
        raise ConfigError(f"engine.workers: expected a positive integer, got {workers}")
    return EngineConfig(cfg["kind"], workers, cfg["address"] or None, int(cfg["max_retries"]))


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Run one task and measure the CPU seconds it took in its worker."""
    c0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - c0


def makespan(cpu: list[float], workers: int) -> float:
    """The finish time of ``cpu`` tasks handed out in order to the first free of ``workers`` (as the pool does)."""
    free = [0.0] * min(workers, max(1, len(cpu)))
    for c in cpu:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


class Engine:
    """``with Engine(cfg) as eng: results = eng.map(fn, args_list, name="clean: pass 1")``.

    ``summary()`` accounts the CPU seconds of every task and of the driver, and the ideal wall time on ``workers``
    idle cores (driver + each map's makespan): on a shared machine, where the wall clock measures the neighbours, the
    CPU accounting is what shows how the work divides (bench/bench_scale.py reports both)."""

    def __init__(self, cfg: EngineConfig | None = None) -> None:
        self.cfg = cfg or EngineConfig()
        self._pool: ProcessPoolExecutor | None = None
        self._ray: Any = None
        self._ray_started = False
        self._cpu0 = time.process_time()
        self._maps: list[dict[str, Any]] = []
        self._inproc_cpu = 0.0

    def summary(self) -> dict[str, Any]:
        task_cpu = sum(m["task_cpu_s"] for m in self._maps)
        driver = time.process_time() - self._cpu0 - self._inproc_cpu
        ideal = driver + sum(m["makespan_s"] for m in self._maps)
        return {"kind": self.cfg.kind, "workers": self.cfg.workers, "tasks": sum(m["tasks"] for m in self._maps),
                "task_cpu_s": round(task_cpu, 2), "driver_cpu_s": round(driver, 2),
                "ideal_wall_s": round(ideal, 2), "maps": self._maps}

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def workers(self) -> int:
        return self.cfg.workers

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], name: str = "task",
            cost: Sequence[float] | None = None) -> list[Any]:
        """``[fn(*t) for t in tasks]``, run on the engine, results in task order.

        ``cost`` (e.g. each shard's bytes) sets the order tasks are handed out: largest first (LPT scheduling),
        so the shards' short tails fill the gaps at the end instead of a big shard starting last on an otherwise
        idle pool. It changes when a task runs, never what it computes or where its result goes."""
        n = len(tasks)
        if cost is not None and len(cost) != n:
            raise ValueError(f"{name}: {len(cost)} costs for {n} tasks")
        order = sorted(range(n), key=lambda i: -float(cost[i])) if cost is not None else list(range(n))
        run = [(fn, *tasks[i]) for i in order]
        if not run:
            return []
        with progress(total=n, desc=name, unit=" tasks", leave=False) as bar:  # tasks done, in any order
            if self.cfg.kind == "ray":
                timed = self._map_ray(_timed, run, name, bar)
            elif self.cfg.workers == 1 or n == 1:
                timed = []
                for t in run:
                    timed.append(_timed(*t))
                    bar.update(1)
                self._inproc_cpu += sum(c for _, c in timed)
            else:
                timed = self._map_local(_timed, run, name, bar)
        cpu = [c for _, c in timed]
        self._maps.append({"name": name, "tasks": n, "task_cpu_s": round(sum(cpu), 2),
                           "makespan_s": round(makespan(cpu, self.cfg.workers), 2)})
        out: list[Any] = [None] * n
        for i, (r, _) in zip(order, timed):
            out[i] = r
        return out

    # -- local process pool
    def _map_local(self, fn: Callable[..., Any], tasks: list[tuple], name: str, bar: Any) -> list[Any]:
        import multiprocessing as mp

        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.cfg.workers, mp_context=mp.get_context("spawn"))
        futures = [self._pool.submit(fn, *t) for t in tasks]
        index = {fut: i for i, fut in enumerate(futures)}
        out: list[Any] = [None] * len(futures)
        for fut in as_completed(futures):
            i = index[fut]
            try:
                out[i] = fut.result()
                bar.update(1)
            except BrokenProcessPool as exc:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                raise EngineError(
                    f"{name}: a worker process died (killed or out of memory) by task {i + 1} of {len(tasks)} "
                    f"(that one or one running beside it); nothing was written to the stage's output. Rerun the stage (fewer engine.workers if "
                    f"memory ran out)."
                ) from exc
        return out

    # -- ray
    def _map_ray(self, fn: Callable[..., Any], tasks: list[tuple], name: str, bar: Any) -> list[Any]:
        ray = self._ray_init()
        remote = ray.remote(max_retries=self.cfg.max_retries, retry_exceptions=False)(fn)
        refs = [remote.remote(*t) for t in tasks]
        try:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                bar.update(len(ready))
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            raise EngineError(f"{name}: a Ray task failed after {self.cfg.max_retries} retries: {exc}") from exc

    def _ray_init(self) -> Any:
        if self._ray is not None:
            return self._ray
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("engine.kind: ray needs the `ray` package (pip install 'cpt[ray]')") from exc
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
            src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            # workers import cpt from the same source tree as the driver (a checkout, not necessarily installed)
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}}
            if self.cfg.address:
                ray.init(address=self.cfg.address, runtime_env=env, **{k: v for k, v in kwargs.items()
                                                                       if k != "include_dashboard"})
            else:
                ray.init(num_cpus=self.cfg.workers, runtime_env=env, **kwargs)
            self._ray_started = True
            log.info("ray: %s", ray.cluster_resources())
        self._ray = ray
        return ray

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._ray is not None and self._ray_started:
            self._ray.shutdown()
        self._ray = None
        self._ray_started = False
