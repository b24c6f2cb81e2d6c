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
