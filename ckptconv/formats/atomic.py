"""Atomic output directories: write into a hidden sibling, rename into place on success.

A failed or interrupted run leaves no complete-looking DST; an existing DST is replaced only
with --overwrite and only after the new one is complete. DST may not be SRC or overlap it.
"""
from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputExists

TMP_MARK = ".ckptconv-tmp-"


def check_destination(dst: Path, sources: list[Path], overwrite: bool) -> Path:
    dst = Path(dst).resolve()
    for src in sources:
        s = Path(src).resolve()
        if dst == s:
            raise OutputExists("destination is the source", path=dst, fix="choose another output directory")
        if s in dst.parents:
            raise OutputExists("destination is inside the source checkpoint", path=dst,
                               fix="write the output outside the source directory")
        if dst in s.parents:
            raise OutputExists("the source checkpoint is inside the destination", path=dst,
                               fix="choose an output directory that does not contain the source")
    if dst.exists() and not overwrite:
        raise OutputExists("destination already exists", path=dst,
                           fix="pass --overwrite to replace it, or choose another directory")
    if dst.exists() and not dst.is_dir():
        raise OutputExists("destination exists and is not a directory", path=dst, fix="remove it first")
    return dst


@contextmanager
def atomic_output_dir(dst: Path, *, sources: list[Path], overwrite: bool = False) -> Iterator[Path]:
    dst = check_destination(dst, sources, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.parent / f".{dst.name}.ckptconv-old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)
