"""Hugging Face checkpoint directories: a header-first reader (the streaming writer,
``HFWriter``, lives in :mod:`ckptconv.formats.hf_write` and is re-exported here).

Reader: ``config.json`` plus ``model.safetensors`` | ``model.safetensors.index.json`` +
shards | legacy ``pytorch_model.bin`` (+ index). Safetensors headers are parsed and
validated up front; tensor bytes are read one tensor (or a row range) at a time with
positioned reads, so memory is bounded by the largest tensor. ``.bin`` files are only
ever opened through :mod:`ckptconv.formats.safe_pickle` (never ``torch.load``).

Writer: told every output tensor up front, it plans the shards, writes each shard's
safetensors header and pre-sizes the file; ``write`` then puts one tensor's bytes at its
offset, in any order. Nothing ever holds more than the tensor being written.

The byte-level safetensors work (header parsing/validation, shard creation, positioned
reads and writes, dtype tables) lives in :mod:`ckptconv.formats.safetensors_io`.
"""
from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptconv.errors import CorruptCheckpoint, LayoutError, MissingTensors, UnknownFormat
from ckptconv.formats.hf_write import HFWriter
from ckptconv.formats.mapped import map_region
from ckptconv.formats.safetensors_io import _REFIX, read_into, read_safetensors_header
from ckptconv.types import TensorMeta
from ckptconv.formats.closing import ClosesOnExit

__all__ = ["ASSET_NAMES", "HFReader", "HFWriter"]

ASSET_NAMES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
)


@dataclass(frozen=True)
class _Entry:
    file: Path
    meta: TensorMeta
    offset: int = 0          # absolute byte offset of the data (safetensors)
    lazy: Any = None         # safe_pickle LazyTensor (.bin)


class HFReader(ClosesOnExit):
    """Read a Hugging Face model directory, header first. Context manager.

    ``config_path`` optionally points at a config.json elsewhere (for weight-only dirs)."""

    def __init__(self, path: Path, config_path: Path | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UnknownFormat("not a Hugging Face model directory", path=self.path,
                                fix="pass a directory holding config.json and *.safetensors")
        self._config_path = Path(config_path) if config_path else self.path / "config.json"
        if not self._config_path.is_file():
            raise UnknownFormat("no config.json in the Hugging Face model directory",
                                path=self._config_path,
                                fix="copy config.json from the original model or pass "
                                    "--hf-config PATH")
        self._entries: dict[str, _Entry] = {}
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()
        self._stack = ExitStack()
        try:
            self._discover()
        except BaseException:
            self.close()
            raise

    # -- discovery -------------------------------------------------------------------
    def _discover(self) -> None:
        d = self.path
        for single, index, pattern in (
                ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")):
            if (d / single).is_file():
                return self._add_file(d / single)
            if (d / index).is_file():
                return self._add_index(d / index)
            shards = sorted(d.glob(pattern))
            if shards:
                for shard in shards:
                    self._add_file(shard)
                return None
        raise UnknownFormat("no weights found (model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin)", path=d,
                            fix="download the weight files into this directory")

    def _add_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
            assert all(isinstance(v, str) for v in weight_map.values())
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
            raise CorruptCheckpoint("index is not JSON with a 'weight_map' of name -> file",
                                    path=index, fix=_REFIX) from None
        for fname in dict.fromkeys(weight_map.values()):
            shard = self.path / fname
            if Path(fname).is_absolute() or ".." in Path(fname).parts or not shard.is_file():
                first = next(k for k, v in weight_map.items() if v == fname)
                raise MissingTensors(f"index names shard {fname} which does not exist",
                                     path=index, tensor=first,
                                     fix=f"download {fname} or regenerate the index")
            self._add_file(shard, weight_map, index)
        for name, fname in weight_map.items():
            if name not in self._entries:
                raise MissingTensors(f"index maps the tensor to {fname} but that shard does "
                                     f"not hold it", path=self.path / fname, tensor=name,
                                     fix="re-download the shard or regenerate the index")

    def _add_file(self, file: Path, weight_map: dict | None = None,
                  index: Path | None = None) -> None:
        if file.suffix == ".bin":
            found = {n: _Entry(file, m, lazy=lz) for n, (m, lz) in self._bin_metas(file).items()}
        else:
            found = {n: _Entry(file, m, off) for n, (m, off) in read_safetensors_header(file).items()}
        for name, entry in found.items():
            if weight_map is not None and name not in weight_map:
                raise MissingTensors(f"shard holds a tensor that {index.name} does not list",
                                     path=file, tensor=name, fix="regenerate the index")
            if weight_map is not None and weight_map[name] != file.name:
                raise LayoutError(f"shard holds a tensor that {index.name} maps to "
                                  f"{weight_map[name]}", path=file, tensor=name,
                                  fix="regenerate the index")
            if name in self._entries:
                raise LayoutError(f"tensor is stored twice (also in {self._entries[name].file.name})",
                                  path=file, tensor=name, fix="remove the stale shard file")
            self._entries[name] = entry

    def _bin_metas(self, file: Path) -> dict[str, tuple[TensorMeta, Any]]:
        from ckptconv.formats import safe_pickle  # lazy: only legacy checkpoints need it
        tree = self._stack.enter_context(safe_pickle.TorchFile(file)).obj
        out = {}
        if isinstance(tree, dict):
            for name, leaf in tree.items():
                if isinstance(leaf, safe_pickle.LazyTensor):
                    out[str(name)] = (TensorMeta(str(name), tuple(leaf.shape), leaf.dtype), leaf)
        if not out:
            raise CorruptCheckpoint("pickle is not a state dict of tensors", path=file,
                                    fix="save the model with save_pretrained (safetensors)")
        return out

    # -- public API ------------------------------------------------------------------
    def config(self) -> dict:
        """The parsed config.json (a fresh dict each call)."""
        try:
            cfg = json.loads(self._config_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"config.json is not valid JSON ({e})",
                                    path=self._config_path,
                                    fix="restore config.json from the original model") from None
        if not isinstance(cfg, dict):
            raise CorruptCheckpoint("config.json is not a JSON object", path=self._config_path,
                                    fix="restore config.json from the original model")
        return cfg

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor's name, shape and dtype, from headers only (file/disk order)."""
        return {name: e.meta for name, e in self._entries.items()}

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor (memory: that tensor only)."""
        e = self._entry(name)
        if e.lazy is not None:
            with self._lock:  # safe_pickle archives share one handle (not thread-safe)
                return e.lazy.load()
        return self._read_rows(e, 0, e.meta.shape[0] if e.meta.shape else None)

    def read_slice(self, name: str, dim0_start: int, dim0_stop: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``dim0_start:dim0_stop`` of a tensor, reading only those bytes; with ``out`` (a
        contiguous tensor of the slice's shape and dtype) they are read straight into it."""
        e = self._entry(name)
        shape = e.meta.shape
        if not shape or not 0 <= dim0_start <= dim0_stop <= shape[0]:
            raise LayoutError(f"row slice [{dim0_start}:{dim0_stop}] is out of range for shape "
                              f"{list(shape)}", path=e.file, tensor=name,
                              fix="check the parallel split sizes against the config")
        if e.lazy is not None:  # reads only the rows' bytes
            with self._lock:
                return e.lazy.load_slice(0, dim0_start, dim0_stop, out=out)
        return self._read_rows(e, dim0_start, dim0_stop, out)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` read into ``out`` (the row-reading interface of HF-named sources)."""
        return self.read_slice(name, start, stop, out=out)

    def view_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``start:stop`` of a safetensors tensor as a zero-copy view of the file
        (``formats.mapped``); None for other files or when it cannot be mapped."""
        e = self._entry(name)
        m = e.meta
        if e.lazy is not None or not m.shape or not 0 <= start <= stop <= m.shape[0]:
            return None
        row = m.nbytes // max(m.shape[0], 1)
        with self._lock:
            raw = map_region(self._handle(e.file).fileno(), e.offset + start * row, (stop - start) * row)
        return None if raw is None else raw.view(m.dtype).view(stop - start, *m.shape[1:])

    def asset_files(self) -> list[Path]:
        """Tokenizer / generation files present next to the weights."""
        return [self.path / n for n in ASSET_NAMES if (self.path / n).is_file()]

    def close(self) -> None:
        """Close every open shard handle (idempotent)."""
        with self._lock:
            for f in self._handles.values():
                f.close()
            self._handles.clear()
        self._stack.close()


    # -- internals -------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise MissingTensors("no such tensor in the checkpoint", path=self.path, tensor=name,
                                 fix="check the model family / tensor names") from None

    def _handle(self, file: Path):
        """The cached open handle of ``file`` (call with ``self._lock`` held)."""
        f = self._handles.get(file)
        if f is None:
            f = self._handles[file] = open(file, "rb")
        return f

    def _read_rows(self, e: _Entry, start: int, stop: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        m = e.meta
        if stop is None:  # 0-d tensor
            nbytes, shape, offset = m.nbytes, m.shape, e.offset
        else:
            row = m.dtype.itemsize
            for s in m.shape[1:]:
                row *= s
            nbytes, shape, offset = (stop - start) * row, (stop - start, *m.shape[1:]), \
                e.offset + start * row
        if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != m.dtype or not out.is_contiguous()):
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the slice is {tuple(shape)} {m.dtype}")
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.view(-1).view(torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy()).cast("B")
            with self._lock:
                read_into(self._handle(e.file), offset, view, e.file, m.name)
        return out if out is not None else buf.view(m.dtype).reshape(shape)
