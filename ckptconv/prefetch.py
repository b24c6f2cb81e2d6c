"""Warm the page cache for a checkpoint's data files in the background.

A CLI call spends ~3 s importing torch before it reads a byte. Commands that read whole
checkpoints (verify, fingerprint) first ask the kernel to start reading the data files
(``posix_fadvise(WILLNEED)``, from a daemon thread, before the heavy imports), so on a cold
cache the disk works while the interpreter imports. Bounded by half the memory the kernel
reports available, in the order the files are read; without effect where the platform or
filesystem has no read-ahead hint. Imports nothing heavy (no torch).
"""
from __future__ import annotations

import os
import threading
from itertools import zip_longest
from pathlib import Path

DATA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
WINDOW = 8 << 20


def data_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint data files under ``path`` (a file or a directory), sorted."""
    p = Path(path)
    if p.is_file():
        return [p] if p.suffix in DATA_SUFFIXES else []
    if not p.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root, f) for f in sorted(files) if f.endswith(DATA_SUFFIXES)]
    return out


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def plan(paths, budget: int) -> list[tuple[Path, int]]:
    """(file, bytes to hint) for the files of ``paths``, interleaved path by path in file order,
    until ``budget`` bytes are planned."""
    order = [f for group in zip_longest(*(data_files(p) for p in paths)) for f in group if f is not None]
    out, left = [], budget
    for f in order:
        if left <= 0:
            break
        try:
            size = f.stat().st_size
        except OSError:
            continue
        out.append((f, min(size, left)))
        left -= size
    return out


def _hint(files: list[tuple[Path, int]]) -> None:
    for f, n in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            for at in range(0, n, WINDOW):      # the kernel caps one hint at its read-ahead size
                os.posix_fadvise(fd, at, min(WINDOW, n - at), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def start_prefetch(paths, budget: int | None = None) -> threading.Thread | None:
    """Start hinting the data files of ``paths`` to the kernel on a daemon thread; returns it
    (None when there is nothing to do or the platform has no read-ahead hint)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    files = plan(paths, mem_available() // 2 if budget is None else budget)
    if not files:
        return None
    t = threading.Thread(target=_hint, args=(files,), name="ckptconv-prefetch", daemon=True)
    t.start()
    return t
