"""The TPU (Mosaic) body of the Pallas decode attention (`decode_attention` is the
entry point).

Grid (B, H, splits, steps); each step DMAs S blocks, i.e. S * rows rows of every stored
field (`mixkvq_jax.layout`: lane-dense [NB * rows, 128] per sequence and head; the
Pallas pipeline double-buffers them). The stacked cache is read in place: the layer
index and the lengths are scalar-prefetched into the index maps, and the index map
clamps the block step to the sequence's last valid one, so steps past the length
re-use the resident buffer (no DMA) and ``pl.when`` skips their compute.

Per block, the parts are unpacked in VMEM (`_tpu_unpack_block`): 16- and 8-bit fields
are widened to 32 bits once per step (Mosaic slices 32-bit tiles at any row), a part
``[a, w]`` is cut from its block's rows by reshaping [w, 128] pieces to [128, w] (the
lane-splitting reshape Mosaic supports) and written to a per-part scratch. Then scores
are built in natural orientation ([Gq, R], tokens on lanes): one MXU dot per planar slab
against the scale-folded query,

  keys    score_t = sum_d (q_d * s_dg) * c_dt + sum_d q_d * z_dg     (g = token t's group)
  values  out_e   = sum_t (p_t * s_tg) * c_te + sum_t p_t * z_tg     (g = channel e's group)

accumulated into a VMEM score row at the slab's lane offset; value scales fold into the
probabilities, one dot per value slab into a per-slab accumulator. Scale columns become
lane rows by a one-hot NT-matmul (exact). MixKVQ's query is permuted per block by
one-hot dots (`_permuted_tier_queries`; Mosaic has no lane gather), with no HBM traffic.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mixkvq_jax.layout import LANES, Part

from .decode_plan import (
    Layout,
    cost_estimate,
    dot,
    lane_pick,
    lane_row,
    mask_sinks,
    slab_codes,
)


def _permuted_tier_queries(q: jax.Array, perm: jax.Array, lay: Layout) -> dict[str, jax.Array]:
    """The query [Gq, D] in a block's channel order, per key tier: ``q_full`` /
    ``q{t}`` [Gq, n_t].

    ``perm`` [k, D / k] int32 holds the block's permutation interleaved: row j, lane w
    is permuted position ``k * w + j`` (k indices a stored word: bytes of uint32 words,
    k = 4; k = 1 for int32 indices, `layout.permutation_per_word`). Mosaic has
    no lane gather, so each row becomes a one-hot matrix (``onehot[d, w] = perm[j, w]
    == d``, exact) applied on the MXU, and each tier's columns are picked by constant
    selection matrices (no unaligned lane slices or lane interleaves): a few small dots
    per block and no HBM traffic.
    """
    d = lay.d
    k, m = perm.shape
    rows = lax.broadcasted_iota(jnp.int32, (d, m), 0)
    q_rows = [dot(q, (rows == perm[j : j + 1, :]).astype(jnp.float32)) for j in range(k)]
    out: dict[str, jax.Array] = {}
    offset = 0
    names = (["q_full"] if lay.n_full else []) + [f"q{t}" for t in range(len(lay.tiers))]
    counts = ([lay.n_full] if lay.n_full else []) + [tier.n for tier in lay.tiers]
    for name, n in zip(names, counts, strict=True):
        position = lax.broadcasted_iota(jnp.int32, (m, n), 0) * k
        column = lax.broadcasted_iota(jnp.int32, (m, n), 1) + offset
        out[name] = sum(dot(q_rows[j], (position + j == column).astype(jnp.float32))
                        for j in range(k))
        offset += n
    return out


def _lanes_to_rows(tile: jax.Array, width: int) -> jax.Array:
    """A row-major [r, 128] tile viewed as [r * 128 / width, width] (width divides 128).

    Mosaic reshapes a [w, 128] tile to [128, w] but not [r, 128] to [r * 128 / w, w] in
    general, so the tile goes through in [w, 128] pieces (zero-padded), concatenated."""
    r = tile.shape[0]
    if width == LANES:
        return tile
    pad = (-r) % width
    if pad:
        tile = jnp.concatenate([tile, jnp.zeros((pad, LANES), tile.dtype)], axis=0)
    pieces = [tile[i : i + width].reshape(LANES, width) for i in range(0, r + pad, width)]
    whole = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)
    return whole[: r * LANES // width]


def _part_of(tile: jax.Array, part: Part) -> jax.Array:
    """Part ``part`` [a, w] of one block's field record ``tile`` [rows, 128]."""
    a, w = part.shape
    row0 = part.offset // LANES
    row1 = -(-(part.offset + part.size) // LANES)
    view = _lanes_to_rows(tile[row0:row1], min(w, LANES))
    start = (part.offset - row0 * LANES) // w
    return view[start : start + a]


def _tpu_unpack_block(fields: dict[str, Any], sub: Any, lay: Layout,
                      parts: dict[str, Any]) -> None:
    """Copy block ``sub`` of the step's fields (32-bit VMEM tiles [S * rows, 128]) into
    the per-block part scratch ``parts`` (their `layout` shapes; floats as float32,
    the permutation as int32 [k, D / k])."""
    for name, field in lay.fields.items():
        if name not in fields:
            continue
        tile = fields[name][pl.ds(sub * field.rows, field.rows), :]  # [rows, 128]
        for part in field.parts:
            if not part.size:
                continue
            x = _part_of(tile, part)
            if part.name == "key_permutation":
                if lay.perm_per_word == 4:  # 4 indices a word: row j = byte j
                    x = jnp.concatenate([(x >> jnp.uint32(8 * j)) & jnp.uint32(255)
                                         for j in range(4)], axis=0)
                x = x.astype(jnp.int32)
            parts[part.name][...] = x


def _tpu_block(parts: dict[str, Any], q_refs: dict[str, Any], lay: Layout, sc_ref: Any,
               m_ref: Any, l_ref: Any, acc_ref: Any, block: Any) -> None:
    """Fold one cache block (index ``block``; its parts unpacked into the VMEM refs
    ``parts`` by `_tpu_unpack_block`) into the running softmax state (TPU)."""
    cfg = lay.config
    tier_queries = (_permuted_tier_queries(q_refs["q"][...], parts["key_permutation"][...],
                                           lay) if lay.permuted else None)

    def query(name: str) -> jax.Array:
        return tier_queries[name] if lay.permuted else q_refs[name][...]

    # Scores [Gq, R]: the full-precision tier, then one dot per planar slab and tier.
    if lay.n_full:
        sc_ref[...] = dot(query("q_full"), parts["key_full"][...])
    else:
        sc_ref[...] = jnp.zeros(sc_ref.shape, jnp.float32)
    for t, tier in enumerate(lay.tiers):
        q_t = query(f"q{t}")  # [Gq, n]
        scales = parts[f"key_scales{t}"][...]  # [n, NG]
        zeros = parts[f"key_zeros{t}"][...]
        bias = dot(q_t, zeros)  # [Gq, NG]: sum_d q_d z_dg, every group
        words = parts[f"key_codes{t}"][...]  # [n, W] uint32
        scaled_q: dict[int, tuple[jax.Array, jax.Array]] = {}  # per group: (q * s, q . z)
        for pc in lay.key_pieces(tier):
            if pc.group not in scaled_q:
                scaled_q[pc.group] = (q_t * lane_row(scales, pc.group),
                                      lane_pick(bias, pc.group))
            if pc.width == tier.words:
                slab_words = words
            else:
                slab_words = parts[f"key_codes{t}"][:, pc.word : pc.word + pc.width]
            q_scaled, q_zero = scaled_q[pc.group]
            part = dot(q_scaled, slab_codes(slab_words, tier.bits, pc.slab)) + q_zero
            cols = slice(pc.start, pc.start + pc.width)
            sc_ref[:, cols] = sc_ref[:, cols] + part

    # Online softmax (the whole block is valid, sinks aside: blocks hold R tokens each).
    scores = mask_sinks(sc_ref[...], block, lay)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(scores - m_new)  # [Gq, R]
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new

    # Values: one dot per planar slab; per-token scales fold into p.
    if not cfg.quantizes_values:
        values = parts["value_codes"][...]  # [R, D]
        acc_ref[0] = alpha * acc_ref[0] + dot(p, values)
        return
    v_scales = parts["value_scales"][...]  # [R, NGv]
    v_bias = dot(p, parts["value_zeros"][...])  # [Gq, NGv]
    words = parts["value_codes"][...]  # [R, Dv]
    scaled_p: dict[int, tuple[jax.Array, jax.Array]] = {}  # per group: (p * s, p . z)
    for i, pc in enumerate(lay.value_pieces()):
        if pc.group not in scaled_p:
            scaled_p[pc.group] = (p * lane_row(v_scales, pc.group),
                                  lane_pick(v_bias, pc.group))
        if pc.width == lay.value_words:
            slab_words = words
        else:
            slab_words = parts["value_codes"][:, pc.word : pc.word + pc.width]
        p_scaled, p_zero = scaled_p[pc.group]
        part = dot(p_scaled, slab_codes(slab_words, cfg.value_bits, pc.slab)) + p_zero
        acc_ref[i] = alpha * acc_ref[i] + part


def _tpu_kernel(lengths_ref: Any, layer_ref: Any, *refs_and_scratch: Any,
                names: Sequence[str], lay: Layout, blocks_per_step: int, steps: int,
                paged: bool) -> None:
    del layer_ref  # used by the index maps only
    if paged:  # the block table: read by the index maps only
        refs_and_scratch = refs_and_scratch[1:]
    n_in = len(names)
    refs = dict(zip(names, refs_and_scratch[:n_in], strict=True))
    o_ref, lse_ref, sc_ref, m_ref, l_ref, acc_ref, *scratch = refs_and_scratch[n_in:]
    wide_names = [n for n in names if not n.startswith("q") and _needs_widening(refs[n])]
    wide = dict(zip(wide_names, scratch[: len(wide_names)], strict=True))
    part_names = [p.name for f in lay.fields.values() if f.name in refs for p in f.parts
                  if p.size]
    parts = dict(zip(part_names, scratch[len(wide_names):], strict=True))
    b, split, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(step == 0)
    def _init() -> None:
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    n_blocks = lax.div(lengths_ref[b], lay.r)  # lengths >= 0: no floor-division signs
    first = (split * steps + step) * blocks_per_step

    @pl.when(first < n_blocks)
    def _widen() -> None:
        # 16- and 8-bit fields to 32 bits once per step: Mosaic slices 32-bit tiles at
        # any row, narrower ones only at whole packed tiles.
        for name, dst in wide.items():
            dst[...] = refs[name][...].astype(dst.dtype)

    fields = {n: wide.get(n, refs[n]) for n in names if not n.startswith("q")}
    q_refs = {n: refs[n] for n in names if n.startswith("q")}

    def one(sub: Any, carry: Any) -> Any:
        @pl.when(first + sub < n_blocks)
        def _() -> None:
            _tpu_unpack_block(fields, sub, lay, parts)
            _tpu_block(parts, q_refs, lay, sc_ref, m_ref, l_ref, acc_ref, first + sub)

        return carry

    lax.fori_loop(0, blocks_per_step, one, 0)

    @pl.when(step == steps - 1)
    def _finish() -> None:
        total = l_ref[...]
        safe = jnp.where(total > 0, total, 1.0)
        inv = 1.0 / safe
        for i, pc in enumerate(lay.value_pieces()):
            o_ref[:, pc.start : pc.start + pc.width] = acc_ref[i] * inv
        lse_ref[...] = jnp.where(total > 0, m_ref[...] + jnp.log(safe), -jnp.inf)


def _needs_widening(x: Any) -> bool:
    return jnp.dtype(x.dtype).itemsize < 4


def _wide_dtype(dtype: Any) -> Any:
    return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else jnp.int32


def _part_scratch(lay: Layout, present: Sequence[str]) -> list[Any]:
    """VMEM scratch for one block's parts, in `_tpu_kernel`'s order."""
    out = []
    for field in lay.fields.values():
        if field.name not in present:
            continue
        for part in field.parts:
            if not part.size:
                continue
            if part.name == "key_permutation":
                k = lay.perm_per_word
                out.append(pltpu.VMEM((k, lay.d // k), jnp.int32))
            elif field.dtype == "uint32":
                out.append(pltpu.VMEM(part.shape, jnp.uint32))
            else:
                out.append(pltpu.VMEM(part.shape, jnp.float32))
    return out


def _tpu_blocks_per_step(nb: int, cap: int, fields: Sequence[tuple[int, int]]) -> int:
    """Blocks a grid step DMAs: the smallest divisor of ``nb`` from ``cap`` up whose
    rows fill whole packed tiles of every field ((rows, itemsize) pairs: 8 rows of
    32-bit, 16 of 16-bit, 32 of 8-bit elements), else all ``nb`` blocks (a block
    shape equal to the array's is always allowed)."""
    for s in range(min(cap, nb), nb + 1):
        if nb % s == 0 and all(s * rows % (32 // size) == 0 for rows, size in fields):
            return s
    return nb


def call_tpu(inputs: dict[str, jax.Array], lengths: jax.Array, layer_index: jax.Array,
              lay: Layout, *, num_splits: int, blocks_per_step: int,
              interpret: Any, block_table: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The TPU kernel over the stacked fields ([L, B, H, NB * rows, 128]): layer
    ``layer_index`` is read in place, by the index maps (scalar prefetch), S blocks
    (S * rows rows of each field) a grid step.

    Paged (``block_table`` [B, MB]; fields are pools [L, P, H, rows, 128]): the table is
    scalar-prefetched too (flattened) and a grid step reads one page, the one
    ``block_table[b, step]`` names (`_page_of`): no gather, no copy."""
    names = tuple(inputs)
    arrays = [inputs[n] for n in names]
    cache_names = [n for n in names if not n.startswith("q")]
    paged = block_table is not None
    h = inputs["value_codes"].shape[2]
    if paged:
        b, nb = block_table.shape
        s = 1
    else:
        b = inputs["value_codes"].shape[1]
        nb = inputs["value_codes"].shape[3] // lay.fields["value_codes"].rows
        s = _tpu_blocks_per_step(nb, blocks_per_step, [
            (lay.fields[n].rows, jnp.dtype(inputs[n].dtype).itemsize) for n in cache_names])
    total_steps = nb // s
    num_splits = max(1, min(num_splits, total_steps))
    steps = pl.cdiv(total_steps, num_splits)

    def block_step(bi: Any, si: Any, ti: Any, ln_ref: Any) -> Any:
        """The step this grid point reads, clamped to the last one holding valid blocks
        (so later steps re-use the resident buffer: no DMA)."""
        valid_steps = lax.div(lax.div(ln_ref[bi], lay.r) + (s - 1), s)
        last = jnp.clip(valid_steps - 1, 0, total_steps - 1)
        return jnp.minimum(si * steps + ti, last)

    def _page_of(bi: Any, si: Any, ti: Any, ln: Any, table: Any) -> Any:
        """The page holding the block this grid point reads (the block table read)."""
        return table[bi * nb + block_step(bi, si, ti, ln)]

    def spec(name: str, x: jax.Array) -> pl.BlockSpec:
        if name.startswith("q"):  # [B, H, ...]: once per (sequence, head)
            zeros = (0,) * (x.ndim - 2)
            return pl.BlockSpec((None, None, *x.shape[2:]),
                                lambda bi, hi, si, ti, ln, li, *tb: (bi, hi, *zeros))
        if paged:  # pool [L, P, H, rows, 128]: one page a step
            return pl.BlockSpec(
                (None, None, None, lay.fields[name].rows, LANES),
                lambda bi, hi, si, ti, ln, li, tb: (li[0], _page_of(bi, si, ti, ln, tb), hi,
                                                    0, 0))
        return pl.BlockSpec(
            (None, None, None, s * lay.fields[name].rows, LANES),
            lambda bi, hi, si, ti, ln, li: (li[0], bi, hi, block_step(bi, si, ti, ln), 0),
        )

    pieces = lay.value_pieces()

    def split_out(bi: Any, hi: Any, si: Any, ti: Any, ln: Any, li: Any,
                  *tb: Any) -> tuple[Any, ...]:
        return (bi, hi, si, 0, 0)

    out_specs = (
        pl.BlockSpec((None, None, None, lay.gq, lay.d), split_out),
        pl.BlockSpec((None, None, None, lay.gq, 1), split_out),
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3 if paged else 2,
        grid=(b, h, num_splits, steps),
        in_specs=[spec(n, x) for n, x in zip(names, arrays, strict=True)],
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((lay.gq, lay.r), jnp.float32),  # scores of one block
            pltpu.VMEM((lay.gq, 1), jnp.float32),  # running max
            pltpu.VMEM((lay.gq, 1), jnp.float32),  # running sum
            pltpu.VMEM((len(pieces), lay.gq, pieces[0].width), jnp.float32),  # output slabs
            *[pltpu.VMEM((s * lay.fields[n].rows, LANES), _wide_dtype(inputs[n].dtype))
              for n in cache_names if _needs_widening(inputs[n])],  # 32-bit step tiles
            *_part_scratch(lay, cache_names),  # one block's parts
        ],
    )
    kernel = functools.partial(_tpu_kernel, names=names, lay=lay, blocks_per_step=s,
                               steps=steps, paged=paged)
    prefetch = (lengths, layer_index.reshape(1))
    if paged:
        prefetch = (*prefetch, block_table.reshape(-1))
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct((b, h, num_splits, lay.gq, lay.d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, num_splits, lay.gq, 1), jnp.float32),
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        cost_estimate=cost_estimate(inputs, lay, b, h, num_splits,
                                    pages_read=(min(b * nb, inputs["value_codes"].shape[1])
                                                if paged else None)),
        name="mixkvq_decode_attention_tpu",
    )(*prefetch, *arrays)
    return out, lse[..., 0]


