"""Where the model is inside a torch DCP training checkpoint, from file names and key names only.

Layouts (read off real saves, see docs/formats.md "FSDP2 / torch DCP"):

* ``plain``: a directory with ``.metadata`` + ``__R_K.distcp`` (no Megatron ``metadata.json``),
  as ``dcp.save(get_model_state_dict(model))`` or ``dcp.save({"model": msd, "optim": osd})`` write;
* ``accelerate``: a ``save_state`` directory whose ``pytorch_model_fsdp_0/`` is the model DCP
  (``optimizer_0/`` the optimizer one; ``random_states_*.pkl`` are full pickles: never read);
* ``torchtitan``: its ``checkpoint/`` folder (or the folder holding it) with ``step-N/`` DCP
  directories, the highest N (or the one asked for) is used.

``split_keys`` finds the model's tensors among a checkpoint's keys: an anchor key (the
embedding, ``model.embed_tokens.weight`` for HF names or ``tok_embeddings.weight`` for
torchtitan's) says where the wrapper ends. Where the metadata's ``planner_data`` records a key's
path (``('model', 'model.embed_tokens.weight')``) the path decides the wrapper; wrapper
components (``_orig_mod``, ``module``, ...) are dropped anywhere in a name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingTensors, UnknownFormat, UnsupportedFamily

METADATA_FILE = ".metadata"
MEGATRON_MARKER = "metadata.json"
ACCELERATE_MODEL = re.compile(r"^pytorch_model_fsdp_(\d+)$")
ACCELERATE_OPTIM = re.compile(r"^optimizer_(\d+)$")
STEP = re.compile(r"^step-(\d+)$")
WRAPPERS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# top-level groups of training state that never hold model weights
TRAINING_STATE = frozenset({"optim", "optimizer", "optimizers", "lr_scheduler", "lr_schedulers", "scheduler",
                            "train_state", "dataloader", "rng", "rng_state", "random_states", "extra_state"})
ANCHORS = {"hf": "model.embed_tokens.weight", "torchtitan": "tok_embeddings.weight"}


def is_dcp_dir(p: Path) -> bool:
    return (p / METADATA_FILE).is_file() and not (p / MEGATRON_MARKER).is_file()


def _steps(p: Path) -> dict[int, Path]:
    out = {}
    if p.is_dir():
        for c in p.iterdir():
            m = STEP.match(c.name)
            if m and is_dcp_dir(c):
                out[int(m.group(1))] = c
    return out


@dataclass(frozen=True)
class DcpLayout:
    kind: str                 # plain | accelerate | torchtitan
    root: Path                # what the user pointed at
    model_dir: Path           # the DCP directory holding the model
    optim_dir: Path | None    # a separate optimizer DCP (accelerate), else None
    step: int | None = None


def resolve_layout(path: Path, step: str | int | None = None) -> DcpLayout | None:
    """The DCP layout at ``path`` (None if it is none of them); ``step`` picks a torchtitan step."""
    p = Path(path)
    if not p.is_dir():
        return None
    if is_dcp_dir(p):
        m = STEP.match(p.name)
        return DcpLayout("torchtitan" if m else "plain", p, p, None, int(m.group(1)) if m else None)
    models = sorted((int(m.group(1)), c) for c in p.iterdir() if (m := ACCELERATE_MODEL.match(c.name)) and is_dcp_dir(c))
    if models:
        optim = p / "optimizer_0"
        return DcpLayout("accelerate", p, models[0][1], optim if is_dcp_dir(optim) else None)
    steps = _steps(p) or _steps(p / "checkpoint")
    if not steps:
        return None
    if step in (None, "latest"):
        n = max(steps)
    else:
        try:
            n = int(step)
        except ValueError:
            raise UnknownFormat(f"step {step!r} is not a number", path=p, fix=f"use one of {sorted(steps)}") from None
        if n not in steps:
            raise UnknownFormat(f"no step-{n}/ DCP directory (found steps {sorted(steps)})", path=p,
                                fix=f"use one of {sorted(steps)}")
    return DcpLayout("torchtitan", p, steps[n], None, n)


def is_dcp(path: Path) -> bool:
    return resolve_layout(path) is not None


def clean(name: str) -> str:
    """``name`` without wrapper components (``_orig_mod.``, ``module.``, ...)."""
    return ".".join(c for c in name.split(".") if c not in WRAPPERS)


@dataclass(frozen=True)
class ModelKeys:
    naming: str                   # hf | torchtitan
    wrapper: str                  # the stored prefix before the model's own names ("model." or "")
    names: dict[str, str]         # model name (wrappers stripped) -> stored key
    other: dict[str, list[str]]   # training-state group -> stored tensor keys (optimizer moments, ...)


def _path(key: str, planner_data) -> tuple[tuple[str, ...], str]:
    """(outer path, leaf) of a stored key: from planner_data when it records one, else ((), key)."""
    path = planner_data.get(key) if isinstance(planner_data, dict) else None
    if isinstance(path, tuple) and path and all(isinstance(c, (str, int)) for c in path):
        return tuple(str(c) for c in path[:-1]), str(path[-1])
    return (), key


def _group(outer: tuple[str, ...], leaf: str) -> str:
    return outer[0] if outer else leaf.split(".", 1)[0]


def split_keys(keys: list[str], planner_data, where: Path) -> ModelKeys:
    """Which stored tensor keys are the model's, under which names (see the module docstring)."""
    parsed = {k: _path(k, planner_data) for k in keys}
    anchors = set()
    for key, (outer, leaf) in parsed.items():
        name = clean(leaf)
        for naming, anchor in ANCHORS.items():
            if name == anchor or name.endswith("." + anchor):
                anchors.add((naming, outer, name[:len(name) - len(anchor)]))
    if not anchors:
        groups = sorted({_group(*parsed[k]) for k in keys})
        if not keys or all(g in TRAINING_STATE for g in groups):
            raise MissingTensors(f"the checkpoint holds no model tensors (tensor groups: {groups or 'none'})",
                                 path=where, fix="point at the model's DCP directory (e.g. pytorch_model_fsdp_0/ "
                                 "or step-N/), not an optimizer-only save")
        raise UnsupportedFamily(f"unknown parameter naming: no {' or '.join(ANCHORS.values())} among "
                                f"{len(keys)} tensors (first: {sorted(keys)[0]})", path=where,
                                fix="only Hugging Face names and torchtitan's Llama 3 names are understood")
    if len(anchors) > 1:
        raise UnsupportedFamily(f"several models in one checkpoint ({sorted(a[1:] for a in anchors)})", path=where,
                                fix="save one model per checkpoint")
    naming, outer, inner = anchors.pop()
    names: dict[str, str] = {}
    other: dict[str, list[str]] = {}
    for key, (o, leaf) in parsed.items():
        name = clean(leaf)
        mine = o == outer and name.startswith(inner) and (outer or inner or _group(o, leaf) not in TRAINING_STATE)
        if not mine:
            other.setdefault(_group(o, leaf), []).append(key)
            continue
        name = name[len(inner):]
        if name in names:
            raise UnsupportedFamily(f"two stored keys name the same parameter ({names[name]}, {key})", path=where,
                                    tensor=name, fix="the checkpoint mixes wrapped and unwrapped names")
        names[name] = key
    wrapper = ".".join(outer) + "." if outer else ""
    return ModelKeys(naming, wrapper + inner, names, other)
