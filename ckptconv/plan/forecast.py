"""Wall-time forecast of a conversion, from its plan and the machine's measured rates.

Plain arithmetic on plain data, so that it is unit-tested with ints: the plan says how many bytes
are read and written, how many tensors and output pieces there are; ``Rates`` (measured by
``engine.calibrate`` in the output's filesystem when ``--dry-run`` runs) say how fast this
machine reads, writes, copies, scans and hashes right now; ``PROFILES`` say how many passes of
each kind the engine makes over the bytes of each command. The forecast is the sum of

    start-up      interpreter + torch import (measured: this process's age at the dry-run; no
                  format imports more: DCP metadata is written without torch's DCP package);
    read+copy     bytes read / read rate, and memory copies per written byte (op, TP slicing,
                  serialisation);
    scan+hash     per byte read: NaN/overflow scans and SHA-256 (fingerprint manifest, integrity);
    write         bytes written / page-cache write rate up to the dirty-page allowance, the rest
                  at the slower of that rate and the disk's own (past the allowance the kernel
                  throttles writers to its flushing, which runs while they write), and the
                  SHA-256 of what is written where the format records it (torch_dist). The
                  page-cache rate is the calibration's, but at most ``copy_Bps /
                  CACHE_WRITE_PASSES``: a 32 MB sample lands in free pages, a conversion's
                  gigabytes make the kernel reclaim a cached page for every page written;
    per piece     a fixed cost per written piece (a tensor slice of one rank; a torch_dist file).

An engine that runs the three middle lanes on their own threads (``Profile.overlapped``) is
forecast as the slowest lane or the CPU they share over the cores, whichever is longer, plus
``OVERLAP_LOSS`` of the other lanes (``stream``). Worker processes divide the CPU work up to the
number of cores.

``PROFILES`` are counts read off the engine's hot loops and checked by ``bench/bench_scale.py``
against measured runs (docs/benchmarks.md gives the forecast error): when the engine changes how
many times it touches a byte, change the profile and rerun the bench.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Rates:
    """What this machine does per second (bytes/s), and its fixed costs (s)."""
    read_Bps: float                 # reading the source (as cached as it is now)
    write_Bps: float                # writing into the output filesystem's page cache
    disk_write_Bps: float           # the calibration sample written and fsynced (write + flush)
    dirty_allowance_bytes: int      # dirty bytes the kernel accepts before throttling writers
    copy_Bps: float                 # one memory pass: a torch copy of a tensor
    scan_Bps: float                 # torch.aminmax (NaN / Inf / overflow check)
    hash_Bps: float                 # SHA-256 (the fingerprint manifest)
    startup_s: float                # interpreter start + imports, up to the plan
    cores: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """How the engine treats each byte of one kind of conversion."""
    copies_per_byte: float          # memory passes over the written bytes (op, slicing, serialising)
    scans_per_byte: float           # NaN/overflow scans over the read bytes
    hashes_per_byte: float          # SHA-256 passes over the read bytes (fingerprints, source integrity)
    out_hashes_per_byte: float      # SHA-256 passes over the written bytes (torch_dist integrity.json)
    piece_s: float                  # fixed cost per written piece (s)
    overlapped: bool = True         # checks, hashes and writes run on their own threads


# (command, output format) -> profile, read off the engine (engine/convert.py, reshard_workers.py,
# rows.py, overlap.py): the engine's thread and a stream's reading thread read, transform (fused
# QKV / gate-up and vocab padding: one copy; TP slices of row-split tensors: one copy) and scan,
# the budget's hashing thread hashes the fingerprints, the writer's thread writes (torch_dist:
# with the records' SHA-256 for integrity.json on a hasher thread beside it), and megatron-to-hf /
# reshard hash the source for its integrity check on another thread.
PROFILES: dict[tuple[str, str], Profile] = {
    ("hf_to_megatron", "megatron_torch_dist"): Profile(1.0, 1.0, 1.0, 1.0, 0.001),
    ("hf_to_megatron", "megatron_torch"): Profile(1.0, 1.0, 1.0, 0.0, 0.001),
    ("megatron_to_hf", "hf"): Profile(2.0, 1.0, 2.0, 0.0, 0.001),      # + the TP assembly copy
    ("reshard", "megatron_torch_dist"): Profile(1.0, 0.0, 2.0, 1.0, 0.001),
    ("reshard", "megatron_torch"): Profile(1.0, 0.0, 2.0, 0.0, 0.001),
}


# The part of the other lanes' time an overlapped engine does not hide: its queues are one tensor
# deep, tensors differ in size and Python holds the GIL between the threads' C calls. Fitted on
# bench/bench_scale.py's 1 GB and 7B runs (docs/benchmarks.md).
OVERLAP_LOSS = 0.3

# Memory passes a page written into the page cache costs once free memory is used up: the copy in,
# reclaiming a cached page for it and, with large folios, compaction. Fitted on bench/bench_scale.py's
# runs at 3720924 and checked on those at 5fcd1c0 (docs/benchmarks.md): there the 32 MB calibration
# sample ran at 0.35-5 GB/s while the 1 GB conversions spent 1.0-2.6 s per GB in the kernel.
CACHE_WRITE_PASSES = 4


@dataclass(frozen=True)
class Work:
    """What a plan will do, from metadata alone."""
    command: str                    # hf_to_megatron | megatron_to_hf | reshard
    out_format: str                 # the summary's "format"
    bytes_read: int
    bytes_written: int
    pieces_written: int             # tensor slices written (one per rank holding a slice)
    workers: int = 1


def profile_for(work: Work) -> Profile:
    try:
        return PROFILES[(work.command, work.out_format)]
    except KeyError:
        return max(PROFILES.values(), key=_passes)


def _passes(p: Profile) -> float:
    return p.copies_per_byte + p.scans_per_byte + p.hashes_per_byte + p.out_hashes_per_byte


def cache_write_Bps(rates: Rates) -> float:
    """The page-cache write rate a conversion sustains (module doc: ``CACHE_WRITE_PASSES``)."""
    return min(rates.write_Bps, rates.copy_Bps / CACHE_WRITE_PASSES)


def flush_Bps(rates: Rates) -> float:
    """The disk's own rate: the calibration sample's fsync alone (``disk_write_Bps`` is its write
    and fsync together)."""
    flush_s_per_byte = 1 / rates.disk_write_Bps - 1 / rates.write_Bps
    return 1 / flush_s_per_byte if flush_s_per_byte > 0 else float("inf")


def write_seconds(nbytes: int, rates: Rates) -> float:
    cached = min(nbytes, rates.dirty_allowance_bytes)
    into_cache = cache_write_Bps(rates)
    return cached / into_cache + (nbytes - cached) / min(into_cache, flush_Bps(rates))


def forecast_seconds(work: Work, rates: Rates, profile: Profile | None = None) -> dict:
    """Forecast wall time: ``{"seconds": total, "parts": {part: seconds}}``.

    Three lanes: reading + copies (the main thread), scans + hashes, writing. Serial engines add
    them up; an ``overlapped`` engine runs them side by side, bounded by the slowest lane and by
    the CPU work they share over the cores. Workers divide the CPU work between processes (up to
    the cores); the disk is shared."""
    p = profile or profile_for(work)
    share = max(1, min(work.workers, rates.cores))
    main = (work.bytes_read / rates.read_Bps + work.bytes_written * p.copies_per_byte / rates.copy_Bps) / share
    checks = (work.bytes_read * p.scans_per_byte / rates.scan_Bps
              + work.bytes_read * p.hashes_per_byte / rates.hash_Bps) / share
    out_hash = work.bytes_written * p.out_hashes_per_byte / rates.hash_Bps / share
    write = write_seconds(work.bytes_written, rates) + out_hash
    pieces = work.pieces_written * p.piece_s / share
    if p.overlapped:
        cached = min(work.bytes_written, rates.dirty_allowance_bytes) / cache_write_Bps(rates)
        cpu = ((main + checks + out_hash) * share + cached) / rates.cores
        lanes = (main, checks, write)
        slowest = max(*lanes, cpu)
        body = {"stream": slowest + OVERLAP_LOSS * max(0.0, sum(lanes) - max(lanes))}
    else:
        body = {"read+copy": main, "scan+hash": checks, "write": write}
    parts = {"startup": rates.startup_s, **body, "pieces": pieces}
    return {"seconds": sum(parts.values()), "parts": parts}


def pieces_written(names, layout) -> int:
    """Tensor slices a Megatron output holds: one per rank file holding (a TP piece of) each."""
    return sum(len(layout.holders(layout.locate(n))) for n in names)
