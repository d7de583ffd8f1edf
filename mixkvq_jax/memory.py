"""Total inference memory, as KV Pareto counts it: weights + KV cache + peak prefill
activations.

* Weights: bytes of the actual parameter arrays (packed int4 AWQ weights count as
  what they store).
* KV cache: bytes of the cache pytree `init_cache` builds for the context (computed on
  abstract shapes, nothing allocated) and, independently, the closed form
  `KVQuantConfig.cache_bytes`; the two must agree.
* Activations: XLA's own accounting of the compiled prefill step for one chunk
  (`Compiled.memory_analysis()`): its temporary buffers plus the outputs that are not
  aliased to the donated cache (the logits). This is what chunked prefill bounds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mixkvq_jax.cache import init_cache
from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.models import ModelConfig, forward


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of one inference configuration (see the module docstring)."""

    weights_bytes: int
    kv_cache_bytes: int
    kv_cache_formula_bytes: int
    activation_bytes: int
    context: int
    batch: int
    prefill_chunk: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or `jax.ShapeDtypeStruct`) leaf of a pytree."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _abstract_cache(kv_config: KVQuantConfig, model_config: ModelConfig, batch: int,
                    context: int) -> Any:
    return jax.eval_shape(lambda: init_cache(
        kv_config, num_layers=model_config.num_layers, batch=batch,
        num_kv_heads=model_config.num_kv_heads, max_len=context,
    ))


def kv_cache_bytes(kv_config: KVQuantConfig, model_config: ModelConfig, *, batch: int,
                   context: int) -> tuple[int, int]:
    """(bytes of the cache pytree, bytes by `KVQuantConfig.cache_bytes`) for a cache of
    ``batch`` sequences x ``context`` tokens; nothing is allocated."""
    from_tree = tree_bytes(_abstract_cache(kv_config, model_config, batch, context))
    from_formula = kv_config.cache_bytes(
        num_layers=model_config.num_layers, batch=batch,
        num_kv_heads=model_config.num_kv_heads, max_len=context,
    )
    return from_tree, from_formula


def prefill_activation_bytes(params: Any, model_config: ModelConfig, kv_config: KVQuantConfig,
                             *, chunk: int, batch: int = 1, context: int,
                             impl: str = "xla") -> int:
    """Peak activation bytes of one prefill chunk from the compiled step's memory
    analysis: temporaries + outputs not aliased to the (donated) cache."""
    cache = _abstract_cache(kv_config, model_config, batch, context)
    tokens = jax.ShapeDtypeStruct((batch, chunk), jnp.int32)
    step = jax.jit(forward, static_argnames=("config", "impl"), donate_argnums=2)
    compiled = step.lower(params, tokens, cache, config=model_config, impl=impl).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(
            f"XLA gives no memory analysis on backend {jax.default_backend()!r}; "
            "activation memory cannot be measured here"
        )
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes)


def memory_report(params: Any, model_config: ModelConfig, kv_config: KVQuantConfig, *,
                  context: int, prefill_chunk: int = 256, batch: int = 1,
                  impl: str = "xla") -> MemoryReport:
    """Weights + KV cache at ``context`` tokens + peak activations of a prefill chunk."""
    if prefill_chunk < 1 or context < 1 or batch < 1:
        raise ValueError("context, prefill_chunk and batch must be positive")
    kv_tree, kv_formula = kv_cache_bytes(kv_config, model_config, batch=batch, context=context)
    return MemoryReport(
        weights_bytes=tree_bytes(params),
        kv_cache_bytes=kv_tree,
        kv_cache_formula_bytes=kv_formula,
        activation_bytes=prefill_activation_bytes(
            params, model_config, kv_config, chunk=min(prefill_chunk, context), batch=batch,
            context=context, impl=impl,
        ),
        context=context,
        batch=batch,
        prefill_chunk=prefill_chunk,
    )
