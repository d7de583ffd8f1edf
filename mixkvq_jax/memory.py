"""Total inference memory, as KV Pareto counts it: weights + KV cache + peak prefill
activations.

* Weights: bytes of the actual parameter arrays (packed int4 AWQ weights count as
  what they store).
* KV cache: bytes of the cache pytree `init_cache` builds for the context (computed on
  abstract shapes, nothing allocated) and, independently, the closed form
  `KVQuantConfig.cache_bytes`; the two must agree.
* Activations: XLA's own accounting of the compiled prefill step for one chunk
  (`Compiled.memory_analysis()`), the step `generate` runs (logits of the last token
  only): its temporary buffers plus the outputs that are not aliased to the donated
  cache (the logits). This is what chunked prefill bounds.

`compiled_prefill_footprint` also gives XLA's *argument* bytes of that step, whose
arguments are the params and the cache: an independent measurement of weights + KV,
so ``argument + activations`` checks the total (tests/test_memory.py, the sweep's
``measured_total_bytes`` column).
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
    measured_peak_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def total_rel_error(self) -> float:
        """|total - XLA's peak of the compiled prefill| / XLA's peak: the model of memory
        (array bytes + KV formula + activations) against XLA's own buffer accounting,
        whose arguments are the real params and cache."""
        return abs(self.total_bytes - self.measured_peak_bytes) / max(self.measured_peak_bytes, 1)

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


def _prefill_step(params: Any, tokens: jax.Array, cache: Any, counts: jax.Array, *,
                  config: ModelConfig, impl: str) -> tuple[jax.Array, Any]:
    """One prefill chunk as `generate` runs it: logits of the last valid token only."""
    return forward(params, tokens, cache, counts, config=config, impl=impl,
                   logit_index=jnp.maximum(counts - 1, 0))


_PREFILL = jax.jit(_prefill_step, static_argnames=("config", "impl"), donate_argnums=2)


@dataclasses.dataclass(frozen=True)
class CompiledFootprint:
    """XLA's buffer accounting of one compiled prefill chunk (`memory_analysis()`).

    ``argument_bytes`` are the inputs (params, the cache, the chunk's tokens and
    counts), ``output_bytes`` the outputs (logits [B, V] and the updated cache),
    ``alias_bytes`` the outputs written in place of a donated input (the cache), and
    ``temp_bytes`` the scratch buffers. Peak device bytes while the chunk runs:
    ``argument + output - alias + temp``.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def activation_bytes(self) -> int:
        """What prefill adds on top of the weights and the cache."""
        return self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.activation_bytes


def compiled_prefill_footprint(params: Any, model_config: ModelConfig, kv_config: KVQuantConfig,
                               *, chunk: int, batch: int = 1, context: int, impl: str = "xla",
                               cache: Any = None) -> CompiledFootprint:
    """Compile one prefill chunk (tokens [batch, chunk] into a cache of ``context``
    tokens, cache donated) and read its memory analysis. ``cache`` may be a real cache
    (e.g. from `init_cache`) or None for abstract shapes; nothing runs either way."""
    if cache is None:
        cache = _abstract_cache(kv_config, model_config, batch, context)
    tokens = jax.ShapeDtypeStruct((batch, chunk), jnp.int32)
    counts = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = _PREFILL.lower(params, tokens, cache, counts, config=model_config,
                              impl=impl).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(
            f"XLA gives no memory analysis on backend {jax.default_backend()!r}; "
            "activation memory cannot be measured here"
        )
    return CompiledFootprint(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                             int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes))


def prefill_activation_bytes(params: Any, model_config: ModelConfig, kv_config: KVQuantConfig,
                             *, chunk: int, batch: int = 1, context: int,
                             impl: str = "xla") -> int:
    """Peak activation bytes of one prefill chunk from the compiled step's memory
    analysis: temporaries + outputs not aliased to the (donated) cache."""
    return compiled_prefill_footprint(params, model_config, kv_config, chunk=chunk, batch=batch,
                                      context=context, impl=impl).activation_bytes


def memory_report(params: Any, model_config: ModelConfig, kv_config: KVQuantConfig, *,
                  context: int, prefill_chunk: int = 256, batch: int = 1,
                  impl: str = "xla") -> MemoryReport:
    """Weights + KV cache at ``context`` tokens + peak activations of a prefill chunk,
    and XLA's peak of that compiled chunk (``measured_peak_bytes``) to check them by."""
    if prefill_chunk < 1 or context < 1 or batch < 1:
        raise ValueError("context, prefill_chunk and batch must be positive")
    kv_tree, kv_formula = kv_cache_bytes(kv_config, model_config, batch=batch, context=context)
    footprint = compiled_prefill_footprint(params, model_config, kv_config,
                                           chunk=min(prefill_chunk, context), batch=batch,
                                           context=context, impl=impl)
    return MemoryReport(
        weights_bytes=tree_bytes(params),
        kv_cache_bytes=kv_tree,
        kv_cache_formula_bytes=kv_formula,
        activation_bytes=footprint.activation_bytes,
        context=context,
        batch=batch,
        prefill_chunk=prefill_chunk,
        measured_peak_bytes=footprint.peak_bytes,
    )
