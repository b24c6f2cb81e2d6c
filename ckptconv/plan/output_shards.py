"""Output-shard planning (pure: sizes and names only, no torch and no I/O).

The Hugging Face writer asks this module how to split a model into ``*.safetensors``
files *before* any tensor is read, so that every shard's header can be written up
front and tensors can then be streamed in any order.
"""
from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(s: str | int) -> int:
    """Parse a byte size: ``"5GB"`` (5*10**9), ``"500MB"``, ``"2GiB"`` (2*2**30),
    ``"100KB"``, ``"123"`` or an int (bytes). Units are case-insensitive; decimal
    prefixes (KB/MB/GB/TB) are powers of 10, binary ones (KiB/MiB/GiB/TiB) powers of 2.
    Raises ``ValueError`` for anything else (negative, unknown unit, not a number)."""
    if isinstance(s, bool):
        raise ValueError(f"invalid size {s!r}: expected bytes as an int or a string like '5GB'")
    if isinstance(s, int):
        if s < 0:
            raise ValueError(f"invalid size {s!r}: a size cannot be negative")
        return s
    if not isinstance(s, str):
        raise ValueError(f"invalid size {s!r}: expected an int or a string like '5GB'")
    m = _SIZE_RE.match(s)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {s!r}: expected a number with an optional unit "
            f"B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. '5GB', '500MB', '2GiB')")
    return int(Fraction(m.group(1)) * _UNITS[unit])


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedily split ``(name, nbytes)`` pairs, in the given order, into shards of at
    most ``max_shard_size`` bytes (the same rule as huggingface_hub's
    ``split_torch_state_dict_into_shards``): a tensor that would tip the current shard
    over the limit starts a new shard; a tensor bigger than the limit gets a shard of
    its own. Unlike huggingface_hub, an oversize tensor also closes the current shard,
    so concatenating the result gives back the input order exactly.

    Returns a list of shards, each a list of names; ``[]`` for no tensors."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) \
            or max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, "
                         f"got {max_shard_size!r}")
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    seen: set[str] = set()
    for name, size in sizes:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the shard plan")
        seen.add(name)
        if size < 0:
            raise ValueError(f"tensor {name!r} has a negative size {size}")
        if size > max_shard_size:
            if current:
                shards.append(current)
            shards.append([name])
            current, current_size = [], 0
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    """File names for ``n`` shards, as transformers names them:
    ``["model.safetensors"]`` for one, else ``model-00001-of-0000N.safetensors``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of shards must be a positive int, got {n!r}")
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
