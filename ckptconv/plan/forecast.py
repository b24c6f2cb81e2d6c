"""Wall-time forecast of a conversion, from its plan and the machine's measured rates.

Plain arithmetic on plain data, so that it is unit-tested with ints: the plan says how many bytes
are read and written, how many tensors and output pieces there are; ``Rates`` (measured by
``engine.calibrate`` in the output's filesystem when ``--dry-run`` runs) say how fast this
machine reads, writes, copies, scans and hashes right now; ``PROFILES`` say how many passes of
each kind the engine makes over the bytes of each command. The forecast is the sum of

    start-up      interpreter + torch import (measured: this process's age at the dry-run) and,
                  when torch_dist is written, torch.distributed.checkpoint's import;
    read          bytes read / read rate;
    cpu           per byte: NaN/overflow scan, manifest SHA-256, memory copies (op, TP slicing,
                  serialisation), divided over the worker processes that share the cores;
    write         bytes written / page-cache write rate up to the dirty-page allowance, the rest
                  at the disk's sustained rate (the kernel throttles writers past it);
    per piece     a fixed cost per written piece (a tensor slice of one rank; a torch_dist file).

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
    disk_write_Bps: float           # sustained write once the dirty-page allowance is used up
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
    hashes_per_byte: float          # SHA-256 passes (manifest) over the logical bytes
    piece_s: float                  # fixed cost per written piece (s)
    import_ratio: float             # extra import time as a fraction of start-up (torch_dist: DCP)


# (command, output format) -> profile. Counts from engine/convert.py and engine/reshard*.py:
# hf_to_megatron: read, aminmax, op (cat for fused qkv / gate_up), per-rank slice copy, torch.save;
# megatron_to_hf: read TP shards + cat, aminmax, inverse op split, safetensors write;
# reshard: read shards + assemble, per-rank slices, serialise, manifest from the assembled tensor.
PROFILES: dict[tuple[str, str], Profile] = {
    ("hf_to_megatron", "megatron_torch_dist"): Profile(2.0, 1.0, 1.0, 0.004, 0.7),
    ("hf_to_megatron", "megatron_torch"): Profile(2.0, 1.0, 1.0, 0.001, 0.0),
    ("megatron_to_hf", "hf"): Profile(2.0, 1.0, 1.0, 0.001, 0.0),
    ("reshard", "megatron_torch_dist"): Profile(3.0, 0.0, 1.0, 0.004, 0.7),
    ("reshard", "megatron_torch"): Profile(3.0, 0.0, 1.0, 0.001, 0.0),
}


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
        return max(PROFILES.values(), key=lambda p: p.copies_per_byte)    # the costliest known


def write_seconds(nbytes: int, rates: Rates) -> float:
    cached = min(nbytes, rates.dirty_allowance_bytes)
    return cached / rates.write_Bps + (nbytes - cached) / rates.disk_write_Bps


def forecast_seconds(work: Work, rates: Rates) -> dict:
    """Forecast wall time: ``{"seconds": total, "parts": {part: seconds}}``."""
    p = profile_for(work)
    share = max(1, min(work.workers, rates.cores))
    cpu = (work.bytes_read * p.scans_per_byte / rates.scan_Bps
           + max(work.bytes_read, work.bytes_written) * p.hashes_per_byte / rates.hash_Bps
           + work.bytes_written * p.copies_per_byte / rates.copy_Bps) / share
    parts = {
        "startup": rates.startup_s * (1.0 + p.import_ratio),
        "read": work.bytes_read / rates.read_Bps,
        "cpu": cpu,
        "write": write_seconds(work.bytes_written, rates),
        "pieces": work.pieces_written * p.piece_s / share,
    }
    return {"seconds": sum(parts.values()), "parts": parts}


def pieces_written(names, layout) -> int:
    """Tensor slices a Megatron output holds: one per rank file holding (a TP piece of) each."""
    return sum(len(layout.holders(layout.locate(n))) for n in names)
