"""Shared building blocks: `dense`, RMSNorm, RoPE, and the one decoder layer.

Every family (Llama 2/3, Mistral, Qwen2, Qwen3) runs through `DecoderLayer`; their
differences are `ModelConfig` fields (q/k/v and o biases, MLP bias, q/k RMSNorm).

Modules are Flax NNX. A layer never owns KV-cache state: attention is a function
passed in (``attend``) that takes the post-RoPE q, k, v and the cache (the models pass
the stacked cache with this layer's index bound in) and returns the output and the
updated cache, so the same layer code serves cached
prefill/decode (`mixkvq_jax.attention.attend_and_update`) and cache-free causal
attention for training (`causal_attention`).

Shapes: B = batch, T = tokens (chunk), E = hidden size, Hq / Hkv = query / KV heads,
D = head_dim, F = MLP width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig

# attend(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cache) -> (out [B,T,Hq,D], cache): the
# models pass the whole stacked cache, with the layer index bound into ``attend``.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def dense(x: jax.Array, kernel: Any, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel + bias``: the one entry point of every linear projection.

    Args:
      x: [..., in_features] activations.
      kernel: a [in_features, out_features] array, or any object with a
        ``matmul(x)`` method (e.g. `mixkvq_jax.awq.Int4Weight`), which is then called
        instead, so quantized weights plug in without touching model code.
      bias: optional [out_features].

    Returns:
      [..., out_features] in ``x``'s dtype.
    """
    if hasattr(kernel, "matmul"):
        y = kernel.matmul(x)
    else:
        y = jnp.matmul(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF-exact RMSNorm over the last axis: normalize in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin, float32 [B, T, D], for integer positions [B, T] (HF layout: the
    D/2 frequencies repeated twice, matching `rotate_half`)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D] (non-interleaved halves, as HF)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Plain full-precision causal attention with GQA, no cache.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq a multiple of Hkv).
      scale: softmax scale (1 / sqrt(D)).
      lengths: optional [B] valid tokens per sequence (right padding); keys past it are
        masked out.

    Returns:
      [B, T, Hq, D] in q's dtype; logits and softmax in float32.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if lengths is not None:
        mask = mask & (jnp.arange(t)[None, None, :] < lengths[:, None, None])
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """A projection ``x @ kernel (+ bias)`` through `dense`.

    Params: ``kernel`` [in, out] (or a quantized kernel object), ``bias`` [out] or absent.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: Any,
                 rngs: nnx.Rngs, init_std: float = 0.02) -> None:
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype, init_std))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias.get_value()
        return dense(x, self.kernel.get_value(), bias)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``scale`` [dim] (HF ``weight``), epsilon from the config."""

    def __init__(self, dim: int, *, eps: float, dtype: Any) -> None:
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale.get_value(), self.eps)


class Embed(nnx.Module):
    """Token embedding table ``embedding`` [V, E]; `attend` is the tied output head."""

    def __init__(self, vocab_size: int, dim: int, *, dtype: Any, rngs: nnx.Rngs,
                 init_std: float = 0.02) -> None:
        self.embedding = nnx.Param(_normal(rngs, (vocab_size, dim), dtype, init_std))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, T] -> [B, T, E]."""
        table = self.embedding.get_value()
        return jnp.take(table, tokens, axis=0, mode="clip")

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] -> logits [B, T, V] against the embedding table."""
        table = self.embedding.get_value()
        return jnp.einsum("bte,ve->btv", x, table.astype(x.dtype))


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional biases, optional q/k RMSNorm (Qwen3)."""

    def __init__(self, config: ModelConfig, *, dtype: Any, rngs: nnx.Rngs,
                 init_std: float = 0.02) -> None:
        e, d = config.hidden_size, config.head_dim
        hq, hkv = config.num_heads, config.num_kv_heads
        kw = {"dtype": dtype, "rngs": rngs, "init_std": init_std}
        self.q_proj = Linear(e, hq * d, use_bias=config.attention_bias, **kw)
        self.k_proj = Linear(e, hkv * d, use_bias=config.attention_bias, **kw)
        self.v_proj = Linear(e, hkv * d, use_bias=config.attention_bias, **kw)
        self.o_proj = Linear(hq * d, e, use_bias=config.attention_out_bias, **kw)
        norm_kw = {"eps": config.rms_norm_eps, "dtype": dtype}
        self.q_norm = RMSNorm(d, **norm_kw) if config.qk_norm else None
        self.k_norm = RMSNorm(d, **norm_kw) if config.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend: AttendFn,
                 layer_cache: Any) -> tuple[jax.Array, Any]:
        """x [B, T, E], rope = (cos, sin) [B, T, D] -> ([B, T, E], updated layer cache)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, layer_cache = attend(q, k, v, layer_cache)
        out = out.astype(x.dtype).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), layer_cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, dtype: Any, rngs: nnx.Rngs,
                 init_std: float = 0.02) -> None:
        e, f = config.hidden_size, config.intermediate_size
        kw = {"use_bias": config.mlp_bias, "dtype": dtype, "rngs": rngs, "init_std": init_std}
        self.gate_proj = Linear(e, f, **kw)
        self.up_proj = Linear(e, f, **kw)
        self.down_proj = Linear(f, e, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: ``x += attn(norm(x)); x += mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, *, dtype: Any, rngs: nnx.Rngs,
                 init_std: float = 0.02) -> None:
        norm_kw = {"eps": config.rms_norm_eps, "dtype": dtype}
        self.attn_norm = RMSNorm(config.hidden_size, **norm_kw)
        self.attn = Attention(config, dtype=dtype, rngs=rngs, init_std=init_std)
        self.mlp_norm = RMSNorm(config.hidden_size, **norm_kw)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs, init_std=init_std)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend: AttendFn,
                 layer_cache: Any) -> tuple[jax.Array, Any]:
        """x [B, T, E] -> ([B, T, E], updated layer cache)."""
        h, layer_cache = self.attn(self.attn_norm(x), rope, attend, layer_cache)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, layer_cache
