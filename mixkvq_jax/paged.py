"""A paged quantized KV cache: blocks of every sequence in one shared pool of pages.

`PagedKVCache` is `cache.QuantizedKVCache` with the block storage turned into pages:

* **Pool**: each block field of `mixkvq_jax.layout` is stored as ``[L, P, H, rows, 128]``
  (L layers, P pages, H KV heads). That is the non-paged field ``[L, B, H, NB * rows,
  128]`` with the batch axis replaced by a page axis and one block per page, so the
  quantizer, `layout.pack` / `layout.unpack` and `cache.update_layer` are reused as is.
* **Block table** ``[S, MB]`` int32: block j of the sequence in slot s is page
  ``block_table[s, j]`` (S decode slots, MB = blocks per sequence at ``max_len``).
  `layout.block_address` (writes) and `layout.gather_pages` (the XLA path's reads) are
  the only places that follow it.
* **Per slot** (``[L, S, ...]``, as in the non-paged cache): the residual window, the
  sinks, the MixKVQ query statistic, the first-chunk statistics; ``lengths`` and
  ``overflow`` [S].

Pages are handed out by the host (`mixkvq_jax.serve.engine.PagePool`); a freed sequence's
pages go back to it and its slot is reset when the next sequence takes it
(`take_slot` with ``fresh``).

Why ``[L, P, H, rows, 128]`` and not ``[L, H, P * rows, 128]``: a page is then one
contiguous run of ``H * rows`` rows (all heads of a block, one DMA), the page axis is an
untiled leading axis (a TPU index map selects it from a scalar-prefetched block table
with no copy), and every function written for the non-paged layout applies to the pool
as a cache of P one-block "sequences".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mixkvq_jax import layout
from mixkvq_jax.cache import (
    BLOCK_FIELDS,
    LayerKVCache,
    QuantizedKVCache,
    StackedCacheShape,
    init_layer,
)
from mixkvq_jax.config import KVQuantConfig


@struct.dataclass
class PagedKVCache(StackedCacheShape):
    """The paged cache (see the module docstring).

    Attributes:
      layers: `LayerKVCache` with a leading ``[layers]`` axis; block fields are the pool
        [L, P, H, rows, 128], the other fields per slot [L, S, ...].
      block_table: [S, MB] int32 page of each slot's block j (unused entries: any page;
        they are never read past a slot's length nor written).
      lengths: [S] int32 tokens stored per slot.
      overflow: [S] bool, sticky: an update went past ``max_len``.
      config: the static `KVQuantConfig`.
      max_len: static capacity in tokens per sequence (MB = ``config.num_blocks(max_len)``).
    """

    layers: LayerKVCache
    block_table: jax.Array
    lengths: jax.Array
    overflow: jax.Array
    config: KVQuantConfig = struct.field(pytree_node=False)
    max_len: int = struct.field(pytree_node=False)

    @property
    def num_pages(self) -> int:
        return self.layers.value_codes.shape[1]

    @property
    def max_blocks(self) -> int:
        return self.block_table.shape[1]


def init_paged_cache(config: KVQuantConfig, *, num_layers: int, slots: int, num_kv_heads: int,
                     pages: int, max_len: int) -> PagedKVCache:
    """An empty paged cache: ``slots`` sequences of up to ``max_len`` tokens whose
    blocks share ``pages`` pages of one block (``config.residual_length`` tokens, all
    layers and KV heads) each."""
    for name, value in (("num_layers", num_layers), ("slots", slots),
                        ("num_kv_heads", num_kv_heads), ("pages", pages), ("max_len", max_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"init_paged_cache: {name} must be a positive int, got {value!r}")
    r = config.residual_length
    per_slot = init_layer(config, batch=slots, num_kv_heads=num_kv_heads, max_len=r)
    pool = init_layer(config, batch=pages, num_kv_heads=num_kv_heads, max_len=r)
    layer = per_slot.replace(**{name: getattr(pool, name) for name in BLOCK_FIELDS})
    layers = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_layers, *x.shape)).copy(), layer)
    return PagedKVCache(
        layers=layers,
        block_table=jnp.zeros((slots, config.num_blocks(max_len)), jnp.int32),
        lengths=jnp.zeros((slots,), jnp.int32),
        overflow=jnp.zeros((slots,), bool),
        config=config,
        max_len=max_len,
    )


# ---- bytes ------------------------------------------------------------------------------
def page_bytes(config: KVQuantConfig, *, num_layers: int, num_kv_heads: int) -> int:
    """Bytes of one page: one block of R tokens for every layer and KV head."""
    return num_layers * num_kv_heads * sum(config.block_bytes().values())


def slot_bytes(config: KVQuantConfig, *, num_layers: int, num_kv_heads: int,
               max_len: int) -> int:
    """Bytes one decode slot holds outside the pool: residual window, statistics, sinks,
    length and overflow flag, and its block-table row."""
    state = config.cache_bytes(num_layers=num_layers, batch=1, num_kv_heads=num_kv_heads,
                               max_len=0)
    return state + 4 * config.num_blocks(max_len)


def blocks_needed(tokens: int, config: KVQuantConfig) -> int:
    """Pages a sequence needs to store ``tokens`` tokens (complete blocks; the rest sits
    in its slot's residual window)."""
    return max(0, tokens) // config.residual_length


def plan_pool(config: KVQuantConfig, *, num_layers: int, num_kv_heads: int, budget_bytes: int,
              max_len: int, typical_tokens: int, max_slots: int = 256) -> tuple[int, int]:
    """(slots, pages) that fit ``budget_bytes``: as many slots as sequences of
    ``typical_tokens`` tokens fit (at most ``max_slots``), the rest of the budget as pages.

    Raises:
      ValueError: the budget does not hold one slot and the pages of one sequence of
        ``typical_tokens``.
    """
    page = page_bytes(config, num_layers=num_layers, num_kv_heads=num_kv_heads)
    slot = slot_bytes(config, num_layers=num_layers, num_kv_heads=num_kv_heads, max_len=max_len)
    per_seq = slot + max(1, blocks_needed(typical_tokens, config)) * page
    slots = min(max_slots, budget_bytes // per_seq)
    if slots < 1:
        raise ValueError(
            f"a KV budget of {budget_bytes / 2**30:.3f} GiB holds no {config.name} sequence of "
            f"{typical_tokens} tokens ({per_seq / 2**20:.1f} MiB each); raise the budget")
    pages = (budget_bytes - slots * slot) // page
    return int(slots), int(pages)


def memory_bytes(cache: PagedKVCache) -> int:
    """Bytes of every array the paged cache holds."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(cache))


# ---- one slot as a batch of one (prefill) ---------------------------------------------------
def take_slot(cache: PagedKVCache, slot: jax.Array, fresh: jax.Array | bool = False
              ) -> PagedKVCache:
    """Slot ``slot`` as a paged cache of batch 1 that shares the pool (a prefill chunk of
    one sequence runs on it). ``fresh``: the slot starts a new sequence, so its
    per-slot state reads as empty (the previous occupant's is dropped)."""

    def one(name: str, x: jax.Array) -> jax.Array:
        if name in BLOCK_FIELDS:
            return x
        row = jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=1)
        return jnp.where(fresh, jnp.zeros_like(row), row)

    layers = cache.layers.replace(**{name: one(name, getattr(cache.layers, name))
                                     for name in _fields(cache.layers)})
    row = lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)
    return cache.replace(layers=layers, block_table=row(cache.block_table),
                         lengths=jnp.where(fresh, 0, row(cache.lengths)),
                         overflow=jnp.where(fresh, False, row(cache.overflow)))


def put_slot(cache: PagedKVCache, view: PagedKVCache, slot: jax.Array) -> PagedKVCache:
    """Store a `take_slot` view (after it ran) back: its pool and slot ``slot``."""

    def one(name: str, x: jax.Array, v: jax.Array) -> jax.Array:
        if name in BLOCK_FIELDS:
            return v
        return jax.lax.dynamic_update_slice_in_dim(x, v, slot, axis=1)

    layers = cache.layers.replace(**{
        name: one(name, getattr(cache.layers, name), getattr(view.layers, name))
        for name in _fields(cache.layers)})
    put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, slot, axis=0)
    return cache.replace(layers=layers, lengths=put(cache.lengths, view.lengths),
                         overflow=put(cache.overflow, view.overflow))


def _fields(layer: LayerKVCache) -> list[str]:
    return list(layer.__dataclass_fields__)


# ---- the contiguous view (tests, inspection) -------------------------------------------------
def to_contiguous(cache: PagedKVCache) -> QuantizedKVCache:
    """The same sequences as a non-paged `QuantizedKVCache` (each slot's pages gathered
    into its blocks [L, S, H, MB * rows, 128]; entries past a slot's length hold
    whatever page its table names). For tests and inspection: it copies the blocks."""
    gather = jax.vmap(lambda pool: layout.gather_pages(pool, cache.block_table))
    blocks = {name: gather(getattr(cache.layers, name)) for name in BLOCK_FIELDS}
    return QuantizedKVCache(layers=cache.layers.replace(**blocks), lengths=cache.lengths,
                            overflow=cache.overflow, config=cache.config,
                            max_len=cache.max_len)


__all__ = ["PagedKVCache", "blocks_needed", "init_paged_cache", "memory_bytes", "page_bytes",
           "plan_pool", "put_slot", "slot_bytes", "take_slot", "to_contiguous"]
