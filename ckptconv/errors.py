"""Typed errors. Every error the CLI reports to a user is a CkptError: one line saying what,
where (file / tensor) and how to fix it. The CLI maps them to exit code 2."""
from __future__ import annotations


class CkptError(Exception):
    """Base class: a usage or input problem the user can fix."""

    def __init__(self, what: str, *, path: object = None, tensor: str | None = None,
                 fix: str | None = None):
        self.what, self.path, self.tensor, self.fix = what, path, tensor, fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [self.what]
        if self.path is not None:
            parts.append(f"file: {self.path}")
        if self.tensor is not None:
            parts.append(f"tensor: {self.tensor}")
        line = "; ".join(parts)
        return f"{line}. Fix: {self.fix}" if self.fix else line


class UnknownFormat(CkptError):
    """The path is not a checkpoint format we recognise."""


class UnsupportedFamily(CkptError):
    """The model architecture has no family table."""


class MissingTensors(CkptError):
    """Tensors the plan needs are absent (or unexpected tensors are present)."""


class LayoutError(CkptError):
    """Shapes or parallel layout are inconsistent (divisibility, shard shapes, ...)."""


class CorruptCheckpoint(CkptError):
    """A file is truncated, has a bad header, or offsets out of range."""


class UnsafeCheckpoint(CkptError):
    """A pickle references a global outside the allowlist."""


class OutputExists(CkptError):
    """DST exists and --overwrite was not given, or DST overlaps SRC."""


class NonFiniteWeights(CkptError):
    """A tensor contains NaN or Inf."""


class WriteFailed(CkptError):
    """Writing the output failed (disk full, permissions, I/O error)."""


def os_error_in_chain(e: BaseException | None) -> OSError | None:
    """The OSError behind an exception (libraries such as torch's writers re-raise I/O
    failures like ENOSPC as RuntimeError), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
