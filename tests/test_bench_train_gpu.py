"""The GPU throughput bench's --smoke mode (CPU, tiny shape, 2 steps; FSDP2 over a gloo world of one) runs the same
code paths as on the H100, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_gpu_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_train_gpu", REPO / "bench" / "bench_train_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "train_gpu.json"
    result = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"hf_eager", "cpt_eager", "cpt_fsdp"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["mfu"] is None
        assert r["vocab_padded"] % 64 == 0
    assert rows["cpt_eager"]["params"] == rows["hf_eager"]["params"] == rows["cpt_fsdp"]["params"]
    assert rows["cpt_fsdp"]["world_size"] == 1  # FSDP2 over a world of one: the multi-GPU code path
    assert "| cpt_eager |" in capsys.readouterr().out
