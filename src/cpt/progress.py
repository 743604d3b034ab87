"""Progress bars for long passes (tqdm on stderr, so DVC and Prefect logs show them; off with CPT_PROGRESS=0)."""

from __future__ import annotations

import os
from typing import Any, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("CPT_PROGRESS", "1") not in ("0", "false", "no")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Iterable[T]:
    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("mininterval", 2.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
