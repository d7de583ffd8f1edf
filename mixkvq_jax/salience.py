"""MixKVQ key-channel salience and the per-block channel permutation it induces.

Salience of key channel d (arXiv 2512.19206): ``A_d = I_d * S_d`` where ``I_d`` is the
running mean of ``|q_d|`` over the post-RoPE queries seen so far (for GQA, averaged over
the query heads that share the KV head) and ``S_d = (max_t K_td - min_t K_td) / (2^B - 1)``
is the channel's quantization step at the base bit width B over the block being
quantized. Channels sorted by decreasing salience fill the tiers full > int8 > int4 >
int2, so a wide channel the query ignores is not promoted (the case range-only ranking
gets wrong).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixkvq_jax.config import KVQuantConfig


def abs_query_per_kv_head(queries: jax.Array, kv_heads: int, valid: jax.Array) -> jax.Array:
    """``|q|`` averaged over the query heads of each KV head, zero for padding tokens.

    Args:
      queries: [batch, tokens, q_heads, head_dim] post-RoPE queries.
      kv_heads: KV heads; q_heads is a multiple of it (GQA).
      valid: [batch, tokens] bool, which tokens are real (not padding).

    Returns:
      [batch, tokens, kv_heads, head_dim] float32.
    """
    batch, tokens, q_heads, head_dim = queries.shape
    grouped = jnp.abs(queries.astype(jnp.float32)).reshape(
        batch, tokens, kv_heads, q_heads // kv_heads, head_dim
    )
    return grouped.mean(axis=3) * valid[:, :, None, None]


def query_mean(abs_sum: jax.Array, count: jax.Array) -> jax.Array:
    """``I_d``: [batch, kv_heads, head_dim] mean |q| (zeros before any query)."""
    return abs_sum / jnp.maximum(count, 1).astype(jnp.float32)[:, None, None]


def channel_salience(
    keys: jax.Array, mean_abs_query: jax.Array, config: KVQuantConfig
) -> jax.Array:
    """Salience per key channel of each block.

    Args:
      keys: [..., tokens, head_dim] the block(s) about to be quantized.
      mean_abs_query: ``I_d`` broadcastable to [..., head_dim].
      config: its ``salience`` mode and ``salience_base_bits`` apply.

    Returns:
      [..., head_dim] float32; larger means keep at higher precision.
    """
    keys = keys.astype(jnp.float32)
    step = (keys.max(axis=-2) - keys.min(axis=-2)) / (2**config.salience_base_bits - 1)
    if config.salience == "query_aware":
        return mean_abs_query * step
    if config.salience == "range_only":
        return step
    raise ValueError(f"salience mode {config.salience!r} ranks no channels")


def channel_permutation(
    keys: jax.Array, mean_abs_query: jax.Array, config: KVQuantConfig
) -> jax.Array:
    """Channel order for each block, most salient first: [..., head_dim] int32.

    Position ``c`` of the permuted block holds original channel ``perm[c]``; the first
    ``key_channels_full`` positions are the full-precision tier, then int8, int4, int2.
    With ``salience="none"`` the order is the identity (tiers by channel index).
    """
    head_dim = keys.shape[-1]
    if config.salience == "none":
        return jnp.broadcast_to(jnp.arange(head_dim, dtype=jnp.int32), (*keys.shape[:-2], head_dim))
    salience = channel_salience(keys, mean_abs_query, config)
    # Stable descending sort; ties keep channel order, so the result is deterministic.
    return jnp.argsort(-salience, axis=-1, stable=True).astype(jnp.int32)
