"""Attention over the quantized cache: one entry point, `cached_attention`, that
dispatches to the XLA path (runs anywhere, defines correctness) or a Pallas kernel.

The XLA path never builds a dequantized float copy of the whole history: it walks the
quantized blocks a few at a time, dequantizes them into a small float32 tile that stays
in the CPU cache, and contracts it with ordinary dots (see the comment above
`BLOCKS_PER_STEP` for the measurements behind that choice), with an online softmax, then
the residual window. Results come back as `Partial` (normalized output + log-sum-exp) so
partial attentions over disjoint token sets (blocks, residual window, the current chunk)
merge exactly.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mixkvq_jax import cache as kv_cache
from mixkvq_jax import layout, quant
from mixkvq_jax.cache import BLOCK_FIELDS, LayerKVCache, layer_at, update_layer
from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.target import canonical_platform

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
_MASKED = -1e30  # finite, so fully masked rows never produce inf - inf
_HIGHEST = jax.lax.Precision.HIGHEST


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


def _online_update(carry: _Carry, scores: jax.Array, valid: jax.Array, values_fn,
                   token_axes: tuple[int, ...] = (-1,)) -> _Carry:
    """Fold tokens with ``scores`` (the carry's query axes plus ``token_axes``, e.g.
    [B, H, Gq, C, N]; ``valid`` broadcastable) in; ``values_fn(p)`` contracts the
    probabilities (``scores``' shape) with the tokens' values."""
    scores = jnp.where(valid, scores, _MASKED)
    m_new = jnp.maximum(carry.max, scores.max(axis=token_axes))
    p = jnp.where(valid, jnp.exp(scores - jnp.expand_dims(m_new, token_axes)), 0.0)
    alpha = jnp.exp(carry.max - m_new)
    return _Carry(m_new, carry.sum * alpha + p.sum(token_axes),
                  carry.acc * alpha[..., None] + values_fn(p))


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


# ---- the history: quantized blocks, a tile at a time, then the residual window -----
# Inside the XLA path the queries are [B, H, M, D]: M = Gq * C query rows share each KV
# head, so every contraction is [B, H, M, ...] x [B, H, ..., tokens].
#
# Each loop step dequantizes `BLOCKS_PER_STEP` blocks into a float32 tile (a few hundred
# KiB per sequence and head: it stays in cache) and contracts it with ordinary dots.
# Measured on CPU (2 cores, 8k tokens, batch 4, 3 KV heads, D=64, 2-bit keys), the keys'
# scores took 3.3 ms this way, 9.6 ms as one dot over an fp32 cache (DRAM-bound) and
# 21-28 ms either dequantizing the whole history at once (a float copy in DRAM) or
# folding the scales into the query and reducing over the codes (XLA's fused
# multiply-reduce does not vectorize across channels). One step per block is slower
# again (loop overhead): 4 blocks per step is the measured optimum, 2-8 within 40%.
BLOCKS_PER_STEP = 4


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HIGHEST)


def tile_token_bits(config: KVQuantConfig) -> int | None:
    """The bits whose word-major order (`quant.unpack_word_major`) the XLA path gives the
    tokens of each block, in keys, scores and values alike; ``None``: natural order.

    Unpacking codes packed along tokens into natural order interleaves the words (code
    ``j * W + w`` is slab j of word w), which XLA:CPU compiles to scalar code; word-major
    order is one bitcast. So the blocks' keys are unpacked word-major, the value rows are
    read in the same token order (the permutation fuses into their dequantization) and
    the scores and softmax never return to natural order. Measured on CPU (2 cores,
    kivi2, 8k tokens x batch 4, SmolLM2 shapes): 7.5 -> 3.6 ms of attention per layer,
    237 -> 145 ms per decode step. MixKVQ takes the order of its lowest-bit tier (the one
    with the most channels); its other tiers' tiles are read in that order too (the
    permutations fuse into their dequantization).
    """
    if not kv_cache.packs_evenly(config, "keys"):
        return None
    return min(bits for bits, _ in config.key_tiers)


def dequantize_tile(blocks: dict[str, Any], layer: LayerKVCache, config: KVQuantConfig,
                    *, keys_word_major: bool = False, values_word_major: bool = False
                    ) -> tuple[list[jax.Array], jax.Array]:
    """Blocks ([B, H, S, ...] `LayerKVCache` block fields) -> float32 keys, one
    [B, H, S, n_t, R] per tier in *stored* channel order (MixKVQ: each block's salience
    order; under K-smoothing, keys minus their mean), and values [B, H, S, R, D].
    ``*_word_major``: quantized tiers' tokens / quantized values' channels in
    `quant.unpack_word_major` order (see `cache.dequantize_key_tiers`)."""
    arrays = {**blocks, **kv_cache.fixed_arrays(layer)}
    keys = kv_cache.dequantize_key_tiers(arrays, config, word_major=keys_word_major)
    return keys, kv_cache.dequantize_block_values(arrays, config,
                                                  word_major=values_word_major)


def block_scores(q: jax.Array, keys: list[jax.Array], blocks: dict[str, Any],
                 config: KVQuantConfig, *, token_bits: int | None = None) -> jax.Array:
    """Scores of query rows q [B, H, M, D] against dequantized key tiers, each
    [B, H, S, n_t, R] (stored channel order, tiers in order; with ``token_bits``,
    quantized tiers word-major as `dequantize_tile` gives them): [B, H, M, S, R]
    (MixKVQ, `config.stores_permutation`: [B, H, S, M, R], as its batched dots give
    them), the tokens of each block in natural order, or with ``token_bits`` in
    ``quant.word_major_order(..., token_bits)`` (`tile_token_bits`)."""
    spec = "bhmd,bhsdr->bhmsr"
    if config.stores_permutation:
        # MixKVQ: the query follows each block's channel permutation (a [B, H, S, M, D]
        # gather, tiny next to the tile), so the keys are used in their stored order.
        # Blocks lead as batch axes, as the CPU dot kernels want them.
        perm = blocks["key_permutation"].astype(jnp.int32)  # [B, H, S, D]
        q = jnp.take_along_axis(q[:, :, None], perm[:, :, :, None], axis=-1)
        spec = "bhsmd,bhsdr->bhsmr"
    bits = [None] * (len(keys) - len(config.key_tiers)) + [b for b, _ in config.key_tiers]
    scores, offset = None, 0
    for tier, tier_bits in zip(keys, bits, strict=True):  # one dot per tier: no concatenate
        n = tier.shape[-2]
        # Every tier's tile in the token order of the scores (the permutation fuses into
        # its dequantization; moving the INT4 scores instead put a transpose into each
        # softmax fusion: 213 -> 202 ms per MixKVQ step at 8k x 4 doing it here).
        if token_bits is not None and tier_bits is None:  # the full tier: natural order
            tier = quant.word_major_order(tier, token_bits)
        elif token_bits is not None and tier_bits != token_bits:
            tier = quant.rewrap_word_major(tier, tier_bits, token_bits)
        part = _dot(spec, q[..., offset:offset + n], tier)
        scores, offset = part if scores is None else scores + part, offset + n
    return scores


def _dense_update(carry: _Carry, qm: jax.Array, keys: jax.Array, values: jax.Array,
                  valid: jax.Array) -> _Carry:
    """Fold full-precision tokens in (the residual window, the sinks): qm [B, H, M, D],
    keys / values [B, H, T, D], ``valid`` [B, T] (or [B, 1]) marks the tokens that count."""
    return _online_update(
        carry, _dot("bhmd,bhtd->bhmt", qm, _f32(keys)), valid[:, None, None, :],
        lambda p: _dot("bhmt,bhtd->bhmd", p, _f32(values)),
    )


def history_attention_xla(
    q: jax.Array,
    layer: LayerKVCache,
    lengths: jax.Array,
    config: KVQuantConfig,
    *,
    scale: float,
    blocks_per_step: int | None = None,
    index: jax.Array | None = None,
    platform: str | None = None,
) -> Partial:
    """Attention of q [B, C, Hq, D] over each sequence's first ``lengths`` cached tokens.

    Walks the quantized blocks ``blocks_per_step`` at a time (stopping after the last
    block any sequence uses; ``None``: `BLOCKS_PER_STEP`), then the residual window,
    with an online softmax. With ``index``, ``layer`` is the stacked cache and each step
    slices its blocks of layer ``index`` straight from the stack (a per-layer view would
    be a copy of the whole layer, as the loop needs its operands in memory).
    ``platform`` (default: this process's backend): the CPU tricks below (word-major
    tiles, one sub-byte bitcast per unpack) are for CPU targets only; XLA:TPU has no
    ``uint2`` type.
    """
    blocks = {name: getattr(layer, name) for name in BLOCK_FIELDS}
    if index is None:
        blocks = jax.tree.map(lambda x: x[None], blocks)  # a stack of one (no copy)
        index = jnp.zeros((), jnp.int32)
    else:
        # Read for its window, statistics and shapes (16-bit floats may come as bits:
        # `cache.to_bits`).
        layer = kv_cache.from_bits(layer_at(layer, index), config)
    b, c, _, d = q.shape
    kv_heads, r = layer.residual_keys.shape[1], config.residual_length
    qg = _group_queries(q, kv_heads, scale)  # [B, H, Gq, C, D]
    gq = qg.shape[2]
    m = gq * c
    qm = qg.reshape(b, kv_heads, m, d)
    fields = layout.block_fields(config)
    n_slots = blocks["value_codes"].shape[3] // fields["value_codes"].rows
    step = max(1, min(blocks_per_step or BLOCKS_PER_STEP, n_slots))
    n_blocks = lengths // r  # [B]
    # Codes unpacked word-major where they pack evenly (`quant.unpack_word_major`, one
    # bitcast on CPU): keys along tokens (`tile_token_bits`: the whole tile then keeps
    # that token order) and values along channels (undone on the output after the loop).
    on_cpu = canonical_platform(platform) == "cpu"
    token_bits = tile_token_bits(config) if on_cpu else None
    values_word_major = on_cpu and kv_cache.packs_evenly(config, "values")
    within = jnp.arange(r)  # natural position of each tile row within its block
    if token_bits is not None:
        within = quant.word_major_order(within, token_bits)
    if config.smooths_keys:
        key_mean_scores = _dot("bhmd,bhd->bhm", qm, _f32(layer.key_mean))

    def body(i: jax.Array, carry: _Carry) -> _Carry:
        # The last step may overlap the previous one; blocks already seen are masked.
        start = jnp.minimum(i * step, n_slots - step)
        sl = {name: jax.lax.dynamic_slice(
            x, (index, 0, 0, start * fields[name].rows, 0),
            (1, *x.shape[1:3], step * fields[name].rows, x.shape[4]))[0]
            for name, x in blocks.items()}
        # Without the barrier XLA turns convert(slice(stack)) into slice(convert(stack))
        # and hoists the convert of the whole (bf16 scales) stack out of the loop.
        sl = kv_cache.from_bits(jax.lax.optimization_barrier(sl), config)
        sl = layout.unpack(sl, config)  # the parts, [B, H, step, ...]
        if token_bits is not None:  # value rows in the keys' token order
            sl = {**sl, **{name: quant.word_major_order(sl[name], token_bits, axis=3)
                           for name in ("value_codes", "value_scales", "value_zeros")}}
        slot = start + jnp.arange(step)
        valid_blocks = (slot[None, :] >= i * step) & (slot[None, :] < n_blocks[:, None])
        valid = valid_blocks[:, :, None]  # [B, S, 1]
        if config.sink_tokens:  # sink rows of the first block: read from the sink buffer
            valid = valid & (start * r + jnp.arange(step)[:, None] * r + within
                             >= config.sink_tokens)
        keys, values = dequantize_tile(sl, layer, config,
                                       keys_word_major=token_bits is not None,
                                       values_word_major=values_word_major)
        scores = block_scores(qm, keys, sl, config, token_bits=token_bits)
        # The softmax runs on the scores as the dots give them: transposing MixKVQ's
        # [B, H, S, M, R] in the fusion that masks and exponentiates them cost more than
        # its three tier dots (CPU profile); p alone transposes cheaply.
        if config.stores_permutation:
            token_axes, valid = (2, 4), valid[:, None, :, None, :]
            to_rows = lambda p: p.transpose(0, 1, 3, 2, 4)
        else:  # [B, H, M, S, R]
            token_axes, valid, to_rows = (3, 4), valid[:, None, None], lambda p: p
        # One contracting axis over the tile's tokens (with two, s and r, XLA:CPU
        # transposes the value tile before the dot).
        values_fn = lambda p: _dot("bhmt,bhtd->bhmd", to_rows(p).reshape(b, kv_heads, m, -1),
                                   values.reshape(b, kv_heads, step * r, d))
        if config.smooths_keys:  # the blocks hold k - mean: add q . mean back (exact)
            scores = scores + jnp.expand_dims(key_mean_scores, token_axes)
        return _online_update(carry, scores, valid, values_fn, token_axes)

    carry = _empty_carry(qm)
    n_steps = (jnp.max(n_blocks) + step - 1) // step
    carry = jax.lax.fori_loop(0, n_steps, body, carry)
    if values_word_major:
        carry = carry._replace(acc=quant.natural_order(carry.acc, config.value_bits))
    if config.sink_tokens:  # exact sinks, once they have left the window for a block
        carry = _dense_update(carry, qm, layer.sink_keys, layer.sink_values,
                              (n_blocks > 0)[:, None])
    window_valid = jnp.arange(r)[None, :] < (lengths % r)[:, None]
    carry = _dense_update(carry, qm, layer.residual_keys, layer.residual_values, window_valid)
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

    Returns:
      `Partial` (output [B, C, Hq, D] float32 and log-sum-exp [B, C, Hq]).
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
            reason = kernels.unsupported_reason(q, layer, config, backend, layer_index=index)
            if reason is None:
                return kernels.cached_attention_pallas(
                    q, layer, lengths, config, scale=scale, backend=backend,
                    interpret=impl == "pallas_interpret", layer_index=index)
            _warn_once(f"Pallas decode attention does not support this call ({reason}); "
                       "using the XLA attention path")
    return history_attention_xla(q, layer, lengths, config, scale=scale,
                                 blocks_per_step=BLOCKS_PER_STEP, index=index,
                                 platform=platform)


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
) -> tuple[jax.Array, LayerKVCache]:
    """One attention layer's work for a chunk of new tokens (prefill or decode).

    Args:
      q: [B, C, Hq, D] post-RoPE queries; k, v: [B, C, H, D] post-RoPE keys / values.
      layer: this layer's cache or, with ``index``, the stacked cache of all layers
        (then layer ``index`` is read and updated in place: see `update_layer`).
      lengths: [B] tokens cached before the chunk.
      counts: [B] valid chunk tokens per sequence (right padding beyond).
      impl, platform: as in `cached_attention`.

    Returns:
      ``(out, new_layer)``: out [B, C, Hq, D] in q's dtype, the attention of every
      chunk token over the cached history (quantized) and, causally, over the chunk
      itself (full precision); ``new_layer`` (the new stack, with ``index``) with the
      valid chunk tokens appended.
    """
    scale = config.head_dim**-0.5 if scale is None else scale
    history = cached_attention(q, layer, lengths, config, scale=scale, impl=impl, index=index,
                               platform=platform)
    own = chunk_attention(q, k, v, counts, scale=scale)
    out = merge_partials(history, own).out.astype(q.dtype)
    # The update writes into the buffer the attention read. XLA does that in place only
    # if every read provably happens first; otherwise it copies the buffer (for a stack:
    # all layers) at every layer. Make the update depend on the attention output through
    # a zero XLA cannot fold (no float is < -inf, NaN included): reads come first.
    after_reads = (out.reshape(-1)[0] < -jnp.inf).astype(lengths.dtype)
    return out, update_layer(layer, lengths + after_reads, k, v, q, counts, config,
                             index=index)
