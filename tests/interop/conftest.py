"""Interop tests: run checkpoints through REAL megatron-core on CPU (gloo).

Everything collected under this folder gets ``pytest.mark.interop``. Without the
``interop`` extra (megatron-core, psutil) the whole folder is skipped cleanly: each test
module also starts with ``pytest.importorskip`` so it reports as skipped, not as errors.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _missing_deps() -> list[str]:
    missing = []
    for mod in ("megatron.core", "psutil"):
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(mod)
    return missing


_MISSING = _missing_deps()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"interop extra not installed: {', '.join(_MISSING)}") if _MISSING else None
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.interop)
            if skip is not None:
                item.add_marker(skip)
