"""Pallas decode attention over the packed low-bit KV cache: the entry point
(`cached_attention_pallas`), for TPU (Mosaic, `decode_tpu`) and GPU (Triton, `decode_gpu`).

One query token per sequence (C == 1). Every program owns one (sequence, KV head,
sequence split) and all ``Gq`` query heads of that KV head (GQA), streams the split's
quantized blocks once with an online softmax and writes a normalized partial result and
its log-sum-exp. This wrapper merges the splits, the residual window and the sinks
(plain jnp: at most R - 1 + S full-precision tokens) by log-sum-exp, so the result
equals `mixkvq_jax.attention_xla.history_attention_xla`, the reference both bodies are
tested against.

The kernels read the stacked cache in place (the layer index is a kernel argument: TPU
scalar prefetch, GPU pointer offset), from the lane-dense stored fields of
`mixkvq_jax.layout`; nothing dequantized is written to HBM. Every ``pallas_call``
carries a `pl.CostEstimate` (one layer of the cache read once).

**Attention sinks** (``config.sink_tokens`` = S > 0): both bodies mask the first S rows
of each sequence's first block; the wrapper attends to the exact sink copies.

**Verified here** (CPU only): both bodies in interpret mode against the XLA oracle,
lowering for ``platforms=["tpu"]`` / ``lowering_platforms=("cuda",)``, and the TPU body
compiled by Mosaic for deviceless TPU topologies (`mixkvq_jax.tpu_aot`). Not verifiable
without a GPU: Triton's compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixkvq_jax.cache import LayerKVCache, from_bits, layer_at, layer_partition_specs
from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.layout import block_fields, field_bytes_per_block
from mixkvq_jax.partials import Partial, merge_partials

from .decode_gpu import call_gpu
from .decode_plan import (
    BACKENDS,
    HIGHEST,
    Layout,
    cache_inputs,
    query_inputs,
    resolve_backend,
    unsupported_reason,
)
from .decode_tpu import call_tpu


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
    scores = jnp.einsum("bhgd,bhtd->bhgt", qg, keys, precision=HIGHEST)
    valid = valid[:, None, None, :]
    m = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid, jnp.exp(scores - m_safe[..., None]), 0.0)
    total = jnp.sum(p, axis=-1)
    safe = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgt,bhtd->bhgd", p, values, precision=HIGHEST) / safe[..., None]
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
    block_table: Any = None,
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
      block_table: [B, MB] int32 for a paged cache (`mixkvq_jax.paged`): the block
        fields are a pool [(L,) P, H, rows, 128] and block j of sequence b is page
        ``block_table[b, j]``. TPU: the table is scalar-prefetched and the index maps
        pick one page per grid step; GPU: the page offsets the block's pointer.

    Returns:
      `Partial`: out [B, 1, Hq, D] float32 normalized, lse [B, 1, Hq] (-inf where a
      sequence has no cached token).

    Under a mesh context (``jax.set_mesh``, axes ``data`` / ``model``) the kernel runs
    per shard (`jax.shard_map`): q and the cache sharded by batch over ``data`` and heads
    over ``model``, as `mixkvq_jax.models.sharding` places them.
    """
    if backend is None and not interpret and jax.default_backend() == "cpu":
        raise ValueError(
            "Pallas decode attention needs a TPU or GPU to compile; on CPU use "
            "impl='pallas_interpret' (interpret mode) or impl='xla'"
        )
    backend = resolve_backend(backend)
    reason = unsupported_reason(q, layer, config, backend, layer_index=layer_index,
                                block_table=block_table)
    if reason is not None:
        raise ValueError(f"Pallas decode attention: {reason}")
    if block_table is not None:
        block_table = jnp.asarray(block_table, jnp.int32)
    local = functools.partial(_attend_local, config=config, scale=scale, interpret=interpret,
                              backend=backend, num_splits=num_splits,
                              blocks_per_step=blocks_per_step, block_table=block_table)
    index = None if layer_index is None else jnp.asarray(layer_index, jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, layer, jnp.asarray(lengths, jnp.int32), index)
    if block_table is not None:  # the pool's page axis is not the batch axis a mesh splits
        raise ValueError("Pallas decode attention: a paged cache on a multi-device mesh is "
                         "not supported; serve on one device")
    # On a mesh (`jax.set_mesh`): one kernel per shard, each over its own sequences and
    # KV heads (batch over "data", heads over "model", the cache's own sharding), so no
    # device gathers the cache; the partial results come back sharded the same way.
    data = "data" if "data" in mesh.axis_names else None
    model = "model" if "model" in mesh.axis_names else None
    q_spec = P(data, None, model, None)
    in_specs = (q_spec, layer_partition_specs(layer, data, model, stacked=index is not None),
                P(data), None if index is None else P())
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                         out_specs=Partial(q_spec, P(data, None, model)), check_vma=False)(
        q, layer, jnp.asarray(lengths, jnp.int32), index)


def _attend_local(q: jax.Array, layer: LayerKVCache, lengths: jax.Array, layer_index: Any, *,
                  config: KVQuantConfig, scale: float, interpret: bool | Any, backend: str,
                  num_splits: int | None, blocks_per_step: int,
                  block_table: jax.Array | None) -> Partial:
    """`cached_attention_pallas` on the arrays of one device (shapes as there)."""
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
    lay = Layout(config, gq, backend)

    qg = (q[:, 0].astype(jnp.float32) * scale).reshape(b, h, group, d)
    qg_pad = jnp.pad(qg, ((0, 0), (0, 0), (0, gq - group), (0, 0)))
    inputs = {**query_inputs(qg_pad, lay), **cache_inputs(layer, config)}
    if block_table is None:
        nb = layer.value_codes.shape[3] // lay.fields["value_codes"].rows
    else:
        nb = block_table.shape[1]
    splits = num_splits or default_num_splits(b, h, nb, backend)
    if backend == "tpu":
        out, lse = call_tpu(inputs, lengths, layer_index, lay, num_splits=splits,
                             blocks_per_step=blocks_per_step, interpret=interpret,
                             block_table=block_table)
    else:
        out, lse = call_gpu(inputs, lengths, layer_index, lay, num_splits=splits,
                             interpret=interpret, block_table=block_table)
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
    """HBM bytes one decode call reads: the stored rows of the used blocks of every
    field (`mixkvq_jax.layout`, row padding included), the residual window and the
    query."""
    del backend  # the same fields on every backend
    b, h = layer.value_codes.shape[:2]
    fields = block_fields(config)
    nb = layer.value_codes.shape[2] // fields["value_codes"].rows
    used = sum(min(int(n) // config.residual_length, nb) for n in lengths)
    per_block = sum(field_bytes_per_block(config).values())
    q_bytes = (q_heads // h) * config.head_dim * 4
    window = 2 * config.residual_length * config.head_dim * jnp.dtype(config.full_dtype).itemsize
    return used * h * per_block + b * h * (window + q_bytes)


__all__: list[str] = [
    "BACKENDS", "cached_attention_pallas", "default_num_splits", "kernel_bytes_read",
    "unsupported_reason",
]
