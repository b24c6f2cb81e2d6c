"""Resolve a Hugging Face source: a local directory, or a hub repo id (``org/name[@rev]``).

The hub cache is tried first (``local_files_only=True``), so a model downloaded once
converts offline. A real download is attempted only when not offline
(``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read at call time).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ckptconv.errors import UnknownFormat

_REPO_RE = re.compile(r"^(?:[\w.\-]+/)?[\w.\-]+(?:@[^\s@]+)?$")
# Files a conversion never needs: other frameworks' weights and originals (e.g. Llama's
# original/consolidated.*.pth). .bin is fetched only when a repo has no safetensors.
_IGNORE = ["original/*", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.ot", "*.gguf", "*.onnx",
           "onnx/*", "*.tflite", "*.mlmodel", "coreml/*"]


def _offline() -> bool:
    """True when the user asked for offline mode (checked now, not at import time)."""
    import huggingface_hub.constants as hc

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "")
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(hc.HF_HUB_OFFLINE)


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.bin"))


def resolve_hf_source(src: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local directory for ``src``.

    An existing path is returned as is. Otherwise ``src`` is a hub repo id
    (``org/name`` with optional ``@revision``): the local hub cache (``cache_dir`` or the
    default) is used if it holds the snapshot, else the repo is downloaded unless offline.
    Raises :class:`UnknownFormat` when it is neither."""
    p = Path(src).expanduser()
    if p.exists():
        return p
    fix = ("check the path, or fetch the repo first with `huggingface-cli download "
           "org/name` (and unset HF_HUB_OFFLINE), or pass --cache-dir")
    if not _REPO_RE.match(src):
        raise UnknownFormat("neither an existing local path nor a Hugging Face repo id",
                            path=src, fix=fix)
    repo_id, _, revision = src.partition("@")
    from huggingface_hub import snapshot_download  # lazy: keep CLI start-up fast

    kw = dict(revision=revision or None, cache_dir=str(cache_dir) if cache_dir else None)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kw))
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if _offline():
        raise UnknownFormat(f"neither a local path nor a cached Hugging Face repo (offline mode "
                            f"is on; {cause})", path=src, fix=fix)
    try:
        d = Path(snapshot_download(repo_id, ignore_patterns=_IGNORE + ["*.bin"], **kw))
        if not _has_weights(d):
            d = Path(snapshot_download(repo_id, ignore_patterns=_IGNORE, **kw))
        return d
    except Exception as e:  # network, auth, missing repo or revision
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UnknownFormat(f"neither a local path nor a cached/downloadable Hugging Face repo "
                            f"({cause})", path=src, fix=fix) from None
