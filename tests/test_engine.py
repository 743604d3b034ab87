"""The engine and the sharded data stages: the same bytes whatever the worker count, a killed worker either retried
(Ray) or a clear failure that leaves the previous data/clean in place (local), and a real two-node Ray cluster
started on loopback inside a network namespace of its own (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpt.data import cleaning
from cpt.data.engine import Engine, EngineConfig, EngineError, config
from cpt.data.records import iter_docs, read_manifest
from cpt.errors import ConfigError
from cpt.layout import Layout
from cpt.stages import clean, ingest, shards, validate

sys.path.insert(0, str(Path(__file__).parent))
import engine_helpers  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _params(corpora: Path, **engine) -> dict:
    """viwiki in 0.15 MB shards (about a dozen), Korean in its own, NTREX vi as eval: decontam and dedup have work
    (viwiki's first articles include near-duplicate year stubs), and every task kind runs on several shards."""
    return {
        "seed": 5,
        "engine": engine,
        "ingest": {"corpus_dir": str(corpora), "shard_mb": 0.15, "sources": [
            {"name": "viwiki", "path": "viwiki/viwiki.jsonl.gz", "lang": "vi", "domain": "new", "role": "train",
             "max_docs": 400},
            {"name": "ko", "path": "ko_ud_kaist/ko_kaist_dev_test_docs.jsonl", "lang": "ko", "domain": "new",
             "role": "train", "max_docs": 60},
            {"name": "ntrex_vi", "path": "ntrex128/newstest2019-ref.vie.txt", "lang": "vi", "domain": "new",
             "role": "eval", "unit": "line"},
        ]},
        "clean": {"filters": {"vi": {"min_chars": 50}}},
    }


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, corpora):
    layout = Layout(tmp_path_factory.mktemp("w1"))
    params = _params(corpora, workers=1)
    ingest.run(params, layout)
    metrics = clean.run(params, layout)
    return layout, metrics


def test_two_workers_write_the_same_bytes_as_one(one_worker, tmp_path, corpora):
    layout1, m1 = one_worker
    assert len(read_manifest(layout1.raw)[0].shards) > 5  # several shards per source: real cross-shard work
    assert m1["near_duplicates"] > 0  # cross-shard clusters: the year stubs of viwiki's first articles
    layout2 = Layout(tmp_path)
    params = _params(corpora, workers=2)
    ingest.run(params, layout2)
    m2 = clean.run(params, layout2)
    assert _digest(layout1.raw) == _digest(layout2.raw)
    assert _digest(layout1.clean) == _digest(layout2.clean)
    for key in ("docs_out", "quarantined", "near_dedup", "by_source"):
        assert m1[key] == m2[key]
    v = validate.run(params, layout2)
    assert v["success"] and v["docs"] == m2["docs_out"]


def test_shards_are_a_partition_of_the_one_process_result(one_worker):
    """Shards + manifest carry counts and hashes; every doc is read back once, in order."""
    layout, m = one_worker
    for src in read_manifest(layout.clean):
        assert src.docs == sum(s["docs"] for s in src.shards)
        for s, path in zip(src.shards, src.paths(layout.clean)):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
    pos = {d["id"]: i for i, d in enumerate(iter_docs(layout.raw, name="viwiki"))}
    kept = [pos[d["id"]] for d in iter_docs(layout.clean, name="viwiki")]
    assert kept == sorted(set(kept)) and len(kept) == m["by_source"]["viwiki"]["docs_out"]  # input order, once


def test_a_killed_worker_fails_the_stage_and_keeps_the_previous_output(one_worker, corpora, monkeypatch):
    layout, _ = one_worker
    before = _digest(layout.clean)
    marker = layout.clean.with_name("killed-once")
    marker.unlink(missing_ok=True)
    monkeypatch.setattr(cleaning, "finish_shard", engine_helpers.finish_or_die)
    with pytest.raises(EngineError, match="worker process died"):
        clean.run(_params(corpora, workers=2), layout)
    assert marker.exists()  # it did die mid-stage
    assert _digest(layout.clean) == before  # data/clean is the previous, whole output


def test_engine_map_keeps_task_order_and_checks_its_params():
    with Engine(EngineConfig(workers=2)) as eng:
        assert eng.map(engine_helpers.square, [(i,) for i in range(7)]) == [i * i for i in range(7)]
    with Engine(EngineConfig(workers=2)) as eng:  # largest first, results still in task order
        assert eng.map(engine_helpers.square, [(i,) for i in range(7)], cost=[1, 9, 3, 3, 0, 7, 2]) == \
            [i * i for i in range(7)]
    engine_helpers.STARTED.clear()
    with Engine(EngineConfig(workers=1)) as eng:
        assert eng.map(engine_helpers.record_start, [(i,) for i in range(5)], cost=[2, 5, 2, 0, 9]) == list(range(5))
    assert engine_helpers.STARTED == [4, 1, 0, 2, 3]  # descending cost, ties in task order
    with Engine(EngineConfig(workers=2)) as eng, pytest.raises(EngineError, match="worker process died"):
        eng.map(engine_helpers.kill_self, [(0,), (1,), (2,)])
    with pytest.raises(ConfigError, match="unknown"):
        config({"engine": {"nodes": 2}})
    with pytest.raises(ConfigError, match="kind"):
        config({"engine": {"kind": "dask"}})
    assert config({}) == EngineConfig("local", 1, None, 3)


# ---------------------------------------------------------------- Ray


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _can_unshare() -> list[str] | None:
    for cmd in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            if subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


DRIVER = textwrap.dedent('''
    import json, sys
    import ray.cloudpickle
    params = json.loads({params!r})
    sys.path.insert(0, {tests!r})
    import engine_helpers
    ray.cloudpickle.register_pickle_by_value(engine_helpers)  # the cluster's workers need not see tests/
    ray.init(address=params["engine"]["address"])  # the driver joins first, so the stage's engine reuses it
    from cpt.data import cleaning
    from cpt.layout import Layout
    from cpt.stages import clean, ingest
    layout = Layout({root!r})
    ingest.run(params, layout)
    clean.run(params, layout)
    cleaning.finish_shard = engine_helpers.finish_or_die  # a worker dies once in the write pass: Ray retries it
    m = clean.run(params, layout)
    from cpt.stages import shards, validate
    print("VALID", validate.run(params, layout)["success"])
    shards.run(params, layout)  # one encode task per clean shard, on the cluster
    print("NODES", len([n for n in ray.nodes() if n["Alive"]]))
    print("DOCS", m["docs_out"])
''')


def _tokenizer(folder: Path, corpora: Path) -> Path:
    """A small SentencePiece tokenizer folder for the shards stage (a few seconds)."""
    import gzip

    from cpt.training import tiny

    with gzip.open(corpora / "viwiki" / "viwiki.jsonl.gz", "rt", encoding="utf-8") as fh:
        lines = [ln for _, row in zip(range(60), fh) for ln in json.loads(row)["text"].split("\n") if ln.strip()]
    tiny.train_tokenizer(lines, folder / "tokenizer.model", vocab_size=512, seed=0)
    tiny.write_hf_tokenizer(folder / "tokenizer.model", folder)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not _have_ray(), reason="ray not installed (pip install 'cpt[ray]')")
def test_two_node_ray_cluster_on_loopback_matches_local(one_worker, tmp_path, corpora):
    unshare = _can_unshare()
    if unshare is None:
        pytest.skip("cannot make a network namespace here (unshare -n)")
    layout1, m1 = one_worker
    root = tmp_path / "ray"
    shards_cfg = {"tokenizer": str(_tokenizer(tmp_path / "tok", corpora)), "block_size": 64}
    params = {**_params(corpora, kind="ray", address="127.0.0.1:6390"), "shards": shards_cfg}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent), params=json.dumps(params), root=str(root)))
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = "--node-ip-address 127.0.0.1 --num-cpus 1 --disable-usage-stats"
    script = f"""
        set -e
        ip link set lo up
        export RAY_AUTH_MODE=disabled PYTHONPATH={SRC}
        {ray_bin} start --head --port 6390 {common} --include-dashboard false >/dev/null
        {ray_bin} start --address 127.0.0.1:6390 {common} >/dev/null
        trap '{ray_bin} stop --force >/dev/null 2>&1' EXIT
        {sys.executable} {driver}
    """
    env = {**os.environ, "PYTHONPATH": SRC, "RAY_AUTH_MODE": "disabled", "CPT_PROGRESS": "0"}
    out = subprocess.run([*unshare, "bash", "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "NODES 2" in out.stdout
    assert _digest(Layout(root).clean) == _digest(layout1.clean)
    assert _digest(Layout(root).raw) == _digest(layout1.raw)
    assert (Layout(root).data / "killed-once").exists()  # the worker did die, and the retried task finished
    assert "VALID True" in out.stdout
    shards.run({**_params(corpora, workers=1), "shards": shards_cfg}, layout1)  # the same stage in one process
    assert _digest(Layout(root).shards) == _digest(layout1.shards)


def test_staged_near_dedup_equals_the_one_process_union_find(tmp_path):
    """Signatures split over 3 shards, LSH per band on disk, verify + connected components == dedup.near_duplicates,
    including a bucket of 25 near-copies (more pairs than max_bucket_pairs: first + consecutive pairs only) and
    documents without a signature (contaminated) left out."""
    import numpy as np

    from cpt.data import dedup
    from cpt.data.cleanwork import band_keys
    from cpt.data.dedup_staged import SignatureStore, band_pairs, verify_and_cluster

    rng = np.random.default_rng(0)
    n, perm, bands, rows = 300, 128, 18, 7
    sig = rng.integers(0, 2**32 - 1, size=(n, perm), dtype=np.uint32)
    for i in range(1, 25):  # 25 near-copies of doc 10, each with a few permutations changed
        sig[10 + i * 7] = sig[10]
        sig[10 + i * 7, rng.choice(perm, size=int(rng.integers(0, 40)), replace=False)] = rng.integers(0, 2**31)
    sig[250], sig[260] = sig[5], sig[5]  # an exact-signature cluster
    sig[260, :20] = 1
    sig[270] = 0xFFFFFFFF  # no signature (contaminated / no tokens)
    want = dedup.near_duplicates(sig, bands, rows, threshold=0.8, seed=3)

    work = tmp_path / "work"
    keys, g0 = [], []
    for k, (a, b) in enumerate([(0, 100), (100, 180), (180, n)]):
        keys.append(f"src/{k:05d}")
        g0.append(a)
        keep = ~(sig[a:b] == 0xFFFFFFFF).all(axis=1)
        for name, arr in (("sig", sig[a:b][keep]), ("sig_g", np.arange(a, b)[keep]),
                          ("bands", band_keys(sig[a:b][keep], bands, rows, 3))):
            (work / name / "src").mkdir(parents=True, exist_ok=True)
            np.save(work / name / f"{keys[-1]}.npy", arr)
    np.save(work / "exact_dups.npy", np.zeros(0, np.int64))
    for b in range(bands):
        band_pairs(str(work), b, keys, str(work / "exact_dups.npy"))
    got = verify_and_cluster(str(work), bands, SignatureStore(str(work), keys, g0), perm, 0.8)
    assert got["dup"].tolist() == want.duplicates.tolist() and len(got["dup"]) > 15
    assert got["root"].tolist() == want.root[want.duplicates].tolist()
    assert (got["candidate_pairs"], got["verified_pairs"]) == (want.candidate_pairs, want.verified_pairs)
