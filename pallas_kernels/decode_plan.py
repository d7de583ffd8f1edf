"""What the Pallas decode-attention bodies share: the static plan of one kernel instance
(`Layout`: tiers, slabs, value pieces, the stored fields it reads), the support check,
small in-kernel helpers and the cost estimate.

Imports go one way: `decode_attention` (the wrapper) -> `decode_tpu` / `decode_gpu` (one
body each) -> this module -> `mixkvq_jax.layout` / `mixkvq_jax.config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixkvq_jax.cache import LayerKVCache
from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.layout import Field, block_fields, permutation_per_word

BACKENDS = ("tpu", "gpu")
HIGHEST = lax.Precision.HIGHEST
# Largest fp32 broadcast product (elements) one Triton program forms at a time.
GPU_MAX_PRODUCT = 8192


# ---- static plan ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tier:
    """One quantized key tier: ``n`` channels at ``bits``, ``words`` uint32 per channel."""

    bits: int
    n: int
    words: int  # W = R * bits / 32 tokens per slab


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of ``width`` tokens (keys) or channels (values) inside one planar slab and
    one quantization group: slab ``slab`` (shift ``bits * slab``), word offset ``word``."""

    start: int
    width: int
    slab: int
    word: int
    group: int


def pieces(length: int, words: int, group_size: int, width: int) -> tuple[Piece, ...]:
    """Split ``length`` packed positions (``words`` per slab) into runs of ``width``
    positions that stay inside one slab and one group."""
    out = []
    for start in range(0, length, width):
        out.append(Piece(start, width, start // words, start % words, start // group_size))
    return tuple(out)


def channel_chunks(n: int, cap: int, pow2: bool) -> tuple[tuple[int, int], ...]:
    """(offset, size) chunks covering ``n`` channels: sizes <= cap, powers of two if asked."""
    chunks, offset = [], 0
    while offset < n:
        size = min(cap, n - offset)
        if pow2:
            size = 1 << (size.bit_length() - 1)
        chunks.append((offset, size))
        offset += size
    return tuple(chunks)


def pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


# ---- support check ----------------------------------------------------------------------
def resolve_backend(backend: str | None) -> str:
    if backend is None:
        platform = jax.default_backend()
        return "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"Pallas backend {backend!r} is unknown; use one of {BACKENDS}")
    return backend


def unsupported_reason(
    q: jax.Array, layer: LayerKVCache, config: KVQuantConfig, backend: str | None = None,
    *, layer_index: Any = None, block_table: Any = None,
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
    if block_table is not None:
        rows = block_fields(config)["value_codes"].rows
        pool = layer.value_codes.shape[stacked:]
        if block_table.ndim != 2 or block_table.shape[0] != b or pool[1:3] != (h, rows):
            return (f"a paged cache needs a pool [P, H={h}, rows={rows}, 128] and a block "
                    f"table [B={b}, blocks]; got {pool} and {block_table.shape}")
    platform = jax.default_backend()
    if backend is None and platform not in ("tpu", "gpu", "cuda", "rocm", "cpu"):
        return f"no Pallas decode kernel for platform {platform!r} (TPU and GPU only)"
    backend = resolve_backend(backend)
    if backend == "tpu":
        # The TPU body cuts a part [a, w] out of its block's 128-lane rows by splitting
        # lanes ([w, 128] -> [128, w]); wider rows would need lanes merged.
        wide = sorted({p.name for f in block_fields(config).values() for p in f.parts
                       if p.size and (p.shape[1] > 128 or p.offset % p.shape[1])})
        if wide:
            return (f"the TPU kernel reads block parts at most 128 wide; {', '.join(wide)} "
                    f"are not (head_dim {config.head_dim}): the XLA path serves this config")
    if backend == "gpu":
        dims = {"residual_length": config.residual_length, "head_dim": config.head_dim}
        if config.key_tiers:
            dims["key_group_size"] = config.key_group_size
        if config.quantizes_values:
            dims["value_group_size"] = config.value_group_size
        bad = {k: v for k, v in dims.items() if not pow2(v)}
        if bad:
            return f"the Triton kernel needs power-of-two sizes, got {bad}"
    return None


# ---- small in-kernel helpers ------------------------------------------------------------
def slab_codes(words: jax.Array, bits: int, slab: int) -> jax.Array:
    """Codes of planar slab ``slab`` from uint32 ``words``, as float32."""
    shifted = words >> jnp.uint32(bits * slab) if slab else words
    c = shifted & jnp.uint32((1 << bits) - 1)
    return c.astype(jnp.int32).astype(jnp.float32)  # uint -> float is not lowered on TPU


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, K] x [K, N] float32 on the MXU at full fp32 precision."""
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def one_hot_row(n: int, index: int) -> jax.Array:
    """[1, n] float32 with a 1 at ``index`` (built from iota: no captured constants)."""
    return (lax.broadcasted_iota(jnp.int32, (1, n), 1) == index).astype(jnp.float32)


def lane_row(tile: jax.Array, column: int) -> jax.Array:
    """Column ``column`` of ``tile`` [n, m] as a lane row [1, n] (exact one-hot NT dot)."""
    return lax.dot_general(
        one_hot_row(tile.shape[1], column), tile, (((1,), (1,)), ((), ())),
        precision=HIGHEST, preferred_element_type=jnp.float32,
    )


def lane_pick(x: jax.Array, column: int) -> jax.Array:
    """Column ``column`` of ``x`` [m, n] as [m, 1] (a lane reduction)."""
    return jnp.sum(x * one_hot_row(x.shape[1], column), axis=1, keepdims=True)


# ---- the kernel layout shared by both backends ------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of one kernel instance (hashable: it keys the jit cache)."""

    config: KVQuantConfig
    gq: int  # query heads per KV head, padded
    backend: str

    @property
    def permuted(self) -> bool:
        """Blocks store a channel permutation: the kernel permutes the query per block
        (TPU: one-hot dots; GPU: pointer gathers)."""
        return self.config.stores_permutation

    @property
    def fields(self) -> dict[str, Field]:
        """The stored block fields (`mixkvq_jax.layout`)."""
        return block_fields(self.config)

    @property
    def perm_per_word(self) -> int:
        """Permutation indices per uint32 word after the key codes (4, or 1 if D > 256)."""
        return permutation_per_word(self.config)

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
    def tiers(self) -> tuple[Tier, ...]:
        r = self.config.residual_length
        return tuple(Tier(b, n, r * b // 32) for b, n in self.config.key_tiers)

    @property
    def n_groups(self) -> int:
        return self.r // self.config.key_group_size

    def key_pieces(self, tier: Tier) -> tuple[Piece, ...]:
        width = min(tier.words, self.config.key_group_size)
        return pieces(self.r, tier.words, self.config.key_group_size, width)

    @property
    def value_words(self) -> int:
        return self.d * self.config.value_bits // 32

    def value_pieces(self) -> tuple[Piece, ...]:
        """Output channel runs: one per value slab (or slab part inside one group)."""
        cfg = self.config
        if not cfg.quantizes_values:
            width = self.d
            if self.backend == "gpu":
                width = max(1, min(self.d, GPU_MAX_PRODUCT // (self.gq * self.r)))
                width = 1 << (width.bit_length() - 1)
            return pieces(self.d, self.d, self.d, width)
        width = min(self.value_words, cfg.value_group_size)
        if self.backend == "gpu":
            cap = max(1, GPU_MAX_PRODUCT // (self.gq * self.r))
            width = min(width, 1 << (cap.bit_length() - 1))
        return pieces(self.d, self.value_words, cfg.value_group_size, width)

    def gpu_chunks(self, n: int) -> tuple[tuple[int, int], ...]:
        cap = max(1, GPU_MAX_PRODUCT // (self.gq * self.r))
        return channel_chunks(n, cap, pow2=True)


def cache_inputs(layer: LayerKVCache, config: KVQuantConfig) -> dict[str, jax.Array]:
    """The stored block fields the kernel reads (`mixkvq_jax.layout`; empty ones left
    out), by name: with a stacked cache the whole stacks ([L, B, H, NB * rows, 128]),
    which the kernel reads in place."""
    return {name: getattr(layer, name) for name, field in block_fields(config).items()
            if field.rows}


def query_inputs(qg: jax.Array, lay: Layout) -> dict[str, jax.Array]:
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


def mask_sinks(scores: jax.Array, block: Any, lay: Layout) -> jax.Array:
    """Scores [Gq, R] of cache block ``block`` with the sink rows of block 0 at -inf
    (their exact copies are attended outside the kernel)."""
    s = lay.config.sink_tokens
    if not s:
        return scores
    token = block * lay.r + lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    return jnp.where(token >= s, scores, -jnp.inf)


def cost_estimate(inputs: dict[str, jax.Array], lay: Layout, batch: int, heads: int,
                   num_splits: int, pages_read: int | None = None) -> pl.CostEstimate:
    """What one call reads and computes when every block of the layer is in use (the
    kernel reads one layer of each stacked cache array, plus the query once; a paged
    pool [L, P, ...]: ``pages_read`` of its pages)."""
    nb = inputs["value_codes"].shape[3]
    per_layer = sum(x.nbytes // x.shape[0] for name, x in inputs.items()
                    if not name.startswith("q"))
    if pages_read is not None:
        per_layer = per_layer // inputs["value_codes"].shape[1] * pages_read
        nb = pages_read // batch
    queries = sum(x.nbytes for name, x in inputs.items() if name.startswith("q"))
    outputs = batch * heads * num_splits * lay.gq * (lay.d + 1) * 4
    blocks = batch * heads * nb
    flops = blocks * 4 * lay.gq * lay.r * lay.d
    if lay.permuted:
        flops += blocks * 2 * lay.gq * lay.d * lay.d * 2
    return pl.CostEstimate(flops=int(flops), transcendentals=int(blocks * lay.gq * lay.r),
                           bytes_accessed=int(per_layer + queries + outputs))


