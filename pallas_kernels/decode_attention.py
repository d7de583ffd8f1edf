"""Pallas decode attention over the packed low-bit KV cache (TPU Mosaic and GPU Triton).

One query token per sequence (C == 1). Every program owns one (sequence, KV head,
sequence split) and all ``Gq`` query heads of that KV head (GQA), streams the split's
quantized blocks once with an online softmax and writes a normalized partial result
and its log-sum-exp. The wrapper merges the splits and the residual window (plain jnp:
at most R - 1 full-precision tokens) by log-sum-exp, so the result equals
`mixkvq_jax.attention.history_attention_xla`.

Nothing dequantized is written to HBM: integer codes are unpacked in VMEM / registers
with one shift and one mask per planar slab (`mixkvq_jax.quant`), and

  keys    score_t = sum_d (q_d * s_dg) * c_dt + sum_d q_d * z_dg     (g = token t's group)
  values  out_e   = sum_t (p_t * s_tg) * c_te + sum_t p_t * z_tg     (g = channel e's group)

**Channel permutation.** MixKVQ stores a per-block channel order, so each block needs
the query gathered by it (``q[..., perm]``). GPU: gathered in the kernel with pointer
loads from the tiny query (L1/L2-resident), reading only the D permutation bytes per
block. TPU: gathered by the wrapper (one XLA gather, [B, H, NB, Gq, D] float32, split
per key tier), because Mosaic has no general lane gather and the exact alternative, a
one-hot [D, D] matmul per block, costs a D x D compare plus an MXU weight load per
block in a kernel whose VPU already does the unpacking. The price is Gq * D * 4 bytes
per block and head written and read (2 KiB at Gq 4, D 128, against about 14 KiB for a
MixKVQ block), counted in the benchmark's bytes; presets without a stored permutation
pass the query once per (sequence, head) instead.

**Attention sinks** (``config.sink_tokens`` = S > 0): both bodies mask the first S
rows of each sequence's first block; the wrapper attends to the exact sink copies in
plain jnp, like the residual window.

**TPU (Mosaic).** Grid (B, H, splits, steps); each step DMAs ``blocks_per_step``
blocks (double-buffered by the Pallas pipeline). Lengths are scalar-prefetched; the
index map clamps the block index to the sequence's last valid step, so steps past the
length re-use the resident buffer (no DMA) and ``pl.when`` skips their compute. Scores
are built in natural orientation ([Gq, R], tokens on lanes): one MXU dot per planar
slab against the scale-folded query, accumulated into a VMEM score row at the slab's
lane offset; value scales fold into the probabilities, one dot per value slab into a
per-slab VMEM accumulator. Scale columns are turned into lane rows with a one-hot
NT-matmul (exact), so no transpose or unaligned value slice is needed.

**GPU (Triton).** Grid (B, H, splits); each program loops over its valid blocks only
(dynamic trip count, so blocks past the length are never read). Triton cannot slice
register tensors, so a tier's slabs are unpacked at once with a broadcast shift and a
reshape into natural token order ([n, k, W] -> [n, R]) and the key scales / zeros are
applied to the codes in registers (a multiply-add per code, 1 / Gq of the product
work). Products are fp32 broadcast-multiply-reduce: exact fp32 like the XLA path (no
TF32), no 16 x 16 minimum MMA tile (Gq is often 4), and Triton's power-of-two shapes
hold by splitting channel tiers into power-of-two pieces. Values: one product per
planar value slab with the value scales folded into the probabilities, as on TPU.

**Verified here** (CPU only): both bodies in interpret mode against the XLA oracle, and
lowering for ``platforms=["tpu"]`` / ``lowering_platforms=("cuda",)`` with the embedded
Mosaic / Triton module passing its dialect verifiers. Not verifiable without the
devices: Mosaic's layout passes and Triton's compilation, which run at compile time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from mixkvq_jax.attention import Partial, merge_partials
from mixkvq_jax.cache import LayerKVCache, from_bits, layer_at
from mixkvq_jax.config import KVQuantConfig

BACKENDS = ("tpu", "gpu")
_HIGHEST = lax.Precision.HIGHEST
# Largest fp32 broadcast product (elements) one Triton program forms at a time.
_GPU_MAX_PRODUCT = 8192


# ---- static plan ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tier:
    """One quantized key tier: ``n`` channels at ``bits``, ``words`` uint32 per channel."""

    bits: int
    n: int
    words: int  # W = R * bits / 32 tokens per slab


@dataclasses.dataclass(frozen=True)
class _Piece:
    """A run of ``width`` tokens (keys) or channels (values) inside one planar slab and
    one quantization group: slab ``slab`` (shift ``bits * slab``), word offset ``word``."""

    start: int
    width: int
    slab: int
    word: int
    group: int


def _pieces(length: int, words: int, group_size: int, width: int) -> tuple[_Piece, ...]:
    """Split ``length`` packed positions (``words`` per slab) into runs of ``width``
    positions that stay inside one slab and one group."""
    out = []
    for start in range(0, length, width):
        out.append(_Piece(start, width, start // words, start % words, start // group_size))
    return tuple(out)


def _channel_chunks(n: int, cap: int, pow2: bool) -> tuple[tuple[int, int], ...]:
    """(offset, size) chunks covering ``n`` channels: sizes <= cap, powers of two if asked."""
    chunks, offset = [], 0
    while offset < n:
        size = min(cap, n - offset)
        if pow2:
            size = 1 << (size.bit_length() - 1)
        chunks.append((offset, size))
        offset += size
    return tuple(chunks)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


# ---- support check ----------------------------------------------------------------------
def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        platform = jax.default_backend()
        return "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"Pallas backend {backend!r} is unknown; use one of {BACKENDS}")
    return backend


def unsupported_reason(
    q: jax.Array, layer: LayerKVCache, config: KVQuantConfig, backend: str | None = None,
    *, layer_index: Any = None,
) -> str | None:
    """Why the Pallas decode kernel cannot run this call (None: it can).

    Checks static shapes and the config only, so it is cheap and jit-safe.
    ``q`` is [B, C, Hq, D]; ``layer`` one layer of the cache (no leading L axis) or,
    with ``layer_index``, the stacked cache.
    """
    if q.ndim != 4:
        return f"q must be [batch, tokens, q_heads, head_dim], got shape {q.shape}"
    b, c, hq, d = q.shape
    if c != 1:
        return (f"the decode kernel takes one query token per sequence (C == 1); got a "
                f"chunk of C={c}, which the XLA path handles")
    if d != config.head_dim:
        return f"q head_dim {d} != config.head_dim {config.head_dim}"
    if config.uses_kv_pareto_options:
        return (f"key/value granularity {config.effective_key_granularity}/"
                f"{config.effective_value_granularity}"
                f"{' with K-smoothing' if config.smooths_keys else ''} is served by the XLA "
                "path (the kernel reads per_block scales only)")
    stacked = layer_index is not None
    if layer.residual_keys.ndim != 4 + stacked:
        return ("layer must be the stacked cache ([L, B, H, ...] arrays) with layer_index"
                if stacked else
                "layer must be one layer's cache ([B, H, ...] arrays, no leading layer axis)")
    h = layer.residual_keys.shape[1 + stacked]
    if hq % h:
        return f"{hq} query heads are not a multiple of {h} KV heads"
    platform = jax.default_backend()
    if backend is None and platform not in ("tpu", "gpu", "cuda", "rocm", "cpu"):
        return f"no Pallas decode kernel for platform {platform!r} (TPU and GPU only)"
    backend = _resolve_backend(backend)
    if backend == "gpu":
        dims = {"residual_length": config.residual_length, "head_dim": config.head_dim}
        if config.key_tiers:
            dims["key_group_size"] = config.key_group_size
        if config.quantizes_values:
            dims["value_group_size"] = config.value_group_size
        bad = {k: v for k, v in dims.items() if not _pow2(v)}
        if bad:
            return f"the Triton kernel needs power-of-two sizes, got {bad}"
    return None


# ---- small in-kernel helpers ------------------------------------------------------------
def _codes(words: jax.Array, bits: int, slab: int) -> jax.Array:
    """Codes of planar slab ``slab`` from uint32 ``words``, as float32."""
    shifted = words >> jnp.uint32(bits * slab) if slab else words
    c = shifted & jnp.uint32((1 << bits) - 1)
    return c.astype(jnp.int32).astype(jnp.float32)  # uint -> float is not lowered on TPU


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, K] x [K, N] float32 on the MXU at full fp32 precision."""
    return jnp.dot(a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _one_hot_row(n: int, index: int) -> jax.Array:
    """[1, n] float32 with a 1 at ``index`` (built from iota: no captured constants)."""
    return (lax.broadcasted_iota(jnp.int32, (1, n), 1) == index).astype(jnp.float32)


def _lane_row(tile: jax.Array, column: int) -> jax.Array:
    """Column ``column`` of ``tile`` [n, m] as a lane row [1, n] (exact one-hot NT dot)."""
    return lax.dot_general(
        _one_hot_row(tile.shape[1], column), tile, (((1,), (1,)), ((), ())),
        precision=_HIGHEST, preferred_element_type=jnp.float32,
    )


def _lane_pick(x: jax.Array, column: int) -> jax.Array:
    """Column ``column`` of ``x`` [m, n] as [m, 1] (a lane reduction)."""
    return jnp.sum(x * _one_hot_row(x.shape[1], column), axis=1, keepdims=True)


# ---- the kernel layout shared by both backends ------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static description of one kernel instance (hashable: it keys the jit cache)."""

    config: KVQuantConfig
    gq: int  # query heads per KV head, padded
    backend: str

    @property
    def permuted(self) -> bool:
        """Blocks store a channel permutation: the query is gathered per block (by the
        wrapper on TPU, in the kernel on GPU)."""
        return self.config.stores_permutation

    @property
    def r(self) -> int:
        return self.config.residual_length

    @property
    def d(self) -> int:
        return self.config.head_dim

    @property
    def n_full(self) -> int:
        return self.config.key_channels_full

    @property
    def tiers(self) -> tuple[_Tier, ...]:
        r = self.config.residual_length
        return tuple(_Tier(b, n, r * b // 32) for b, n in self.config.key_tiers)

    @property
    def n_groups(self) -> int:
        return self.r // self.config.key_group_size

    def key_pieces(self, tier: _Tier) -> tuple[_Piece, ...]:
        width = min(tier.words, self.config.key_group_size)
        return _pieces(self.r, tier.words, self.config.key_group_size, width)

    @property
    def value_words(self) -> int:
        return self.d * self.config.value_bits // 32

    def value_pieces(self) -> tuple[_Piece, ...]:
        """Output channel runs: one per value slab (or slab part inside one group)."""
        cfg = self.config
        if not cfg.quantizes_values:
            width = self.d
            if self.backend == "gpu":
                width = max(1, min(self.d, _GPU_MAX_PRODUCT // (self.gq * self.r)))
                width = 1 << (width.bit_length() - 1)
            return _pieces(self.d, self.d, self.d, width)
        width = min(self.value_words, cfg.value_group_size)
        if self.backend == "gpu":
            cap = max(1, _GPU_MAX_PRODUCT // (self.gq * self.r))
            width = min(width, 1 << (cap.bit_length() - 1))
        return _pieces(self.d, self.value_words, cfg.value_group_size, width)

    def gpu_chunks(self, n: int) -> tuple[tuple[int, int], ...]:
        cap = max(1, _GPU_MAX_PRODUCT // (self.gq * self.r))
        return _channel_chunks(n, cap, pow2=True)


def _cache_inputs(layer: LayerKVCache, config: KVQuantConfig) -> dict[str, jax.Array]:
    """The block arrays the kernel reads, by name (empty ones left out): with a stacked
    cache, the whole stacks ([L, B, H, NB, ...]), which the kernel reads in place."""
    arrays: dict[str, jax.Array] = {}
    if config.key_channels_full:
        arrays["key_full"] = layer.key_full
    for t, (codes, scales, zeros) in enumerate(
        zip(layer.key_codes, layer.key_scales, layer.key_zeros, strict=True)
    ):
        arrays[f"key_codes{t}"] = codes
        arrays[f"key_scales{t}"] = scales
        arrays[f"key_zeros{t}"] = zeros
    arrays["value_codes"] = layer.value_codes
    if config.quantizes_values:
        arrays["value_scales"] = layer.value_scales
        arrays["value_zeros"] = layer.value_zeros
    if config.stores_permutation:
        arrays["key_permutation"] = layer.key_permutation
    return arrays


def _query_inputs(qg: jax.Array, lay: _Layout) -> dict[str, jax.Array]:
    """The query as the kernel reads it, once per (sequence, KV head).

    ``qg`` is [B, H, Gq, D] float32 (scaled, padded). GPU, and TPU with a stored
    channel permutation (the kernel permutes it per block): ``q`` itself. TPU without
    one: per-tier ``q_full`` / ``q{t}`` [B, H, Gq, n_t].
    """
    if lay.backend == "gpu" or lay.permuted:
        return {"q": qg}
    out: dict[str, jax.Array] = {}
    offset = lay.n_full
    if lay.n_full:
        out["q_full"] = qg[..., :offset]
    for t, tier in enumerate(lay.tiers):
        out[f"q{t}"] = qg[..., offset : offset + tier.n]
        offset += tier.n
    return out


# ---- TPU kernel ---------------------------------------------------------------------------
def _mask_sinks(scores: jax.Array, block: Any, lay: _Layout) -> jax.Array:
    """Scores [Gq, R] of cache block ``block`` with the sink rows of block 0 at -inf
    (their exact copies are attended outside the kernel)."""
    s = lay.config.sink_tokens
    if not s:
        return scores
    token = block * lay.r + lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    return jnp.where(token >= s, scores, -jnp.inf)


def _permuted_tier_queries(refs: dict[str, Any], sub: Any, lay: _Layout) -> dict[str, jax.Array]:
    """The query in block ``sub``'s channel order, per key tier: ``q_full`` / ``q{t}``
    [Gq, n_t].

    Mosaic has no lane gather, so the permutation is a one-hot [D, D] matrix
    (``onehot[d, c] = perm[c] == d``, exact) applied on the MXU, then each tier's
    columns are picked by a constant selection matrix (no unaligned lane slices). This
    costs a D x D compare and small dots per block, and no HBM traffic.
    """
    d = lay.d
    perm = refs["key_permutation"][pl.ds(sub, 1), :].astype(jnp.int32)  # [1, D]
    rows = lax.broadcasted_iota(jnp.int32, (d, d), 0)
    onehot = (rows == perm).astype(jnp.float32)  # [D (channel), D (position)]
    qp = _dot(refs["q"][...], onehot)  # [Gq, D]: q at each permuted position
    out: dict[str, jax.Array] = {}
    offset = 0
    names = (["q_full"] if lay.n_full else []) + [f"q{t}" for t in range(len(lay.tiers))]
    counts = ([lay.n_full] if lay.n_full else []) + [tier.n for tier in lay.tiers]
    for name, n in zip(names, counts, strict=True):
        select = (lax.broadcasted_iota(jnp.int32, (d, n), 0)
                  == lax.broadcasted_iota(jnp.int32, (d, n), 1) + offset)
        out[name] = _dot(qp, select.astype(jnp.float32))
        offset += n
    return out


def _tpu_block(refs: dict[str, Any], sub: Any, lay: _Layout, sc_ref: Any, m_ref: Any,
               l_ref: Any, acc_ref: Any, block: Any) -> None:
    """Fold block ``sub`` of the current step (cache block ``block``) into the running
    softmax state (TPU)."""
    cfg = lay.config
    tier_queries = _permuted_tier_queries(refs, sub, lay) if lay.permuted else None

    def query(name: str) -> jax.Array:
        return tier_queries[name] if lay.permuted else refs[name][...]

    # Scores [Gq, R]: the full-precision tier, then one dot per planar slab and tier.
    if lay.n_full:
        sc_ref[...] = _dot(query("q_full"), refs["key_full"][sub].astype(jnp.float32))
    else:
        sc_ref[...] = jnp.zeros(sc_ref.shape, jnp.float32)
    for t, tier in enumerate(lay.tiers):
        q_t = query(f"q{t}")  # [Gq, n]
        scales = refs[f"key_scales{t}"][sub].astype(jnp.float32)  # [n, NG]
        zeros = refs[f"key_zeros{t}"][sub].astype(jnp.float32)
        bias = _dot(q_t, zeros)  # [Gq, NG]: sum_d q_d z_dg, every group
        words = refs[f"key_codes{t}"][sub]  # [n, W] uint32
        scaled_q: dict[int, tuple[jax.Array, jax.Array]] = {}  # per group: (q * s, q . z)
        for pc in lay.key_pieces(tier):
            if pc.group not in scaled_q:
                scaled_q[pc.group] = (q_t * _lane_row(scales, pc.group),
                                      _lane_pick(bias, pc.group))
            if pc.width == tier.words:
                slab_words = words
            else:
                slab_words = refs[f"key_codes{t}"][sub, :, pc.word : pc.word + pc.width]
            q_scaled, q_zero = scaled_q[pc.group]
            part = _dot(q_scaled, _codes(slab_words, tier.bits, pc.slab)) + q_zero
            cols = slice(pc.start, pc.start + pc.width)
            sc_ref[:, cols] = sc_ref[:, cols] + part

    # Online softmax (the whole block is valid, sinks aside: blocks hold R tokens each).
    scores = _mask_sinks(sc_ref[...], block, lay)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(scores - m_new)  # [Gq, R]
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new

    # Values: one dot per planar slab; per-token scales fold into p.
    if not cfg.quantizes_values:
        values = refs["value_codes"][sub].astype(jnp.float32)  # [R, D]
        acc_ref[0] = alpha * acc_ref[0] + _dot(p, values)
        return
    v_scales = refs["value_scales"][sub].astype(jnp.float32)  # [R, NGv]
    v_bias = _dot(p, refs["value_zeros"][sub].astype(jnp.float32))  # [Gq, NGv]
    words = refs["value_codes"][sub]  # [R, Dv]
    scaled_p: dict[int, tuple[jax.Array, jax.Array]] = {}  # per group: (p * s, p . z)
    for i, pc in enumerate(lay.value_pieces()):
        if pc.group not in scaled_p:
            scaled_p[pc.group] = (p * _lane_row(v_scales, pc.group),
                                  _lane_pick(v_bias, pc.group))
        if pc.width == lay.value_words:
            slab_words = words
        else:
            slab_words = refs["value_codes"][sub, :, pc.word : pc.word + pc.width]
        p_scaled, p_zero = scaled_p[pc.group]
        part = _dot(p_scaled, _codes(slab_words, cfg.value_bits, pc.slab)) + p_zero
        acc_ref[i] = alpha * acc_ref[i] + part


def _tpu_kernel(lengths_ref: Any, layer_ref: Any, *refs_and_scratch: Any,
                names: Sequence[str], lay: _Layout, blocks_per_step: int, steps: int) -> None:
    del layer_ref  # used by the index maps only
    n_in = len(names)
    refs = dict(zip(names, refs_and_scratch[:n_in], strict=True))
    o_ref, lse_ref, sc_ref, m_ref, l_ref, acc_ref = refs_and_scratch[n_in:]
    b, split, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(step == 0)
    def _init() -> None:
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    n_blocks = lax.div(lengths_ref[b], lay.r)  # lengths >= 0: no floor-division signs
    first = (split * steps + step) * blocks_per_step

    def one(sub: Any, carry: Any) -> Any:
        @pl.when(first + sub < n_blocks)
        def _() -> None:
            _tpu_block(refs, sub, lay, sc_ref, m_ref, l_ref, acc_ref, first + sub)

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


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _cost_estimate(inputs: dict[str, jax.Array], lay: _Layout, batch: int, heads: int,
                   num_splits: int) -> pl.CostEstimate:
    """What one call reads and computes when every block of the layer is in use (the
    kernel reads one layer of each stacked cache array, plus the query once)."""
    nb = inputs["value_codes"].shape[3]
    per_layer = sum(x.nbytes // x.shape[0] for name, x in inputs.items()
                    if not name.startswith("q"))
    queries = sum(x.nbytes for name, x in inputs.items() if name.startswith("q"))
    outputs = batch * heads * num_splits * lay.gq * (lay.d + 1) * 4
    blocks = batch * heads * nb
    flops = blocks * 4 * lay.gq * lay.r * lay.d
    if lay.permuted:
        flops += blocks * 2 * lay.gq * lay.d * lay.d * 2
    return pl.CostEstimate(flops=int(flops), transcendentals=int(blocks * lay.gq * lay.r),
                           bytes_accessed=int(per_layer + queries + outputs))


def _call_tpu(inputs: dict[str, jax.Array], lengths: jax.Array, layer_index: jax.Array,
              lay: _Layout, *, num_splits: int, blocks_per_step: int,
              interpret: Any) -> tuple[jax.Array, ...]:
    """The TPU kernel over stacked cache arrays ([L, B, H, NB, ...]): layer
    ``layer_index`` is read in place, by the index maps (scalar prefetch)."""
    names = tuple(inputs)
    arrays = [inputs[n] for n in names]
    b, h, nb = inputs["value_codes"].shape[1:4]
    s = _divisor_at_most(nb, blocks_per_step)
    total_steps = nb // s
    num_splits = max(1, min(num_splits, total_steps))
    steps = pl.cdiv(total_steps, num_splits)

    def block_step(bi: Any, si: Any, ti: Any, ln_ref: Any) -> Any:
        """The step this grid point reads, clamped to the last one holding valid blocks
        (so later steps re-use the resident buffer: no DMA)."""
        valid_steps = lax.div(lax.div(ln_ref[bi], lay.r) + (s - 1), s)
        last = jnp.clip(valid_steps - 1, 0, total_steps - 1)
        return jnp.minimum(si * steps + ti, last)

    def spec(name: str, x: jax.Array) -> pl.BlockSpec:
        if name.startswith("q"):  # [B, H, ...]: once per (sequence, head)
            zeros = (0,) * (x.ndim - 2)
            return pl.BlockSpec((None, None, *x.shape[2:]),
                                lambda bi, hi, si, ti, ln, li: (bi, hi, *zeros))
        zeros = (0,) * (x.ndim - 4)
        return pl.BlockSpec(
            (None, None, None, s, *x.shape[4:]),
            lambda bi, hi, si, ti, ln, li: (li[0], bi, hi, block_step(bi, si, ti, ln), *zeros),
        )

    pieces = lay.value_pieces()

    def split_out(bi: Any, hi: Any, si: Any, ti: Any, ln: Any, li: Any) -> tuple[Any, ...]:
        return (bi, hi, si, 0, 0)

    out_specs = (
        pl.BlockSpec((None, None, None, lay.gq, lay.d), split_out),
        pl.BlockSpec((None, None, None, lay.gq, 1), split_out),
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, num_splits, steps),
        in_specs=[spec(n, x) for n, x in zip(names, arrays, strict=True)],
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((lay.gq, lay.r), jnp.float32),  # scores of one block
            pltpu.VMEM((lay.gq, 1), jnp.float32),  # running max
            pltpu.VMEM((lay.gq, 1), jnp.float32),  # running sum
            pltpu.VMEM((len(pieces), lay.gq, pieces[0].width), jnp.float32),  # output slabs
        ],
    )
    kernel = functools.partial(_tpu_kernel, names=names, lay=lay, blocks_per_step=s,
                               steps=steps)
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
        cost_estimate=_cost_estimate(inputs, lay, b, h, num_splits),
        name="mixkvq_decode_attention_tpu",
    )(lengths, layer_index.reshape(1), *arrays)
    return out, lse[..., 0]


# ---- GPU (Triton) kernel ------------------------------------------------------------------
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


def _gpu_block(refs: dict[str, Any], layer: Any, blk: Any, lay: _Layout,
               carry: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fold block ``blk`` of layer ``layer`` into (m [Gq], l [Gq], *acc [Gq, width])
    (GPU; the cache refs are [L, NB, ...] views of the stacks: pointer offsets)."""
    cfg = lay.config
    m_prev, l_prev, *acc = carry

    def cache(name: str, *index: Any) -> jax.Array:
        return refs[name][(layer, blk, *index)]

    def query(c0: int, n: int) -> jax.Array:
        """[Gq, n]: query channels at permuted positions c0 .. c0 + n of this block."""
        if not lay.permuted:
            return refs["q"][:, c0 : c0 + n]
        channels = cache("key_permutation", slice(c0, c0 + n)).astype(jnp.int32)  # [n]
        rows = lax.broadcasted_iota(jnp.int32, (lay.gq, n), 0)
        # A pointer gather from the tiny, cache-resident query (two same-shape index
        # arrays: Triton's lowering cannot mix a slice with an index array).
        return refs["q"][rows, jnp.broadcast_to(channels[None, :], (lay.gq, n))]

    scores = jnp.zeros((lay.gq, lay.r), jnp.float32)
    for c0, n in lay.gpu_chunks(lay.n_full):
        keys = cache("key_full", slice(c0, c0 + n)).astype(jnp.float32)  # [n, R]
        scores = scores + _fma_dot(query(c0, n), keys)
    if lay.tiers:
        g = cfg.key_group_size
        bias = jnp.zeros((lay.gq, lay.n_groups), jnp.float32)
        offset = lay.n_full
        for t, tier in enumerate(lay.tiers):
            for c0, n in lay.gpu_chunks(tier.n):
                q_t = query(offset + c0, n)
                rows = slice(c0, c0 + n)
                codes = _gpu_unpack_all(cache(f"key_codes{t}", rows), tier.bits)
                scales = cache(f"key_scales{t}", rows).astype(jnp.float32)
                zeros = cache(f"key_zeros{t}", rows).astype(jnp.float32)
                scores = scores + _fma_dot(q_t, codes * _gpu_tokens(scales, g))
                bias = bias + _fma_dot(q_t, zeros)
            offset += tier.n
        scores = scores + _gpu_tokens(bias, g)
    scores = _mask_sinks(scores, blk, lay)

    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(scores - m_new[:, None])
    l_new = alpha * l_prev + jnp.sum(p, axis=1)

    new_acc = []
    for i, pc in enumerate(lay.value_pieces()):
        if cfg.quantizes_values:
            words = cache("value_codes", slice(None), slice(pc.word, pc.word + pc.width))
            codes = _codes(words, cfg.value_bits, pc.slab)  # [R, width]
            v_scale = cache("value_scales", slice(None), pc.group).astype(jnp.float32)  # [R]
            v_zero = cache("value_zeros", slice(None), pc.group).astype(jnp.float32)
            part = _fma_dot(p * v_scale[None, :], codes)
            part = part + jnp.sum(p * v_zero[None, :], axis=1)[:, None]
        else:
            values = cache("value_codes", slice(None), slice(pc.start, pc.start + pc.width))
            part = _fma_dot(p, values.astype(jnp.float32))
        new_acc.append(alpha[:, None] * acc[i] + part)
    return (m_new, l_new, *new_acc)


def _gpu_kernel(lengths_ref: Any, layer_ref: Any, *refs_and_outs: Any, names: Sequence[str],
                lay: _Layout, blocks_per_split: int) -> None:
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
    m, total, *acc = lax.fori_loop(start, stop,
                                   lambda i, c: _gpu_block(refs, layer, i, lay, c), carry)
    safe = jnp.where(total > 0, total, 1.0)
    for pc, a in zip(pieces, acc, strict=True):
        o_ref[:, pc.start : pc.start + pc.width] = a / safe[:, None]
    lse_ref[...] = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)


def _call_gpu(inputs: dict[str, jax.Array], lengths: jax.Array, layer_index: jax.Array,
              lay: _Layout, *, num_splits: int, interpret: Any) -> tuple[jax.Array, ...]:
    """The Triton kernel over stacked cache arrays ([L, B, H, NB, ...]): each program
    gets [L, NB, ...] views of its (sequence, head) and offsets them by the layer."""
    names = tuple(inputs)
    arrays = [inputs[n] for n in names]
    b, h, nb = inputs["value_codes"].shape[1:4]
    num_splits = max(1, min(num_splits, nb))
    per_split = pl.cdiv(nb, num_splits)

    def spec(name: str, x: jax.Array) -> pl.BlockSpec:
        if name.startswith("q"):  # [B, H, ...]
            zeros = (0,) * (x.ndim - 2)
            return pl.BlockSpec((None, None, *x.shape[2:]), lambda bi, hi, si: (bi, hi, *zeros))
        zeros = (0,) * (x.ndim - 3)
        return pl.BlockSpec((x.shape[0], None, None, *x.shape[3:]),
                            lambda bi, hi, si: (0, bi, hi, *zeros))

    kernel = functools.partial(_gpu_kernel, names=names, lay=lay, blocks_per_split=per_split)
    return pl.pallas_call(
        kernel,
        grid=(b, h, num_splits),
        in_specs=[pl.BlockSpec((b,), lambda bi, hi, si: (0,)),
                  pl.BlockSpec((1,), lambda bi, hi, si: (0,)),
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
        cost_estimate=_cost_estimate(inputs, lay, b, h, num_splits),
        name="mixkvq_decode_attention_gpu",
    )(lengths, layer_index.reshape(1), *arrays)


# ---- wrapper ------------------------------------------------------------------------------
def _merge_splits(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-sum-exp merge over axis 2: out [B, H, S, G, D], lse [B, H, S, G]."""
    m = jnp.max(lse, axis=2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe[:, :, None])  # exp(-inf) = 0 for empty splits
    total = jnp.sum(w, axis=2)
    denom = jnp.where(total > 0, total, 1.0)
    merged = jnp.sum(out * w[..., None], axis=2) / denom[..., None]
    return merged, jnp.where(total > 0, m_safe + jnp.log(denom), -jnp.inf)


def _dense_partial(qg: jax.Array, keys: jax.Array, values: jax.Array,
                   valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention of qg [B, H, G, D] over full-precision keys / values [B, H, T, D]
    (the residual window, the sinks); ``valid`` [B, T] marks the tokens that count."""
    keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)
    scores = jnp.einsum("bhgd,bhtd->bhgt", qg, keys, precision=_HIGHEST)
    valid = valid[:, None, None, :]
    m = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid, jnp.exp(scores - m_safe[..., None]), 0.0)
    total = jnp.sum(p, axis=-1)
    safe = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgt,bhtd->bhgd", p, values, precision=_HIGHEST) / safe[..., None]
    return out, jnp.where(total > 0, m_safe + jnp.log(safe), -jnp.inf)


def default_num_splits(batch: int, kv_heads: int, num_blocks: int, backend: str) -> int:
    """Sequence splits: 1 on TPU (B x H programs fill its cores); on GPU enough programs
    (about 264, two waves of a 132-SM H100) to fill the SMs at small batch."""
    if backend == "tpu":
        return 1
    return max(1, min(num_blocks, -(-264 // (batch * kv_heads))))


def cached_attention_pallas(
    q: jax.Array,
    layer: LayerKVCache,
    lengths: jax.Array,
    config: KVQuantConfig,
    *,
    scale: float,
    interpret: bool | Any = False,
    backend: str | None = None,
    num_splits: int | None = None,
    blocks_per_step: int = 8,
    layer_index: Any = None,
) -> Partial:
    """Decode attention of q [B, 1, Hq, D] over each sequence's first ``lengths`` tokens.

    Args:
      q: [B, 1, Hq, D] post-RoPE queries, Hq a multiple of the cache's KV heads H.
      layer: one layer's `LayerKVCache` (arrays [B, H, ...], no leading layer axis) or,
        with ``layer_index``, the stacked cache ([L, B, H, ...]).
      lengths: [B] int32 cached tokens per sequence.
      config: the cache's `KVQuantConfig`.
      scale: softmax scale.
      interpret: run the kernel in Pallas interpret mode (CPU tests); a
        ``pltpu.InterpretParams`` also works for the TPU kernel.
      backend: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton); default from
        `jax.default_backend` (CPU interprets the TPU kernel). Naming one explicitly
        also allows cross-platform lowering (`jax.export`) on a CPU host.
      num_splits: sequence splits per (sequence, head), merged by log-sum-exp.
      blocks_per_step: TPU only, cache blocks DMA'd per grid step.
      layer_index: with a stacked ``layer``, the layer to attend over (a traced int is
        fine). The kernel reads that layer of the stack in place (TPU: scalar prefetch
        into the index maps; GPU: a pointer offset): no per-layer copy of the cache.

    Returns:
      `Partial`: out [B, 1, Hq, D] float32 normalized, lse [B, 1, Hq] (-inf where a
      sequence has no cached token).
    """
    if backend is None and not interpret and jax.default_backend() == "cpu":
        raise ValueError(
            "Pallas decode attention needs a TPU or GPU to compile; on CPU use "
            "impl='pallas_interpret' (interpret mode) or impl='xla'"
        )
    backend = _resolve_backend(backend)
    reason = unsupported_reason(q, layer, config, backend, layer_index=layer_index)
    if reason is not None:
        raise ValueError(f"Pallas decode attention: {reason}")
    if layer_index is None:  # one layer: a stack of one (a free reshape)
        layer, layer_index = jax.tree.map(lambda x: x[None], layer), 0
    layer_index = jnp.asarray(layer_index, jnp.int32)
    # A stack in CPU bits form (`cache.to_bits`; interpret mode only: compiled TPU / GPU
    # programs carry floats) is read as floats.
    layer = from_bits(layer, config)
    b, _, hq, d = q.shape
    h = layer.residual_keys.shape[2]
    group = hq // h
    gq = -(-group // 8) * 8 if backend == "tpu" else 1 << (group - 1).bit_length()
    lay = _Layout(config, gq, backend)

    qg = (q[:, 0].astype(jnp.float32) * scale).reshape(b, h, group, d)
    qg_pad = jnp.pad(qg, ((0, 0), (0, 0), (0, gq - group), (0, 0)))
    inputs = {**_query_inputs(qg_pad, lay), **_cache_inputs(layer, config)}
    lengths = jnp.asarray(lengths, jnp.int32)
    nb = layer.value_codes.shape[3]
    splits = num_splits or default_num_splits(b, h, nb, backend)
    if backend == "tpu":
        out, lse = _call_tpu(inputs, lengths, layer_index, lay, num_splits=splits,
                             blocks_per_step=blocks_per_step, interpret=interpret)
    else:
        out, lse = _call_gpu(inputs, lengths, layer_index, lay, num_splits=splits,
                             interpret=interpret)
    out, lse = _merge_splits(out[:, :, :, :group], lse[:, :, :, :group])
    # The small per-layer arrays (residual window, sinks): this layer's slices.
    layer = layer_at(layer, layer_index)
    r = config.residual_length
    window = Partial(*_dense_partial(qg, layer.residual_keys, layer.residual_values,
                                     jnp.arange(r)[None, :] < (lengths % r)[:, None]))
    merged = merge_partials(Partial(out, lse), window)
    if config.sink_tokens:  # in the sink buffer once the first block is complete
        in_blocks = jnp.broadcast_to((lengths >= r)[:, None], (b, config.sink_tokens))
        merged = merge_partials(merged, Partial(*_dense_partial(
            qg, layer.sink_keys, layer.sink_values, in_blocks)))
    return Partial(merged.out.reshape(b, 1, hq, d), merged.lse.reshape(b, 1, hq))


def kernel_bytes_read(layer: LayerKVCache, lengths: Sequence[int], config: KVQuantConfig,
                      q_heads: int, backend: str | None = None) -> int:
    """HBM bytes one decode call reads (logical, before any TPU tile padding): the used
    blocks of every cache array, the residual window and the query; on TPU the query
    gathered per block by the permutation, on GPU the permutation itself."""
    backend = _resolve_backend(backend)
    b, h, nb = layer.value_codes.shape[:3]
    used = sum(min(int(n) // config.residual_length, nb) for n in lengths)
    per_block = sum(x.dtype.itemsize * math.prod(x.shape[3:])
                    for x in _cache_inputs(layer, config).values())
    q_bytes = (q_heads // h) * config.head_dim * 4
    if config.stores_permutation:
        per_block += config.head_dim * layer.key_permutation.dtype.itemsize
        if backend == "tpu":
            per_block += q_bytes
    window = 2 * config.residual_length * config.head_dim * jnp.dtype(config.full_dtype).itemsize
    return used * h * per_block + b * h * (window + q_bytes)


__all__: list[str] = [
    "BACKENDS", "cached_attention_pallas", "default_num_splits", "kernel_bytes_read",
    "unsupported_reason",
]
