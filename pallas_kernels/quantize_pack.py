"""Fused quantize-and-pack of complete cache blocks (the residual-window flush).

`quantize_blocks_pallas` returns exactly what `mixkvq_jax.cache.quantize_blocks`
returns, bit for bit: the MixKVQ salience ranking and the channel permutation stay in
jnp (one sort per block of D channels), and one Pallas program per block does the rest
in VMEM / registers: per key tier and group of G tokens the min / max, scale and zero
point (rounded to the storage dtype toward -inf / +inf like `quant.quant_params`),
round-to-nearest-even codes, and planar packing (slab j of the words holds tokens
[j W, (j + 1) W), so each slab is one shift and one OR into the output words); then the
same per token for values over groups of Gv channels.

In-kernel rounding to the scale dtype works on float32 bits (truncate, then step one
bfloat16 ulp away from zero when inexact and on the requested side), because neither
Mosaic nor Triton lowers ``nextafter`` on bfloat16. So scale dtypes bfloat16 and
float32 are supported; float16 is reported by `unsupported_reason`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.salience import channel_permutation

from .decode_plan import BACKENDS, channel_chunks, pieces, resolve_backend

_BF16_LOW_BITS = 0xFFFF  # the float32 mantissa bits bfloat16 drops


def unsupported_reason(config: KVQuantConfig, backend: str | None = None) -> str | None:
    """Why `quantize_blocks_pallas` cannot handle ``config`` (None: it can)."""
    if config.scale_dtype not in ("bfloat16", "float32"):
        return (f"scale_dtype={config.scale_dtype!r}: the kernel rounds scales to bfloat16 "
                "or float32 only")
    if resolve_backend(backend) == "gpu":
        sizes = {"residual_length": config.residual_length,
                 "key_group_size": config.key_group_size}
        if config.quantizes_values:
            sizes |= {"head_dim": config.head_dim,
                      "value_group_size": config.value_group_size}
        bad = {k: v for k, v in sizes.items() if v & (v - 1)}
        if bad:
            return f"the Triton kernel needs power-of-two sizes, got {bad}"
    return None


# ---- in-kernel arithmetic, bit-equal to mixkvq_jax.quant -------------------------------
def _round_to_scale_dtype(x: jax.Array, dtype: jnp.dtype, up: bool) -> jax.Array:
    """float32 ``x`` rounded to ``dtype`` toward +inf (``up``) or -inf, as float32.

    Same values as ``quant._round_toward``: for bfloat16, truncate the float32 bits
    (rounds toward zero) and move one bfloat16 ulp away from zero when that was the
    wrong direction. NaN stays NaN; overflow goes to +-inf like ``nextafter``.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return x
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    trunc = bits & jnp.uint32(0xFFFF0000)
    wrong_side = (trunc != bits) & ((x > 0) if up else (x < 0))
    bumped = trunc + jnp.where(wrong_side, jnp.uint32(_BF16_LOW_BITS + 1), jnp.uint32(0))
    out = lax.bitcast_convert_type(bumped, jnp.float32)
    return jnp.where(jnp.isnan(x), x, out)


def _round_half_even(y: jax.Array, backend: str) -> jax.Array:
    """``jnp.round`` (half to even); Triton has no round primitive, so floor-based there
    (exact for |y| < 2^23, and larger values are clipped to the code range anyway)."""
    if backend == "tpu":
        return jnp.round(y)
    r = jnp.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * jnp.floor(r * 0.5)) == 1.0
    return jnp.where(tie & odd, r - 1.0, r)


def _params(x: jax.Array, bits: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Scale and zero [m, 1] (float32 holding ``dtype`` values) of groups x [m, g]."""
    x_min = jnp.min(x, axis=1, keepdims=True)
    x_max = jnp.max(x, axis=1, keepdims=True)
    zero = _round_to_scale_dtype(x_min, dtype, up=False)
    scale = _round_to_scale_dtype((x_max - zero) / (2**bits - 1), dtype, up=True)
    return scale, zero


def _codes(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int,
           backend: str) -> jax.Array:
    """uint32 codes of x for broadcastable float32 scale / zero (`quantize_with_params`)."""
    safe = jnp.where(scale == 0, 1.0, scale)
    codes = _round_half_even((x - zero) / safe, backend)
    codes = jnp.where(scale == 0, 0.0, codes)
    codes = jnp.clip(codes, 0.0, float(2**bits - 1))
    return codes.astype(jnp.int32).astype(jnp.uint32)


# ---- kernel -------------------------------------------------------------------------------
def _kernel(keys_ref: Any, values_ref: Any, *out_refs: Any, config: KVQuantConfig,
            backend: str, chunk_cap: int) -> None:
    """One block: keys_ref [D, R] (permuted, channel-major), values_ref [R, D]."""
    scale_dtype = jnp.dtype(config.scale_dtype)
    r, g = config.residual_length, config.key_group_size
    n_tiers = len(config.key_tiers)
    key_outs = [out_refs[3 * i : 3 * i + 3] for i in range(n_tiers)]
    pow2 = backend == "gpu"
    offset = config.key_channels_full
    for (bits, count), (codes_ref, scales_ref, zeros_ref) in zip(
        config.key_tiers, key_outs, strict=True
    ):
        words = r * bits // 32
        for c0, n in channel_chunks(count, chunk_cap if pow2 else count, pow2):
            rows = slice(offset + c0, offset + c0 + n)
            out_rows = slice(c0, c0 + n)
            params = {}
            for grp in range(r // g):
                x = keys_ref[rows, grp * g : (grp + 1) * g].astype(jnp.float32)
                scale, zero = _params(x, bits, scale_dtype)
                scales_ref[out_rows, grp : grp + 1] = scale.astype(scales_ref.dtype)
                zeros_ref[out_rows, grp : grp + 1] = zero.astype(zeros_ref.dtype)
                params[grp] = (scale, zero)
            codes_ref[out_rows, :] = jnp.zeros((n, words), jnp.uint32)
            for pc in pieces(r, words, g, min(words, g)):
                x = keys_ref[rows, pc.start : pc.start + pc.width].astype(jnp.float32)
                c = _codes(x, *params[pc.group], bits, backend) << jnp.uint32(bits * pc.slab)
                cols = slice(pc.word, pc.word + pc.width)
                codes_ref[out_rows, cols] = codes_ref[out_rows, cols] | c
        offset += count
    if not config.quantizes_values:
        return
    v_codes_ref, v_scales_ref, v_zeros_ref = out_refs[3 * n_tiers :]
    bits, gv, d = config.value_bits, config.value_group_size, config.head_dim
    words = d * bits // 32
    params = {}
    for grp in range(d // gv):
        x = values_ref[:, grp * gv : (grp + 1) * gv].astype(jnp.float32)
        scale, zero = _params(x, bits, scale_dtype)
        v_scales_ref[:, grp : grp + 1] = scale.astype(v_scales_ref.dtype)
        v_zeros_ref[:, grp : grp + 1] = zero.astype(v_zeros_ref.dtype)
        params[grp] = (scale, zero)
    v_codes_ref[...] = jnp.zeros(v_codes_ref.shape, jnp.uint32)
    for pc in pieces(d, words, gv, min(words, gv)):
        x = values_ref[:, pc.start : pc.start + pc.width].astype(jnp.float32)
        c = _codes(x, *params[pc.group], bits, backend) << jnp.uint32(bits * pc.slab)
        cols = slice(pc.word, pc.word + pc.width)
        v_codes_ref[:, cols] = v_codes_ref[:, cols] | c


def _pack_call(keys_t: jax.Array, values: jax.Array, config: KVQuantConfig, backend: str,
               interpret: Any) -> tuple[jax.Array, ...]:
    """keys_t [N, D, R] (permuted), values [N, R, D] -> the packed outputs, flat over N."""
    n, d, r = keys_t.shape
    scale_dtype = jnp.dtype(config.scale_dtype)
    n_groups = r // config.key_group_size
    out_shapes = []
    for bits, count in config.key_tiers:
        out_shapes += [
            jax.ShapeDtypeStruct((n, count, r * bits // 32), jnp.uint32),
            jax.ShapeDtypeStruct((n, count, n_groups), scale_dtype),
            jax.ShapeDtypeStruct((n, count, n_groups), scale_dtype),
        ]
    if config.quantizes_values:
        n_vgroups = d // config.value_group_size
        out_shapes += [
            jax.ShapeDtypeStruct((n, r, d * config.value_bits // 32), jnp.uint32),
            jax.ShapeDtypeStruct((n, r, n_vgroups), scale_dtype),
            jax.ShapeDtypeStruct((n, r, n_vgroups), scale_dtype),
        ]
    if not out_shapes:
        return ()

    def spec(shape: tuple[int, ...]) -> pl.BlockSpec:
        return pl.BlockSpec((None, *shape[1:]), lambda i: (i, 0, 0))

    chunk_cap = 16  # Triton: power-of-two channel chunks of at most 16 rows
    kernel = functools.partial(_kernel, config=config, backend=backend, chunk_cap=chunk_cap)
    if backend == "tpu":
        params: Any = pltpu.CompilerParams(dimension_semantics=("parallel",))
    else:
        params = plgpu.CompilerParams(num_warps=4, num_stages=1)
    return tuple(pl.pallas_call(
        kernel,
        grid=(n,),
        in_specs=[spec(keys_t.shape), spec(values.shape)],
        out_specs=[spec(s.shape) for s in out_shapes],
        out_shape=out_shapes,
        compiler_params=params,
        interpret=interpret,
        # Reads the blocks once, writes the packed parts once; about 8 VPU ops a value.
        cost_estimate=pl.CostEstimate(
            flops=8 * (keys_t.size + values.size), transcendentals=0,
            bytes_accessed=keys_t.nbytes + values.nbytes
            + sum(math.prod(s.shape) * s.dtype.itemsize for s in out_shapes)),
        name=f"mixkvq_quantize_pack_{backend}",
    )(keys_t, values))


def quantize_blocks_pallas(
    keys: jax.Array,
    values: jax.Array,
    mean_abs_query: jax.Array,
    config: KVQuantConfig,
    *,
    interpret: bool | Any = False,
    backend: str | None = None,
) -> dict[str, Any]:
    """`mixkvq_jax.cache.quantize_blocks` with the quantization and packing in Pallas.

    Args:
      keys, values: [..., R, D] blocks of R tokens (any leading dims).
      mean_abs_query: ``I_d`` broadcastable to [..., D].
      config: the cache's `KVQuantConfig` (scale dtype bfloat16 or float32).
      interpret: run in Pallas interpret mode (CPU tests).
      backend: ``"tpu"`` or ``"gpu"``; default from `jax.default_backend`.

    Returns:
      The `LayerKVCache` block fields, exactly as `quantize_blocks` returns them.
    """
    backend = resolve_backend(backend)
    reason = unsupported_reason(config, backend)
    if reason is not None:
        raise ValueError(f"Pallas quantize-pack: {reason}")
    r, d = config.residual_length, config.head_dim
    if keys.shape[-2:] != (r, d) or values.shape != keys.shape:
        raise ValueError(
            f"keys/values must both be [..., R={r}, D={d}]; got {keys.shape} and {values.shape}"
        )
    full, scale_dtype = jnp.dtype(config.full_dtype), jnp.dtype(config.scale_dtype)
    lead = keys.shape[:-2]
    perm = channel_permutation(keys, mean_abs_query, config)
    keys_t = jnp.swapaxes(keys, -1, -2)  # [..., D, R]
    if config.stores_permutation:
        keys_t = jnp.take_along_axis(keys_t, perm[..., :, None], axis=-2)
    flat = _pack_call(keys_t.reshape(-1, d, r), values.reshape(-1, r, d), config, backend,
                      interpret)
    outs = [x.reshape(*lead, *x.shape[1:]) for x in flat]
    n_tiers = len(config.key_tiers)
    if config.quantizes_values:
        value_codes, value_scales, value_zeros = outs[3 * n_tiers :]
    else:
        value_codes = values.astype(full)
        value_scales = value_zeros = jnp.zeros((*lead, r, 0), scale_dtype)
    n_perm = d if config.stores_permutation else 0
    return {
        "key_full": keys_t[..., : config.key_channels_full, :].astype(full),
        "key_codes": tuple(outs[3 * i] for i in range(n_tiers)),
        "key_scales": tuple(outs[3 * i + 1] for i in range(n_tiers)),
        "key_zeros": tuple(outs[3 * i + 2] for i in range(n_tiers)),
        "key_permutation": perm[..., :n_perm].astype(config.permutation_dtype),
        "value_codes": value_codes,
        "value_scales": value_scales,
        "value_zeros": value_zeros,
    }


__all__ = ["BACKENDS", "quantize_blocks_pallas", "unsupported_reason"]
