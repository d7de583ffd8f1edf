"""Value rotation: values are stored in a Hadamard-rotated basis, so that per-token
quantization sees their energy spread over every channel.

A value vector ``v`` [D] is stored as ``v @ H`` with ``H`` the orthonormal Sylvester
Hadamard matrix of order D (a power of two; ``H = H.T = H^-1``). Attention is linear in
the values, so attention over rotated values is the rotated attention output: the
dispatch (`mixkvq_jax.attention.cached_attention`) rotates it back with one D x D
product per query. Nothing else changes: bytes, layout and kernels are those of the
unrotated preset, and every backend gets the rotation for free.

Why: a few value channels of a token carry most of its magnitude, and a 2-bit
per-token group takes its step from them. After the rotation each rotated channel is a
signed sum of all channels, the group's range shrinks relative to its energy, and the
rounding error (unbiased, so it averages out in attention) falls. Unlike clipping the
range, the rotation adds no bias.

Imports: `config` only (the cache and the attention dispatch import this).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mixkvq_jax.config import KVQuantConfig


@functools.cache
def hadamard(order: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix [order, order], float32 (symmetric, its
    own inverse). ``order`` must be a power of two."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {order}")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    out = (h / np.sqrt(order)).astype(np.float32)
    out.flags.writeable = False
    return out


def _apply(x: jax.Array, order: int) -> jax.Array:
    """``x @ H`` over the last axis, in float32 at full matmul precision."""
    h = jnp.asarray(hadamard(order))
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), h,
                      precision=jax.lax.Precision.HIGHEST)


def rotate_values(values: jax.Array, config: KVQuantConfig) -> jax.Array:
    """Values [..., D] in the basis the cache stores them in (``values`` itself, dtype
    kept, when ``config`` does not rotate)."""
    if not config.rotates_values:
        return values
    return _apply(values, config.head_dim).astype(values.dtype)


def unrotate_values(values: jax.Array, config: KVQuantConfig) -> jax.Array:
    """Inverse of `rotate_values`: stored-basis values or attention outputs [..., D]
    back in the model's basis (float32 when ``config`` rotates)."""
    if not config.rotates_values:
        return values
    return _apply(values, config.head_dim)  # H is its own inverse


__all__ = ["hadamard", "rotate_values", "unrotate_values"]
