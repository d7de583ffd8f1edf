"""The cache's block layout, defined once: what a quantized block holds and how it is
stored.

A block (``residual_length`` = R tokens of one KV head) has *parts*, the arrays the
quantizer writes and the attention reads, with their natural shapes (D = head_dim,
n_t / b_t = channels / bits of key tier t, W_t = R * b_t / 32, G / G_v = key / value
group size, P_t / P_v = scale-zero pairs per row, see `KVQuantConfig`):

=================  =============================  ==================================
part               shape per block                dtype
=================  =============================  ==================================
key_full           [n_full, R]                    ``full_dtype`` (channel-major)
key_codes{t}       [n_t, W_t]                     uint32, packed along tokens
key_scales{t}      [n_t, P_t] (per_token [1, R])  ``scale_dtype``
key_zeros{t}       like key_scales{t}             ``scale_dtype``
key_permutation    [1, D] (or [1, 0])             uint8 (int32 for D > 256)
value_codes        [R, D * b_v / 32] | [R, D]     uint32 | ``full_dtype``
value_scales       [R, P_v]                       ``scale_dtype``
value_zeros        [R, P_v]                       ``scale_dtype``
=================  =============================  ==================================

Parts of one dtype are stored together in a *field*, block after block, each block's
parts row-major one after the other and padded to a multiple of `LANES` (128)
elements, so a field is an array ``[..., NB * rows, LANES]``: every block occupies
``rows`` whole rows. This is lane-dense on TPU (minor dimension 128, no tile padding:
the 4- to 8-wide minor dimensions of the parts would be padded 16-32x there), a
block is a contiguous run of rows (it can become a page of a paged cache: a block
table indexes rows in units of ``rows``), and on row-major backends a part is a
reshape and a slice of the field (free on CPU, fused into its consumer).

=================  ============================================  ===================
field              parts, in order                               dtype
=================  ============================================  ===================
key_full           key_full                                      ``full_dtype``
key_codes          key_codes0, key_codes1, ..., key_permutation  uint32
key_scales         key_scales0, key_scales1, ...                 ``scale_dtype``
key_zeros          key_zeros0, key_zeros1, ...                   ``scale_dtype``
value_codes        value_codes                                   uint32 | full
value_scales       value_scales                                  ``scale_dtype``
value_zeros        value_zeros                                   ``scale_dtype``
=================  ============================================  ===================

The permutation is stored in uint32 words after the key codes: 4 uint8 indices a word
(little-endian: index 4w + j is byte j of word w), or one int32 a word for D > 256.
No field is narrower than 32 bits but the 16-bit floats: XLA:TPU lays 8-bit arrays out
in a tiling Mosaic does not take, which cost a relayout copy of the whole stack.

`pack` turns parts into fields (the writer), `unpack` fields into parts (the readers;
the Pallas kernels read the fields directly and do the same in VMEM).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mixkvq_jax.config import KVQuantConfig

LANES = 128
FIELDS = ("key_full", "key_codes", "key_scales", "key_zeros", "value_codes", "value_scales",
          "value_zeros")


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a block: ``shape`` [rows, cols] at element ``offset`` of its field's
    per-block record."""

    name: str
    shape: tuple[int, int]
    offset: int

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclasses.dataclass(frozen=True)
class Field:
    """One stored field: its parts and dtype; ``rows`` rows of `LANES` per block."""

    name: str
    dtype: str
    parts: tuple[Part, ...]

    @property
    def elements(self) -> int:
        """Elements of the parts of one block (before padding)."""
        return sum(p.size for p in self.parts)

    @property
    def rows(self) -> int:
        """Rows of `LANES` elements one block occupies."""
        return -(-self.elements // LANES)


def _key_param_shape(config: KVQuantConfig, count: int) -> tuple[int, int]:
    """Per-block scale (or zero) shape of a key tier of ``count`` channels."""
    r = config.residual_length
    granularity = config.effective_key_granularity
    if granularity == "per_block":
        return count, r // config.key_group_size
    return (1, r) if granularity == "per_token" else (count, 0)


def _value_param_groups(config: KVQuantConfig) -> int:
    """Per-token value scale/zero pairs per block token (0: none stored per block)."""
    if not config.quantizes_values:
        return 0
    return {"per_block": config.head_dim // config.value_group_size,
            "per_token": 1}.get(config.effective_value_granularity, 0)


def _field(name: str, dtype: str, shapes: list[tuple[str, tuple[int, int]]]) -> Field:
    parts, offset = [], 0
    for part_name, shape in shapes:
        parts.append(Part(part_name, shape, offset))
        offset += shape[0] * shape[1]
    return Field(name, dtype, tuple(parts))


@functools.lru_cache(maxsize=256)
def block_fields(config: KVQuantConfig) -> dict[str, Field]:
    """The stored fields of ``config``'s blocks, by name (`FIELDS` order)."""
    r, d = config.residual_length, config.head_dim
    key_codes, key_scales, key_zeros = [], [], []
    for t, (bits, count) in enumerate(config.key_tiers):
        key_codes.append((f"key_codes{t}", (count, r * bits // 32)))
        shape = _key_param_shape(config, count)
        key_scales.append((f"key_scales{t}", shape))
        key_zeros.append((f"key_zeros{t}", shape))
    pairs = _value_param_groups(config)
    value_shape = (r, -(-d * config.value_bits // 32)) if config.quantizes_values else (r, d)
    if config.stores_permutation:
        key_codes.append(("key_permutation", (1, d // permutation_per_word(config))))
    fields = (
        _field("key_full", config.full_dtype, [("key_full", (config.key_channels_full, r))]),
        _field("key_codes", "uint32", key_codes),
        _field("key_scales", config.scale_dtype, key_scales),
        _field("key_zeros", config.scale_dtype, key_zeros),
        _field("value_codes", "uint32" if config.quantizes_values else config.full_dtype,
               [("value_codes", value_shape)]),
        _field("value_scales", config.scale_dtype, [("value_scales", (r, pairs))]),
        _field("value_zeros", config.scale_dtype, [("value_zeros", (r, pairs))]),
    )
    return {f.name: f for f in fields}


def permutation_per_word(config: KVQuantConfig) -> int:
    """Permutation indices per stored uint32 word: 4 bytes (uint8 indices), or 1
    (int32 indices, head_dim > 256)."""
    return 4 if config.permutation_dtype == "uint8" else 1


def field_shape(field: Field, num_blocks: int) -> tuple[int, int]:
    """The trailing [NB * rows, LANES] shape of ``field`` for ``num_blocks`` blocks."""
    return num_blocks * field.rows, LANES


def part_index(config: KVQuantConfig) -> dict[str, tuple[Field, Part]]:
    """Every part name -> (its field, the part)."""
    return {p.name: (f, p) for f in block_fields(config).values() for p in f.parts}


def _as_parts(parts: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The quantizer's dict (tuples per key tier: ``key_codes``, ``key_scales``,
    ``key_zeros``) as flat part names (``key_codes0``, ...)."""
    out: dict[str, jax.Array] = {}
    for name, value in parts.items():
        if isinstance(value, (tuple, list)):
            out.update({f"{name}{t}": x for t, x in enumerate(value)})
        else:
            out[name] = value
    return out


def pack(parts: Mapping[str, Any], config: KVQuantConfig) -> dict[str, jax.Array]:
    """Blocks' parts -> fields.

    Args:
      parts: the block parts with leading dims ``lead + (S,)`` (S blocks), e.g. what
        `cache.quantize_blocks` returns: ``key_codes`` / ``key_scales`` /
        ``key_zeros`` as tuples over the key tiers, ``key_permutation`` [..., S, D]
        (or [..., S, 0]), the others [..., S, *shape].

    Returns:
      `FIELDS` -> [..., S * rows, LANES] in the field's dtype.
    """
    flat = _as_parts(parts)
    perm = flat["key_permutation"].astype(config.permutation_dtype)
    k = permutation_per_word(config)
    if k > 1:  # k indices a word
        perm = perm.reshape(*perm.shape[:-1], -1, k)
    flat["key_permutation"] = jax.lax.bitcast_convert_type(perm, jnp.uint32)[..., None, :]
    lead = flat["value_codes"].shape[:-2]  # [..., S]
    out = {}
    for field in block_fields(config).values():
        dtype = jnp.dtype(field.dtype)
        pieces = [flat[part.name].astype(dtype).reshape(*lead, part.size)
                  for part in field.parts]
        pad = field.rows * LANES - field.elements
        if pad:
            pieces.append(jnp.zeros((*lead, pad), dtype))
        if not pieces:
            pieces.append(jnp.zeros((*lead, 0), dtype))
        record = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
        out[field.name] = record.reshape(*lead[:-1], lead[-1] * field.rows, LANES)
    return out


def unpack(fields: Mapping[str, jax.Array], config: KVQuantConfig) -> dict[str, Any]:
    """Fields [..., S * rows, LANES] -> the blocks' parts, in the quantizer's dict form
    (tuples per key tier; ``key_permutation`` [..., S, D]), each [..., S, *shape].

    On row-major backends this is reshapes and static slices of the fields (a part that
    fills its field whole is a bitcast). 16-bit float fields may come as their uint16
    bits (`cache.to_bits`): the parts keep the field's dtype.
    """
    specs = block_fields(config)
    values = fields["value_codes"]  # every config has value rows: it gives S
    s = values.shape[-2] // specs["value_codes"].rows
    lead = values.shape[:-2]
    flat: dict[str, jax.Array] = {}
    for field in specs.values():
        record = fields[field.name].reshape(*lead, s, field.rows * LANES)
        for part in field.parts:
            piece = record[..., part.offset : part.offset + part.size]
            flat[part.name] = piece.reshape(*lead, s, *part.shape)
    if config.stores_permutation:
        perm = jax.lax.bitcast_convert_type(flat["key_permutation"][..., 0, :],
                                            jnp.dtype(config.permutation_dtype))
        perm = perm.reshape(*lead, s, -1)  # k indices a word: [..., D / k, k] -> [..., D]
    else:
        perm = jnp.zeros((*lead, s, 0), config.permutation_dtype)
    out: dict[str, Any] = {
        "key_full": flat["key_full"],
        "key_permutation": perm,
        "value_codes": flat["value_codes"],
        "value_scales": flat["value_scales"],
        "value_zeros": flat["value_zeros"],
    }
    n = len(config.key_tiers)
    for name in ("key_codes", "key_scales", "key_zeros"):
        out[name] = tuple(flat[f"{name}{t}"] for t in range(n))
    return out


# ---- pages: a block table over a pool of blocks ----------------------------------------
# A paged cache (`mixkvq_jax.paged`) stores each field as a pool ``[P, H, rows, LANES]``:
# the non-paged layout with the batch axis replaced by a page axis and one block per
# "sequence". Block j of sequence b is page ``block_table[b, j]``. These two functions are
# the only places that turn (sequence, block) into a storage address.
def block_address(seq: jax.Array, block: jax.Array, rows: int,
                  block_table: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Where block ``block`` of sequence ``seq`` is stored in a field: (index along the
    field's leading batch / page axis, first row). Non-paged ``[B, H, NB * rows, LANES]``:
    ``(seq, block * rows)``; paged pool ``[P, H, rows, LANES]``: ``(block_table[seq,
    block], 0)``."""
    if block_table is None:
        return seq, block * rows
    return block_table[seq, block], jnp.zeros_like(block)


def gather_pages(pool: jax.Array, pages: jax.Array, index: jax.Array | None = None
                 ) -> jax.Array:
    """Read blocks through a block table (the XLA path's paged read: one gather).

    Args:
      pool: a field's pool [P, H, rows, LANES] (or a stack [L, P, H, rows, LANES] with
        ``index``, the layer to read).
      pages: [B, S] int32 page ids, S consecutive blocks of each sequence.

    Returns:
      [B, H, S * rows, LANES]: the blocks as the non-paged field holds them.
    """
    got = pool[pages] if index is None else pool[index, pages]  # [B, S, H, rows, LANES]
    b, s, h, rows, lanes = got.shape
    return got.transpose(0, 2, 1, 3, 4).reshape(b, h, s * rows, lanes)


def field_bytes_per_block(config: KVQuantConfig) -> dict[str, int]:
    """Stored bytes of one block of one KV head, per field (padding included)."""
    return {f.name: f.rows * LANES * jnp.dtype(f.dtype).itemsize
            for f in block_fields(config).values()}


def padding_bytes_per_block(config: KVQuantConfig) -> int:
    """Bytes of one block (one KV head) that pad the fields to whole rows."""
    return sum((f.rows * LANES - f.elements) * jnp.dtype(f.dtype).itemsize
               for f in block_fields(config).values())


__all__ = ["FIELDS", "LANES", "Field", "Part", "block_address", "block_fields",
           "field_bytes_per_block", "field_shape", "gather_pages", "pack",
           "padding_bytes_per_block", "part_index", "permutation_per_word", "unpack"]
