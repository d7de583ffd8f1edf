"""The GPU (Triton) body of the Pallas decode attention (`decode_attention` is the entry
point).

Grid (B, H, splits); each program loops over its valid blocks only (dynamic trip count,
so blocks past the length are never read). The stacked fields (`mixkvq_jax.layout`) come
as free [L, B, H, NB, rows * 128] reshapes; a program reads its layer and blocks by
pointer arithmetic into each block's record (gathers with same-shape index arrays),
so the cache is read in place, without a per-layer copy.

Triton cannot slice register tensors, so a tier's slabs are unpacked at once with a
broadcast shift and a reshape into natural token order ([n, k, W] -> [n, R]) and the key
scales / zeros are applied to the codes in registers (a multiply-add per code, 1 / Gq of
the product work). Products are fp32 broadcast-multiply-reduce: exact fp32 like the XLA
path (no TF32), no 16 x 16 minimum MMA tile (Gq is often 4), and Triton's power-of-two
shapes hold by splitting channel tiers into power-of-two pieces. Values: one product per
planar value slab with the value scales folded into the probabilities. MixKVQ's query is
gathered per block by pointer loads from the tiny, cache-resident query.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixkvq_jax.layout import part_index

from .decode_plan import Layout, cost_estimate, mask_sinks, slab_codes


def _gpu_tokens(x: jax.Array, group: int) -> jax.Array:
    """[m, NG] per-group values -> [m, NG * group] per token (broadcast + reshape)."""
    m, ng = x.shape
    return jnp.broadcast_to(x[:, :, None], (m, ng, group)).reshape(m, ng * group)


def _gpu_unpack_all(words: jax.Array, bits: int) -> jax.Array:
    """uint32 words [n, W] -> float32 codes [n, (32 / bits) * W] in planar order."""
    n, w = words.shape
    k = 32 // bits
    shifts = lax.broadcasted_iota(jnp.uint32, (1, k, 1), 1) * jnp.uint32(bits)
    codes = (words[:, None, :] >> shifts) & jnp.uint32((1 << bits) - 1)
    return codes.reshape(n, k * w).astype(jnp.int32).astype(jnp.float32)


def _fma_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, K] x [K, N] as an exact fp32 broadcast-multiply-reduce (no MMA tile limits)."""
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _gpu_block(refs: dict[str, Any], layer: Any, blk: Any, lay: Layout,
               carry: tuple[Any, ...], page: Any = None) -> tuple[Any, ...]:
    """Fold block ``blk`` of layer ``layer`` into (m [Gq], l [Gq], *acc [Gq, width])
    (GPU; the cache refs are [L, NB, rows * 128] views of the stacked fields: every
    part is read by pointer arithmetic into its block's record). Paged: the refs are
    [L, P, rows * 128] views of the pool and the block's record is page ``page``."""
    cfg = lay.config
    m_prev, l_prev, *acc = carry
    parts = part_index(cfg)

    def load(field: str, flat: jax.Array) -> jax.Array:
        """Elements ``flat`` (an index array) of this block's record of ``field``
        (same-shape index arrays: Triton's lowering cannot mix them with slices)."""
        at = lambda v: jnp.full(flat.shape, v, jnp.int32)
        return refs[field][at(layer), at(blk if page is None else page), flat]

    def cache(name: str, r0: int, n: int, c0: int = 0, m: int | None = None) -> jax.Array:
        """Rows r0 .. r0 + n, columns c0 .. c0 + m (default all) of part ``name``."""
        field, part = parts[name]
        width = part.shape[1]
        m = width - c0 if m is None else m
        rows = lax.broadcasted_iota(jnp.int32, (n, m), 0) + r0
        cols = lax.broadcasted_iota(jnp.int32, (n, m), 1) + c0
        return load(field.name, part.offset + rows * width + cols)

    def column(name: str, c: int) -> jax.Array:
        """Column ``c`` of part ``name`` [a, w] as a row [1, a]."""
        field, part = parts[name]
        a, width = part.shape
        return load(field.name,
                    part.offset + lax.broadcasted_iota(jnp.int32, (1, a), 1) * width + c)

    def query(c0: int, n: int) -> jax.Array:
        """[Gq, n]: query channels at permuted positions c0 .. c0 + n of this block."""
        if not lay.permuted:
            return refs["q"][:, c0 : c0 + n]
        field, part = parts["key_permutation"]
        position = lax.broadcasted_iota(jnp.int32, (lay.gq, n), 1) + c0
        if lay.perm_per_word == 4:  # byte position % 4 of word position // 4
            words = load(field.name, part.offset + position // 4)
            channels = (words >> (8 * (position % 4)).astype(jnp.uint32)) & jnp.uint32(255)
        else:
            channels = load(field.name, part.offset + position)
        rows = lax.broadcasted_iota(jnp.int32, (lay.gq, n), 0)
        # A pointer gather from the tiny, cache-resident query.
        return refs["q"][rows, channels.astype(jnp.int32)]

    scores = jnp.zeros((lay.gq, lay.r), jnp.float32)
    for c0, n in lay.gpu_chunks(lay.n_full):
        keys = cache("key_full", c0, n).astype(jnp.float32)  # [n, R]
        scores = scores + _fma_dot(query(c0, n), keys)
    if lay.tiers:
        g = cfg.key_group_size
        bias = jnp.zeros((lay.gq, lay.n_groups), jnp.float32)
        offset = lay.n_full
        for t, tier in enumerate(lay.tiers):
            for c0, n in lay.gpu_chunks(tier.n):
                q_t = query(offset + c0, n)
                codes = _gpu_unpack_all(cache(f"key_codes{t}", c0, n), tier.bits)
                scales = cache(f"key_scales{t}", c0, n).astype(jnp.float32)
                zeros = cache(f"key_zeros{t}", c0, n).astype(jnp.float32)
                scores = scores + _fma_dot(q_t, codes * _gpu_tokens(scales, g))
                bias = bias + _fma_dot(q_t, zeros)
            offset += tier.n
        scores = scores + _gpu_tokens(bias, g)
    scores = mask_sinks(scores, blk, lay)

    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(scores - m_new[:, None])
    l_new = alpha * l_prev + jnp.sum(p, axis=1)

    new_acc = []
    for i, pc in enumerate(lay.value_pieces()):
        if cfg.quantizes_values:
            words = cache("value_codes", 0, lay.r, pc.word, pc.width)
            codes = slab_codes(words, cfg.value_bits, pc.slab)  # [R, width]
            v_scale = column("value_scales", pc.group).astype(jnp.float32)  # [1, R]
            v_zero = column("value_zeros", pc.group).astype(jnp.float32)
            part = _fma_dot(p * v_scale, codes)
            part = part + jnp.sum(p * v_zero, axis=1)[:, None]
        else:
            values = cache("value_codes", 0, lay.r, pc.start, pc.width)
            part = _fma_dot(p, values.astype(jnp.float32))
        new_acc.append(alpha[:, None] * acc[i] + part)
    return (m_new, l_new, *new_acc)


def _gpu_kernel(lengths_ref: Any, layer_ref: Any, *refs_and_outs: Any, names: Sequence[str],
                lay: Layout, blocks_per_split: int, paged: bool) -> None:
    table_ref = None
    if paged:  # [MB]: this sequence's row of the block table
        table_ref, *refs_and_outs = refs_and_outs
    n_in = len(names)
    refs = dict(zip(names, refs_and_outs[:n_in], strict=True))
    o_ref, lse_ref = refs_and_outs[n_in:]
    b, split = pl.program_id(0), pl.program_id(2)
    n_blocks = lax.div(lengths_ref[b], lay.r)  # lengths >= 0: no floor-division signs
    start = split * blocks_per_split
    stop = jnp.maximum(jnp.minimum(start + blocks_per_split, n_blocks), start)
    pieces = lay.value_pieces()
    carry = (
        jnp.full((lay.gq,), -jnp.inf, jnp.float32),
        jnp.zeros((lay.gq,), jnp.float32),
        *[jnp.zeros((lay.gq, pc.width), jnp.float32) for pc in pieces],
    )
    layer = layer_ref[0]

    def one(i: Any, c: tuple[Any, ...]) -> tuple[Any, ...]:
        page = None if table_ref is None else table_ref[i]  # the block table read
        return _gpu_block(refs, layer, i, lay, c, page)

    m, total, *acc = lax.fori_loop(start, stop, one, carry)
    safe = jnp.where(total > 0, total, 1.0)
    for pc, a in zip(pieces, acc, strict=True):
        o_ref[:, pc.start : pc.start + pc.width] = a / safe[:, None]
    lse_ref[...] = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)


def call_gpu(inputs: dict[str, jax.Array], lengths: jax.Array, layer_index: jax.Array,
              lay: Layout, *, num_splits: int, interpret: Any,
              block_table: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The Triton kernel over stacked cache arrays ([L, B, H, NB, ...]): each program
    gets [L, NB, ...] views of its (sequence, head) and offsets them by the layer.

    Paged (``block_table`` [B, MB]; fields are pools [L, P, H, rows, 128]): each program
    gets [L, P, rows * 128] views of its head's pages and its sequence's table row, and
    offsets the pointer by the page the row names."""
    names = tuple(inputs)
    paged = block_table is not None
    h = inputs["value_codes"].shape[2]
    if paged:
        b, nb = block_table.shape
        # Each page's record as one row: a free reshape of the pool.
        arrays = [x if n.startswith("q") else x.reshape(*x.shape[:3], -1)
                  for n, x in inputs.items()]
    else:
        b = inputs["value_codes"].shape[1]
        nb = inputs["value_codes"].shape[3] // lay.fields["value_codes"].rows
        # Each block's record as one row: a free reshape of the row-major stack.
        arrays = [x if n.startswith("q") else x.reshape(*x.shape[:3], nb, -1)
                  for n, x in inputs.items()]
    num_splits = max(1, min(num_splits, nb))
    per_split = pl.cdiv(nb, num_splits)

    def spec(name: str, x: jax.Array) -> pl.BlockSpec:
        if name.startswith("q"):  # [B, H, ...]
            zeros = (0,) * (x.ndim - 2)
            return pl.BlockSpec((None, None, *x.shape[2:]), lambda bi, hi, si: (bi, hi, *zeros))
        if paged:  # pool [L, P, H, rows * 128]: every page of this head
            return pl.BlockSpec((x.shape[0], x.shape[1], None, x.shape[3]),
                                lambda bi, hi, si: (0, 0, hi, 0))
        zeros = (0,) * (x.ndim - 3)
        return pl.BlockSpec((x.shape[0], None, None, *x.shape[3:]),
                            lambda bi, hi, si: (0, bi, hi, *zeros))

    kernel = functools.partial(_gpu_kernel, names=names, lay=lay, blocks_per_split=per_split,
                               paged=paged)
    table = ([pl.BlockSpec((None, nb), lambda bi, hi, si: (bi, 0))], [block_table]) if paged \
        else ([], [])
    return pl.pallas_call(
        kernel,
        grid=(b, h, num_splits),
        in_specs=[pl.BlockSpec((b,), lambda bi, hi, si: (0,)),
                  pl.BlockSpec((1,), lambda bi, hi, si: (0,)),
                  *table[0],
                  *[spec(n, x) for n, x in zip(names, arrays, strict=True)]],
        out_specs=(
            pl.BlockSpec((None, None, None, lay.gq, lay.d), lambda bi, hi, si: (bi, hi, si, 0, 0)),
            pl.BlockSpec((None, None, None, lay.gq), lambda bi, hi, si: (bi, hi, si, 0)),
        ),
        out_shape=(
            jax.ShapeDtypeStruct((b, h, num_splits, lay.gq, lay.d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, num_splits, lay.gq), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        cost_estimate=cost_estimate(inputs, lay, b, h, num_splits,
                                    pages_read=(min(b * nb, inputs["value_codes"].shape[1])
                                                if paged else None)),
        name="mixkvq_decode_attention_gpu",
    )(lengths, layer_index.reshape(1), *table[1], *arrays)


