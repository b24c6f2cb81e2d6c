"""How the files of a `torch_dist` checkpoint are laid out, per megatron-core release line: data.

Read off checkpoints real megatron-core saves (fixtures/megatron_dist_* by 0.16.1,
fixtures/megatron019_dist_* by 0.19.2) and, for 0.17 / 0.18, off their `dist_checkpointing`
source (0.17.x and 0.18.2 save `common.pt` like 0.16; 0.17.1 adds the optional integrity manifest):

    layout        common state (args, iteration, ...)             metadata.json
    "0.16-0.18"   ITER_DIR/common.pt                              + common_backend, common_backend_version
    "0.19"        BYTES item common_state/shard_0_1 in .distcp    sharded_backend* only
    "both"        both (what ckptconv writes: loads in 0.16.1, which needs common.pt, and in
                  0.19.x, which prefers common.pt when present and otherwise reads the item)

Both items hold the same dict: common.pt is `torch.save(dict)`, the item `torch.save([dict])`.
Independent of the layout: `integrity.json` (sha256 of every other file in ITER_DIR; 0.17.1+ writes it
with `save(..., verify_integrity=True)` and `load(..., verify_integrity=True)` requires it) and the
`_extra_state` BYTES items. A reader finds the layout from the files (`layout_of`), never from a
version the user names; a writer picks one `DistLayout` (`WRITE_LAYOUT`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

COMMON_FILE = "common.pt"
COMMON_ITEM = "common_state/shard_0_1"
COMMON_GROUP = "common_state"
INTEGRITY_FILE = "integrity.json"
INTEGRITY_ALGORITHM = "sha256"
BACKEND = "torch_dist"


@dataclass(frozen=True)
class DistLayout:
    name: str
    common_file: bool                 # ITER_DIR/common.pt holds the common dict
    common_item: bool                 # the BYTES item COMMON_ITEM holds [common dict]
    config: dict = field(default_factory=dict)   # metadata.json as this line writes it
    loads_in: str = ""                # the megatron-core versions that load it (checked in tests/interop)


_CONFIG = {"sharded_backend": BACKEND, "sharded_backend_version": 1}
LAYOUTS: tuple[DistLayout, ...] = (
    DistLayout("megatron-core 0.16-0.18 (common.pt)", common_file=True, common_item=False,
               config={**_CONFIG, "common_backend": "torch", "common_backend_version": 1},
               loads_in="0.16.1, 0.17.1, 0.18.2, 0.19.x (deprecated common.pt fallback)"),
    DistLayout("megatron-core 0.19 (common_state item)", common_file=False, common_item=True,
               config=dict(_CONFIG), loads_in="0.19.x"),
    DistLayout("megatron-core 0.16-0.19 (common.pt and common_state item)", common_file=True,
               common_item=True, config={**_CONFIG, "common_backend": "torch", "common_backend_version": 1},
               loads_in="0.16.1, 0.17.1, 0.18.2, 0.19.x"),
)
WRITE_LAYOUT = LAYOUTS[2]


def layout_of(has_common_file: bool, has_common_item: bool) -> DistLayout | None:
    """The known layout with these files; None when neither holds the common state."""
    for lay in LAYOUTS:
        if (lay.common_file, lay.common_item) == (has_common_file, has_common_item):
            return lay
    return None
