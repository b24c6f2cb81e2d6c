"""``torch.load(weights_only=True)`` of Megatron files with an exact, scoped allowlist.

Why not ``torch.serialization.safe_globals(L)``: it adds ``L`` on entry and *removes* ``L`` on
exit, also entries registered before. megatron-core registers its ``SAFE_GLOBALS``
(``argparse.Namespace``, numpy's RNG-state classes, ``AttnBackend``, ...) for the whole process
when ``megatron.core`` is first imported. A helper using ``safe_globals`` with that list therefore
unregisters megatron's classes for every later test (which then fail), and a helper without it
passes only after some earlier test imported megatron-core (a run of the test alone fails).

``allowing(objs)`` makes the allowlist inside *exactly* torch's built-ins plus ``objs`` and, on
exit, puts back the registrations that were there before, unchanged: a load depends neither on
import order nor on what earlier tests registered or removed.

Real Megatron-LM args hold megatron-core objects (enum defaults such as
``attention_backend=AttnBackend.auto``; the classes are read from the generated argument lists in
fixtures/megatron_args/). Without megatron-core they are rebuilt as inert ``MegatronObject``
stand-ins (class name + constructor args); ``real_megatron=True`` (interop tests, whose args go
back into megatron-core) uses megatron-core's own ``SAFE_GLOBALS`` instead.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptconv.formats.safe_pickle_policy import Placeholder

ARGS_LISTS = Path(__file__).resolve().parents[1] / "fixtures" / "megatron_args"


def _numpy_rng_globals() -> list:
    """Classes of numpy's RNG state (Megatron's ``rng_state.np_rng_state``): ndarray, dtype, the
    dtype classes and the array rebuilder."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [v for v in vars(getattr(np, "dtypes", object)).values() if isinstance(v, type) and issubclass(v, np.dtype)]
    return [np.ndarray, np.dtype, _reconstruct, *dtypes]


# what a per-rank file / common.pt pickles besides tensors, megatron-core objects aside
RANK_FILE_GLOBALS = [argparse.Namespace, *_numpy_rng_globals()]


class MegatronObject:
    """Stand-in for a megatron-core object read without megatron-core: one subclass per class
    (``qualname``), holding the constructor args (``AttnBackend.auto`` reads as an instance with
    ``args == (5,)``, whether pickled as a call (megatron) or as ``cls.__new__(cls, 5)`` (ckptconv's
    RePickler writing it back))."""
    qualname = "?"

    def __new__(cls, *args: Any) -> MegatronObject:
        self = object.__new__(cls)
        self.args = args
        return self

    def __init__(self, *args: Any) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MegatronObject) and (other.qualname, other.args) == (self.qualname, self.args)

    def __hash__(self) -> int:
        return hash((self.qualname, self.args))

    def __repr__(self) -> str:
        return f"<MegatronObject {self.qualname}{self.args}>"

    def __reduce__(self):
        return type(self), self.args       # pickled as megatron pickles it: Class(*args)


@functools.cache
def _stand_in(qualname: str) -> type:
    return type(qualname.rpartition(".")[2], (MegatronObject,), {"qualname": qualname})


@functools.cache
def megatron_args_classes() -> tuple[str, ...]:
    """``module.Class`` of every megatron-core object a Megatron-LM args default holds (enums), and
    of the Megatron-DeepSpeed fork's enums its training loop stores in args (``ModelType``)."""
    names = set()
    for path in sorted(ARGS_LISTS.glob("megatron_lm_args*.json")):
        for field in json.loads(path.read_text())["fields"].values():
            d = field["default"]
            if isinstance(d, dict) and "enum" in d:
                names.add(d["enum"].replace(":", "."))
    fork = json.loads((ARGS_LISTS / "megatron_deepspeed_args.json").read_text())
    names |= {q.replace(":", ".") for q in fork["enums"]}
    return tuple(sorted(names))


def megatron_globals(real_megatron: bool = False) -> list:
    if real_megatron:
        from megatron.core.safe_globals import SAFE_GLOBALS

        return list(SAFE_GLOBALS)
    return [(_stand_in(q), q) for q in megatron_args_classes()]


@contextlib.contextmanager
def allowing(objs: list):
    """Inside: weights-only loads allow exactly torch's built-ins + ``objs``; after: as before."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(list(objs))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load_megatron_file(path, *, real_megatron: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` of a Megatron ``model_optim_rng.pt`` / ``common.pt``
    (or a file object holding one)."""
    with allowing(RANK_FILE_GLOBALS + megatron_globals(real_megatron)):
        return torch.load(path if hasattr(path, "read") else str(path), map_location="cpu", weights_only=True)


class _Pickler(pickle._Pickler):
    """Writes a ``MegatronObject`` stand-in class as the megatron-core class it stands for."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, MegatronObject) and obj is not MegatronObject:
            module, _, attr = obj.qualname.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode("utf-8"))
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _PickleModule:
    Pickler = _Pickler
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL


def save_megatron_file(state: Any, path) -> None:
    """``torch.save`` of a (test-edited) state read by ``load_megatron_file``: stand-ins are written
    back as the megatron-core objects they were read from, so megatron-core can load the file."""
    torch.save(state, str(path), pickle_module=_PickleModule)


def comparable(value: Any) -> Any:
    """``value`` with megatron-core objects as ``(qualname, args)`` whoever read them: a real enum
    member, a ``MegatronObject`` stand-in or ckptconv's unpickler placeholder compare equal."""
    import enum

    if isinstance(value, argparse.Namespace):
        return {k: comparable(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, MegatronObject):
        return (value.qualname, tuple(value.args))
    if isinstance(value, enum.Enum):
        return (f"{type(value).__module__}.{type(value).__qualname__}", (value.value,))
    if isinstance(value, Placeholder):
        return (".".join(type(value).pickled_as), tuple(value.args))
    return value
