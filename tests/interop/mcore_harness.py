"""Run a Megatron-LM per-rank ``torch``-format checkpoint through REAL megatron-core.

Test helper (interop tests only). ``megatron_logits`` reads ``args`` from the checkpoint,
spawns ``tp * pp`` gloo ranks, builds a megatron-core ``GPTModel`` (local spec) on every
rank from those args, loads that rank's ``model_optim_rng.pt`` with
``load_state_dict(strict=True)`` -- as Megatron-LM does -- runs the forward through the
pipeline (virtual pipeline included), all-gathers the vocab-parallel logits and returns
them to the caller.

megatron-core is imported only inside the worker processes, so importing this module is
cheap and does not need megatron.
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# the CPU shims live next to this file; make them importable by plain name here, in the
# forkserver and in the rank processes (all inherit sys.path)
_HERE = str(Path(__file__).resolve().parent)
for _p in (_HERE, str(Path(_HERE).parent)):      # tests/interop (shims), tests (safe_load)
    if _p not in sys.path:
        sys.path.insert(0, _p)

__all__ = [
    "MegatronHarnessError",
    "megatron_logits",
    "read_megatron_args",
    "resolve_iteration_dir",
    "rank_file",
    "safe_torch_load",
]

TE_TO_LOCAL = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".self_attention.linear_qkv.layer_norm_bias": ".input_layernorm.bias",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_bias": ".pre_mlp_layernorm.bias",
}


class MegatronHarnessError(RuntimeError):
    """A worker rank failed (e.g. megatron's strict load_state_dict); carries its traceback."""


# ----------------------------------------------------------------------------- file layout
def safe_torch_load(path: Path | str) -> dict:
    """``torch.load(weights_only=True)`` allowing exactly the Namespace / numpy-RNG classes and
    megatron-core's own SAFE_GLOBALS (its args objects come back as megatron-core's objects), in
    a scope that leaves the process's registrations as they were (tests/safe_load.py)."""
    from safe_load import load_megatron_file

    return load_megatron_file(path, real_megatron=True)


def resolve_iteration_dir(ckpt_root: Path | str, iteration="latest") -> Path:
    """ROOT + iteration ("latest" | "release" | int) -> ROOT/release or ROOT/iter_NNNNNNN."""
    root = Path(ckpt_root)
    if iteration == "latest":
        tracker = root / "latest_checkpointed_iteration.txt"
        if not tracker.is_file():
            raise FileNotFoundError(f"no {tracker.name} in {root}")
        iteration = tracker.read_text().strip()
    if iteration == "release":
        d = root / "release"
    else:
        d = root / f"iter_{int(iteration):07d}"
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    return d


def rank_file(iter_dir: Path, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> Path:
    """Megatron-LM's get_checkpoint_name: mp_rank_TT, then _PPP if PP > 1, then _EEE if EP > 1."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")
    return Path(iter_dir) / name / "model_optim_rng.pt"


def moe_degrees(args) -> tuple[int, int]:
    """(EP, ETP) from Megatron-LM args (ETP defaults to 1, as in Megatron-LM)."""
    if not _arg(args, "num_experts", None):
        return 1, 1
    return int(_arg(args, "expert_model_parallel_size", 1)), int(_arg(args, "expert_tensor_parallel_size", 1))


def world_size(tp: int, pp: int, ep: int = 1, etp: int = 1) -> int:
    """The smallest world holding TP x PP dense ranks and ETP x EP expert ranks per stage."""
    import math

    return pp * math.lcm(tp, ep * etp)


def read_megatron_args(ckpt_root: Path | str, iteration="latest") -> argparse.Namespace:
    """args of the rank-0 file (mp_rank_00 or mp_rank_00_000)."""
    d = resolve_iteration_dir(ckpt_root, iteration)
    for cand in (d / "mp_rank_00" / "model_optim_rng.pt", d / "mp_rank_00_000" / "model_optim_rng.pt",
                 d / "mp_rank_00_000_000" / "model_optim_rng.pt"):
        if cand.is_file():
            return safe_torch_load(cand)["args"]
    raise FileNotFoundError(f"no rank-0 model_optim_rng.pt under {d}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- model build
def _arg(args, name, default=None):
    v = getattr(args, name, default)
    return default if v is None else v


def _gelu(args):
    """Megatron-LM's --openai-gelu: megatron-core's tanh-approximated GeLU; else exact GeLU."""
    import torch.nn.functional as F
    from megatron.core.transformer.utils import openai_gelu

    return openai_gelu if _arg(args, "openai_gelu", False) else F.gelu


def _transformer_config(args, tp: int, pp: int, vpp):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    heads = args.num_attention_heads
    groups = args.num_query_groups if _arg(args, "group_query_attention", False) else heads
    swiglu = bool(_arg(args, "swiglu", False))
    kw = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=_arg(args, "ffn_hidden_size", 4 * args.hidden_size),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=_arg(args, "kv_channels", args.hidden_size // heads),
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else _gelu(args),
        normalization=_arg(args, "normalization", "LayerNorm"),
        layernorm_epsilon=_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5)),
        add_bias_linear=bool(_arg(args, "add_bias_linear", True)),
        add_qkv_bias=bool(_arg(args, "add_qkv_bias", False)),
        rotary_interleaved=bool(_arg(args, "rotary_interleaved", False)),
        qk_layernorm=bool(_arg(args, "qk_layernorm", False)),
        apply_residual_connection_post_layernorm=bool(
            _arg(args, "apply_residual_connection_post_layernorm", False)
        ),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        # Megatron-LM's args name these decoder_{first,last}_pipeline_num_layers
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None)
        or getattr(args, "num_layers_in_first_pipeline_stage", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None)
        or getattr(args, "num_layers_in_last_pipeline_stage", None),
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
    )
    if _arg(args, "num_experts", None):
        ep, etp = moe_degrees(args)
        kw.update(
            num_moe_experts=int(args.num_experts),
            moe_router_topk=int(_arg(args, "moe_router_topk", 2)),
            moe_ffn_hidden_size=_arg(args, "moe_ffn_hidden_size", None),
            moe_router_pre_softmax=bool(_arg(args, "moe_router_pre_softmax", False)),
            moe_shared_expert_intermediate_size=_arg(args, "moe_shared_expert_intermediate_size", None),
            moe_shared_expert_gate=bool(_arg(args, "moe_shared_expert_gate", False)),
            moe_grouped_gemm=bool(_arg(args, "moe_grouped_gemm", False)),
            moe_layer_freq=_arg(args, "moe_layer_freq", 1),
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=0.0,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )
    return TransformerConfig(**kw)


def _build_chunks(args, cfg, vpp):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = get_gpt_layer_local_spec(
        num_experts=_arg(args, "num_experts", None),
        moe_grouped_gemm=bool(_arg(args, "moe_grouped_gemm", False)),
        normalization=_arg(args, "normalization", "LayerNorm"),
        qk_layernorm=bool(_arg(args, "qk_layernorm", False)),
    )
    stages = [None] if vpp is None else list(range(vpp))
    chunks = []
    for v in stages:
        if _arg(args, "num_experts", None):    # MoE: per-layer specs follow moe_layer_freq (dense layers mix in)
            spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False,
                                              normalization=_arg(args, "normalization", "LayerNorm"), vp_stage=v,
                                              pp_rank=ps.get_pipeline_model_parallel_rank())
        m = GPTModel(
            config=cfg,
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=_arg(args, "max_position_embeddings", _arg(args, "seq_length", 4096)),
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
            share_embeddings_and_output_weights=not bool(
                _arg(args, "untie_embeddings_and_output_weights", False)
            ),
            position_embedding_type=_arg(args, "position_embedding_type", "learned_absolute"),
            rotary_percent=float(_arg(args, "rotary_percent", 1.0)),
            rotary_base=int(_arg(args, "rotary_base", 10000)),
            rope_scaling=bool(_arg(args, "use_rope_scaling", False)),
            rope_scaling_factor=float(_arg(args, "rope_scaling_factor", 8.0)),
            vp_stage=v,
        )
        m.eval()
        chunks.append(m)
    return chunks


def _prepare_state_dict(sd: dict, model) -> dict:
    """TE-named norms -> local names; cast floating tensors to fp32 (the harness runs fp32).

    For a TE-named checkpoint only, ``_extra_state`` entries (TE stores bytes) are
    reconciled with the local-spec model (None where the local model has the key).
    Everything else is left alone, so ``load_state_dict(strict=True)`` still reports
    missing/unexpected/mis-shaped weights exactly as Megatron-LM would.
    """
    is_te = any(k.endswith(suffix) for k in sd for suffix in TE_TO_LOCAL)
    out = {}
    for k, v in sd.items():
        for te, local in TE_TO_LOCAL.items():
            if k.endswith(te):
                k = k[: -len(te)] + local
                break
        if torch.is_tensor(v) and v.is_floating_point():
            v = v.to(torch.float32)
        out[k] = v
    if is_te:
        expected = set(model.state_dict().keys())
        out = {k: v for k, v in out.items() if not k.endswith("._extra_state") or k in expected}
        for k in expected:
            if k.endswith("._extra_state"):
                out[k] = None
    return out


# ----------------------------------------------------------------------------- worker
def _worker(rank, world, tp, pp, vpp, port, iter_dir, tokens_list, out_dir, ep=1, etp=1, moe=False):
    err_path = Path(out_dir) / f"error_rank{rank}.txt"
    try:
        import mcore_cpu_shims as shims

        shims.apply_cpu_shims()
        if moe:
            shims.apply_moe_shim()
        ps = shims.init_megatron_parallel(rank, world, tp, pp, port, vpp=vpp, ep=ep, etp=etp)
        tp_rank = ps.get_tensor_model_parallel_rank()
        pp_rank = ps.get_pipeline_model_parallel_rank()
        ep_rank = ps.get_expert_model_parallel_rank()

        state = safe_torch_load(rank_file(Path(iter_dir), tp_rank, pp_rank, pp, ep_rank, ep))
        args = state["args"]
        torch.manual_seed(0)
        cfg = _transformer_config(args, tp, pp, vpp)
        chunks = _build_chunks(args, cfg, vpp)
        keys = ["model"] if vpp is None else [f"model{v}" for v in range(vpp)]
        for key, model in zip(keys, chunks):
            if key not in state:
                raise KeyError(
                    f"rank {rank} (tp {tp_rank}, pp {pp_rank}): no '{key}' in checkpoint "
                    f"(keys: {sorted(state)})"
                )
            try:
                model.load_state_dict(_prepare_state_dict(state[key], model), strict=True)
            except Exception as e:
                raise MegatronHarnessError(
                    f"rank {rank} (tp {tp_rank}, pp {pp_rank}) '{key}': megatron-core "
                    f"load_state_dict(strict=True) failed: {e}"
                ) from e
        del state

        tokens = torch.tensor(tokens_list, dtype=torch.long)
        out = shims.pipeline_forward(chunks, tokens, args.hidden_size)
        if out is not None:
            logits = shims.gather_tp_logits(out)
            if tp_rank == 0:
                vocab = getattr(args, "vocab_size", None)
                if vocab:
                    logits = logits[..., :vocab]
                torch.save(logits.contiguous().clone(), Path(out_dir) / "logits.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException as e:
        err_path.write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        raise


# ----------------------------------------------------------------------------- public API
def megatron_logits(
    ckpt_root: Path | str,
    tokens: torch.Tensor,
    iteration="latest",
    *,
    timeout_s: float = 180.0,
) -> torch.Tensor:
    """Logits [batch, seq, vocab] (fp32, CPU) of a Megatron-LM ``torch``-format checkpoint,
    computed by real megatron-core on ``tp * pp`` gloo ranks.

    ``tokens`` is an int tensor [batch, seq]. ``iteration`` is "latest" (read the tracker
    file), "release" or an int. The vocab dimension is trimmed to ``args.vocab_size`` when
    that is set, otherwise it is ``args.padded_vocab_size``. Raises
    ``MegatronHarnessError`` with the failing rank's message (e.g. megatron's strict-load
    error) if any rank fails, ``TimeoutError`` after ``timeout_s``.
    """
    iter_dir = resolve_iteration_dir(ckpt_root, iteration)
    args = read_megatron_args(ckpt_root, iteration)
    tp = int(_arg(args, "tensor_model_parallel_size", 1))
    pp = int(_arg(args, "pipeline_model_parallel_size", 1))
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    vpp = int(vpp) if vpp else None
    if vpp == 1:
        vpp = None
    ep, etp = moe_degrees(args)
    if ep == 1:
        missing = [
            str(rank_file(iter_dir, t, p, pp))
            for p in range(pp)
            for t in range(tp)
            if not rank_file(iter_dir, t, p, pp).is_file()
        ]
        if missing:
            raise FileNotFoundError(f"missing rank files for tp={tp} pp={pp}: {missing}")
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got {tuple(tokens.shape)}")
    world = world_size(tp, pp, ep, etp)

    _configure_forkserver()
    for attempt in range(3):
        try:
            return _run_ranks(world, tp, pp, vpp, iter_dir, tokens, timeout_s, ep, etp,
                              moe=bool(_arg(args, "num_experts", None)))
        except MegatronHarnessError as e:  # another process grabbed the port first
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def _run_ranks(world, tp, pp, vpp, iter_dir, tokens, timeout_s, ep=1, etp=1, moe=False) -> torch.Tensor:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="mcore_harness_") as out_dir:
        port = _free_port()
        ctx = mp.start_processes(
            _worker,
            args=(world, tp, pp, vpp, port, str(iter_dir), tokens.tolist(), out_dir, ep, etp, moe),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        join_ranks(ctx, out_dir, world, timeout_s)
        path = Path(out_dir) / "logits.pt"
        if not path.is_file():
            raise MegatronHarnessError("workers finished but produced no logits")
        return torch.load(path, map_location="cpu", weights_only=True)


def join_ranks(ctx, out_dir: str, world: int, timeout_s: float) -> None:
    """Wait for the ranks of ``ctx``; a failing rank's error (or a timeout) is raised with every
    rank's summary; the ranks are always stopped."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if ctx.join(timeout=0.2):
                    break
            except Exception as e:  # ProcessRaisedException / ProcessExitedException
                raise MegatronHarnessError(_collect_errors(out_dir, world) or str(e)) from None
            if time.monotonic() > deadline:
                errors = _collect_errors(out_dir, world)
                raise TimeoutError(f"{world} megatron ranks did not finish within {timeout_s}s"
                                   + (f"\n{errors}" if errors else ""))
    finally:
        _kill_all(ctx)


def _configure_forkserver() -> None:
    """Ranks are started with the "forkserver" method and the forkserver pre-imports
    megatron-core (~6-8 s on this machine): the import is paid once per test session
    instead of once per rank per call. The forkserver never runs torch compute, so
    forking from it is safe; every rank still starts with fresh megatron global state.
    """
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        [
            "mcore_cpu_shims",
            "megatron.core.parallel_state",
            "megatron.core.models.gpt.gpt_model",
            "megatron.core.models.gpt.gpt_layer_specs",
            __name__,
        ]
    )


def _collect_errors(out_dir: str, world: int) -> str:
    """Each failing rank's one-line summary first, then the full tracebacks."""
    summaries, details = [], []
    for r in range(world):
        p = Path(out_dir) / f"error_rank{r}.txt"
        if p.is_file():
            text = p.read_text()
            summaries.append(f"[rank {r}] {text.split(chr(10) + chr(10), 1)[0]}")
            details.append(f"--- rank {r} traceback ---\n{text}")
    return "\n".join(summaries + details)


def _kill_all(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
