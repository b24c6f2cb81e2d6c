"""Write Hugging Face checkpoints: ``HFWriter`` streams tensors into safetensors shards.

Told every output tensor up front, it plans the shards, writes each shard's safetensors header
and pre-sizes the file; ``write`` then puts one tensor's bytes at its offset, in any order.
Nothing ever holds more than the tensor being written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ckptconv.errors import LayoutError, MissingTensors
from ckptconv.formats.closing import CommitsOnExit
from ckptconv.formats.safetensors_io import _DTYPE_TO_ST, create_shard, write_at, write_blocks
from ckptconv.plan.output_shards import plan_shards, shard_file_names
from ckptconv.types import TensorMeta


class HFWriter(CommitsOnExit):
    """Stream tensors into ``out_dir`` as safetensors shards (+ index when >1 shard).

    ``write`` takes a tensor or a row stream (``streams_rows``: ``shape``, ``dtype``, ``blocks()``
    giving the rows in order as contiguous tensors), written block by block.

    ``out_dir`` must exist (a private temp dir; the caller renames it into place).
    Context manager: an exception inside the ``with`` block aborts (deletes what we wrote)."""

    INDEX_NAME = "model.safetensors.index.json"
    takes_row_streams = True
    primes_row_streams = True       # a row stream is read with blocks() from its first row

    def __init__(self, out_dir: Path, metas: list[TensorMeta], max_shard_size: int = 5 * 10**9, *,
                 files: set[str] | None = None, index: bool = True):
        # files: create and fill only these shard files (one worker's share; None: all);
        # index: write the index at close (the share's lead worker; the plan of every shard is known)
        self.out_dir = Path(out_dir)
        self._index = index
        self._metas: dict[str, TensorMeta] = {}
        for m in metas:
            if m.name in self._metas:
                raise LayoutError("tensor planned twice for the output", path=self.out_dir,
                                  tensor=m.name, fix="give every output tensor a unique name")
            if m.dtype not in _DTYPE_TO_ST:
                raise LayoutError(f"dtype {m.dtype} cannot be stored in safetensors",
                                  path=self.out_dir, tensor=m.name, fix="pick another --dtype")
            self._metas[m.name] = m
        groups = plan_shards([(m.name, m.nbytes) for m in metas], max_shard_size) or [[]]
        self._shards = [self.out_dir / f for f in shard_file_names(len(groups))]
        self._file_of = {n: path.name for path, group in zip(self._shards, groups) for n in group}
        self._where: dict[str, tuple[Path, int]] = {}
        self._created: list[Path] = []
        self._written: set[str] = set()
        self._done = False
        self._mine = {n for path, group in zip(self._shards, groups) if files is None or path.name in files
                      for n in group}
        try:
            for path, group in zip(self._shards, groups):
                if files is not None and path.name not in files:
                    continue
                offsets = create_shard(path, [self._metas[n] for n in group], self._created)
                self._where.update((n, (path, off)) for n, off in offsets.items())
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes at its planned offset (any order, each name once)."""
        if self._done:
            raise LayoutError("write after close/abort", path=self.out_dir, tensor=name,
                              fix="write every tensor before close()")
        m = self._metas.get(name)
        if m is None:
            raise MissingTensors("tensor is not in the output plan", path=self.out_dir,
                                 tensor=name, fix="include it in the metas given to HFWriter")
        if name not in self._mine:
            raise LayoutError("tensor is in another worker's shard file", path=self.out_dir, tensor=name,
                              fix="write only the tensors this writer holds()")
        path, offset = self._where[name]
        if name in self._written:
            raise LayoutError("tensor written twice", path=path, tensor=name,
                              fix="write each tensor exactly once")
        if tuple(tensor.shape) != m.shape or tensor.dtype != m.dtype:
            raise LayoutError(f"got {list(tensor.shape)} {tensor.dtype}, the plan says "
                              f"{list(m.shape)} {m.dtype}", path=path, tensor=name,
                              fix="cast/reshape before writing or fix the conversion plan")
        if getattr(tensor, "streams_rows", False):       # row blocks in order (engine.rows.RowStream)
            write_blocks(path, offset, tensor.blocks())
        else:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            if data.numel():
                write_at(path, offset, data)
        self._written.add(name)

    def holds(self, name: str) -> bool:
        """Whether ``name`` goes into one of this writer's shard files."""
        return name in self._mine

    def write_config(self, config: dict) -> None:
        """Write ``config.json`` (indent=2, sorted keys)."""
        self._write_json("config.json", config)

    def copy_assets(self, files: list[Path]) -> None:
        """Copy tokenizer / generation files byte for byte (symlinks are followed)."""
        reserved = {p.name for p in self._shards} | {self.INDEX_NAME}
        for src in map(Path, files):
            if src.name in reserved:
                raise LayoutError("asset would overwrite an output weight file", path=src,
                                  fix="do not pass weight files as assets")
            dst = self.out_dir / src.name
            self._created.append(dst)
            shutil.copyfile(src, dst)

    def close(self) -> None:
        """Check every tensor was written; write the index when there are several shards."""
        if self._done:
            return
        missing = [n for n in self._metas if n in self._mine and n not in self._written]
        if missing:
            raise MissingTensors(f"{len(missing)} of {len(self._mine)} output tensors were "
                                 f"never written", path=self._where[missing[0]][0],
                                 tensor=missing[0], fix="the conversion plan is incomplete; "
                                 "write every tensor listed in the metas")
        if len(self._shards) > 1 and self._index:
            weight_map = {n: self._file_of[n] for n in sorted(self._metas)}
            total = sum(m.nbytes for m in self._metas.values())
            self._write_json(self.INDEX_NAME,
                             {"metadata": {"total_size": total}, "weight_map": weight_map})
        self._done = True

    def abort(self) -> None:
        """Delete every file this writer created (the directory itself is the caller's)."""
        self._done = True
        for p in self._created:
            p.unlink(missing_ok=True)
        self._created.clear()

    def _write_json(self, fname: str, obj: dict) -> None:
        path = self.out_dir / fname
        self._created.append(path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    def __exit__(self, exc_type: object, *exc: object) -> None:   # a failing close() aborts too
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
