"""Zero-copy views of file regions, for readers that only look at the bytes (verify's fast path).

``map_region(fd, offset, nbytes)`` maps the region privately (copy-on-write: the process sees
the page-cache pages themselves, and a write to the tensor would change only a private copy,
never the file) and returns it as a uint8 tensor. Compared with reading into a buffer this skips
one copy of every byte, which on a warm page cache is most of the cost of reading. The mapping
lives as long as the tensor (and its views); a region that does not lie inside the file as it is
now is never mapped (touching a page past the end would raise SIGBUS), the caller reads instead.
"""
from __future__ import annotations

import mmap
import os

import torch


def map_region(fd: int, offset: int, nbytes: int) -> torch.Tensor | None:
    """The bytes ``[offset, offset + nbytes)`` of open file ``fd`` as a uint8 tensor, or None when
    the region cannot be mapped (empty, outside the file, or mapping unsupported)."""
    if nbytes <= 0 or offset < 0:
        return None
    try:
        if offset + nbytes > os.fstat(fd).st_size:
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, offset + nbytes - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=start)
    except (OSError, ValueError, AttributeError, TypeError):   # TypeError: no flags/prot (Windows)
        return None
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset - start)


def file_target(fh) -> tuple[int, int] | None:
    """(fd, base offset) of a file object whose bytes can be mapped: ``fh.map_target()`` when it
    defines one (a window onto another file), else a real file's descriptor with base 0."""
    target = getattr(fh, "map_target", None)
    if target is not None:
        return target()
    try:
        return fh.fileno(), 0
    except (AttributeError, OSError, ValueError):
        return None
