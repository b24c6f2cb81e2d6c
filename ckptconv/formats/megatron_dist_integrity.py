"""`integrity.json` of a torch_dist checkpoint: megatron-core 0.19's manifest of file digests.

    {"algorithm": "sha256", "files": {"<name>": "<hex digest>", ...}}

megatron-core writes it after metadata.json with `save(..., verify_integrity=True)`, listing every
plain file of ITER_DIR except itself, and `load(..., verify_integrity=True)` re-hashes each listed
file and fails on a missing one or a different digest (and on a checkpoint without the manifest).
`write_manifest` writes it the same way; `check_manifest` is what the reader runs.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import CorruptCheckpoint, UnknownFormat
from .megatron_dist_layout import INTEGRITY_ALGORITHM, INTEGRITY_FILE

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CHUNK = 8 << 20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def read_manifest(iter_dir: Path) -> dict[str, str] | None:
    """{file name: digest} of ``iter_dir``/integrity.json, or None when there is none."""
    path = Path(iter_dir) / INTEGRITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CorruptCheckpoint(f"integrity manifest is not JSON ({e})"[:200], path=path,
                                fix="re-copy the file, or delete it to read the checkpoint unchecked") from None
    algorithm = data.get("algorithm", INTEGRITY_ALGORITHM) if isinstance(data, dict) else None
    files = data.get("files") if isinstance(data, dict) else None
    if algorithm != INTEGRITY_ALGORITHM:
        raise UnknownFormat(f"integrity manifest uses {algorithm!r:.40}, only {INTEGRITY_ALGORITHM!r} is known",
                            path=path, fix="delete integrity.json to read the checkpoint unchecked")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CorruptCheckpoint("integrity manifest has no {name: digest} 'files' map", path=path,
                                fix="re-copy the file, or delete it to read the checkpoint unchecked")
    for name in files:
        if not _PLAIN_NAME.match(name) or name in (".", ".."):
            raise CorruptCheckpoint(f"integrity manifest names {name!r:.80}, not a file of the checkpoint "
                                    "directory", path=path, fix="the manifest is corrupt or was tampered with")
    return dict(files)


def share_of_files(iter_dir: Path, files: dict[str, str], rank: int, world: int) -> dict[str, str]:
    """The files worker ``rank`` of ``world`` checks: each file once over all workers, the largest
    first to the least loaded (sizes from the directory; a missing file counts 0 bytes and is
    reported by whoever gets it). The same for every worker, so together they check every file."""
    def size(name: str) -> int:
        try:
            return (Path(iter_dir) / name).stat().st_size
        except OSError:
            return 0

    load, mine = [0] * world, {}
    for name in sorted(files, key=lambda n: (-size(n), n)):
        k = min(range(world), key=lambda i: (load[i], i))
        load[k] += size(name)
        if k == rank:
            mine[name] = files[name]
    return mine


def check_manifest(iter_dir: Path, files: dict[str, str]) -> None:
    """Re-hash every listed file; CorruptCheckpoint naming the first that is missing or differs."""
    iter_dir = Path(iter_dir)
    for name, want in sorted(files.items()):
        path = iter_dir / name
        try:
            got = file_digest(path)
        except OSError as e:
            raise CorruptCheckpoint(f"file listed in {INTEGRITY_FILE} is missing or unreadable "
                                    f"({e.strerror or e})", path=path,
                                    fix="copy the complete checkpoint directory") from None
        if got != want.lower():
            raise CorruptCheckpoint(f"sha256 {got[:16]}... differs from {want[:16]}... recorded in "
                                    f"{INTEGRITY_FILE}", path=path,
                                    fix="the file changed after it was saved: re-copy it from the source")


def write_manifest(iter_dir: Path, known: dict[str, str] | None = None) -> None:
    """integrity.json over every plain file of ``iter_dir`` (as megatron-core's save_integrity_manifest);
    ``known``: digests of files already hashed while they were written (the others are read)."""
    iter_dir = Path(iter_dir)
    known = known or {}
    files = {p.name: known.get(p.name) or file_digest(p) for p in sorted(iter_dir.iterdir(), key=str)
             if p.is_file() and p.name != INTEGRITY_FILE}
    (iter_dir / INTEGRITY_FILE).write_text(json.dumps({"algorithm": INTEGRITY_ALGORITHM, "files": files},
                                                      indent=2))
