"""Walk two HF-named sources group by group (a family mapping at a time) for comparison."""
from __future__ import annotations

from ..families import config_from_hf, family_for_hf
from ..families.schema import Mapping


def mapping_groups(source) -> list[Mapping]:
    """The family's mappings for this source, in table order (fused tensors read once)."""
    cfg = source.config()
    return family_for_hf(cfg).expand(config_from_hf(cfg))
