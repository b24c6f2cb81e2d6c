"""Megatron-Core distributed checkpoints (`torch_dist`): streaming Writer.

What is written (what `megatron.core.dist_checkpointing.load` reads at any TP/PP):
    ROOT/latest_checkpointed_iteration.txt
    ROOT/release | ROOT/iter_%07d/
        __0_K.distcp   one torch DCP record file per write item (see "Memory" below), among them
                       the BYTES item common_state/shard_0_1 = torch.save([common]) (megatron-core 0.19)
        .metadata      torch DCP's Metadata, as torch's FileSystemWriter writes it (`dcp_metadata_write`)
        common.pt      common = {"args", "checkpoint_version": 3.0, "iteration", "ckptconv"} (0.16)
        metadata.json  Megatron's marker of a complete checkpoint
        integrity.json sha256 of every other file, written last (0.17.1+'s `load(verify_integrity=True)`
                       requires it; 0.16 ignores it)
The layout is `megatron_dist_layout.WRITE_LAYOUT` (common state both ways: loads in 0.16.1 and 0.19.x).
Keys are global: per-layer logical tensors become chunks (offset = global layer) of the stacked
`decoder.layers.<module>.<param>`; fc1 keeps the logical [gate; up] layout (= Megatron's
stored [gate_full; up_full]); `_extra_state` objects are BYTES items holding `torch.save([None])`
(Megatron's ShardedObject payload, not pickled a second time), for every Transformer Engine
module of every layer, so both TE and local-spec models find theirs. A tied embedding is stored
once: Megatron's last stage loads its output layer from `embedding.word_embeddings.weight`.

Memory. All items are planned from the metas alone (`dcp_metadata_write.PlanItem`, what torch's
default save planner would plan) and written in plan order by one background thread, which
resolves a tensor item by waiting for the engine's `write()` of that tensor: `write(name, t)`
hands `t` over through a one-slot rendezvous (`_Handoff`) and returns once the storage writer has
taken it. The engine writes in plan order, so at most the tensor being serialised and the one
being produced are alive; a write out of plan order is held until it is asked for (correct, just
not bounded). The storage writer is `dcp_records.RecordStorageWriter`: records streamed into a
few large files (not one file per item), no CRC-32, each file's SHA-256 for integrity.json
computed from the bytes as they are written (no second pass), then the `.metadata`. torch's DCP
package is not imported (it costs ~2 s of start-up): what it would write is written directly,
and tests compare it with `dcp.save`'s and load it with torch's and megatron-core's readers.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import LayoutError, MissingTensors
from ..plan.megatron_layout import MegatronLayout
from ..types import TensorMeta
from .megatron_dist import METADATA_JSON, leading_axes, stacked_key
from .dcp_metadata_write import PlanItem, Stored, tensor_item
from .dcp_records import RecordStorageWriter
from .megatron_dist_integrity import write_manifest
from .megatron_dist_layout import BACKEND, COMMON_FILE, COMMON_ITEM, WRITE_LAYOUT
from .megatron_names import extra_state_keys, to_impl
from .megatron_torch import LATEST, iteration_dir_name
from .closing import CommitsOnExit
from .safe_pickle_policy import RePickleModule

CHECKPOINT_CONFIG = WRITE_LAYOUT.config


def _list_payload(obj: Any) -> bytes:
    """A ShardedObject's stored bytes: torch.save([obj]) (not pickled a second time; objects our
    unpickler read as placeholders are written back as what they stand for)."""
    buf = io.BytesIO()
    torch.save([obj], buf, pickle_module=RePickleModule)
    return buf.getvalue()


class SaveAborted(Exception):
    """The save thread stopped because the engine (or, in a shared save, another worker) failed."""


class _Handoff:
    """One-slot rendezvous between the engine (put) and the storage writer (take)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._pending: dict[str, torch.Tensor] = {}
        self._wanted: str | None = None
        self._closing = False
        self.error: BaseException | None = None

    def put(self, name: str, tensor: torch.Tensor) -> None:
        with self._cv:
            self._check()
            self._pending[name] = tensor
            self._cv.notify_all()
            while name in self._pending and self.error is None and not (
                    self._wanted not in (None, name) and self._wanted not in self._pending):
                self._cv.wait()
            self._check()

    def take(self, name: str) -> torch.Tensor:
        with self._cv:
            self._wanted = name
            self._cv.notify_all()
            while name not in self._pending:
                if self.error is not None:
                    raise SaveAborted()
                if self._closing:
                    raise MissingTensors("planned tensor was never written", tensor=name,
                                         fix="the conversion stopped early; nothing was kept")
                self._cv.wait()
            self._wanted = None
            self._cv.notify_all()
            return self._pending.pop(name)

    def fail(self, exc: BaseException) -> None:
        with self._cv:
            if self.error is None:
                self.error = exc
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()

    def _check(self) -> None:
        if self.error is not None and not isinstance(self.error, SaveAborted):
            raise self.error


class StreamingDcpSave(CommitsOnExit):
    """The records of planned items written by a save thread in plan order, then the `.metadata`;
    ``write(name, t)`` hands the tensor over through a one-slot rendezvous, so at most the tensor
    being serialised and the one being produced are alive. A subclass sets ``_metas``, calls
    ``_init_save`` with its items and their resolver, and adds what it writes after the data
    (``_commit``)."""

    writes_in_background = True      # write() hands over to the save thread: no write-behind needed
    takes_row_streams = True         # write() takes a row stream too (engine.rows.RowStream)
    primes_row_streams = True        # ... read with blocks() from its first row (dcp_records)

    def _init_save(self, items: list[PlanItem], resolve, out_dir: Path) -> None:
        self._written: set[str] = set()
        self._handoff = _Handoff()
        self._failure: BaseException | None = None
        self._items, self._resolve_item = list(items), resolve
        self._storage = RecordStorageWriter(out_dir)
        # started by the first write() or close(), i.e. inside the caller's `with` block: an
        # interrupt while the writer is being built leaves no thread behind to create files in an
        # output directory the caller is removing
        self._thread = threading.Thread(target=self._save, daemon=True, name="ckptconv-dcp-writer")
        self._started = False

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def _save(self) -> None:
        try:
            self._finish(self._write_records())
        except BaseException as e:  # noqa: BLE001 - handed to the engine's thread
            self._failure = e
            self._handoff.fail(e)

    def _write_records(self) -> dict[tuple, Stored]:
        return self._storage.write_items(self._items, self._resolve_item)

    def _finish(self, stored: dict[tuple, Stored]) -> None:
        """After the records: the `.metadata` (a shared save gathers every worker's first)."""
        self._storage.write_metadata(self._items, stored)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        meta = self._metas.get(name)
        if meta is None:
            raise LayoutError("tensor is not in the plan", tensor=name, fix="this is a bug in the caller")
        if tuple(tensor.shape) != meta.shape:
            raise LayoutError(f"shape {tuple(tensor.shape)} != planned {meta.shape}", tensor=name)
        if name in self._written:
            raise LayoutError("tensor written twice", tensor=name)
        self._written.add(name)
        self._start()
        if getattr(tensor, "streams_rows", False):    # row blocks, written as they are read (dcp_records)
            if tensor.dtype != meta.dtype:
                raise LayoutError(f"row stream is {tensor.dtype}, planned {meta.dtype}", tensor=name)
            self._handoff.put(name, tensor)
        else:
            self._handoff.put(name, tensor.detach().to(meta.dtype).contiguous())

    def close(self) -> None:
        self._start()
        try:
            self._handoff.close()
            self._thread.join()
        except BaseException:       # e.g. Ctrl-C while the save thread finishes: stop it first, so
            self.abort()            # no file appears after the caller removed the output
            raise
        if self._failure is not None:
            raise self._failure
        self._commit()

    def _commit(self) -> None:
        """What is written once every tensor is saved (nothing by default)."""

    def abort(self) -> None:
        self._handoff.fail(SaveAborted())
        if not self._started:
            return
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self._thread.join()
                return
            except RuntimeError:    # Ctrl-C/SIGTERM inside Thread.start(): not yet signalled as begun
                if time.monotonic() > deadline:
                    return          # never began; if it does, it takes the failed handoff and ends
                time.sleep(0.01)


class MegatronDistWriter(StreamingDcpSave):
    """The Megatron writer interface (see `formats/megatron.py`). ``impl``, ``tie_copy`` and
    ``gated_mlp`` are accepted for parity with the per-rank writer and change nothing: stored keys
    are always TE names, a tied output layer is never stored, fc1 keeps its logical layout."""

    def __init__(self, out_root: Path, layout: MegatronLayout, metas: list[TensorMeta], *, args: Any,
                 iteration: int | str, impl: str, tie_copy: bool, gated_mlp: bool = True,
                 extra: dict | None = None, extra_state: dict[str, dict[int, torch.Tensor]] | None = None):
        self.out_root, self.layout, self.iteration = Path(out_root), layout, iteration
        self.iter_dir = self.out_root / iteration_dir_name(iteration)
        self._metas = {m.name: m for m in metas}
        self._common = {"args": _dist_args(args), "checkpoint_version": 3.0,
                        "iteration": 0 if iteration == "release" else int(iteration), "ckptconv": extra or {}}
        # models mixing dense and MoE layers store per-layer keys, as Megatron-Core does for them
        per_layer = not isinstance(getattr(args, "moe_layer_freq", 1) or 1, int) \
            or int(getattr(args, "moe_layer_freq", 1) or 1) > 1
        items = self._plan(metas, layout, per_layer)
        self._by_index = {it.key: name for name, it in items.items()}
        # leading (layer[, expert]) axes a stacked item has beyond its logical tensor
        self._stacked = {name: len(it.offsets) - len(self._metas[name].shape) for name, it in items.items()
                         if len(it.offsets) > len(self._metas[name].shape)}
        extra_items = _extra_items(metas, layout, per_layer)
        self._payload = _list_payload(None)
        self._byte_payloads: dict[str, bytes] = {
            _extra_fqn(k, layout, per_layer): _list_payload(v[min(v)]) for k, v in (extra_state or {}).items()}
        if WRITE_LAYOUT.common_item:
            self._byte_payloads[COMMON_ITEM] = _list_payload(self._common)
            extra_items.append(PlanItem(COMMON_ITEM))
        self._init_save(extra_items + list(items.values()), self._resolve, self.iter_dir)

    @staticmethod
    def _plan(metas: list[TensorMeta], layout: MegatronLayout, per_layer: bool = False) -> dict[str, PlanItem]:
        """One write item per logical tensor: a chunk of its stacked key (at its layer, and for an
        expert at its global expert), or the whole key."""
        items: dict[str, PlanItem] = {}
        groups: dict[str, dict[tuple[int, ...], TensorMeta]] = {}
        for m in metas:
            sk = stacked_key(m.name, per_layer)
            if sk and sk[1]:
                groups.setdefault(sk[0], {})[sk[1]] = m
            else:
                items[m.name] = tensor_item(m.name, (0,) * len(m.shape), m.shape, m.shape, m.dtype)
        for fqn, entries in groups.items():
            first_index, first = next(iter(entries.items()))
            lead = _lead_sizes(fqn, layout)
            want = set(itertools.product(*map(range, lead)))
            if set(entries) != want:
                missing, extra = sorted(want - set(entries)), sorted(set(entries) - want)
                raise LayoutError(f"stacked key needs every ({', '.join(leading_axes(fqn))}) of "
                                  f"{lead}: missing {missing[:4]}, beyond {extra[:4]}",
                                  tensor=fqn, fix="every layer (and expert) must have the same tensors")
            for index, m in entries.items():
                if m.shape != first.shape or m.dtype != first.dtype:
                    raise LayoutError(f"{index} is {m.shape} {m.dtype}, {first_index} is "
                                      f"{first.shape} {first.dtype}", tensor=m.name,
                                      fix="layers of one stacked key must share shape and dtype")
                items[m.name] = tensor_item(fqn, index + (0,) * len(m.shape), (1,) * len(index) + tuple(m.shape),
                                            lead + tuple(m.shape), m.dtype)
        order = {m.name: k for k, m in enumerate(metas)}
        return dict(sorted(items.items(), key=lambda kv: order[kv[0]]))     # the engine's writing order

    def _resolve(self, item: PlanItem) -> Any:
        if item.is_bytes:
            return self._byte_payloads.get(item.fqn, self._payload)
        name = self._by_index[item.key]
        t = self._handoff.take(name)
        if not isinstance(t, torch.Tensor):
            return t          # a row stream: its bytes are the record's (shape from the item's chunk)
        return t.view(*[1] * self._stacked[name], *t.shape) if name in self._stacked else t

    def _commit(self) -> None:
        if WRITE_LAYOUT.common_file:
            torch.save(self._common, self.iter_dir / COMMON_FILE, pickle_module=RePickleModule)
        (self.iter_dir / METADATA_JSON).write_text(json.dumps(CHECKPOINT_CONFIG))
        write_manifest(self.iter_dir, known=self._storage.digests)
        (self.out_root / LATEST).write_text(str(self.iteration))


def _dist_args(args: Any) -> Any:
    """A copy of ``args`` that says what was written (the caller's Namespace is not touched)."""
    if not isinstance(args, argparse.Namespace):
        return args
    out = argparse.Namespace(**vars(args))
    out.ckpt_format, out.use_dist_ckpt = BACKEND, True
    return out


def _lead_sizes(fqn: str, layout: MegatronLayout) -> tuple[int, ...]:
    return tuple({"layer": layout.num_layers, "expert": layout.num_experts or 0}[a] for a in leading_axes(fqn))


def _extra_items(metas: list[TensorMeta], layout: MegatronLayout, per_layer: bool = False) -> list[PlanItem]:
    """The `_extra_state` BYTES items of every Transformer Engine module of every layer (both TE
    and local-spec models find theirs): `shard_{layer}_{L}`, per expert `shard_{layer}.{g}_{L}.{E}`."""
    moe = {n.split(".mlp.")[0] for n in (m.name for m in metas) if ".mlp.router." in n}
    names = [to_impl(m.name, "transformer_engine", moe_layer=m.name.split(".mlp.")[0] in moe) for m in metas]
    out = []
    for name in extra_state_keys(names, "transformer_engine", has_output_layer=False):
        out.append(PlanItem(_extra_fqn(name, layout, per_layer)))
    return out


def _extra_fqn(name: str, layout: MegatronLayout, per_layer: bool = False) -> str:
    """The BYTES item of a logical `_extra_state` key: `shard_{layer}_{L}`, per expert
    `shard_{layer}.{g}_{L}.{E}`, a per-layer module `shard_0_1`."""
    sk = stacked_key(name, per_layer)
    if sk is None:
        return f"{name}/shard_0_1"
    fqn, index = sk
    lead = _lead_sizes(fqn, layout)
    index, lead = (index, lead) if index else ((0,), (1,))      # a per-layer module: shard_0_1
    return f"{fqn}/shard_{'.'.join(map(str, index))}_{'.'.join(map(str, lead))}"
