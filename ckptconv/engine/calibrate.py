"""Measure this machine's rates for the dry-run's time forecast (``plan.forecast.Rates``).

Run by every ``--dry-run`` (about 0.2 s), not read from a file: the rates that matter are the
ones of the output's filesystem and of the load on the machine at the time, and a calibration
file would go stale as both change. It writes a scratch file of a few tens of MB next to the
output (in its nearest existing parent directory: the same filesystem), fsyncs it, reads it back
(O_DIRECT: the disk's own read rate) or reads the head of the real source (which tells whether
the source is in the page cache; a config-only dry-run has none and uses the disk's rate),
and times a torch copy, a ``torch.aminmax`` scan and SHA-256 over it. The file is deleted.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
import time
from pathlib import Path

import torch

from ..plan.forecast import Rates

MiB = 1 << 20
SAMPLE = 32 * MiB           # the I/O and copy sample: larger than the CPU caches
CPU_SAMPLE = 8 * MiB
CHUNK = 4 * MiB


def _timed(fn, repeat: int = 3) -> float:
    """Median wall time of ``repeat`` calls (the load of a shared machine is part of the rate)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(sorted(times)[len(times) // 2], 1e-6)


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.is_dir():
        path = path.parent
    return path


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm(name: str) -> int:
    try:
        return int(Path(f"/proc/sys/vm/{name}").read_text())
    except (OSError, ValueError):
        return 0


def dirty_allowance_bytes() -> int:
    """Dirty page-cache bytes a writer may produce before the kernel throttles it to the disk's
    pace (Linux: half-way between the background and the foreground dirty thresholds)."""
    limit, background = _vm("dirty_bytes"), _vm("dirty_background_bytes")
    avail = _meminfo("MemAvailable") or 0
    if not limit:
        limit = avail * (_vm("dirty_ratio") or 20) // 100
    if not background:
        background = avail * (_vm("dirty_background_ratio") or 10) // 100
    return max(0, (limit + background) // 2 - (_meminfo("Dirty") or 0))


def process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 1.0


def _read_rate(path: Path, limit: int) -> float | None:
    try:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(CHUNK)
            t0, n = time.perf_counter(), 0
            while n < limit:
                got = f.readinto(buf)
                if not got:
                    break
                n += got
            dt = time.perf_counter() - t0
    except OSError:
        return None
    return n / max(dt, 1e-6) if n >= CHUNK else None


def _direct_read_rate(path: Path, limit: int) -> float | None:
    """Read rate of the disk itself: O_DIRECT bypasses the page cache (None where unsupported,
    e.g. tmpfs, whose reads are memory reads anyway)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    buf = mmap.mmap(-1, CHUNK)                  # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        t0, n = time.perf_counter(), 0
        while n < limit:
            got = os.preadv(fd, [buf], n)
            if not got:
                break
            n += got
        dt = time.perf_counter() - t0
    except OSError:
        return None
    finally:
        os.close(fd)
        buf.close()
    return n / max(dt, 1e-6) if n >= CHUNK else None


def measure_rates(out_path: str | Path, source_file: str | Path | None = None) -> Rates:
    """Rates of this machine now, for writing under ``out_path`` and reading ``source_file``."""
    startup = process_age_s()
    data = torch.full((SAMPLE,), 0x3F, dtype=torch.uint8)      # as bf16: 0.74, finite
    view = memoryview(data.numpy())
    with tempfile.NamedTemporaryFile(dir=_existing_parent(Path(out_path)), prefix=".ckptconv-calibrate-") as f:
        t0 = time.perf_counter()
        for i in range(0, SAMPLE, CHUNK):
            f.write(view[i:i + CHUNK])
        f.flush()
        t1 = time.perf_counter()
        os.fsync(f.fileno())
        t2 = time.perf_counter()
        disk_read = _direct_read_rate(Path(f.name), SAMPLE)
        cached_read = _read_rate(Path(f.name), SAMPLE)
    # a source on disk: its own head tells how cached it is; a config alone: from the disk
    read = (_read_rate(Path(source_file), SAMPLE) if source_file else disk_read) or cached_read \
        or SAMPLE / (t1 - t0)
    bf16 = data[:CPU_SAMPLE].view(torch.bfloat16)          # compute-bound passes: a smaller sample
    return Rates(
        read_Bps=read,
        write_Bps=SAMPLE / max(t1 - t0, 1e-6),
        disk_write_Bps=SAMPLE / max(t2 - t0, 1e-6),
        dirty_allowance_bytes=dirty_allowance_bytes(),
        copy_Bps=SAMPLE / _timed(lambda: data.clone()),
        scan_Bps=CPU_SAMPLE / _timed(lambda: torch.aminmax(bf16)),
        hash_Bps=CPU_SAMPLE / _timed(lambda: hashlib.sha256(view[:CPU_SAMPLE])),
        startup_s=startup,
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
    )
