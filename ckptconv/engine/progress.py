"""Progress reporting for long work (tqdm on a terminal, silent otherwise)."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, unit="tensor", file=sys.stderr,
                disable=not enabled or not sys.stderr.isatty(), leave=False)
