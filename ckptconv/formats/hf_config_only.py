"""A model known from its config.json alone (no weights on disk), for --dry-run forecasts.

``tensors()`` are the shapes the family's table says the model has (``plan.expected_tensors``),
in the config's dtype; nothing can be read. ``hf-to-megatron CONFIG --dry-run`` plans, checks
and forecasts a conversion of a 70B / 405B / 671B model from the config alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, UnknownFormat
from ..families import family_for_hf
from ..plan.expected_tensors import expected_hf_tensors
from ..types import DTYPE_NAMES, TensorMeta
from .hf import HFReader

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def config_only_path(path: Path) -> Path | None:
    """The config.json of ``path`` when ``path`` is one, or a directory holding it and no weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and (path / "config.json").is_file() and not any(
            next(path.glob(g), None) for g in WEIGHT_GLOBS):
        return path / "config.json"
    return None


class ConfigOnlySource:
    """The ``sources`` interface over a config alone: metas from the family table, no data."""

    rows_readable = True     # forecasts stand for the HF safetensors source, which reads rows

    def __init__(self, config_path: Path):
        self.config_path = Path(config_path)
        self.path = self.config_path.parent
        try:
            self._config = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(f"cannot read the config ({e})", path=self.config_path,
                                    fix="pass a Hugging Face config.json") from None
        if not isinstance(self._config, dict):
            raise CorruptCheckpoint("the config is not a JSON object", path=self.config_path,
                                    fix="pass a Hugging Face config.json")
        family = family_for_hf(self._config, self.config_path)
        cfg = family.from_hf_config(self._config)
        name = self._config.get("torch_dtype") or self._config.get("dtype") or "bfloat16"
        dtype = DTYPE_NAMES.get(name)
        if dtype is None:
            raise UnknownFormat(f"unknown torch_dtype {name!r}", path=self.config_path,
                                fix=f"use one of {sorted(DTYPE_NAMES)}")
        self._tensors = expected_hf_tensors(family, cfg, dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def config(self) -> dict:
        return dict(self._config)

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._tensors)

    def read(self, name: str) -> torch.Tensor:
        raise UnknownFormat("this source is a config alone: it holds no weights", path=self.config_path,
                            tensor=name, fix="run with --dry-run, or point at the model's weights")

    def asset_files(self) -> list[Path]:
        return []

    def close(self) -> None:
        pass


def open_hf_or_config(path: Path, dry_run: bool):
    """An HFReader; for a dry-run of a config alone, a ConfigOnlySource."""
    cfg = config_only_path(path) if dry_run else None
    return ConfigOnlySource(cfg) if cfg else HFReader(path)
