"""Attention over the quantized cache: one entry point, `cached_attention`, that
dispatches to the XLA path (runs anywhere, defines correctness) or a Pallas kernel.

The XLA path never builds a dequantized float copy of the history for decode: key scales
fold into the (channel-permuted) query, zero points into a per-group bias, value scales
into the probabilities, so the integer codes enter the contractions directly:

    score_t = sum_d (q_d * s_dg) * c_dt + sum_d q_d * z_dg        (g = group of token t)
    out_e   = sum_t (p_t * s_tg) * c_te + sum_t p_t * z_tg        (g = group of channel e)

It walks the blocks a step at a time (as many as fit a memory budget: usually the whole
cache in one step at decode) with an online softmax, then the residual window. Results
come back as `Partial` (normalized output + log-sum-exp) so partial attentions over
disjoint token sets (blocks, residual window, the current chunk) merge exactly.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mixkvq_jax import cache as kv_cache
from mixkvq_jax import quant
from mixkvq_jax.cache import BLOCK_FIELDS, LayerKVCache, update_layer
from mixkvq_jax.config import KVQuantConfig

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
_MASKED = -1e30  # finite, so fully masked rows never produce inf - inf
_HIGHEST = jax.lax.Precision.HIGHEST
BLOCKS_PER_STEP: int | None = None  # None: as many blocks per step as STEP_BYTES allows
STEP_BYTES = 32 * 2**20  # intermediates (unpacked codes, scores) of one step, about


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


# ---- online softmax over [B, H, Gq, C, ...] ----------------------------------------
class _Carry(NamedTuple):
    max: jax.Array  # [B, H, Gq, C] running max
    sum: jax.Array  # [B, H, Gq, C] running sum of exp
    acc: jax.Array  # [B, H, Gq, C, D] running sum of p * v


def _online_update(carry: _Carry, scores: jax.Array, valid: jax.Array, values_fn) -> _Carry:
    """Fold tokens with ``scores`` [B, H, Gq, C, N] (``valid`` broadcastable) in."""
    scores = jnp.where(valid, scores, _MASKED)
    m_new = jnp.maximum(carry.max, scores.max(axis=-1))
    p = jnp.where(valid, jnp.exp(scores - m_new[..., None]), 0.0)
    alpha = jnp.exp(carry.max - m_new)
    return _Carry(
        m_new, carry.sum * alpha + p.sum(-1), carry.acc * alpha[..., None] + values_fn(p)
    )


def _finish(carry: _Carry) -> Partial:
    """Normalize and return as [B, C, Hq, ...] (Hq = H * Gq, heads grouped per KV head)."""
    sum_safe = jnp.where(carry.sum > 0, carry.sum, 1.0)
    out = carry.acc / sum_safe[..., None]
    lse = jnp.where(carry.sum > 0, carry.max + jnp.log(sum_safe), -jnp.inf)
    b, h, g, c, d = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, c, h * g, d)
    return Partial(out, lse.transpose(0, 3, 1, 2).reshape(b, c, h * g))


def _group_queries(q: jax.Array, kv_heads: int, scale: float) -> jax.Array:
    """[B, C, Hq, D] -> [B, H, Gq, C, D] float32, pre-multiplied by the softmax scale."""
    b, c, hq, d = q.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads cannot share {kv_heads} KV heads; need a multiple")
    qg = q.astype(jnp.float32).reshape(b, c, kv_heads, hq // kv_heads, d)
    return qg.transpose(0, 2, 3, 1, 4) * scale


def _empty_carry(qg: jax.Array) -> _Carry:
    # *_like keeps qg's sharding/varying axes, so the carry type-checks under shard_map.
    return _Carry(jnp.full_like(qg[..., 0], _MASKED), jnp.zeros_like(qg[..., 0]),
                  jnp.zeros_like(qg))


# ---- score and value contributions of quantized blocks -----------------------------
# Inside the XLA path the queries are [B, H, M, D]: M = Gq * C query rows share each KV
# head, so every contraction is [B, H, M, ...] x [B, H, ..., tokens].
#
# On CPU, XLA hands reductions and dots (with simple elementwise producers: convert,
# multiply, add) to YNNPACK fusions, which do not take the shift/mask ops of unpacking.
# So packed codes are unpacked by an XLA loop fusion to uint8 (a byte per code, a quarter
# of a float copy) and the contraction reads those bytes with the scales folded in:
#
# * few query rows per KV head (decode, M = Gq): keys as one broadcast multiply-reduce
#   over channels, ``sum_d (q_d * s_dg) * c_dt``, that YNNPACK fuses (convert, scale,
#   product, sum). The codes are unpacked slab-major, [slab, channel, word]: every row is
#   a contiguous run of words (the unpack vectorizes) and, since a slab's W tokens lie in
#   one scale group, the group is a plain axis of the product (no gather, no reshape of
#   a broadcast, which YNNPACK would materialize). Values: per value group, per-block
#   dots of the probabilities (scaled per token) with that group's codes.
# * many query rows (prefill chunks): the blocks of a step are dequantized to a float32
#   tile and contracted with ordinary dots, whose cost the many rows amortize.
#
# Zero points enter as small bias terms (``sum_d q_d * z_dg``, ``sum_t p_t * z_tg``).
# Full-precision arrays are read in their stored [B, H, S, ...] shape with no reshape:
# the models slice each layer out of a stacked cache, and XLA then shares that one slice
# between the attention and the cache update (a reshaped read would be a second copy).
REDUCE_MAX_ROWS = 16  # at most this many query rows per KV head use the reduce path


def _unpack(words: jax.Array, bits: int, length: int) -> jax.Array:
    """uint32 words [..., W] (planar packing) -> uint8 codes [..., length], in order.

    Slab j of the planar layout is a contiguous run of W codes, so the broadcast shift
    yields [..., slabs, W], already in order: one elementwise op, no concatenate.
    """
    k = quant.codes_per_word(bits)
    shifts = (jnp.arange(k, dtype=jnp.uint32) * bits)[:, None]
    codes = (words[..., None, :] >> shifts) & jnp.uint32(2**bits - 1)
    codes = codes.astype(jnp.uint8).reshape(*words.shape[:-1], k * words.shape[-1])
    return codes[..., :length] if length != codes.shape[-1] else codes


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HIGHEST)


def _merge_bh(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _permuted_queries(q: jax.Array, blocks: dict[str, Any], config: KVQuantConfig) -> jax.Array:
    """[B, H, M, D] -> [B, H, M, S, D] in each block's channel order ([.., 1, D] if none)."""
    if not config.stores_permutation:
        return q[:, :, :, None]
    perm = blocks["key_permutation"].astype(jnp.int32)  # [B, H, S, D]
    return jnp.take_along_axis(q[:, :, :, None], perm[:, :, None], axis=-1)


def _tier_scores_by_slab(q_tier: jax.Array, codes: jax.Array, scales: jax.Array, bits: int,
                         group: int) -> jax.Array:
    """One key tier's scale-folded scores (zero points excluded): [Z, M, S, R].

    q_tier [Z, M, S|1, n] (Z = B * H); codes uint32 [B, H, S, n, W] packed along tokens,
    W dividing ``group``; scales float32 [Z, S, n, NG].
    """
    z_, m, _, n = q_tier.shape
    s, w = codes.shape[2], codes.shape[-1]
    ng, per_group = scales.shape[-1], group // w
    words = _merge_bh(codes).reshape(z_ * s, 1, 1, n, w)
    shifts = (jnp.arange(ng * per_group, dtype=jnp.uint32) * bits).reshape(ng, per_group, 1, 1)
    c = ((words >> shifts) & jnp.uint32(2**bits - 1)).astype(jnp.uint8)  # [ZS, NG, k, n, W]
    q_rows = jnp.broadcast_to(jnp.swapaxes(q_tier, 1, 2), (z_, s, m, n)).reshape(z_ * s, m, n)
    q_scaled = q_rows[..., None] * scales.reshape(z_ * s, 1, n, ng)  # [ZS, M, n, NG]
    q_scaled = jnp.swapaxes(q_scaled, 2, 3)[:, :, :, None, :, None]  # [ZS, M, NG, 1, n, 1]
    out = jnp.sum(q_scaled * _f32(c)[:, None], axis=4)  # [ZS, M, NG, k, W]: token order
    return jnp.swapaxes(out.reshape(z_, s, m, ng * per_group * w), 1, 2)


def block_scores(q: jax.Array, blocks: dict[str, Any], config: KVQuantConfig) -> jax.Array:
    """Scaled scores of query rows against blocks: q [B, H, M, D] -> [B, H, M, S, R].

    ``q`` holds the (softmax-scaled) query rows of each KV head; ``blocks`` the
    `LayerKVCache` block fields of S blocks ([B, H, S, ...]).
    """
    b, h, m, _ = q.shape
    s = blocks["key_full"].shape[2]
    r, g = config.residual_length, config.key_group_size
    qp = _permuted_queries(q, blocks, config)  # [B, H, M, S|1, D]
    reduce_path = m <= REDUCE_MAX_ROWS
    n_full = config.key_channels_full
    scores = None
    if n_full:
        keys = _f32(blocks["key_full"])  # [B, H, S, n, R]
        if reduce_path:
            scores = jnp.sum(qp[..., :n_full, None] * keys[:, :, None], axis=4)
        else:
            q_full = jnp.broadcast_to(qp[..., :n_full], (b, h, m, s, n_full))
            scores = _dot("bhmsd,bhsdr->bhmsr", q_full, keys)
    offset = n_full
    qz = _merge_bh(qp)  # [Z, M, S|1, D]
    for (bits, count), codes, scales, zeros in zip(
        config.key_tiers, blocks["key_codes"], blocks["key_scales"], blocks["key_zeros"],
        strict=True,
    ):
        q_tier = qz[..., offset : offset + count]  # [Z, M, S|1, n]
        offset += count
        scales, zeros = _f32(_merge_bh(scales)), _f32(_merge_bh(zeros))  # [Z, S, n, NG]
        if reduce_path and g % codes.shape[-1] == 0:
            tier = _tier_scores_by_slab(q_tier, codes, scales, bits, g)
            tier = tier.reshape(b * h, m, s, r // g, g)
        else:
            c = _unpack(_merge_bh(codes), bits, r).reshape(b * h, s, count, r // g, g)  # uint8
            if reduce_path:
                q_scaled = q_tier[..., None] * scales[:, None]  # [Z, M, S, n, NG]
                tier = jnp.sum(q_scaled[..., None] * _f32(c)[:, None], axis=3)
            else:
                keys = (_f32(c) * scales[..., None]).reshape(b * h, s, count, r)
                q_tier = jnp.broadcast_to(q_tier, (b * h, m, s, count))
                tier = _dot("zmsd,zsdr->zmsr", q_tier, keys).reshape(b * h, m, s, r // g, g)
        bias = jnp.sum(q_tier[..., None] * zeros[:, None], axis=3)  # [Z, M, S, NG]
        tier = (tier + bias[..., None]).reshape(b, h, m, s, r)
        scores = tier if scores is None else scores + tier
    return scores


def block_values(p: jax.Array, blocks: dict[str, Any], config: KVQuantConfig) -> jax.Array:
    """``sum_t p_t v_t`` over blocks: p [B, H, M, S, R] -> [B, H, M, D]."""
    codes = blocks["value_codes"]
    if not config.quantizes_values:
        # Per-block dots then a sum over blocks: contracting only R keeps the stored
        # [B, H, S, R, D] layout (contracting S and R together would reshape, i.e. copy).
        return jnp.sum(_dot("bhmsr,bhsrd->bhsmd", p, _f32(codes)), axis=2)
    b, h, m, s, r = p.shape
    d, gv = config.head_dim, config.value_group_size
    ng, z_ = d // gv, b * h
    p = p.reshape(z_, m, s, r)
    c = _unpack(_merge_bh(codes), config.value_bits, d).reshape(z_, s, r, ng, gv)  # uint8
    scales = _f32(_merge_bh(blocks["value_scales"]))  # [Z, S, R, NG]
    zeros = _f32(_merge_bh(blocks["value_zeros"]))
    bias = jnp.sum(_dot("zmsr,zsrn->zsmn", p, zeros), axis=1)  # [Z, M, NG]
    if m <= REDUCE_MAX_ROWS:
        # Per value group: per-block dots of p (scaled per token) with the group's codes.
        out = jnp.stack([
            jnp.sum(_dot("zmsr,zsre->zsme", p * scales[:, None, ..., i], _f32(c[..., i, :])),
                    axis=1)
            for i in range(ng)
        ], axis=2)  # [Z, M, NG, Gv]
    else:
        values = _f32(c) * scales[..., None]
        out = jnp.sum(_dot("zmsr,zsrne->zsmne", p, values), axis=1)
    return (out + bias[..., None]).reshape(b, h, m, d)


def _auto_step(layer: LayerKVCache, config: KVQuantConfig, rows: int) -> int:
    """Blocks per step whose intermediates (unpacked codes or a dequantized tile, and the
    scores) stay near `STEP_BYTES`."""
    b, h = layer.residual_keys.shape[:2]
    r, d = config.residual_length, config.head_dim
    code_bytes = 4 if rows > REDUCE_MAX_ROWS else 1
    per_block = b * h * r * (2 * d * code_bytes + 8 * rows)
    return max(1, STEP_BYTES // per_block)


def _kv_pareto_fold(carry: _Carry, qm: jax.Array, sl: dict[str, Any], layer: LayerKVCache,
                    valid_blocks: jax.Array, config: KVQuantConfig) -> _Carry:
    """`history_attention_xla`'s step for KV Pareto granularities / K-smoothing.

    qm [B, H, M, D] scaled query rows; ``sl`` the block fields of S slots; valid_blocks
    [B, S]. Per_block parts use the scale-folded `block_scores` / `block_values`; other
    granularities dequantize the step's blocks to float32 (`cache.dequantize_block_*`)
    and use plain dots. Under K-smoothing the blocks hold ``k - mean``, so ``q . mean``
    is added to every block score of the row: exactly the score of the stored key.
    """
    b, h, m, d = qm.shape
    s, r = sl["key_full"].shape[2], config.residual_length
    arrays = {**sl, **kv_cache.fixed_arrays(layer)}
    if config.effective_key_granularity == "per_block":
        scores = block_scores(qm, sl, config)  # [B, H, M, S, R]
    else:
        keys = kv_cache.dequantize_block_keys(arrays, config, smoothed=True)  # [B,H,S,R,D]
        scores = _dot("bhmd,bhsrd->bhmsr", qm, keys)
    scores = scores.reshape(b, h, m, s * r)
    if config.smooths_keys:
        scores = scores + _dot("bhmd,bhd->bhm", qm, _f32(layer.key_mean))[..., None]
    if config.effective_value_granularity == "per_block":
        values_fn = lambda p: block_values(p.reshape(b, h, m, s, r), sl, config)
    else:
        values = kv_cache.dequantize_block_values(arrays, config)  # [B, H, S, R, D]
        values_fn = lambda p: _dot("bhmsr,bhsrd->bhmd", p.reshape(b, h, m, s, r), values)
    valid = jnp.repeat(valid_blocks, r, axis=1)[:, None, None, :]  # [B, 1, 1, S * R]
    return _online_update(carry, scores, valid, values_fn)


def history_attention_xla(
    q: jax.Array,
    layer: LayerKVCache,
    lengths: jax.Array,
    config: KVQuantConfig,
    *,
    scale: float,
    blocks_per_step: int | None = BLOCKS_PER_STEP,
) -> Partial:
    """Attention of q [B, C, Hq, D] over each sequence's first ``lengths`` cached tokens.

    Walks the quantized blocks ``blocks_per_step`` at a time (``None``: as many as keep a
    step's intermediates near `STEP_BYTES`, so one step covers a whole decode cache of
    moderate size), stopping after the last block any sequence uses, then the residual
    window, with an online softmax.
    """
    b, c, _, d = q.shape
    kv_heads, r = layer.residual_keys.shape[1], config.residual_length
    qg = _group_queries(q, kv_heads, scale)  # [B, H, Gq, C, D]
    gq = qg.shape[2]
    m = gq * c
    qm = qg.reshape(b, kv_heads, m, d)
    n_slots = layer.key_full.shape[2]
    if blocks_per_step is None:
        blocks_per_step = _auto_step(layer, config, m)
    step = max(1, min(blocks_per_step, n_slots))
    n_blocks = lengths // r  # [B]
    blocks = {name: getattr(layer, name) for name in BLOCK_FIELDS}

    def fold(carry: _Carry, sl: dict[str, Any], valid_blocks: jax.Array) -> _Carry:
        if config.uses_kv_pareto_options:  # granularities / K-smoothing
            return _kv_pareto_fold(carry, qm, sl, layer, valid_blocks, config)
        scores = block_scores(qm, sl, config).reshape(b, kv_heads, m, step * r)
        valid = jnp.repeat(valid_blocks, r, axis=1)[:, None, None, :]  # [B, 1, 1, S * R]
        return _online_update(
            carry, scores, valid,
            lambda p: block_values(p.reshape(b, kv_heads, m, step, r), sl, config),
        )

    shape = (b, kv_heads, m)
    carry = _Carry(jnp.full(shape, _MASKED), jnp.zeros(shape), jnp.zeros((*shape, d)))
    if step == n_slots:
        carry = fold(carry, blocks, jnp.arange(step)[None, :] < n_blocks[:, None])
    else:
        def body(i: jax.Array, carry: _Carry) -> _Carry:
            # The last step may overlap the previous one; blocks already seen are masked.
            start = jnp.minimum(i * step, n_slots - step)
            sl = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, step, axis=2),
                              blocks)
            slot = start + jnp.arange(step)
            valid_blocks = (slot[None, :] >= i * step) & (slot[None, :] < n_blocks[:, None])
            return fold(carry, sl, valid_blocks)

        n_steps = (jnp.max(n_blocks) + step - 1) // step
        carry = jax.lax.fori_loop(0, n_steps, body, carry)

    window_valid = jnp.arange(r)[None, :] < (lengths % r)[:, None]
    window_keys = _f32(layer.residual_keys)  # [B, H, R, D]
    window_values = _f32(layer.residual_values)
    carry = _online_update(
        carry, _dot("bhmd,bhtd->bhmt", qm, window_keys), window_valid[:, None, None, :],
        lambda p: _dot("bhmt,bhtd->bhmd", p, window_values),
    )
    shape = (b, kv_heads, gq, c)
    return _finish(_Carry(carry.max.reshape(shape), carry.sum.reshape(shape),
                          carry.acc.reshape(*shape, d)))


def chunk_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, counts: jax.Array, *, scale: float
) -> Partial:
    """Causal full-precision attention within a chunk.

    q [B, C, Hq, D], k / v [B, C, H, D]; query i sees chunk tokens j <= i, j < counts.
    """
    kv_heads = k.shape[2]
    qg = _group_queries(q, kv_heads, scale)
    scores = jnp.einsum("bhgcd,bthd->bhgct", qg, k.astype(jnp.float32), precision=_HIGHEST)
    c = q.shape[1]
    causal = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    valid = causal[None] & (jnp.arange(c)[None, None, :] < counts[:, None, None])
    values = v.astype(jnp.float32)
    carry = _online_update(
        _empty_carry(qg), scores, valid[:, None, None],
        lambda p: jnp.einsum("bhgct,bthd->bhgcd", p, values, precision=_HIGHEST),
    )
    return _finish(carry)


# ---- dispatch ---------------------------------------------------------------------
@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``pallas`` on TPU/GPU, ``xla`` elsewhere; validate the name."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "xla"
    return impl


def cached_attention(
    q: jax.Array,
    layer: LayerKVCache,
    lengths: jax.Array,
    config: KVQuantConfig,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> Partial:
    """Attention of new queries over the cached tokens of one layer.

    Args:
      q: [B, C, Hq, D] queries (post-RoPE), Hq a multiple of the cache's KV heads.
      layer: the layer's `LayerKVCache`.
      lengths: [B] int32 cached tokens per sequence; all of them precede every query.
      config: the cache's `KVQuantConfig`.
      scale: softmax scale, default ``1 / sqrt(D)``.
      impl: ``auto`` | ``xla`` | ``pallas`` | ``pallas_interpret``.

    Returns:
      `Partial` (output [B, C, Hq, D] float32 and log-sum-exp [B, C, Hq]).
    """
    if q.ndim != 4 or q.shape[-1] != config.head_dim:
        raise ValueError(
            f"q must be [batch, tokens, q_heads, head_dim={config.head_dim}], got {q.shape}"
        )
    scale = config.head_dim**-0.5 if scale is None else scale
    requested, impl = impl, resolve_impl(impl)
    if requested == "auto" and q.shape[1] > 1:
        impl = "xla"  # the Pallas kernel is for decode; prefill chunks take XLA by design
    if impl in ("pallas", "pallas_interpret"):
        try:
            from mixkvq_jax.pallas_kernels import decode_attention as kernels
        except ImportError as err:  # kernels not built for this install
            _warn_once(f"Pallas kernels unavailable ({err}); using the XLA attention path")
        else:
            reason = kernels.unsupported_reason(q, layer, config)
            if reason is None:
                return kernels.cached_attention_pallas(
                    q, layer, lengths, config, scale=scale, interpret=impl == "pallas_interpret"
                )
            _warn_once(f"Pallas decode attention does not support this call ({reason}); "
                       "using the XLA attention path")
    return history_attention_xla(q, layer, lengths, config, scale=scale,
                                 blocks_per_step=BLOCKS_PER_STEP)


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
) -> tuple[jax.Array, LayerKVCache]:
    """One attention layer's work for a chunk of new tokens (prefill or decode).

    Args:
      q: [B, C, Hq, D] post-RoPE queries; k, v: [B, C, H, D] post-RoPE keys / values.
      layer: this layer's cache; lengths: [B] tokens cached before the chunk.
      counts: [B] valid chunk tokens per sequence (right padding beyond).

    Returns:
      ``(out, new_layer)``: out [B, C, Hq, D] in q's dtype, the attention of every
      chunk token over the cached history (quantized) and, causally, over the chunk
      itself (full precision); ``new_layer`` with the valid chunk tokens appended.
    """
    scale = config.head_dim**-0.5 if scale is None else scale
    history = cached_attention(q, layer, lengths, config, scale=scale, impl=impl)
    own = chunk_attention(q, k, v, counts, scale=scale)
    out = merge_partials(history, own).out.astype(q.dtype)
    # The models write the new layer back into the stacked cache they carry through a
    # scan (dynamic_update_slice). XLA updates that buffer in place only if every read of
    # the old layer provably happens first; otherwise it copies the whole stack, twice, at
    # every layer. Make the update depend on the attention output through a zero XLA
    # cannot fold (no float is < -inf, NaN included), which orders all reads before it.
    after_reads = (out.reshape(-1)[0] < -jnp.inf).astype(lengths.dtype)
    return out, update_layer(layer, lengths + after_reads, k, v, q, counts, config)
