"""Resolve a Hugging Face source: a local directory, or an explicit hub repo id
(``hf://org/name[@rev]``).

A plain argument is always a local path: a mistyped path is an error, never a hub look-up. A hub
id must be spelled ``hf://...``; it is resolved from the local hub cache (``local_files_only``),
and downloaded only when the caller opts in (``download=True``, the CLI's ``--download``) and
offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read at call time) is off.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ckptconv.errors import UnknownFormat

HUB_PREFIX = "hf://"
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


def _cause(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def is_hub_id(src: str) -> bool:
    return str(src).startswith(HUB_PREFIX)


def resolve_hf_source(src: str, cache_dir: str | Path | None = None, download: bool = False) -> Path:
    """Return a local directory for ``src``.

    ``hf://org/name[@revision]`` is a hub repo id: the local hub cache (``cache_dir`` or the
    default) is used if it holds the snapshot; else, with ``download``, the repo is downloaded
    (unless offline). Anything else is a local path and must exist. Raises
    :class:`UnknownFormat` otherwise."""
    if not is_hub_id(src):
        p = Path(src).expanduser()
        if p.exists():
            return p
        raise UnknownFormat("no such file or directory", path=src,
                            fix=f"check the path (a Hugging Face hub repo is written {HUB_PREFIX}org/name)")
    repo = src[len(HUB_PREFIX):]
    fix = (f"fetch the repo first with `huggingface-cli download {repo.partition('@')[0] or 'org/name'}`, "
           "pass --cache-dir, or pass --download to download it")
    if not _REPO_RE.match(repo):
        raise UnknownFormat(f"not a Hugging Face repo id (want {HUB_PREFIX}org/name[@revision])", path=src, fix=fix)
    repo_id, _, revision = repo.partition("@")
    from huggingface_hub import snapshot_download  # lazy: keep CLI start-up fast

    kw = dict(revision=revision or None, cache_dir=str(cache_dir) if cache_dir else None)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kw))
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        cause = _cause(e)
    if not download:
        raise UnknownFormat(f"Hugging Face repo not in the local hub cache and downloading is off ({cause})",
                            path=src, fix=fix)
    if _offline():
        raise UnknownFormat(f"Hugging Face repo not in the local hub cache, and offline mode is on ({cause})",
                            path=src, fix="unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or " + fix)
    try:
        d = Path(snapshot_download(repo_id, ignore_patterns=_IGNORE + ["*.bin"], **kw))
        if not _has_weights(d):
            d = Path(snapshot_download(repo_id, ignore_patterns=_IGNORE, **kw))
        return d
    except Exception as e:  # network, auth, missing repo or revision
        raise UnknownFormat(f"Hugging Face repo could not be downloaded ({_cause(e)})", path=src,
                            fix="check the repo id, revision, network and token") from None
