"""Asymmetric uniform quantization with groups, and bit-packing into uint32 words.

One quantizer serves every preset: keys use it per channel over groups of G tokens,
values per token over groups of G channels, each just a different ``axis`` (the other
granularities are whole-axis groups, or parameters fixed at prefill applied with
`quantize_with_params`).

Scale and zero point are rounded to their storage dtype *before* the codes are
computed (zero rounded down, scale rounded up), so the codes are exact for the stored
parameters: ``|x - dequantize(quantize(x))| <= scale / 2`` holds for the scale actually
stored, whatever its dtype. A zero-range group gets scale 0 and code 0 and dequantizes
to its zero point (exact whenever that value is representable in the parameter dtype),
never NaN. Non-finite inputs make their own group non-finite and touch no other group.

Packing is *planar*: a vector of N codes of b bits is split into k = 32/b slabs of
W = N/k consecutive codes, and slab j occupies bits [b*j, b*(j+1)) of the W words. So
``(words >> (b*j)) & mask`` yields codes [j*W, (j+1)*W) in order: a kernel unpacks with
one shift and one mask per slab, and each slab is a contiguous range of tokens (keys) or
channels (values), with no gather and no interleave.

`unpack_word_major` reads the same words in *word-major* order ([..., W, k]: word w's k
codes side by side, so index ``w * k + j`` holds code ``j * W + w``). On CPU that is a
bitcast to XLA's packed sub-byte integers, which XLA:CPU converts to float about twice
as fast as the shift-and-mask unpack; the XLA attention path works in that order and
undoes it on its small results (scores, outputs), never on the codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 4, 8)


class Quantized(NamedTuple):
    """Codes (uint8, same shape as the input) and per-group scales and zero points
    (the input shape with the quantized axis divided by the group size)."""

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is unsupported; use one of {SUPPORTED_BITS}")


def _round_toward(x: jax.Array, dtype: jnp.dtype, direction: float) -> jax.Array:
    """Cast float32 ``x`` to ``dtype``, rounding toward +inf (direction=inf) or -inf."""
    if jnp.dtype(dtype) == jnp.float32:
        return x
    y = x.astype(dtype)
    wrong_side = (y.astype(jnp.float32) < x) if direction > 0 else (y.astype(jnp.float32) > x)
    return jnp.where(wrong_side, jnp.nextafter(y, jnp.asarray(direction, dtype)), y)


def quant_params(
    x_min: jax.Array, x_max: jax.Array, bits: int, param_dtype: jnp.dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point for groups with the given min and max, in ``param_dtype``.

    ``zero = min`` rounded down, ``scale = (max - zero) / (2^b - 1)`` rounded up, so every
    value of the group maps to a code in [0, 2^b - 1] without clamping.
    """
    x_min = x_min.astype(jnp.float32)
    x_max = x_max.astype(jnp.float32)
    zero = _round_toward(x_min, param_dtype, -jnp.inf)
    scale = (x_max - zero.astype(jnp.float32)) / (2**bits - 1)
    return _round_toward(scale, param_dtype, jnp.inf), zero


def quantize_with_params(
    x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int
) -> jax.Array:
    """Codes of ``x`` for given ``scale`` / ``zero`` (broadcastable to ``x``).

    Values outside ``[zero, zero + scale * (2^b - 1)]`` are clamped to the end codes:
    how parameters fixed at prefill (per_channel / per_tensor granularity) treat later
    tokens. A zero scale gives code 0 (dequantizes to ``zero``).
    """
    scale = scale.astype(jnp.float32)
    safe_scale = jnp.where(scale == 0, 1.0, scale)  # zero range: code 0, never x/0
    codes = jnp.round((x.astype(jnp.float32) - zero.astype(jnp.float32)) / safe_scale)
    codes = jnp.where(scale == 0, 0.0, codes)
    return jnp.clip(codes, 0, 2**bits - 1).astype(jnp.uint8)


def _grouped(x: jax.Array, axis: int, group_size: int) -> jax.Array:
    """Move ``axis`` last and split it into [n_groups, group_size]."""
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    if n % group_size:
        raise ValueError(
            f"axis of length {n} is not a multiple of group_size={group_size}; pad the input "
            "or choose a group size that divides it"
        )
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def quantize(
    x: jax.Array,
    bits: int,
    *,
    axis: int = -1,
    group_size: int | None = None,
    param_dtype: jnp.dtype = jnp.float32,
) -> Quantized:
    """Asymmetric round-to-nearest (half to even) quantization in groups along ``axis``.

    Args:
      x: float array (bf16, fp16 or fp32).
      bits: 2, 4 or 8.
      axis: the axis along which groups of ``group_size`` elements share a scale.
      group_size: elements per group; ``None`` means the whole axis is one group.
      param_dtype: storage dtype of scales and zeros.

    Returns:
      ``Quantized(codes, scales, zeros)``: ``codes`` has the shape of ``x``; scales and
      zeros have ``x``'s shape with ``axis`` reduced to ``x.shape[axis] // group_size``.
    """
    _check_bits(bits)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize expects a floating-point array, got {x.dtype}")
    axis = axis % x.ndim
    group_size = group_size or x.shape[axis]
    grouped = _grouped(x, axis, group_size)
    scales, zeros = quant_params(grouped.min(-1), grouped.max(-1), bits, param_dtype)
    codes = quantize_with_params(grouped, scales[..., None], zeros[..., None], bits)
    codes = jnp.moveaxis(codes.reshape(*codes.shape[:-2], -1), -1, axis)
    return Quantized(codes, jnp.moveaxis(scales, -1, axis), jnp.moveaxis(zeros, -1, axis))


def dequantize(
    codes: jax.Array,
    scales: jax.Array,
    zeros: jax.Array,
    *,
    axis: int = -1,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Inverse of `quantize`: ``zero + code * scale`` with groups inferred from shapes."""
    axis = axis % codes.ndim
    n, n_groups = codes.shape[axis], scales.shape[axis]
    # Split the axis into (groups, group) and broadcast the parameters over the group:
    # one elementwise fusion (a `jnp.repeat` of the parameters would be a gather).
    grouped = (*codes.shape[:axis], n_groups, n // n_groups, *codes.shape[axis + 1:])
    scales = jnp.expand_dims(scales.astype(jnp.float32), axis + 1)
    zeros = jnp.expand_dims(zeros.astype(jnp.float32), axis + 1)
    values = zeros + codes.reshape(grouped).astype(jnp.float32) * scales
    return values.reshape(codes.shape).astype(dtype)


def codes_per_word(bits: int) -> int:
    _check_bits(bits)
    return 32 // bits


def packed_length(n: int, bits: int) -> int:
    """uint32 words that hold ``n`` codes of ``bits`` bits (planar layout)."""
    return -(-n // codes_per_word(bits))


def pack(codes: jax.Array, bits: int, *, axis: int = -1) -> jax.Array:
    """Pack unsigned ``bits``-bit codes along ``axis`` into uint32 words (planar layout).

    A length that is not a multiple of 32/bits is zero-padded; `unpack` takes the
    original length back.
    """
    k = codes_per_word(bits)
    x = jnp.moveaxis(codes, axis, -1).astype(jnp.uint32)
    n = x.shape[-1]
    n_words = packed_length(n, bits)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_words * k - n)])
    slabs = x.reshape(*x.shape[:-1], k, n_words)
    shifts = (jnp.arange(k, dtype=jnp.uint32) * bits)[:, None]
    # Slabs occupy disjoint bit ranges, so the sum is a bitwise OR.
    words = jnp.sum(slabs << shifts, axis=-2, dtype=jnp.uint32)
    return jnp.moveaxis(words, -1, axis)


_SUB_BYTE = {2: jnp.uint2, 4: jnp.uint4, 8: jnp.uint8}


def unpack_word_major(words: jax.Array, bits: int, *, dtype: jnp.dtype = jnp.int32,
                      bitcast: bool | None = None) -> jax.Array:
    """Codes of packed words [..., W] in word-major order: [..., W, k] (k = 32 / bits),
    element [..., w, j] = code ``j * W + w`` of the planar layout (`pack`).

    With ``bitcast`` (default: on CPU) the words are bitcast to ``uint{bits}``
    (little-endian: element j is bits b*j.., i.e. slab j) and converted; otherwise the
    same values come from a broadcast shift and mask.
    """
    k = codes_per_word(bits)
    words = words.astype(jnp.uint32)
    if jax.default_backend() == "cpu" if bitcast is None else bitcast:
        return jax.lax.bitcast_convert_type(words, _SUB_BYTE[bits]).astype(dtype)
    w = jax.lax.bitcast_convert_type(words, jnp.int32)
    shifts = jnp.arange(k, dtype=jnp.int32) * bits
    return ((w[..., None] >> shifts) & (2**bits - 1)).astype(dtype)


def _permute_split(x: jax.Array, axis: int, sizes: tuple[int, ...],
                   order: tuple[int, ...]) -> jax.Array:
    """Split ``axis`` of ``x`` into ``sizes`` (row-major; ``-1`` for one of them),
    permute those factors by ``order`` and flatten them back."""
    x = jnp.moveaxis(x, axis, -1)
    lead = x.ndim - 1
    known = math.prod(size for size in sizes if size != -1)
    # -1 resolved here: reshape cannot infer it for zero-size arrays (empty scale fields)
    sizes = tuple(x.shape[-1] // known if size == -1 else size for size in sizes)
    split = x.reshape(*x.shape[:-1], *sizes)
    x = split.transpose(*range(lead), *(lead + i for i in order)).reshape(x.shape)
    return jnp.moveaxis(x, -1, axis)


def natural_order(x: jax.Array, bits: int, *, axis: int = -1) -> jax.Array:
    """Reorder ``axis`` of ``x`` (length W * k, word-major as `unpack_word_major` gives
    it) to the natural code order: index ``j * W + w`` gets word-major ``w * k + j``."""
    return _permute_split(x, axis, (-1, codes_per_word(bits)), (1, 0))


def word_major_order(x: jax.Array, bits: int, *, axis: int = -1) -> jax.Array:
    """Inverse of `natural_order`: reorder ``axis`` of ``x`` (natural code order, length
    W * k) to the word-major order of `unpack_word_major`."""
    return _permute_split(x, axis, (codes_per_word(bits), -1), (1, 0))


def rewrap_word_major(x: jax.Array, bits: int, to_bits: int, *, axis: int = -1) -> jax.Array:
    """``axis`` of ``x`` (length N) from the word-major order of ``bits`` to that of
    ``to_bits``: ``word_major_order(natural_order(x, bits), to_bits)``, as one transpose
    when ``bits >= to_bits``. With k and k' codes per word (W = N / k and W' = N / k'
    words) and f = k' / k, slab j of wide word ``w = a * W' + b`` holds code
    ``(j * f + a) * W' + b``: narrow word b, slab ``j * f + a``. So [a, b, j] -> [b, j, a]."""
    if bits < to_bits:
        return word_major_order(natural_order(x, bits, axis=axis), to_bits, axis=axis)
    k, k_to = codes_per_word(bits), codes_per_word(to_bits)
    return _permute_split(x, axis, (k_to // k, -1, k), (1, 2, 0))


def dequantize_word_major(codes: jax.Array, scales: jax.Array, zeros: jax.Array,
                          bits: int) -> jax.Array:
    """``zero + code * scale`` for word-major codes [..., W, k] of a packed axis whose
    natural order (length N = W * k) is split into NG equal groups: ``scales`` /
    ``zeros`` [..., NG] in natural group order (broadcastable against ``codes[..., 0, 0]``
    plus that axis). Returns float32 [..., W, k], still word-major."""
    w_len, k = codes.shape[-2:]
    n_groups = scales.shape[-1]
    group = w_len * k // n_groups
    scales, zeros = scales.astype(jnp.float32), zeros.astype(jnp.float32)
    codes = codes.astype(jnp.float32)
    lead = codes.shape[:-2]
    if group % w_len == 0:  # natural j * W + w: group j // (G / W), whatever w
        grouped = codes.reshape(*lead, w_len, n_groups, group // w_len)
        out = zeros[..., None, :, None] + grouped * scales[..., None, :, None]
    elif w_len % group == 0:  # group j * (W / G) + w // G
        grouped = codes.reshape(*lead, w_len // group, group, k)
        per = lambda p: jnp.swapaxes(p.reshape(*p.shape[:-1], k, w_len // group), -1, -2)[
            ..., :, None, :]
        out = per(zeros) + grouped * per(scales)
    else:  # groups straddle words unevenly: per-code parameters in word-major order
        per = lambda p: jnp.swapaxes(
            jnp.repeat(p, group, axis=-1).reshape(*p.shape[:-1], k, w_len), -1, -2)
        out = per(zeros) + codes * per(scales)
    return out.reshape(codes.shape)


def unpack(
    words: jax.Array, bits: int, *, length: int | None = None, axis: int = -1,
    dtype: jnp.dtype = jnp.uint8,
) -> jax.Array:
    """Inverse of `pack`: uint32 words -> codes along ``axis`` (``length`` codes), as
    ``dtype`` (uint8; dequantization asks for int32, which converts to float in one
    instruction on CPU)."""
    k = codes_per_word(bits)
    # Shifts and masks on int32 (the bits reinterpreted; the mask drops sign bits):
    # uint32 -> float has no single x86 (AVX2) instruction, int32 -> float has.
    w = jax.lax.bitcast_convert_type(jnp.moveaxis(words, axis, -1).astype(jnp.uint32),
                                     jnp.int32)
    # Planar layout: slab j (bits j*b..) of every word holds codes j*W..(j+1)*W-1, so one
    # broadcast shift gives [..., slabs, W], already in order (no concatenate).
    shifts = (jnp.arange(k, dtype=jnp.int32) * bits)[:, None]
    codes = ((w[..., None, :] >> shifts) & (2**bits - 1)).astype(dtype)
    codes = codes.reshape(*w.shape[:-1], k * w.shape[-1])
    if length is not None:
        codes = codes[..., :length]
    return jnp.moveaxis(codes, -1, axis)
