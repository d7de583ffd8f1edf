"""Attention over the quantized cache: one entry point, `cached_attention`, that
dispatches to a backend: the XLA path (`attention_xla`: runs anywhere, defines
correctness) or a Pallas kernel (`mixkvq_jax.pallas_kernels.decode_attention`, TPU and
GPU), picked from the *target* platform. `attend_and_update` is one layer's work for a
chunk: attention over the history, causal attention within the chunk, both merged
exactly (`partials`), and the cache update.

Imports go one way: models -> this dispatch -> backends -> `cache` / `layout` -> `quant`
/ `config`.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from mixkvq_jax.attention_xla import (  # noqa: F401  (re-exported: the reference path)
    BLOCKS_PER_STEP,
    block_scores,
    dequantize_tile,
    history_attention_xla,
    tile_token_bits,
)
from mixkvq_jax.cache import LayerKVCache, update_layer
from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.partials import (  # noqa: F401  (Partial, merge_partials re-exported)
    Partial,
    empty_carry,
    finish,
    group_queries,
    merge_partials,
    online_update,
)
from mixkvq_jax.rotation import unrotate_values
from mixkvq_jax.target import canonical_platform

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
_HIGHEST = jax.lax.Precision.HIGHEST


def chunk_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, counts: jax.Array, *, scale: float
) -> Partial:
    """Causal full-precision attention within a chunk.

    q [B, C, Hq, D], k / v [B, C, H, D]; query i sees chunk tokens j <= i, j < counts.
    """
    kv_heads = k.shape[2]
    qg = group_queries(q, kv_heads, scale)
    scores = jnp.einsum("bhgcd,bthd->bhgct", qg, k.astype(jnp.float32), precision=_HIGHEST)
    c = q.shape[1]
    causal = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    valid = causal[None] & (jnp.arange(c)[None, None, :] < counts[:, None, None])
    values = v.astype(jnp.float32)
    carry = online_update(
        empty_carry(qg), scores, valid[:, None, None],
        lambda p: jnp.einsum("bhgct,bthd->bhgcd", p, values, precision=_HIGHEST),
    )
    return finish(carry)


# ---- dispatch ---------------------------------------------------------------------
@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``auto`` -> ``pallas`` when the target ``platform`` (default: this process's
    backend, `target.canonical_platform`) is a TPU or GPU, ``xla`` elsewhere; validate
    the name."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if canonical_platform(platform) in ("tpu", "gpu") else "xla"
    return impl


def cached_attention(
    q: jax.Array,
    layer: LayerKVCache,
    lengths: jax.Array,
    config: KVQuantConfig,
    *,
    scale: float | None = None,
    impl: str = "auto",
    index: jax.Array | None = None,
    platform: str | None = None,
    block_table: jax.Array | None = None,
) -> Partial:
    """Attention of new queries over the cached tokens of one layer.

    Args:
      q: [B, C, Hq, D] queries (post-RoPE), Hq a multiple of the cache's KV heads.
      layer: the layer's `LayerKVCache`.
      lengths: [B] int32 cached tokens per sequence; all of them precede every query.
      config: the cache's `KVQuantConfig`.
      scale: softmax scale, default ``1 / sqrt(D)``.
      impl: ``auto`` | ``xla`` | ``pallas`` | ``pallas_interpret``.
      index: if given, ``layer`` is the stacked cache ([layers, ...]) and this attends
        over its layer ``index`` (read in place: no per-layer copy).
      platform: the platform the program is compiled for (``cpu``/``gpu``/``tpu``;
        default: this process's backend). ``auto`` and the kernel body follow it.
      block_table: [B, MB] int32 for a paged cache (`mixkvq_jax.paged`): the block
        fields are a pool of pages and block j of sequence b is page ``block_table[b, j]``.

    Returns:
      `Partial` (output [B, C, Hq, D] float32 and log-sum-exp [B, C, Hq]); the output is
      in the model's basis whatever basis the cache stores values in.
    """
    if q.ndim != 4 or q.shape[-1] != config.head_dim:
        raise ValueError(
            f"q must be [batch, tokens, q_heads, head_dim={config.head_dim}], got {q.shape}"
        )
    scale = config.head_dim**-0.5 if scale is None else scale
    platform = canonical_platform(platform)
    requested, impl = impl, resolve_impl(impl, platform)
    if requested == "auto" and q.shape[1] > 1:
        impl = "xla"  # the Pallas kernel is for decode; prefill chunks take XLA by design
    if impl in ("pallas", "pallas_interpret"):
        try:
            from mixkvq_jax.pallas_kernels import decode_attention as kernels
        except ImportError as err:  # kernels not built for this install
            _warn_once(f"Pallas kernels unavailable ({err}); using the XLA attention path")
        else:
            # On CPU (interpret mode) the kernel body is the TPU one.
            backend = platform if platform in kernels.BACKENDS else "tpu"
            reason = kernels.unsupported_reason(q, layer, config, backend, layer_index=index,
                                                block_table=block_table)
            if reason is None:
                return _in_model_basis(kernels.cached_attention_pallas(
                    q, layer, lengths, config, scale=scale, backend=backend,
                    interpret=impl == "pallas_interpret", layer_index=index,
                    block_table=block_table), config)
            _warn_once(f"Pallas decode attention does not support this call ({reason}); "
                       "using the XLA attention path")
    return _in_model_basis(history_attention_xla(
        q, layer, lengths, config, scale=scale, blocks_per_step=BLOCKS_PER_STEP, index=index,
        platform=platform, block_table=block_table), config)


def _in_model_basis(partial: Partial, config: KVQuantConfig) -> Partial:
    """A backend's output over values stored rotated, rotated back (attention is linear
    in the values, so this is the attention over the model's values)."""
    return partial._replace(out=unrotate_values(partial.out, config))


def attend_and_update(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: LayerKVCache,
    lengths: jax.Array,
    counts: jax.Array,
    config: KVQuantConfig,
    *,
    scale: float | None = None,
    impl: str = "auto",
    index: jax.Array | None = None,
    platform: str | None = None,
    kv_repeat: int = 1,
    block_table: jax.Array | None = None,
) -> tuple[jax.Array, LayerKVCache]:
    """One attention layer's work for a chunk of new tokens (prefill or decode).

    Args:
      q: [B, C, Hq, D] post-RoPE queries; k, v: [B, C, H, D] post-RoPE keys / values.
      layer: this layer's cache or, with ``index``, the stacked cache of all layers
        (then layer ``index`` is read and updated in place: see `update_layer`).
      lengths: [B] tokens cached before the chunk.
      counts: [B] valid chunk tokens per sequence (right padding beyond).
      impl, platform, block_table: as in `cached_attention` (a paged cache: its pool
        is read and written through ``block_table``).
      kv_repeat: k / v hold each of the model's KV heads this many times (a mesh wider
        than the KV heads, `update_layer`).

    Returns:
      ``(out, new_layer)``: out [B, C, Hq, D] in q's dtype, the attention of every
      chunk token over the cached history (quantized) and, causally, over the chunk
      itself (full precision); ``new_layer`` (the new stack, with ``index``) with the
      valid chunk tokens appended.
    """
    scale = config.head_dim**-0.5 if scale is None else scale
    history = cached_attention(q, layer, lengths, config, scale=scale, impl=impl, index=index,
                               platform=platform, block_table=block_table)
    own = chunk_attention(q, k, v, counts, scale=scale)
    out = merge_partials(history, own).out.astype(q.dtype)
    # The update writes into the buffer the attention read. XLA does that in place only
    # if every read provably happens first; otherwise it copies the buffer (for a stack:
    # all layers) at every layer. Make the update depend on the attention output through
    # a zero XLA cannot fold (no float is < -inf, NaN included): reads come first.
    after_reads = (out.reshape(-1)[0] < -jnp.inf).astype(lengths.dtype)
    return out, update_layer(layer, lengths + after_reads, k, v, q, counts, config,
                             index=index, kv_repeat=kv_repeat, block_table=block_table)
