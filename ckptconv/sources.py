"""Open any supported checkpoint as a Hugging Face-named logical source.

Hugging Face layout is the hub between ecosystems: every source offers `config()` (an HF
config dict), `tensors()` (HF name -> TensorMeta), `read(name)`, `asset_files()`, `path`,
`close()`. Conversions to any target and verification are written against this interface.
"""
from __future__ import annotations

from pathlib import Path

from .formats.closing import wrap_or_close
from .formats.deepspeed_source import open_deepspeed
from .formats.dcp_source import DcpSource
from .formats.detect import detect_format
from .formats.hf import HFReader
from .formats.hf_hub import resolve_hf_source
from .formats.megatron import READERS as MEGATRON_READERS
from .formats.megatron import open_megatron_reader
from .formats.megatron_as_hf import MegatronAsHF


def open_hf_view(src: str | Path, *, iteration: str | int = "latest", hf_config: dict | None = None,
                 cache_dir: str | Path | None = None, dtype=None):
    path = resolve_hf_source(str(src), cache_dir)
    fmt = detect_format(path)
    if fmt == "hf":
        return HFReader(path)
    if fmt == "deepspeed":
        return open_deepspeed(path, None if str(iteration) == "latest" else iteration, hf_config=hf_config, dtype=dtype)
    if fmt == "dcp":
        return DcpSource(path, None if str(iteration) in ("latest", "release") else iteration, hf_config=hf_config)
    if fmt in MEGATRON_READERS:
        return wrap_or_close(open_megatron_reader(path, fmt, iteration), lambda r: MegatronAsHF(r, hf_config, dtype))
    raise AssertionError(f"detect_format returned unhandled format {fmt!r}")
