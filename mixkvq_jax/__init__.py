"""mixkvq_jax: low-bit KV-cache quantization (MixKVQ, KIVI, KV Pareto) for Llama/Qwen
inference in JAX, Flax and Pallas.

The main API is importable from the top level; each name is loaded on first use, so
``import mixkvq_jax`` itself does not import JAX::

    import mixkvq_jax as mkv

    model_config, params, tokenizer = mkv.load_checkpoint("path/to/ckpt")
    kv = mkv.load_kv_config("mixkvq", model_config.head_dim)
    cache = mkv.init_cache(kv, num_layers=model_config.num_layers, batch=1,
                           num_kv_heads=model_config.num_kv_heads, max_len=1024)
    logits, cache = mkv.forward(params, tokens, cache, config=model_config)

Generation: ``mkv.run_generation(...)`` (tokens and stats) here, or
``from mixkvq_jax.generate import generate`` (tokens only); ``mixkvq_jax.generate`` is
also the CLI module (``python -m mixkvq_jax.generate``). See docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # KV-cache presets
    "KVQuantConfig": "config",
    "KVConfigError": "config",
    "load_kv_config": "config",
    "available_presets": "config",
    # the cache pytree and its pure functions
    "QuantizedKVCache": "cache",
    "LayerKVCache": "cache",
    "CacheOverflowError": "cache",
    "init_cache": "cache",
    "prefill": "cache",
    "append": "cache",
    "dequantize": "cache",
    "memory_bytes": "cache",
    "check_overflow": "cache",
    "bits_form": "cache",
    "float_form": "cache",
    "decode_loop_form": "cache",
    # attention
    "cached_attention": "attention",
    "attend_and_update": "attention",
    "resolve_impl": "attention",
    # models
    "ModelConfig": "models",
    "CausalLM": "models",
    "init_params": "models",
    "forward": "models",
    "forward_full": "models",
    "module_from_params": "models",
    "cast_params": "models",
    # sharding
    "make_mesh": "models.sharding",
    "param_partition_specs": "models.sharding",
    "cache_partition_specs": "models.sharding",
    "shard_params": "models.sharding",
    "shard_cache": "models.sharding",
    "shard_batch": "models.sharding",
    "ShardingError": "models.sharding",
    # checkpoints
    "load_checkpoint": "checkpoint",
    "save_params": "checkpoint",
    "restore_params": "checkpoint",
    "Tokenizer": "checkpoint",
    "CheckpointError": "checkpoint",
    "write_demo_checkpoint": "demo_checkpoint",
    # generation
    "run_generation": "generate",
    "SamplingConfig": "generate",
    "GenerationResult": "generate",
    "GenerationStats": "generate",
    # errors
    "UserError": "errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # cache: later lookups do not come back here
        return value
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            globals()[name] = version("mixkvq-jax")
        except PackageNotFoundError:  # running from a source tree that is not installed
            globals()[name] = "0+unknown"
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
