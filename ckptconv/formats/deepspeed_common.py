"""DeepSpeed checkpoint discovery: tags, file names, safe opening, the HF config.

    ROOT/latest                                   the tag ("global_step2", no newline)
    ROOT/config.json                              (HF Trainer checkpoint-N/ dirs; optional)
    ROOT/TAG/mp_rank_MM_model_states.pt           module, param_shapes, ... (stage 0/1/2, pipeline)
    ROOT/TAG/zero_pp_rank_R_mp_rank_MM_model_states.pt     stage 3: one per data-parallel rank
    ROOT/TAG/[bf16_]zero_pp_rank_R_mp_rank_MM_optim_states.pt   flat fp32 partitions per rank
    ROOT/TAG/layer_LL[-model_TT]-model_states.pt  pipeline (PipelineModule) layer weights

Every `.pt` is read through ckptconv.formats.safe_pickle: DeepSpeed's own classes
(LossScaler, ZeroStageEnum, fragment_address) become inert Placeholders; nothing is imported
or executed. SRC may be ROOT or a TAG directory itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpoint, MissingTensors, UnsupportedFamily
from .safe_pickle import Placeholder, TorchFile

LATEST = "latest"
MODEL_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
LAYER_FILE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_ANY_STATES = re.compile(r"(model|optim)_states\.pt$")


def is_tag_dir(p: Path) -> bool:
    return p.is_dir() and any(_ANY_STATES.search(c.name) for c in p.iterdir() if c.is_file())


def list_tags(root: Path) -> list[str]:
    root = Path(root)
    if is_tag_dir(root):
        return [root.name]
    return sorted(c.name for c in root.iterdir() if is_tag_dir(c)) if root.is_dir() else []


def is_deepspeed(p: Path) -> bool:
    """A DeepSpeed root (a `latest` file, or a subdirectory holding *_model_states.pt) or a tag dir."""
    p = Path(p)
    return p.is_dir() and ((p / LATEST).is_file() or is_tag_dir(p) or bool(list_tags(p)))


def resolve_tag_dir(root: Path, tag: str | int | None = None) -> tuple[Path, Path, str]:
    """(root, tag directory, tag) for SRC and --tag (None/'latest' = read `latest`; an int N = global_stepN)."""
    root = Path(root)
    if is_tag_dir(root) and tag in (None, "latest", root.name):
        return root.parent, root, root.name
    if tag is None or str(tag) == "latest":
        marker = root / LATEST
        if not marker.is_file():
            tags = list_tags(root)
            if len(tags) == 1:
                return root, root / tags[0], tags[0]
            raise MissingTensors(f"no '{LATEST}' file and {len(tags)} tag directories {tags[:5]}", path=root,
                                 fix="pass --tag TAG to choose one")
        tag = marker.read_text().strip()
    tag = str(tag)
    if tag.isdigit() and not (root / tag).is_dir():
        tag = f"global_step{tag}"
    tag_dir = root / tag
    if not is_tag_dir(tag_dir):
        raise MissingTensors(f"tag directory '{tag}' is missing or holds no *_model_states.pt files"
                             f" (tags present: {list_tags(root) or 'none'})", path=tag_dir,
                             fix=f"copy the {tag} directory, or pass --tag with one that exists")
    return root, tag_dir, tag


def open_pt(path: Path, what: str) -> TorchFile:
    if not path.is_file():
        raise MissingTensors(f"{what} is missing", path=path,
                             fix="copy the complete checkpoint (every rank's files of this tag)")
    return TorchFile(path)


def require_dict(f: TorchFile, *keys: str) -> dict:
    obj = f.obj
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        raise CorruptCheckpoint(f"not a DeepSpeed states file (no {', '.join(repr(k) for k in missing)})",
                                path=f.path, fix="point at a checkpoint written by DeepSpeed save_checkpoint")
    return obj


def plain(x: Any) -> Any:
    """The value behind an enum pickled by DeepSpeed (ZeroStageEnum(2) -> 2), else x."""
    if isinstance(x, Placeholder) and len(x.args) == 1 and isinstance(x.args[0], (int, str)):
        return x.args[0]
    return x


def placeholder_state(x: Any) -> dict:
    """The recorded attributes of a pickled DeepSpeed object (LossScaler, fragment_address)."""
    if isinstance(x, Placeholder):
        return dict(x.state) if isinstance(x.state, dict) else dict(x.kwargs)
    return {}


def find_hf_config(root: Path, tag_dir: Path, hf_config: dict | str | Path | None) -> tuple[dict | None, Path | None]:
    """(config dict, the directory it came from) from --hf-config, else ROOT/config.json
    (HF Trainer checkpoint-N/), else TAG/config.json; (None, None) when there is none."""
    if isinstance(hf_config, dict):
        return dict(hf_config), None
    candidates = [Path(hf_config)] if hf_config is not None else [root / "config.json", tag_dir / "config.json"]
    for c in candidates:
        f = c / "config.json" if c.is_dir() else c
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise CorruptCheckpoint(f"config.json is not valid JSON ({e})", path=f,
                                        fix="pass --hf-config with the model's config.json") from None
            if not isinstance(cfg, dict):
                raise CorruptCheckpoint("config.json is not a JSON object", path=f,
                                        fix="pass --hf-config with the model's config.json")
            return cfg, f.parent
        if hf_config is not None:
            raise MissingTensors("no config.json there", path=f, fix="pass --hf-config FILE|DIR of the model's config")
    return None, None


def require_hf_config(cfg: dict | None, root: Path) -> dict:
    if cfg is None:
        raise UnsupportedFamily("a DeepSpeed ZeRO checkpoint does not record the model architecture and no "
                                "config.json was found next to it", path=root,
                                fix="pass --hf-config FILE|DIR (the config.json of the model that was trained)")
    return cfg


def is_megatron_deepspeed(tag_dir: Path) -> bool:
    """Pipeline layer files, or model states whose module holds GPTModel (language_model.*) names."""
    if any(LAYER_FILE.match(c.name) for c in tag_dir.iterdir()):
        return True
    first = tag_dir / "mp_rank_00_model_states.pt"
    if not first.is_file():
        return False
    with open_pt(first, "model states") as f:
        module = f.obj.get("module") if isinstance(f.obj, dict) else None
        return isinstance(module, dict) and any(str(k).startswith(("language_model.", "module.language_model."))
                                                for k in module)
