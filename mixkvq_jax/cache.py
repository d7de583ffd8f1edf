"""`QuantizedKVCache`: the packed low-bit KV cache as a pytree, and pure functions on it.

Tokens of each sequence live in two places:

* **Blocks** of ``R = residual_length`` tokens, quantized once when they are complete.
  Sequence ``b`` has ``lengths[b] // R`` of them, in slots ``0 .. n-1``.
* The **residual window**: the last ``lengths[b] % R`` tokens, in ``full_dtype``.

When a token makes the window hold R tokens, the window is quantized into the next
block (with the MixKVQ salience of that moment) and emptied, so block boundaries sit at
multiples of R whatever the chunking of prefill and decode.

Per block and KV head, keys are permuted by salience (``key_permutation``) and split
into tiers: ``key_full`` [channels, tokens] in ``full_dtype`` and, for each quantized
tier (``config.key_tiers``, widest first), codes packed along tokens (planar layout,
`quant.pack`) with per-channel scales/zeros over groups of ``key_group_size`` tokens.
Values are quantized per token over groups of ``value_group_size`` channels, packed
along channels, or stored in ``full_dtype`` when ``value_bits == 16``. With
``value_rotation: hadamard`` every stored value (blocks, window, sinks) is in the
Hadamard-rotated basis (`mixkvq_jax.rotation`); `update_layer` rotates on the way in,
`dequantize_layer` and the attention dispatch rotate back.

That is the default ``per_block`` granularity. The KV Pareto granularities keep the same
packed codes and change only the scales/zeros: ``per_token`` stores one pair per token,
``per_channel`` / ``per_tensor`` one pair per channel / per head for the whole sequence,
taken from the first chunk written to the empty sequence and fixed afterwards (later
tokens are clamped into that range). K-smoothing quantizes ``keys - mean`` with the
per-channel mean of that first chunk; the residual window stays raw.

With ``sink_tokens = S > 0`` each sequence's first S tokens (attention sinks) are also
kept in ``full_dtype`` (``sink_keys`` / ``sink_values``). Once they leave the residual
window, attention reads them from there and masks their rows in the first block, whose
quantization never sees them (those rows are filled with the block's token S first).

Every layer array has a leading ``[layers]`` axis so models can `jax.lax.scan` over
``cache.layers``. All functions are pure and jit-compatible with static shapes: decode
compiles once per (batch, max_len).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from mixkvq_jax import layout, quant
from mixkvq_jax.config import QUANT_BITS, KVQuantConfig
from mixkvq_jax.rotation import rotate_values, unrotate_values
from mixkvq_jax.salience import abs_query_per_kv_head, channel_permutation
from mixkvq_jax.target import canonical_platform


class CacheOverflowError(ValueError):
    """More tokens were appended than the cache was created for."""


@struct.dataclass
class LayerKVCache:
    """One layer's cache (a leading ``[layers]`` axis is added when stacked).

    Shapes below omit that axis. B = batch, H = KV heads, NB = blocks, R = tokens per
    block, D = head_dim.

    Attributes:
      key_full, key_codes, key_scales, key_zeros, value_codes, value_scales,
        value_zeros: the quantized
        blocks, as the stored fields of `mixkvq_jax.layout` (each [B, H, NB * rows,
        128]: block j of a sequence and head is rows ``j * rows .. (j + 1) * rows``,
        its parts one after the other). `block_parts` gives the parts (codes, scales,
        zero points, permutation) in their natural shapes.
      residual_keys, residual_values: [B, H, R, D] ``full_dtype``, the recent tokens.
      query_abs_sum: [B, H, D] float32, running sum of mean |q| per KV head (MixKVQ I_d).
      query_count: [B] int32, queries accumulated in ``query_abs_sum``.
      key_fixed_scales, key_fixed_zeros: [B, H, P_k] ``scale_dtype``, the key pairs
        fixed at each sequence's first chunk: P_k = D (per_channel), 1 (per_tensor)
        or 0 (other granularities).
      value_fixed_scales, value_fixed_zeros: [B, H, P_v], the same for values.
      key_mean: [B, H, D] float32, the K-smoothing mean of the first chunk's keys
        ([B, H, 0] without smoothing).
      sink_keys, sink_values: [B, H, S, D] ``full_dtype``, each sequence's first
        S = ``config.sink_tokens`` tokens (zero-size when S = 0).
    """

    key_full: jax.Array
    key_codes: jax.Array
    key_scales: jax.Array
    key_zeros: jax.Array
    value_codes: jax.Array
    value_scales: jax.Array
    value_zeros: jax.Array
    residual_keys: jax.Array
    residual_values: jax.Array
    query_abs_sum: jax.Array
    query_count: jax.Array
    key_fixed_scales: jax.Array
    key_fixed_zeros: jax.Array
    value_fixed_scales: jax.Array
    value_fixed_zeros: jax.Array
    key_mean: jax.Array
    sink_keys: jax.Array
    sink_values: jax.Array


class StackedCacheShape:
    """Shape properties shared by the caches that hold stacked layers (``layers``
    [layers, batch or slots, kv_heads, ...]) and per-sequence ``lengths``."""

    layers: LayerKVCache
    lengths: jax.Array

    @property
    def num_layers(self) -> int:
        return self.layers.residual_keys.shape[0]

    @property
    def batch(self) -> int:
        """Sequences (slots of a paged cache) decoded together."""
        return self.lengths.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.layers.residual_keys.shape[2]


@struct.dataclass
class QuantizedKVCache(StackedCacheShape):
    """The whole cache: stacked layers, per-sequence lengths and an overflow flag.

    Attributes:
      layers: `LayerKVCache` whose arrays carry a leading ``[layers]`` axis.
      lengths: [batch] int32, tokens stored per sequence.
      overflow: [batch] bool, set (sticky) when an update would have exceeded
        ``max_len``; such tokens are not reliably stored. Check with `check_overflow`.
      config: the static `KVQuantConfig`.
      max_len: the static capacity in tokens per sequence.
    """

    layers: LayerKVCache
    lengths: jax.Array
    overflow: jax.Array
    config: KVQuantConfig = struct.field(pytree_node=False)
    max_len: int = struct.field(pytree_node=False)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def init_layer(
    config: KVQuantConfig, *, batch: int, num_kv_heads: int, max_len: int
) -> LayerKVCache:
    """An empty single-layer cache able to hold ``max_len`` tokens per sequence."""
    b, h, r, d = batch, num_kv_heads, config.residual_length, config.head_dim
    nb = config.num_blocks(max_len)
    full, scale = _dtype(config.full_dtype), _dtype(config.scale_dtype)
    blocks = {name: jnp.zeros((b, h, *layout.field_shape(field, nb)), field.dtype)
              for name, field in layout.block_fields(config).items()}
    return LayerKVCache(
        **blocks,
        residual_keys=jnp.zeros((b, h, r, d), full),
        residual_values=jnp.zeros((b, h, r, d), full),
        query_abs_sum=jnp.zeros((b, h, d), jnp.float32),
        query_count=jnp.zeros((b,), jnp.int32),
        key_fixed_scales=jnp.zeros((b, h, config.fixed_key_params), scale),
        key_fixed_zeros=jnp.zeros((b, h, config.fixed_key_params), scale),
        value_fixed_scales=jnp.zeros((b, h, config.fixed_value_params), scale),
        value_fixed_zeros=jnp.zeros((b, h, config.fixed_value_params), scale),
        key_mean=jnp.zeros((b, h, d if config.smooths_keys else 0), jnp.float32),
        sink_keys=jnp.zeros((b, h, config.sink_tokens, d), full),
        sink_values=jnp.zeros((b, h, config.sink_tokens, d), full),
    )


def init_cache(
    config: KVQuantConfig, *, num_layers: int, batch: int, num_kv_heads: int, max_len: int
) -> QuantizedKVCache:
    """An empty cache: ``num_layers`` stacked layers, ``batch`` sequences of up to
    ``max_len`` tokens each, ``num_kv_heads`` heads of ``config.head_dim`` channels."""
    for name, value in (("num_layers", num_layers), ("batch", batch),
                        ("num_kv_heads", num_kv_heads), ("max_len", max_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}")
    layer = init_layer(config, batch=batch, num_kv_heads=num_kv_heads, max_len=max_len)
    layers = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_layers, *x.shape)).copy(), layer)
    return QuantizedKVCache(
        layers=layers,
        lengths=jnp.zeros((batch,), jnp.int32),
        overflow=jnp.zeros((batch,), bool),
        config=config,
        max_len=max_len,
    )


# ---- quantizing blocks ---------------------------------------------------------------
def _quantize_granular(
    x: jax.Array, bits: int, granularity: str, group_size: int, param_dtype: jnp.dtype,
    fixed_scales: jax.Array, fixed_zeros: jax.Array, *, channel_axis: int,
) -> quant.Quantized:
    """Quantize keys [..., D, R] (``channel_axis=-2``) or values [..., R, D] (-1).

    ``per_block`` groups the last axis in runs of ``group_size`` (tokens for keys,
    channels for values); ``per_token`` is one group over the channel axis;
    ``per_channel`` / ``per_tensor`` apply ``fixed_*`` [..., D | 1] along the channel
    axis, clamping, and return zero-size scales/zeros [..., 0].
    """
    if granularity == "per_block":
        return quant.quantize(x, bits, axis=-1, group_size=group_size, param_dtype=param_dtype)
    if granularity == "per_token":
        return quant.quantize(x, bits, axis=channel_axis, param_dtype=param_dtype)
    along = (lambda p: p[..., :, None]) if channel_axis == -2 else (lambda p: p[..., None, :])
    codes = quant.quantize_with_params(x, along(fixed_scales), along(fixed_zeros), bits)
    empty = jnp.zeros((*x.shape[:-1], 0), param_dtype)
    return quant.Quantized(codes, empty, empty)


def quantize_blocks(
    keys: jax.Array,
    values: jax.Array,
    mean_abs_query: jax.Array,
    config: KVQuantConfig,
    fixed: Mapping[str, jax.Array] | None = None,
) -> dict[str, Any]:
    """Quantize complete blocks into the cache's block layout.

    Args:
      keys, values: [..., R, D] blocks of R tokens (any leading dims).
      mean_abs_query: ``I_d`` broadcastable to [..., D].
      fixed: the `FIXED_FIELDS` of the blocks' sequences, each [..., P] with leading
        dims broadcastable to ``keys.shape[:-2]``; needed when
        ``config.has_first_chunk_statistics``.

    Returns:
      A dict with the `LayerKVCache` block fields (``key_full``, ``key_codes``, ...),
      each shaped like the cache's per-block arrays with the given leading dims.
    """
    full, scale = _dtype(config.full_dtype), _dtype(config.scale_dtype)
    if fixed is None:
        if config.has_first_chunk_statistics:
            raise ValueError(f"{config.name}: quantize_blocks needs the sequences' fixed "
                             "statistics (fixed=...) for this granularity / K-smoothing")
        fixed = {name: jnp.zeros((0,)) for name in FIXED_FIELDS}
    perm = channel_permutation(keys, mean_abs_query, config)
    keys_t = jnp.swapaxes(keys, -1, -2)  # [..., D, R]: channel-major, tiers slice rows
    if config.stores_permutation:
        keys_t = jnp.take_along_axis(keys_t, perm[..., :, None], axis=-2)
    if config.smooths_keys:  # K-smoothing: quantize keys - mean (single tier, no full)
        keys_t = keys_t.astype(jnp.float32) - fixed["key_mean"][..., :, None]
    offset = config.key_channels_full
    codes, scales, zeros = [], [], []
    granularity = config.effective_key_granularity
    for bits, count in config.key_tiers:
        tier = _quantize_granular(
            keys_t[..., offset : offset + count, :], bits, granularity, config.key_group_size,
            scale, fixed["key_fixed_scales"], fixed["key_fixed_zeros"], channel_axis=-2,
        )
        codes.append(quant.pack(tier.codes, bits, axis=-1))
        scales.append(tier.scales)
        zeros.append(tier.zeros)
        offset += count
    lead = keys.shape[:-2]
    if config.quantizes_values:
        v = _quantize_granular(
            values, config.value_bits, config.effective_value_granularity,
            config.value_group_size, scale, fixed["value_fixed_scales"],
            fixed["value_fixed_zeros"], channel_axis=-1,
        )
        value_codes = quant.pack(v.codes, config.value_bits, axis=-1)
        value_scales, value_zeros = v.scales, v.zeros
    else:
        value_codes = values.astype(full)
        value_scales = value_zeros = jnp.zeros((*lead, config.residual_length, 0), scale)
    n_perm = config.head_dim if config.stores_permutation else 0
    return {
        "key_full": keys_t[..., : config.key_channels_full, :].astype(full),
        "key_codes": tuple(codes),
        "key_scales": tuple(scales),
        "key_zeros": tuple(zeros),
        "key_permutation": perm[..., :n_perm].astype(config.permutation_dtype),
        "value_codes": value_codes,
        "value_scales": value_scales,
        "value_zeros": value_zeros,
    }


BLOCK_FIELDS = layout.FIELDS  # the stored block fields (`mixkvq_jax.layout`)
# Per-sequence statistics fixed at the first chunk (per_channel / per_tensor, K-smoothing).
FIXED_FIELDS = ("key_fixed_scales", "key_fixed_zeros", "value_fixed_scales",
                "value_fixed_zeros", "key_mean")


def _block_arrays(layer: LayerKVCache) -> dict[str, Any]:
    return {name: getattr(layer, name) for name in BLOCK_FIELDS}


def block_parts(layer: LayerKVCache, config: KVQuantConfig) -> dict[str, Any]:
    """The blocks' parts ([B, H, NB, ...]: codes, scales, zero points, permutation;
    see `mixkvq_jax.layout`) of a layer, in the form `quantize_blocks` returns."""
    return layout.unpack(_block_arrays(layer), config)


def fixed_arrays(layer: LayerKVCache) -> dict[str, jax.Array]:
    """The layer's `FIXED_FIELDS`, each [B, H, P]."""
    return {name: getattr(layer, name) for name in FIXED_FIELDS}


def first_chunk_statistics(
    keys: jax.Array, values: jax.Array, valid: jax.Array, config: KVQuantConfig
) -> dict[str, jax.Array]:
    """The fixed statistics a chunk gives its sequence if it is the first one.

    Args:
      keys, values: [B, C, H, D] the chunk as the cache stores it (``full_dtype``).
      valid: [B, C] bool, the real (non-padding) tokens.

    Returns:
      `FIXED_FIELDS` -> [B, H, P]: per_channel / per_tensor scales and zeros (of
      ``keys - mean`` under K-smoothing) that map every valid token of the chunk into
      range, and the per-channel key mean (float32).
    """
    b, _, h, d = keys.shape
    scale = _dtype(config.scale_dtype)
    mask = valid[:, :, None, None]
    any_valid = jnp.any(valid, axis=1)[:, None, None]
    k, v = keys.astype(jnp.float32), values.astype(jnp.float32)
    if config.smooths_keys:
        n = jnp.maximum(valid.sum(axis=1), 1).astype(jnp.float32)[:, None, None]
        mean = jnp.where(mask, k, 0.0).sum(axis=1) / n  # [B, H, D]
        k = k - mean[:, None]  # the same float32 op as quantize_blocks: no clamping here
    else:
        mean = jnp.zeros((b, h, 0), jnp.float32)

    def params(x: jax.Array, granularity: str, bits: int) -> tuple[jax.Array, jax.Array]:
        if granularity not in ("per_channel", "per_tensor"):
            return jnp.zeros((b, h, 0), scale), jnp.zeros((b, h, 0), scale)
        lo = jnp.where(mask, x, jnp.inf).min(axis=1)  # [B, H, D]
        hi = jnp.where(mask, x, -jnp.inf).max(axis=1)
        if granularity == "per_tensor":
            lo, hi = lo.min(axis=-1, keepdims=True), hi.max(axis=-1, keepdims=True)
        # A sequence without tokens in this chunk keeps its old values (caller): 0, not inf.
        lo, hi = jnp.where(any_valid, lo, 0.0), jnp.where(any_valid, hi, 0.0)
        return quant.quant_params(lo, hi, bits, scale)

    key_bits = config.key_tiers[0][0] if config.key_tiers else QUANT_BITS[0]
    key_scales, key_zeros = params(k, config.effective_key_granularity, key_bits)
    value_scales, value_zeros = params(
        v, config.effective_value_granularity, config.value_bits if config.quantizes_values
        else QUANT_BITS[0])
    return {"key_fixed_scales": key_scales, "key_fixed_zeros": key_zeros,
            "value_fixed_scales": value_scales, "value_fixed_zeros": value_zeros,
            "key_mean": mean}


def dequantize_key_tiers(arrays: Mapping[str, Any], config: KVQuantConfig, *,
                         word_major: bool = False) -> list[jax.Array]:
    """Keys of blocks in float32, one array per tier (full first, then ``key_tiers``):
    [..., S, n_t, R], channels in their stored (MixKVQ: per-block salience) order and,
    under K-smoothing, minus the mean (what the codes hold). ``arrays`` as in
    `dequantize_block_keys`. The attention contracts each tier on its own (a
    concatenate of the tiers would be an extra select per element on CPU).

    With ``word_major`` the tokens of each block of a quantized tier come in the order
    of `quant.unpack_word_major` (``quant.natural_order(x, bits)`` restores it); the
    full-precision tier stays in natural order.
    """
    parts = [arrays["key_full"].astype(jnp.float32)] if config.key_channels_full else []
    granularity = config.effective_key_granularity
    r = config.residual_length
    for (bits, _), codes, scales, zeros in zip(
        config.key_tiers, arrays["key_codes"], arrays["key_scales"], arrays["key_zeros"],
        strict=True,
    ):
        if granularity in ("per_block", "per_token"):
            # per_block: [..., S, n_t, R / G] groups of tokens; per_token [..., S, 1, R]
            pair = scales, zeros
        else:  # fixed [..., D | 1] -> [..., 1, D | 1, 1]: one group per channel and block
            along = lambda p: p[..., None, :, None]
            pair = along(arrays["key_fixed_scales"]), along(arrays["key_fixed_zeros"])
        if word_major:
            tier = quant.dequantize_word_major(quant.unpack_word_major(codes, bits), *pair,
                                               bits)
            parts.append(tier.reshape(*tier.shape[:-2], r))
        else:
            tier_codes = quant.unpack(codes, bits, length=r, axis=-1, dtype=jnp.int32)
            parts.append(quant.dequantize(tier_codes, *pair, axis=-1))
    return parts


def packs_evenly(config: KVQuantConfig, part: str) -> bool:
    """Whether ``part`` (``"keys"`` / ``"values"``) is quantized and its packed axis
    fills whole words (R tokens for every key tier, D channels for values): what
    word-major unpacking (`quant.unpack_word_major`) needs."""
    if part == "keys":
        return bool(config.key_tiers) and all(
            config.residual_length % quant.codes_per_word(b) == 0 for b, _ in config.key_tiers)
    return config.quantizes_values and config.head_dim % quant.codes_per_word(
        config.value_bits) == 0


def dequantize_block_keys(
    arrays: Mapping[str, Any], config: KVQuantConfig, *, smoothed: bool = False
) -> jax.Array:
    """Keys of blocks in float32, channels in original order: [..., S, R, D].

    Args:
      arrays: the `LayerKVCache` block fields of S blocks ([..., S, ...], e.g. a slice
        of the slots) and the sequences' `FIXED_FIELDS` ([..., P]).
      smoothed: under K-smoothing, return ``keys - mean`` (what the codes hold) instead
        of the keys.
    """
    parts = dequantize_key_tiers(arrays, config)
    keys_t = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-2)  # [.., S, D, R]
    if config.stores_permutation:
        inverse = jnp.argsort(arrays["key_permutation"].astype(jnp.int32), axis=-1)
        keys_t = jnp.take_along_axis(keys_t, inverse[..., :, None], axis=-2)
    keys = jnp.swapaxes(keys_t, -1, -2)
    if config.smooths_keys and not smoothed:
        keys = keys + arrays["key_mean"][..., None, None, :]
    return keys


def dequantize_block_values(arrays: Mapping[str, Any], config: KVQuantConfig, *,
                            word_major: bool = False) -> jax.Array:
    """Values of blocks in float32: [..., S, R, D] (``arrays`` as in
    `dequantize_block_keys`). With ``word_major`` quantized values come with their
    channels in the order of `quant.unpack_word_major` (``quant.natural_order(x,
    config.value_bits)`` restores it); unquantized ones are always in natural order."""
    if not config.quantizes_values:
        return arrays["value_codes"].astype(jnp.float32)
    if config.effective_value_granularity in ("per_block", "per_token"):
        # [..., S, R, NG]: groups of channels (per_token: one group of D)
        pair = arrays["value_scales"], arrays["value_zeros"]
    else:  # fixed [..., D | 1] -> [..., 1, 1, D | 1]
        along = lambda p: p[..., None, None, :]
        pair = along(arrays["value_fixed_scales"]), along(arrays["value_fixed_zeros"])
    if word_major:
        words = quant.unpack_word_major(arrays["value_codes"], config.value_bits)
        values = quant.dequantize_word_major(words, *pair, config.value_bits)
        return values.reshape(*values.shape[:-2], config.head_dim)
    codes = quant.unpack(arrays["value_codes"], config.value_bits, length=config.head_dim,
                         dtype=jnp.int32)
    return quant.dequantize(codes, *pair, axis=-1)


def dequantize_blocks(layer: LayerKVCache, config: KVQuantConfig) -> tuple[jax.Array, jax.Array]:
    """All block slots of a layer in float32, channels in original order.

    Returns keys and values, each [B, H, NB, R, D] (slots past a sequence's block
    count hold zeros or stale data; mask them by length).
    """
    arrays = {**block_parts(layer, config), **fixed_arrays(layer)}
    return dequantize_block_keys(arrays, config), dequantize_block_values(arrays, config)


def dequantize_layer(
    layer: LayerKVCache, lengths: jax.Array, config: KVQuantConfig
) -> tuple[jax.Array, jax.Array]:
    """A layer's tokens in order, float32: keys and values [B, H, NB * R + R, D] (values
    in the model's basis, rotated back when the config rotates them).

    Token t of sequence b is at index t for t < lengths[b]; later indices are padding.
    """
    keys, values = dequantize_blocks(layer, config)
    b, h, nb, r, d = keys.shape
    n_blocks = lengths // r

    def place(blocks: jax.Array, window: jax.Array, n: jax.Array) -> jax.Array:
        flat = jnp.concatenate([blocks.reshape(h, nb * r, d), jnp.zeros((h, r, d))], axis=1)
        return jax.lax.dynamic_update_slice(flat, window.astype(jnp.float32), (0, n * r, 0))

    keys = jax.vmap(place)(keys, layer.residual_keys, n_blocks)
    values = jax.vmap(place)(values, layer.residual_values, n_blocks)
    if config.sink_tokens:  # once in a block, the sinks' exact copies are what counts
        s = config.sink_tokens
        in_blocks = (n_blocks > 0)[:, None, None, None]
        keys = keys.at[:, :, :s].set(jnp.where(in_blocks, _f32(layer.sink_keys), keys[:, :, :s]))
        values = values.at[:, :, :s].set(
            jnp.where(in_blocks, _f32(layer.sink_values), values[:, :, :s]))
    return keys, unrotate_values(values, config)


def dequantize(cache: QuantizedKVCache) -> tuple[jax.Array, jax.Array]:
    """Every layer's tokens, float32 keys and values [layers, B, H, NB * R + R, D]."""
    fn = lambda layer: dequantize_layer(layer, cache.lengths, cache.config)
    return jax.lax.map(fn, cache.layers)


# ---- appending ------------------------------------------------------------------------
def update_layer(
    layer: LayerKVCache,
    lengths: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    queries: jax.Array,
    counts: jax.Array,
    config: KVQuantConfig,
    *,
    index: jax.Array | None = None,
    kv_repeat: int = 1,
    block_table: jax.Array | None = None,
) -> LayerKVCache:
    """Append a chunk of tokens to one layer; quantize every window that fills up.

    With ``index``, ``layer`` is the whole stacked cache ([layers, ...] arrays) and layer
    ``index`` is updated *in place*: new blocks are written straight into their slots
    of the stack, never through a per-layer copy. This is how the models update the
    cache they carry through `jax.lax.scan`: writing back a whole updated layer would
    copy the layer (every block slot) twice per layer per decode step, which for a
    full-precision cache at long context costs more than the attention itself.

    Args:
      layer: the layer's cache.
      lengths: [B] int32 tokens stored before this chunk.
      keys, values: [B, C, H, D] the chunk (post-RoPE keys), right-padded; values in
        the model's basis (stored rotated when ``config.rotates_values``).
      queries: [B, C, Hq, D] post-RoPE queries of the chunk (for the MixKVQ statistic).
      counts: [B] int32 valid tokens of the chunk per sequence (0..C).
      config: the cache's config.
      kv_repeat: the cache holds each of the model's KV heads this many times over
        (consecutive copies, for a mesh whose model axis is larger than the KV heads:
        `mixkvq_jax.models.sharding.cache_kv_heads`); the MixKVQ statistic of a copy
        is still the mean over all query heads of the model's KV head.
      block_table: [B, MB] int32 for a paged cache (`mixkvq_jax.paged`): the block
        fields are then a shared pool of pages ([P, H, rows, 128], a stack [L, P, ...]
        with ``index``) and block j of sequence b goes to page ``block_table[b, j]``
        (`layout.block_address`); the per-sequence fields stay [B, ...].

    Returns:
      The updated layer. ``lengths`` is not stored per layer: advance it once for all
      layers (`advance`).
    """
    stacked = layer
    layer = from_bits(layer_at(stacked, index), config)  # only per-sequence fields are read
    values = rotate_values(values, config)  # every stored copy is in the cache's basis
    b, c, h, d = keys.shape
    r = config.residual_length
    full = _dtype(config.full_dtype)
    valid = jnp.arange(c)[None, :] < counts[:, None]
    # Running |q| sums after each chunk token: a block is ranked with the statistic of
    # all queries up to the token that completes it, however the tokens were chunked.
    abs_q = abs_query_per_kv_head(queries, h // kv_repeat, valid)
    abs_q_cumsum = jnp.cumsum(jnp.repeat(abs_q, kv_repeat, axis=2), axis=1)  # [B,C,H,D]
    abs_sum = layer.query_abs_sum + abs_q_cumsum[:, -1]
    q_count = layer.query_count + counts.astype(jnp.int32)
    fixed = fixed_arrays(layer)
    if config.has_first_chunk_statistics:
        # Fixed statistics come from the first chunk written to an empty sequence.
        first = ((lengths == 0) & (counts > 0))[:, None, None]
        stats = first_chunk_statistics(keys.astype(full), values.astype(full), valid, config)
        fixed = {name: jnp.where(first, stats[name], fixed[name]).astype(fixed[name].dtype)
                 for name in FIXED_FIELDS}

    n_flush_max = (r - 1 + c) // r  # static: most blocks one chunk can complete
    window_len = lengths % r
    n_flush = (window_len + counts) // r  # [B] blocks completed by this chunk
    windows: dict[str, jax.Array] = {}
    if c == 1 and index is not None:
        # Decode into the stack: each sequence's token goes into its window row in place
        # (rebuilding the window of every layer every step was most of a small model's
        # decode traffic on TPU); a window the token fills is the block to quantize.
        windows = {name: _put_token_rows(getattr(stacked, name), chunk[:, 0].astype(full),
                                         window_len, counts, index)
                   for name, chunk in (("residual_keys", keys), ("residual_values", values))}
        # This layer's windows [B, H, R, D], sliced out here: captured by the flush
        # `cond` below, the whole stacks would be its operands, copied every layer.
        key_window, value_window = (
            from_bits({name: jax.lax.dynamic_index_in_dim(windows[name], index, 0,
                                                          keepdims=False)}, config)[name]
            for name in ("residual_keys", "residual_values"))
        key_buf, value_buf = lambda: key_window, lambda: value_window
    else:
        # Window + chunk, left-aligned: the window's r tokens, then the chunk's at r.
        buf_len = (n_flush_max + 1) * r

        def fill(window: jax.Array, chunk: jax.Array, start: jax.Array) -> jax.Array:
            buf = jnp.zeros((h, buf_len, d), full).at[:, :r].set(window)
            return jax.lax.dynamic_update_slice(buf, chunk.astype(full), (0, start, 0))

        key_all = jax.vmap(fill)(layer.residual_keys, jnp.swapaxes(keys, 1, 2), window_len)
        value_all = jax.vmap(fill)(layer.residual_values, jnp.swapaxes(values, 1, 2),
                                   window_len)
        key_buf, value_buf = lambda: key_all, lambda: value_all

        def window_at(buf: jax.Array, start: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(buf, (0, start, 0), (h, r, d))

        new_window_keys = jax.vmap(window_at)(key_all, n_flush * r)
        new_window_values = jax.vmap(window_at)(value_all, n_flush * r)

    def blocks_of(buf: jax.Array, lengths: jax.Array) -> jax.Array:  # [B', H, F, R, D]
        blocks = buf[:, :, : n_flush_max * r].reshape(buf.shape[0], h, n_flush_max, r, d)
        if not config.sink_tokens:
            return blocks
        # Sink rows of a sequence's first block repeat its token S: they then take no
        # part in the block's ranges (scales, zero points, salience); attention masks
        # them and reads the sinks' exact copies instead.
        s = config.sink_tokens
        first = (lengths // r)[:, None] + jnp.arange(n_flush_max)[None, :] == 0  # [B', F]
        sink_row = first[:, None, :, None, None] & (jnp.arange(r) < s)[:, None]
        return jnp.where(sink_row, blocks[:, :, :, s : s + 1], blocks)

    # Chunk index of the token completing block j (clamped for incomplete blocks).
    j = jnp.arange(n_flush_max)[None, :]

    def quantize_new(rows: Callable[[jax.Array], jax.Array] = lambda x: x) -> dict[str, Any]:
        """The chunk's blocks of the sequences ``rows`` picks (of every [B, ...] input),
        packed: [B', H, F * rows, LANES] per field."""
        last = jnp.clip((j + 1) * r - rows(window_len)[:, None] - 1, 0, c - 1)  # [B', F]
        sums = rows(layer.query_abs_sum)[:, None] + jnp.take_along_axis(
            rows(abs_q_cumsum), last[:, :, None, None], axis=1
        )  # [B', F, H, D]
        n_queries = (rows(layer.query_count)[:, None] + last + 1).astype(jnp.float32)
        mean_q = jnp.swapaxes(sums / n_queries[:, :, None, None], 1, 2)  # [B', H, F, D]
        per_block = {name: rows(x)[:, :, None] for name, x in fixed.items()}  # [B', H, 1, P]
        seq_lengths = rows(lengths)
        parts = quantize_blocks(blocks_of(rows(key_buf()), seq_lengths),
                                blocks_of(rows(value_buf()), seq_lengths), mean_q, config,
                                per_block)
        return layout.pack(parts, config)

    fields = layout.block_fields(config)
    nb = (stacked.value_codes.shape[-2] // fields["value_codes"].rows if block_table is None
          else block_table.shape[1])
    base = [] if index is None else [index]
    targets = {name: x for name, x in _block_arrays(stacked).items() if fields[name].rows}

    def put_block(arrays: dict[str, Any], new: dict[str, Any], row: jax.Array,
                  s_: jax.Array, j_: jax.Array, keep: jax.Array) -> dict[str, Any]:
        """Write block ``j_`` of ``new``'s row ``row`` as block ``lengths // r + j_`` of
        sequence ``s_`` (``keep``: write the old block back, a no-op), one
        dynamic_update_slice per field: XLA applies those in place, also into a stack
        of layers, and for every dtype (a scatter of 16-bit floats is rewritten on CPU
        to convert the whole target to float32 and back: the whole stack, every layer)."""
        slot = jnp.minimum(lengths[s_] // r + j_, nb - 1)

        def put(name: str, old: jax.Array) -> jax.Array:
            rows = fields[name].rows  # the block's rows in the field
            upd = jax.lax.dynamic_index_in_dim(new[name], row, 0, keepdims=False)
            block = jax.lax.dynamic_slice_in_dim(upd, j_ * rows, rows, axis=1)  # [H, rows, L]
            block = _as_stored(block, old.dtype)
            seq, at = layout.block_address(s_, slot, rows, block_table)
            start = (*base, seq, 0, at, 0)
            size = (*([1] * len(base)), 1, *block.shape)
            current = jax.lax.dynamic_slice(old, start, size)
            block = _select_bits(keep, current, block.reshape(size))
            return jax.lax.dynamic_update_slice(old, block, start)

        return {name: put(name, old) for name, old in arrays.items()}

    # Under shard_map, a loop's carry and a cond's branches must agree on which mesh
    # axes they vary over: adding a zero taken from the data gives them the data's.
    data_zero = jnp.zeros_like(keys.reshape(-1)[0]).astype(full)

    def like_data(tree: Any) -> Any:
        return jax.tree.map(lambda x: x + data_zero.astype(x.dtype), tree)

    def no_blocks() -> dict[str, Any]:  # `quantize_new()`'s arrays, zero
        return like_data(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                      jax.eval_shape(quantize_new)))

    if c == 1:
        # Decode: a sequence fills its window once every R steps, so quantize only the
        # sequences that do, one at a time (with many sequences, quantizing every
        # window whenever one fills cost more than the rest of the cache update).
        order = jnp.argsort(n_flush == 0, stable=True).astype(jnp.int32)  # filled first
        count = jnp.sum(n_flush)
        one = lambda i: lambda x: jax.lax.dynamic_slice_in_dim(x, order[i], 1, axis=0)

        def quantize_one(i: jax.Array, new: dict[str, Any]) -> dict[str, Any]:
            return jax.tree.map(lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
                buf, x, i, axis=0), new, quantize_new(one(i)))

        # Row i of `new`: the block of the i-th sequence that fills its window. A loop
        # apart from the writes: with the quantizer in the loop that writes the stack,
        # XLA:TPU relaid the whole stack out around it, every layer.
        new = jax.lax.fori_loop(0, count, quantize_one, no_blocks())
        zero, no = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
        blocks = jax.lax.fori_loop(
            0, count, lambda i, arrays: put_block(arrays, new, i, order[i], zero, no), targets)
    else:
        # Only the new blocks go through the cond (its operands and results are copied);
        # the cache's block arrays are updated in place by the writes below.
        new = jax.lax.cond(jnp.any(n_flush > 0), lambda: like_data(quantize_new()),
                           no_blocks)

        def write_one(n: jax.Array, arrays: dict[str, Any]) -> dict[str, Any]:
            s_, j_ = n // n_flush_max, n % n_flush_max
            return put_block(arrays, new, s_, s_, j_, j_ >= n_flush[s_])

        # Block j of sequence s goes to slot lengths // r + j if j < n_flush[s].
        blocks = jax.lax.fori_loop(0, b * n_flush_max, write_one, targets)
    small = {**fixed, "query_abs_sum": abs_sum, "query_count": q_count}
    if not windows:
        small.update(residual_keys=new_window_keys, residual_values=new_window_values)
    if config.sink_tokens:
        small["sink_keys"] = _write_sinks(layer.sink_keys, keys, lengths, counts)
        small["sink_values"] = _write_sinks(layer.sink_values, values, lengths, counts)
    if index is not None:
        small = {name: jax.lax.dynamic_update_index_in_dim(
                     getattr(stacked, name), _as_stored(x, getattr(stacked, name).dtype),
                     index, 0)
                 for name, x in small.items()}
    return stacked.replace(**blocks, **small, **windows)


def _put_token_rows(stack: jax.Array, tokens: jax.Array, rows: jax.Array, counts: jax.Array,
                    index: jax.Array) -> jax.Array:
    """Write each sequence's token into row ``rows[b]`` of layer ``index`` of a stacked
    window ``stack`` [L, B, H, R, D] in place (``tokens`` [B, H, D]; sequences with
    ``counts[b] == 0`` keep their row). One dynamic-update-slice per sequence, in a
    loop: XLA applies those in place into the stack."""
    b, h, d = tokens.shape

    def put(i: jax.Array, stack: jax.Array) -> jax.Array:
        start = (index, i, 0, rows[i], 0)
        size = (1, 1, h, 1, d)
        current = jax.lax.dynamic_slice(stack, start, size)
        token = jax.lax.dynamic_index_in_dim(tokens, i, 0, keepdims=False)
        new = _as_stored(token.reshape(size), stack.dtype)
        return jax.lax.dynamic_update_slice(stack, _select_bits(counts[i] > 0, new, current),
                                            start)

    return jax.lax.fori_loop(0, b, put, stack)


def _write_sinks(sinks: jax.Array, chunk: jax.Array, lengths: jax.Array,
                 counts: jax.Array) -> jax.Array:
    """Copy the chunk's tokens at positions < S into the sink buffer [B, H, S, D]
    (chunk [B, C, H, D] starts at position ``lengths``; ``counts`` valid tokens)."""
    s, c = sinks.shape[2], chunk.shape[1]
    at = jnp.arange(s)[None, :] - lengths[:, None]  # [B, S] chunk index of sink slot
    take = (at >= 0) & (at < counts[:, None])
    rows = jnp.take_along_axis(chunk, jnp.clip(at, 0, c - 1)[:, :, None, None], axis=1)
    rows = jnp.swapaxes(rows, 1, 2).astype(sinks.dtype)  # [B, H, S, D]
    return jnp.where(take[:, None, :, None], rows, sinks)


def _select_bits(pred: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``where(pred, a, b)`` on the bits: XLA:CPU upcasts a 16-bit float select (and the
    ops around it, up to the whole cache buffer it feeds) to float32."""
    if a.dtype.itemsize != 2 or not jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.where(pred, a, b)
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.where(pred, bits(a), bits(b)), a.dtype)


# The 16-bit float fields (``full_dtype`` / ``scale_dtype``); the others are integers
# or float32.
_FULL_FIELDS = ("key_full", "residual_keys", "residual_values", "sink_keys", "sink_values")
_SCALE_FIELDS = ("key_scales", "key_zeros", "value_scales",
                 "value_zeros", "key_fixed_scales",
                 "key_fixed_zeros", "value_fixed_scales", "value_fixed_zeros")


def to_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 bits; other arrays unchanged.

    On CPU the models carry the stacked cache through the layers in this form: XLA:CPU
    has no 16-bit float dynamic-update-slice (it converts the whole target buffer to
    float32 and back), while uint16 ones update in place. `update_layer` and the XLA
    attention accept such a stack (with ``index``) and `from_bits` what they read.
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def from_bits(arrays: Any, config: KVQuantConfig) -> Any:
    """Undo `to_bits` on a `LayerKVCache` or a dict of its fields (a no-op on floats)."""
    full, scale = _dtype(config.full_dtype), _dtype(config.scale_dtype)

    def restore(name: str, x: Any) -> Any:
        dtype = (full if name in _FULL_FIELDS
                 or (name == "value_codes" and not config.quantizes_values)
                 else scale if name in _SCALE_FIELDS else None)
        if dtype is None:
            return x
        return jax.tree.map(lambda a: a if a.dtype == dtype
                            else jax.lax.bitcast_convert_type(a, dtype), x)

    if isinstance(arrays, LayerKVCache):
        return arrays.replace(**{f.name: restore(f.name, getattr(arrays, f.name))
                                 for f in dataclasses.fields(arrays)})
    return {name: restore(name, x) for name, x in arrays.items()}


def scan_carries_bits(platform: str | None = None) -> bool:
    """Whether the models carry the stacked cache through their layer scan as bits
    (`to_bits`): on CPU, where XLA has no in-place 16-bit float update. ``platform``:
    the target platform (default: this process's backend)."""
    return canonical_platform(platform) == "cpu"


def bits_form(cache: QuantizedKVCache) -> QuantizedKVCache:
    """The cache with its 16-bit float arrays held as uint16 bits (`to_bits`).

    The models carry the stack through their layer scan in this form on CPU. A cache
    passed in float form is converted on the way in and back on the way out of every
    forward call: for a decode step that is two copies of every 16-bit array of the
    cache (residual windows, scales; the whole history for a bf16 cache). Decode loops
    (`generate.run_generation`, ``benchmarks/decode.py``) therefore hold the cache in
    `decode_loop_form` between steps; the models, `update_layer` and the attention
    accept it as is. `float_form` undoes it (e.g. before `dequantize`).
    """
    return cache.replace(layers=jax.tree.map(to_bits, cache.layers))


def float_form(cache: QuantizedKVCache) -> QuantizedKVCache:
    """Undo `bits_form` (a no-op on a cache in float form)."""
    return cache.replace(layers=from_bits(cache.layers, cache.config))


def decode_loop_form(cache: QuantizedKVCache, platform: str | None = None) -> QuantizedKVCache:
    """The cache in the form a decode loop should hold it between steps on ``platform``
    (default: this process's backend): `bits_form` where the layer scan carries bits
    (`scan_carries_bits`), else as is."""
    return bits_form(cache) if scan_carries_bits(platform) else cache


def _as_stored(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` (a field's value, in its float dtype) as stored in an array of ``dtype``:
    its bits when the stack is carried as `to_bits`."""
    if dtype == jnp.uint16 and jnp.issubdtype(x.dtype, jnp.floating):
        return to_bits(x)
    return x.astype(dtype)


def layer_at(stacked: LayerKVCache, index: jax.Array | None) -> LayerKVCache:
    """Layer ``index`` of a stacked cache (``None``: ``stacked`` is one layer already).

    Slices are lazy under jit: XLA computes only the fields a caller reads (the models
    read the per-sequence fields this way and slice blocks from the stack themselves).
    """
    if index is None:
        return stacked
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False),
                        stacked)


def layer_partition_specs(layer: LayerKVCache, data: str | None, model: str | None, *,
                          stacked: bool = True) -> LayerKVCache:
    """A `LayerKVCache` of `PartitionSpec` s: batch over mesh axis ``data``, KV heads over
    ``model`` (``None``: not sharded); with ``stacked``, a leading unsharded layer axis.
    Every field is [(L,) B, H, ...] except ``query_count`` [(L,) B]."""
    lead = (None,) if stacked else ()
    return jax.tree.map(
        lambda x: P(*lead, data) if x.ndim == len(lead) + 1 else P(*lead, data, model), layer)


def advance(cache: QuantizedKVCache, layers: LayerKVCache, counts: jax.Array) -> QuantizedKVCache:
    """Store updated layers and move every sequence's length on by ``counts``."""
    lengths = cache.lengths + counts.astype(jnp.int32)
    return cache.replace(
        layers=layers, lengths=lengths, overflow=cache.overflow | (lengths > cache.max_len)
    )


def _check_room(cache: QuantizedKVCache, counts: jax.Array) -> None:
    """Raise eagerly when concrete lengths show an overflow (no-op under tracing)."""
    if isinstance(counts, jax.core.Tracer) or isinstance(cache.lengths, jax.core.Tracer):
        return
    needed = int(jnp.max(cache.lengths + counts))
    if needed > cache.max_len:
        raise CacheOverflowError(
            f"cache holds {cache.max_len} tokens per sequence but {needed} are needed; "
            "create it with a larger max_len"
        )


def _as_counts(counts: jax.Array | None, batch: int, tokens: int) -> jax.Array:
    if counts is None:
        return jnp.full((batch,), tokens, jnp.int32)
    return jnp.asarray(counts, jnp.int32)


def _check_chunk(cache: QuantizedKVCache, keys: jax.Array, queries: jax.Array) -> None:
    layers, b, _, h, d = keys.shape
    expected = (cache.num_layers, cache.batch, cache.num_kv_heads, cache.config.head_dim)
    if (layers, b, h, d) != expected:
        raise ValueError(
            f"keys/values of shape {keys.shape} do not fit this cache; expected "
            f"[layers={expected[0]}, batch={expected[1]}, tokens, kv_heads={expected[2]}, "
            f"head_dim={expected[3]}]"
        )
    if queries.shape[:2] != (layers, b) or queries.shape[-1] != d or queries.shape[3] % h:
        raise ValueError(
            f"queries of shape {queries.shape} do not fit; expected [layers, batch, tokens, "
            f"q_heads (a multiple of {h}), head_dim={d}]"
        )


def prefill(
    cache: QuantizedKVCache,
    keys: jax.Array,
    values: jax.Array,
    queries: jax.Array,
    counts: jax.Array | None = None,
) -> QuantizedKVCache:
    """Append a chunk of tokens to every layer.

    Args:
      keys, values: [layers, B, T, H, D] post-RoPE keys and values.
      queries: [layers, B, T, Hq, D] post-RoPE queries (MixKVQ statistic).
      counts: [B] valid tokens per sequence (default: all T).

    Quantizes all blocks that become complete; the rest stays in the residual window.
    """
    _check_chunk(cache, keys, queries)
    counts = _as_counts(counts, keys.shape[1], keys.shape[2])
    _check_room(cache, counts)
    update = lambda layer, k, v, q: update_layer(
        layer, cache.lengths, k, v, q, counts, cache.config
    )
    layers = jax.vmap(update)(cache.layers, keys, values, queries)
    return advance(cache, layers, counts)


def append(
    cache: QuantizedKVCache, keys: jax.Array, values: jax.Array, queries: jax.Array
) -> QuantizedKVCache:
    """Append one decode token per sequence: keys/values [layers, B, H, D], queries
    [layers, B, Hq, D]. A full window is quantized into a new block."""
    return prefill(cache, keys[:, :, None], values[:, :, None], queries[:, :, None])


def check_overflow(cache: QuantizedKVCache) -> None:
    """Raise `CacheOverflowError` if any sequence ever exceeded ``max_len``."""
    if bool(jnp.any(cache.overflow)):
        raise CacheOverflowError(
            f"a sequence exceeded the cache capacity of {cache.max_len} tokens "
            f"(lengths {cache.lengths.tolist()}); create the cache with a larger max_len"
        )


def memory_bytes(cache: QuantizedKVCache | LayerKVCache) -> int:
    """Bytes of every array the cache holds (what is actually allocated)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(cache))
