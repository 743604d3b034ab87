"""The training curve (metrics/train_curve.csv, for ``dvc plots``) and the per-step log in data/checkpoints, cut
back to the checkpoint a resumed run continues from."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from cpt.io import atomic_open

CURVE_FIELDS = ["step", "tokens", "lr", "loss_new", "loss_old", "bpb_new", "bpb_old", "train_loss"]


def write_curve(path: Path, rows: list[dict]) -> None:
    """CURVE_FIELDS, then one exact bits-per-byte column per language (``bpb_<domain>_<lang>``) when the shards
    recorded per-block bytes."""
    extra = sorted({k for row in rows for k in row if k[:8] in ("bpb_new_", "bpb_old_")})
    fields = CURVE_FIELDS + extra
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and not math.isfinite(row[k]))
                             else row[k]) for k in fields})
    with atomic_open(path) as fh:
        fh.write(buf.getvalue())


def truncate_step_log(path: Path, step: int) -> None:
    """Keep only the steps the checkpoint we resume from has seen: a killed run logged steps past it."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    with atomic_open(path) as fh:
        fh.write("".join(line + "\n" for line in keep))
