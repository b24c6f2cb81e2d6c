"""ckptconv: streaming, verifiable checkpoint conversion for LLMs.

Public API (imported lazily so that `ckptconv.plan` / `ckptconv.ops` stay light):
hf_to_megatron, megatron_to_hf, inspect_checkpoint, reshard, deepspeed_to_hf,
deepspeed_to_megatron, verify_checkpoints, fingerprint_checkpoint, logits (the bundled runtime).
"""
__version__ = "0.1.0"

_API = {"hf_to_megatron": "engine.convert", "megatron_to_hf": "engine.convert",
        "inspect_checkpoint": "inspect", "logits": "runtime", "reshard": "engine.reshard",
        "deepspeed_to_hf": "engine.deepspeed_convert", "deepspeed_to_megatron": "engine.deepspeed_convert",
        "verify_checkpoints": "verify.equivalence", "fingerprint_checkpoint": "verify.fingerprint"}
__all__ = [*_API, "__version__"]


def __getattr__(name):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'ckptconv' has no attribute {name!r}")
