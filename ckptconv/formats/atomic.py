"""Atomic output directories: write into a hidden sibling, rename into place on success.

A failed or interrupted run leaves no complete-looking DST; an existing DST is replaced only
with --overwrite and only after the new one is complete. DST may not be SRC or overlap it.
A run killed with SIGKILL leaves only a hidden `.DST.ckptconv-tmp-<pid>-<id>` directory, which
the next run for the same DST removes once that pid is gone.
"""
from __future__ import annotations

import os
import shutil
import time
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp_dirs(dst: Path) -> list[Path]:
    """Remove hidden temp siblings of ``dst`` left by runs that were killed."""
    removed = []
    prefix = f".{dst.name}{TMP_MARK}"
    if not dst.parent.is_dir():
        return removed
    for p in dst.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _remove(path: Path, attempts: int = 50) -> None:
    """rmtree that outlasts a writer thread still finishing a file after an interrupt."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)


@contextmanager
def atomic_output_dir(dst: Path, *, sources: list[Path], overwrite: bool = False) -> Iterator[Path]:
    dst = check_destination(dst, sources, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp_dirs(dst)
    tmp = dst.parent / f".{dst.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()       # inside the try: a signal right after mkdir must not leave it behind
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if dst.exists():
        old = dst.parent / f".{dst.name}.ckptconv-old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)
