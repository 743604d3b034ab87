"""The CPU training bench's --smoke mode (a tiny random Llama, seq 32): both sides run in their own interpreter and
see the same batches, so the script cannot rot and its ratios compare the same work. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_cpu_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_train_cpu", REPO / "bench" / "bench_train_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "train_cpu.json"
    bench.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--threads", "1"])
    result = json.loads(out.read_text())
    cpt, hf = result["sides"]["cpt"], result["sides"]["hf"]
    s = result["settings"]
    n = s["warmup"] + s["steps"]
    for side in (cpt, hf):
        assert side["threads"] == 1
        assert len(side["losses"]) == n and len(side["step_times_s"]) == n
        assert all(math.isfinite(v) for v in side["losses"])
        assert side["tokens_per_s"] > 0 and side["peak_rss_mb"] >= side["rss_after_load_mb"] > 0
    # same weights, same batch, same loss definition: the first step's loss is the same number on both sides;
    # with the same AdamW, clip and LR the later steps follow (a reordered or re-shifted batch would not)
    assert abs(cpt["losses"][0] - hf["losses"][0]) < 1e-4
    assert all(abs(a - b) < 1e-3 for a, b in zip(cpt["losses"], hf["losses"]))
    assert len(set(round(v, 4) for v in cpt["losses"])) == n  # each step saw another batch
    r = result["ratios"]
    assert r["tokens_per_s"] == cpt["tokens_per_s"] / hf["tokens_per_s"]
    assert r["peak_rss"] == cpt["peak_rss_mb"] / hf["peak_rss_mb"]
    assert set(result["goals"]["met"]) == {"tokens_per_s", "peak_rss"}
    assert result["machine"]["cpus"] >= 1 and s["tokens_per_step"] == s["batch"] * s["seq"] == 64
    assert "| cpt |" in capsys.readouterr().out
