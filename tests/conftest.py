import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tree_hash  # noqa: E402
from tiny_models import VARIANTS, build_model, save_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """hf_model_dir(variant, dtype) -> directory of a saved tiny HF model (built once per session)."""
    cache = {}

    def make(variant: str = "llama-gqa", dtype: torch.dtype = torch.float32) -> Path:
        key = (variant, dtype)
        if key not in cache:
            assert variant in VARIANTS
            path = tmp_path_factory.mktemp(f"hf-{variant}-{str(dtype)[6:]}")
            cache[key] = save_model(build_model(variant, dtype=dtype), path)
        return cache[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def fixtures_are_never_modified():
    """Every command in the suite reads the committed fixtures; none may change a byte of them."""
    root = Path(__file__).resolve().parents[1] / "fixtures"
    before = tree_hash(root)
    yield
    assert tree_hash(root) == before, "a test or command modified files under fixtures/"


# ------------------------------------------------------------------ CI: interop skips are failures
# Under CI=true a green run must include the checks by real megatron-core: a skipped interop test
# (missing extra, importorskip, explicit skip) fails the run instead of passing silently.
INTEROP_DIR = Path(__file__).resolve().parent / "interop"


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(longrepr) -> str:
    return str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)


def _under_interop(path) -> bool:
    p = Path(str(path)).resolve()
    return p == INTEROP_DIR or INTEROP_DIR in p.parents


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if _ci() and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("interop"):
        rep.outcome = "failed"
        rep.longrepr = (f"interop test skipped under CI=true ({_skip_reason(rep.longrepr)}): CI must run "
                        "every check by real megatron-core; install the interop extra")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if _ci() and rep.skipped and _under_interop(collector.path):
        rep.outcome = "failed"
        rep.longrepr = (f"interop module skipped under CI=true ({_skip_reason(rep.longrepr)}): CI must run "
                        "every check by real megatron-core; install the interop extra")
