"""Fingerprint manifests: per-logical-parameter hashes that do not depend on sharding or format.

A manifest lists every logical parameter of a model in Hugging Face names (the tensors an HF
reader of the checkpoint gets back: no vocab padding, no tied copies, no TP/PP split) with its
shape, dtype and the SHA-256 of its contiguous little-endian bytes. A Megatron checkpoint at
any TP/PP, its HF conversion and any other format holding the same values give the same file.

``ManifestBuilder`` is the hook conversions use: ``add(name, tensor)`` while streaming (hashing
runs on a worker thread, at most two tensors queued), ``write(dir)`` at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..errors import CorruptCheckpoint
from ..families import config_from_hf, family_for_hf
from ..families.schema import ModelConfig
from ..types import dtype_name

MANIFEST_NAME = "ckptconv-manifest.json"
MANIFEST_FORMAT = "ckptconv-manifest"
MANIFEST_VERSION = 1
# architecture facts that change what the weights mean (compared by verify; stored in manifests)
CONFIG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "head_dim",
                 "vocab_size", "tie_embeddings", "qkv_bias", "norm_eps", "rope_theta", "rope_scaling")
_HASH_QUEUE = 2


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of the tensor's values as contiguous bytes (CPU, little-endian)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def model_fields(cfg: ModelConfig) -> dict:
    out = {}
    for f in CONFIG_FIELDS:
        v = getattr(cfg, f)
        out[f] = dict(v) if isinstance(v, dict) else v
    return out


def logical_names(cfg: ModelConfig, family) -> list[str]:
    """The HF names of the model's logical parameters, in family-table order."""
    return [n for m in family.expand(cfg) for n in m.hf]


@dataclasses.dataclass
class Manifest:
    model: dict                                   # CONFIG_FIELDS of the model, plus "family"
    tensors: dict[str, dict]                      # HF name -> {"shape", "dtype", "sha256"}
    path: Path | None = None

    def to_dict(self) -> dict:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "hash": "sha256",
                "layout": "hf-logical", "model": self.model, "num_tensors": len(self.tensors),
                "tensors": dict(self.tensors)}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def write(self, path: Path) -> Path:
        Path(path).write_text(self.dumps())
        return Path(path)

    def config(self) -> ModelConfig:
        fields = {f: self.model.get(f) for f in CONFIG_FIELDS}
        return ModelConfig(family=self.model.get("family", "?"), max_position_embeddings=0, **fields)


def entry(t: torch.Tensor, digest: str | None = None) -> dict:
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "sha256": digest or tensor_digest(t)}


def load_manifest(path: Path) -> Manifest:
    p = Path(path)
    fix = "regenerate it with `ckptconv fingerprint CKPT -o FILE`"
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"manifest is not valid JSON ({e})", path=p, fix=fix) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise CorruptCheckpoint(f"not a {MANIFEST_FORMAT} file", path=p, fix=fix)
    if data.get("version") != MANIFEST_VERSION or data.get("hash") != "sha256":
        raise CorruptCheckpoint(f"unsupported manifest version {data.get('version')} / hash {data.get('hash')}",
                                path=p, fix=fix)
    tensors = data.get("tensors")
    model = data.get("model")
    if not isinstance(tensors, dict) or not isinstance(model, dict) or \
            any(f not in model for f in CONFIG_FIELDS):
        raise CorruptCheckpoint("manifest lacks 'tensors' or the model fields", path=p, fix=fix)
    for name, e in tensors.items():
        if not (isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("dtype"), str)):
            raise CorruptCheckpoint("malformed manifest entry (needs shape, dtype, sha256)", path=p,
                                    tensor=name, fix=fix)
    return Manifest(model, tensors, p)


class ManifestBuilder:
    """Collects fingerprints of a conversion's output while it streams (see module doc)."""

    def __init__(self, cfg: ModelConfig, family):
        self._names = set(logical_names(cfg, family))
        self._model = {"family": family.name, **model_fields(cfg)}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[str, torch.Tensor, Future]] = deque()
        self._tensors: dict[str, dict] = {}

    @classmethod
    def for_hf_config(cls, hf_config: dict) -> "ManifestBuilder":
        return cls(config_from_hf(hf_config), family_for_hf(hf_config))

    def wants(self, name: str) -> bool:
        """Whether ``name`` is a logical parameter (only those get an entry)."""
        return name in self._names

    def add_digest(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   digest: str | Callable[[], str]) -> None:
        """Record a fingerprint hashed elsewhere (``engine.checks.StreamChecks``: fused with the
        finite check); ``digest`` is the SHA-256 of the contiguous little-endian bytes, or what
        gives it once its hashing thread is done (called by ``manifest``)."""
        if name in self._names:
            self._tensors[name] = {"shape": list(shape), "dtype": dtype_name(dtype), "sha256": digest}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Fingerprint ``tensor`` as the logical parameter ``name`` (other names are ignored:
        tied copies and derived buffers are not logical parameters)."""
        if name not in self._names:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptconv-fingerprint")
        self._pending.append((name, tensor, self._pool.submit(tensor_digest, tensor)))
        while len(self._pending) > _HASH_QUEUE:
            self._collect_one()

    def _collect_one(self) -> None:
        name, t, fut = self._pending.popleft()
        self._tensors[name] = entry(t, fut.result())

    def manifest(self) -> Manifest:
        while self._pending:
            self._collect_one()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for e in self._tensors.values():
            if callable(e["sha256"]):
                e["sha256"] = e["sha256"]()
        return Manifest(dict(self._model), dict(sorted(self._tensors.items())))

    def write(self, directory: Path) -> Path:
        """Write ``ckptconv-manifest.json`` into ``directory``."""
        return self.manifest().write(Path(directory) / MANIFEST_NAME)
