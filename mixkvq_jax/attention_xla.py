"""The XLA attention path over the quantized cache: runs on every backend and is the
reference the Pallas kernels are tested against (`mixkvq_jax.attention` dispatches).

It never builds a dequantized float copy of the whole history: it walks the quantized
blocks a few at a time (`layout.unpack` of a step's rows of the stored fields),
dequantizes them into a small float32 tile and contracts it with ordinary dots, with an
online softmax, then the sinks and the residual window. CPU-only tricks live here and
apply only when the target platform is the CPU: tiles in word-major token order
(`tile_token_bits`, one sub-byte bitcast per unpack), the uint16 bits form of the
stack (`cache.to_bits`) and key scales widened before their tiers are sliced out.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mixkvq_jax import cache as kv_cache
from mixkvq_jax import layout, quant
from mixkvq_jax.cache import BLOCK_FIELDS, LayerKVCache, layer_at
from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.partials import (
    Carry,
    Partial,
    empty_carry,
    finish,
    group_queries,
    online_update,
)
from mixkvq_jax.target import canonical_platform

_HIGHEST = jax.lax.Precision.HIGHEST


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
# A paged cache (a serving batch of mixed lengths) is walked per step for the sequences
# that have blocks there, this many per loop iteration (`_paged_blocks`): fewer rows
# waste less on short sequences, more amortize the loop's gathers (README: serving).
PAGED_ROWS_PER_STEP = 8


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


def _dense_update(carry: Carry, qm: jax.Array, keys: jax.Array, values: jax.Array,
                  valid: jax.Array) -> Carry:
    """Fold full-precision tokens in (the residual window, the sinks): qm [B, H, M, D],
    keys / values [B, H, T, D], ``valid`` [B, T] (or [B, 1]) marks the tokens that count."""
    return online_update(
        carry, _dot("bhmd,bhtd->bhmt", qm, _f32(keys)), valid[:, None, None, :],
        lambda p: _dot("bhmt,bhtd->bhmd", p, _f32(values)),
    )


def _paged_blocks(carry: Carry, block_table: jax.Array, n_blocks: jax.Array, step: int,
                  rows_per_step: int, blocks: dict[str, jax.Array], index: jax.Array,
                  qm: jax.Array, layer: LayerKVCache, key_mean_scores: jax.Array | None,
                  fold) -> Carry:
    """Fold every used block of a paged cache into ``carry`` (rows [B, H, M, ...]).

    Round g folds blocks ``[g * step, (g + 1) * step)`` of each sequence, as the
    contiguous loop's step g does, but only for the sequences that have them:
    sequences sorted longest first, ``rows_per_step`` of them per inner step. A serving
    batch mixes lengths, so the work follows the blocks in use instead of every
    sequence padded to the longest. Each row's arithmetic is the contiguous loop's
    (same steps, same order), so the result does not depend on the other rows.
    """
    b, mb = block_table.shape
    k = max(1, min(rows_per_step, b))
    order = jnp.argsort(-n_blocks, stable=True).astype(jnp.int32)
    fixed = kv_cache.fixed_arrays(layer)
    # Work units (round g, group j of k rows), round by round: one flat loop.
    rounds = -(-mb // step)
    groups = (jnp.sum(n_blocks[None, :] > step * jnp.arange(rounds)[:, None], axis=1)
              + k - 1) // k  # [rounds]
    ends = jnp.cumsum(groups)

    def body(u: jax.Array, carry: Carry) -> Carry:
        g = jnp.searchsorted(ends, u, side="right")
        j = u - (ends[g] - groups[g])
        start = jnp.minimum(g * step, mb - step)  # may overlap round g - 1: masked below
        slot = start + jnp.arange(step)
        lo = jnp.minimum(j * k, b - k)  # the last group may overlap the previous one
        rows = jax.lax.dynamic_slice_in_dim(order, lo, k)
        valid_blocks = ((lo + jnp.arange(k) >= j * k)[:, None]
                        & (slot[None, :] >= g * step)
                        & (slot[None, :] < n_blocks[rows][:, None]))
        pages = jax.lax.dynamic_slice_in_dim(block_table[rows], start, step, axis=1)
        sl = {name: layout.gather_pages(x, pages, index) for name, x in blocks.items()}
        part = fold(jax.tree.map(lambda x: x[rows], carry), qm[rows], sl,
                    jnp.broadcast_to(start, (k,)), valid_blocks,
                    layer.replace(**{name: x[rows] for name, x in fixed.items()}),
                    None if key_mean_scores is None else key_mean_scores[rows])
        return jax.tree.map(lambda c, p: c.at[rows].set(p), carry, part)

    return jax.lax.fori_loop(0, ends[-1], body, carry)


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
    block_table: jax.Array | None = None,
) -> Partial:
    """Attention of q [B, C, Hq, D] over each sequence's first ``lengths`` cached tokens.

    Walks the quantized blocks ``blocks_per_step`` at a time (stopping after the last
    block any sequence uses; ``None``: `BLOCKS_PER_STEP`), then the residual window,
    with an online softmax. With ``index``, ``layer`` is the stacked cache and each step
    slices its blocks of layer ``index`` straight from the stack (a per-layer view would
    be a copy of the whole layer, as the loop needs its operands in memory).
    ``platform`` (default: this process's backend): the CPU tricks below (word-major
    tiles, one sub-byte bitcast per unpack) are for CPU targets only; XLA:TPU has no
    ``uint2`` type. ``block_table`` [B, MB] int32: a paged cache (`mixkvq_jax.paged`);
    each step gathers its blocks' pages from the pool (`layout.gather_pages`).
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
    qg = group_queries(q, kv_heads, scale)  # [B, H, Gq, C, D]
    gq = qg.shape[2]
    m = gq * c
    qm = qg.reshape(b, kv_heads, m, d)
    fields = layout.block_fields(config)
    n_slots = (blocks["value_codes"].shape[3] // fields["value_codes"].rows
               if block_table is None else block_table.shape[1])
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
    key_mean_scores = (_dot("bhmd,bhd->bhm", qm, _f32(layer.key_mean))
                       if config.smooths_keys else None)

    def fold(carry: Carry, qm: jax.Array, sl: dict[str, Any], first_block: jax.Array,
             valid_blocks: jax.Array, tile_layer: LayerKVCache,
             key_mean_scores: jax.Array | None) -> Carry:
        """Fold a tile in: ``sl`` the stored fields of S blocks per row of qm
        [B', H, M, D] ([B', H, S * rows, 128]), block k of row b being block
        ``first_block + k`` of its sequence; ``valid_blocks`` [B', S] the ones that
        count; ``tile_layer`` holds each row's fixed statistics ([B', H, P])."""
        s = valid_blocks.shape[1]
        # Without the barrier XLA turns convert(slice(stack)) into slice(convert(stack))
        # and hoists the convert of the whole (bf16 scales) stack out of the loop.
        sl = kv_cache.from_bits(jax.lax.optimization_barrier(sl), config)
        if on_cpu:
            # Key scales and zeros widened before their tiers are sliced out: XLA:CPU
            # materializes a 16-bit part sliced from a shared record (the convert moves
            # ahead of the slice) instead of fusing it into its tier's dequantization.
            sl = {**sl, **{name: _f32(sl[name]) for name in ("key_scales", "key_zeros")}}
        sl = layout.unpack(sl, config)  # the parts, [B', H, S, ...]
        if token_bits is not None:  # value rows in the keys' token order
            sl = {**sl, **{name: quant.word_major_order(sl[name], token_bits, axis=3)
                           for name in ("value_codes", "value_scales", "value_zeros")}}
        valid = valid_blocks[:, :, None]  # [B', S, 1]
        if config.sink_tokens:  # sink rows of the first block: read from the sink buffer
            position = (first_block[..., None, None] + jnp.arange(s)[:, None]) * r + within
            valid = valid & (position >= config.sink_tokens)
        keys, values = dequantize_tile(sl, tile_layer, config,
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
        rows_, m_ = qm.shape[0], qm.shape[2]
        # One contracting axis over the tile's tokens (with two, s and r, XLA:CPU
        # transposes the value tile before the dot).
        values_fn = lambda p: _dot("bhmt,bhtd->bhmd",
                                   to_rows(p).reshape(rows_, kv_heads, m_, -1),
                                   values.reshape(rows_, kv_heads, s * r, d))
        if key_mean_scores is not None:  # the blocks hold k - mean: add q . mean back
            scores = scores + jnp.expand_dims(key_mean_scores, token_axes)
        return online_update(carry, scores, valid, values_fn, token_axes)

    carry = empty_carry(qm)
    if block_table is None:
        def body(i: jax.Array, carry: Carry) -> Carry:
            # The last step may overlap the previous one; blocks already seen are masked.
            start = jnp.minimum(i * step, n_slots - step)
            sl = {name: jax.lax.dynamic_slice(
                x, (index, 0, 0, start * fields[name].rows, 0),
                (1, *x.shape[1:3], step * fields[name].rows, x.shape[4]))[0]
                for name, x in blocks.items()}
            slot = start + jnp.arange(step)
            valid_blocks = (slot[None, :] >= i * step) & (slot[None, :] < n_blocks[:, None])
            return fold(carry, qm, sl, jnp.broadcast_to(start, (b,)), valid_blocks, layer,
                        key_mean_scores)

        n_steps = (jnp.max(n_blocks) + step - 1) // step
        carry = jax.lax.fori_loop(0, n_steps, body, carry)
    else:
        carry = _paged_blocks(carry, block_table, n_blocks, step, PAGED_ROWS_PER_STEP, blocks,
                              index, qm, layer, key_mean_scores, fold)
    if values_word_major:
        carry = carry._replace(acc=quant.natural_order(carry.acc, config.value_bits))
    if config.sink_tokens:  # exact sinks, once they have left the window for a block
        carry = _dense_update(carry, qm, layer.sink_keys, layer.sink_values,
                              (n_blocks > 0)[:, None])
    window_valid = jnp.arange(r)[None, :] < (lengths % r)[:, None]
    carry = _dense_update(carry, qm, layer.residual_keys, layer.residual_values, window_valid)
    shape = (b, kv_heads, gq, c)
    return finish(Carry(carry.max.reshape(shape), carry.sum.reshape(shape),
                          carry.acc.reshape(*shape, d)))


