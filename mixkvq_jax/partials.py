"""Attention over disjoint token sets as normalized partial results, their exact merge,
and the online softmax that builds them: what every attention backend shares (the XLA
path, the Pallas kernels' wrapper, the chunk's own causal attention).

Queries are grouped per KV head: [B, H, Gq, C, D] (H KV heads, Gq query heads each,
C chunk tokens); `finish` returns [B, C, Hq, ...] with Hq = H * Gq.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so fully masked rows never produce inf - inf


class Partial(NamedTuple):
    """Attention of queries over one set of tokens.

    out: [B, C, Hq, D] float32, softmax-normalized over that set (0 where empty).
    lse: [B, C, Hq] float32 log-sum-exp of the scaled scores (-inf where empty).
    """

    out: jax.Array
    lse: jax.Array


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Exact softmax attention over the union of two disjoint token sets."""
    m = jnp.maximum(a.lse, b.lse)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(a.lse - m_safe), jnp.exp(b.lse - m_safe)  # exp(-inf) = 0
    total = wa + wb
    denom = jnp.where(total > 0, total, 1.0)
    out = (a.out * wa[..., None] + b.out * wb[..., None]) / denom[..., None]
    lse = jnp.where(total > 0, m_safe + jnp.log(denom), -jnp.inf)
    return Partial(out, lse)


# ---- online softmax over [B, H, Gq, C, ...] ------------------------------------------
class Carry(NamedTuple):
    max: jax.Array  # [B, H, Gq, C] running max
    sum: jax.Array  # [B, H, Gq, C] running sum of exp
    acc: jax.Array  # [B, H, Gq, C, D] running sum of p * v


def online_update(carry: Carry, scores: jax.Array, valid: jax.Array, values_fn,
                   token_axes: tuple[int, ...] = (-1,)) -> Carry:
    """Fold tokens with ``scores`` (the carry's query axes plus ``token_axes``, e.g.
    [B, H, Gq, C, N]; ``valid`` broadcastable) in; ``values_fn(p)`` contracts the
    probabilities (``scores``' shape) with the tokens' values."""
    scores = jnp.where(valid, scores, MASKED)
    m_new = jnp.maximum(carry.max, scores.max(axis=token_axes))
    p = jnp.where(valid, jnp.exp(scores - jnp.expand_dims(m_new, token_axes)), 0.0)
    alpha = jnp.exp(carry.max - m_new)
    return Carry(m_new, carry.sum * alpha + p.sum(token_axes),
                  carry.acc * alpha[..., None] + values_fn(p))


def finish(carry: Carry) -> Partial:
    """Normalize and return as [B, C, Hq, ...] (Hq = H * Gq, heads grouped per KV head)."""
    sum_safe = jnp.where(carry.sum > 0, carry.sum, 1.0)
    out = carry.acc / sum_safe[..., None]
    lse = jnp.where(carry.sum > 0, carry.max + jnp.log(sum_safe), -jnp.inf)
    b, h, g, c, d = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, c, h * g, d)
    return Partial(out, lse.transpose(0, 3, 1, 2).reshape(b, c, h * g))


def group_queries(q: jax.Array, kv_heads: int, scale: float) -> jax.Array:
    """[B, C, Hq, D] -> [B, H, Gq, C, D] float32, pre-multiplied by the softmax scale."""
    b, c, hq, d = q.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads cannot share {kv_heads} KV heads; need a multiple")
    qg = q.astype(jnp.float32).reshape(b, c, kv_heads, hq // kv_heads, d)
    return qg.transpose(0, 2, 3, 1, 4) * scale


def empty_carry(qg: jax.Array) -> Carry:
    # *_like keeps qg's sharding/varying axes, so the carry type-checks under shard_map.
    return Carry(jnp.full_like(qg[..., 0], MASKED), jnp.zeros_like(qg[..., 0]),
                  jnp.zeros_like(qg))


