"""`KVQuantConfig`: what a KV-cache preset stores, and what it costs in bytes.

A config is a frozen, hashable dataclass, so it can be a `jax.jit` static argument.
Tier sizes are static channel *counts* per head (they fix array shapes under jit);
presets in ``configs/kv/*.yaml`` give them as fractions of ``head_dim`` so one preset
serves head_dim 64 and 128 models alike.

Key layout (per KV head, per block of ``residual_length`` tokens): the channels are
ranked by salience and split into tiers, ``full`` (kept in ``full_dtype``), ``int8``,
``int4`` and ``int2``; quantized tiers are per-channel over groups of
``key_group_size`` tokens (KIVI). Values are per-token over groups of
``value_group_size`` channels at ``value_bits`` (16 means not quantized).

KV Pareto options (single-tier presets only): the quantization granularity of keys and
values (``per_block`` as above, ``per_token``, ``per_channel`` or ``per_tensor``, the
last two with statistics fixed at prefill) and K-smoothing; see `KVQuantConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

QUANT_BITS = (8, 4, 2)
SALIENCE_MODES = ("query_aware", "range_only", "none")
FULL_DTYPES = ("bfloat16", "float16", "float32")
SCALE_DTYPES = ("bfloat16", "float16", "float32")
# Scale/zero granularity of a quantized key or value tier (KV Pareto); see KVQuantConfig.
GRANULARITIES = ("per_block", "per_token", "per_channel", "per_tensor")
FIXED_GRANULARITIES = ("per_channel", "per_tensor")  # statistics fixed at the first chunk
VALUE_ROTATIONS = ("none", "hadamard")  # basis values are stored in (`mixkvq_jax.rotation`)
# configs/ is installed as the package mixkvq_jax.configs (pyproject package-dir mapping).
PRESET_DIR = Path(str(importlib.resources.files("mixkvq_jax.configs"))) / "kv"
MAX_PRESET_FILE_BYTES = 1 << 20  # a preset is a few hundred bytes; refuse to parse a blob
MAX_BLOCK = 1 << 16  # largest residual_length / group size accepted
_INT_FIELDS = ("head_dim", "key_channels_full", "key_channels_int8", "key_channels_int4",
               "key_channels_int2", "key_group_size", "value_bits", "value_group_size",
               "residual_length", "salience_base_bits", "sink_tokens")
_STR_FIELDS = ("name", "salience", "full_dtype", "scale_dtype", "key_granularity",
               "value_granularity", "value_rotation")


class KVConfigError(ValueError):
    """A KV-cache configuration or preset is invalid; the message names the fix."""


def _words(n: int, bits: int) -> int:
    """uint32 words holding n codes of ``bits`` bits (padded, as quant.pack does)."""
    return -(-n * bits // 32)


def _dtype_bytes(name: str) -> int:
    return np.dtype(name if name != "bfloat16" else "float16").itemsize


@dataclasses.dataclass(frozen=True)
class KVQuantConfig:
    """A KV-cache quantization scheme for one head_dim.

    Attributes:
      name: preset name, for reports.
      head_dim: channels per head; the four ``key_channels_*`` counts sum to it.
      key_channels_full / _int8 / _int4 / _int2: key channels per head in each tier.
      key_group_size: tokens per key scale/zero group (per-channel quantization).
      value_bits: 2, 4 or 8, or 16 for values stored unquantized in ``full_dtype``.
      value_group_size: channels per value scale/zero group (per-token quantization).
      residual_length: recent tokens kept in ``full_dtype``; also the block size in
        which keys and values are quantized (a multiple of both group sizes).
      salience: ``query_aware`` (MixKVQ: mean |q| x quantization step),
        ``range_only`` (the step alone, no query term) or ``none`` (tiers by channel
        index, no permutation stored).
      salience_base_bits: the bit width B whose step (range / (2^B - 1)) enters the
        salience.
      full_dtype: storage dtype of unquantized channels and of the residual window.
      scale_dtype: storage dtype of scales and zero points.
      key_granularity, value_granularity: what one scale/zero pair covers, per KV head
        and sequence (one of `GRANULARITIES`):

        * ``per_block`` (default): keys per channel over groups of ``key_group_size``
          tokens (KIVI), values per token over groups of ``value_group_size`` channels;
        * ``per_token``: one pair per token over all ``head_dim`` channels;
        * ``per_channel``: one pair per channel over the whole sequence;
        * ``per_tensor``: one pair over all channels and tokens.

        ``per_channel`` and ``per_tensor`` statistics are computed from the first chunk
        written to an empty sequence (the prefill, or its first chunk under chunked
        prefill) and fixed afterwards: later tokens outside that range are *clamped*
        to it. A granularity for a part that is not quantized (values at 16 bits, keys
        with no quantized tier) has no effect.
      key_smoothing: K-smoothing (KV Pareto): subtract the per-channel key mean of the
        first chunk (stored, float32) before quantizing the keys; attention adds
        ``q . mean`` back to every quantized score, exactly. No effect without a
        quantized key tier.
      sink_tokens: the first ``sink_tokens`` tokens of every sequence (attention sinks,
        which draw a large share of attention) are also kept in ``full_dtype`` in a
        small per-sequence buffer and attended from there; their rows in the first
        quantized block are left out of its scales, zero points and MixKVQ salience.
        Must be below ``residual_length``. With ``per_channel`` / ``per_tensor``
        granularity or K-smoothing the first-chunk statistics still include them.
      value_rotation: ``none``, or ``hadamard``: values are stored (quantized, in the
        residual window and as sinks) multiplied by the orthonormal Hadamard matrix of
        order ``head_dim`` (a power of two), and attention outputs are rotated back
        (`mixkvq_jax.rotation`). Same bytes and layout; lower 2-bit value error. No
        effect when values are not quantized.

    Non-default granularities and smoothing need a single key tier (no salience
    permutation; e.g. k8v8..k2v2, kivi2/4, int8); mixed-precision (MixKVQ) presets
    reject them.
    """

    name: str
    head_dim: int
    key_channels_full: int
    key_channels_int8: int = 0
    key_channels_int4: int = 0
    key_channels_int2: int = 0
    key_group_size: int = 32
    value_bits: int = 16
    value_group_size: int = 32
    residual_length: int = 128
    salience: str = "query_aware"
    salience_base_bits: int = 2
    full_dtype: str = "bfloat16"
    scale_dtype: str = "bfloat16"
    key_granularity: str = "per_block"
    value_granularity: str = "per_block"
    key_smoothing: bool = False
    sink_tokens: int = 0
    value_rotation: str = "none"

    def __post_init__(self) -> None:
        for field in _INT_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise KVConfigError(f"{self.name}: {field}={value!r}; give an integer")
        for field in _STR_FIELDS:
            if not isinstance(getattr(self, field), str):
                raise KVConfigError(
                    f"{self.name!r}: {field}={getattr(self, field)!r}; give a string")
        counts = self.key_channel_counts
        if min(counts) < 0:
            raise KVConfigError(f"{self.name}: key channel counts must be >= 0, got {counts}")
        if sum(counts) != self.head_dim:
            raise KVConfigError(
                f"{self.name}: key channel counts full/int8/int4/int2 = {counts} sum to "
                f"{sum(counts)}, but head_dim is {self.head_dim}; make them sum to head_dim"
            )
        if self.value_bits not in (*QUANT_BITS, 16):
            raise KVConfigError(
                f"{self.name}: value_bits={self.value_bits} is unsupported; use 2, 4, 8 or 16"
            )
        if self.salience not in SALIENCE_MODES:
            raise KVConfigError(
                f"{self.name}: salience={self.salience!r}; use one of {', '.join(SALIENCE_MODES)}"
            )
        if self.salience_base_bits not in QUANT_BITS:
            raise KVConfigError(f"{self.name}: salience_base_bits must be 2, 4 or 8")
        if self.full_dtype not in FULL_DTYPES:
            raise KVConfigError(
                f"{self.name}: full_dtype={self.full_dtype!r}; use one of {', '.join(FULL_DTYPES)}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise KVConfigError(
                f"{self.name}: scale_dtype={self.scale_dtype!r}; use one of "
                f"{', '.join(SCALE_DTYPES)}"
            )
        for field in ("key_group_size", "value_group_size", "residual_length"):
            if not 0 < getattr(self, field) <= MAX_BLOCK:
                raise KVConfigError(f"{self.name}: {field}={getattr(self, field)} must be in "
                                    f"1..{MAX_BLOCK}")
        if self.residual_length % self.key_group_size:
            raise KVConfigError(
                f"{self.name}: residual_length={self.residual_length} is not a multiple of "
                f"key_group_size={self.key_group_size}; pick R = k * G"
            )
        if self.quantizes_values and self.head_dim % self.value_group_size:
            raise KVConfigError(
                f"{self.name}: head_dim={self.head_dim} is not a multiple of "
                f"value_group_size={self.value_group_size}"
            )
        for field in ("key_granularity", "value_granularity"):
            if getattr(self, field) not in GRANULARITIES:
                raise KVConfigError(
                    f"{self.name}: {field}={getattr(self, field)!r} is unknown; use one of "
                    f"{', '.join(GRANULARITIES)}"
                )
        if not isinstance(self.key_smoothing, bool):
            raise KVConfigError(
                f"{self.name}: key_smoothing={self.key_smoothing!r}; use true or false"
            )
        if (not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool)
                or not 0 <= self.sink_tokens < self.residual_length):
            raise KVConfigError(
                f"{self.name}: sink_tokens={self.sink_tokens!r}; use an int from 0 to "
                f"residual_length - 1 = {self.residual_length - 1}"
            )
        if self.value_rotation not in VALUE_ROTATIONS:
            raise KVConfigError(
                f"{self.name}: value rotation {self.value_rotation!r} is unknown; use one of "
                f"{', '.join(VALUE_ROTATIONS)}"
            )
        if self.value_rotation == "hadamard" and self.head_dim & (self.head_dim - 1):
            raise KVConfigError(
                f"{self.name}: a Hadamard value rotation needs a power-of-two head_dim, got "
                f"{self.head_dim}; use value rotation none for this model"
            )
        n_key_tiers = len(self.key_tiers) + (self.key_channels_full > 0)
        non_default = (self.key_granularity != "per_block"
                       or self.value_granularity != "per_block" or self.key_smoothing)
        if non_default and n_key_tiers > 1:
            raise KVConfigError(
                f"{self.name}: key/value granularity other than per_block and key_smoothing "
                f"need a single key tier, but key channels full/int8/int4/int2 are "
                f"{self.key_channel_counts}; use a uniform preset (k8v8..k2v2, kivi2/4, "
                "int8) or keep per_block without smoothing"
            )

    # ---- derived, static -------------------------------------------------------------
    @property
    def key_channel_counts(self) -> tuple[int, int, int, int]:
        """(full, int8, int4, int2) channel counts per head."""
        return (
            self.key_channels_full,
            self.key_channels_int8,
            self.key_channels_int4,
            self.key_channels_int2,
        )

    @property
    def key_tiers(self) -> tuple[tuple[int, int], ...]:
        """The non-empty quantized key tiers as (bits, channels), widest first.

        Channel order inside a block (after the salience permutation) is: the full
        tier, then these tiers in this order.
        """
        pairs = zip(QUANT_BITS, self.key_channel_counts[1:], strict=True)
        return tuple((bits, count) for bits, count in pairs if count > 0)

    @property
    def quantizes_values(self) -> bool:
        return self.value_bits != 16

    @property
    def rotates_values(self) -> bool:
        """Values are quantized and stored Hadamard-rotated (`mixkvq_jax.rotation`)."""
        return self.value_rotation == "hadamard" and self.quantizes_values

    @property
    def is_full_precision(self) -> bool:
        """True when neither keys nor values are quantized (the bf16/fp32 baselines)."""
        return not self.key_tiers and not self.quantizes_values

    @property
    def stores_permutation(self) -> bool:
        """A per-block channel permutation is stored when salience picks among 2+ tiers."""
        n_nonempty = sum(1 for c in self.key_channel_counts if c > 0)
        return self.salience != "none" and n_nonempty > 1

    @property
    def effective_key_granularity(self) -> str:
        """``key_granularity``, or ``per_block`` when no key channel is quantized."""
        return self.key_granularity if self.key_tiers else "per_block"

    @property
    def effective_value_granularity(self) -> str:
        """``value_granularity``, or ``per_block`` when values are not quantized."""
        return self.value_granularity if self.quantizes_values else "per_block"

    @property
    def smooths_keys(self) -> bool:
        """K-smoothing is on and some key channel is quantized."""
        return self.key_smoothing and bool(self.key_tiers)

    @property
    def fixed_key_params(self) -> int:
        """Key scale/zero pairs per (sequence, KV head) fixed at the first chunk:
        head_dim (per_channel), 1 (per_tensor) or 0."""
        return {"per_channel": self.head_dim, "per_tensor": 1}.get(
            self.effective_key_granularity, 0)

    @property
    def fixed_value_params(self) -> int:
        """The same for values."""
        return {"per_channel": self.head_dim, "per_tensor": 1}.get(
            self.effective_value_granularity, 0)

    @property
    def has_first_chunk_statistics(self) -> bool:
        """Something (fixed scales/zeros, the smoothing mean) is taken from the first
        chunk of each sequence, so prefill(n) + appends != prefill(n + m) in general."""
        return bool(self.fixed_key_params or self.fixed_value_params or self.smooths_keys)

    @property
    def uses_kv_pareto_options(self) -> bool:
        """A non-per_block granularity or K-smoothing is in effect (the Pallas decode
        kernel does not serve these; the XLA path does)."""
        return (self.effective_key_granularity != "per_block"
                or self.effective_value_granularity != "per_block" or self.smooths_keys)

    @property
    def permutation_dtype(self) -> str:
        return "uint8" if self.head_dim <= 256 else "int32"

    @property
    def full_bits(self) -> int:
        return 8 * _dtype_bytes(self.full_dtype)

    @property
    def scale_bytes(self) -> int:
        return _dtype_bytes(self.scale_dtype)

    @property
    def full_bytes(self) -> int:
        return _dtype_bytes(self.full_dtype)

    @property
    def average_key_bits(self) -> float:
        """Average bits per key element, codes only (the papers' convention: "C2.7")."""
        bits = self.full_bits * self.key_channels_full
        bits += sum(b * c for b, c in self.key_tiers)
        return bits / self.head_dim

    @property
    def average_value_bits(self) -> float:
        return float(self.full_bits if not self.quantizes_values else self.value_bits)

    # ---- bytes ------------------------------------------------------------------------
    def block_bytes(self) -> dict[str, int]:
        """Bytes of one quantized block (``residual_length`` tokens) of one KV head."""
        r, d = self.residual_length, self.head_dim
        # Scale/zero pairs per block: per channel x group (per_block), per token
        # (per_token), none (per_channel / per_tensor: fixed per sequence, `fixed_bytes`).
        def key_pairs(count: int) -> int:
            granularity = self.effective_key_granularity
            if granularity == "per_block":
                return count * (r // self.key_group_size)
            return r if granularity == "per_token" else 0

        value_pairs = {"per_block": r * (d // self.value_group_size),
                       "per_token": r}.get(self.effective_value_granularity, 0)
        key_codes = self.key_channels_full * r * self.full_bytes
        key_codes += sum(count * 4 * _words(r, bits) for bits, count in self.key_tiers)
        key_params = sum(2 * key_pairs(count) * self.scale_bytes for _, count in self.key_tiers)
        perm = d * np.dtype(self.permutation_dtype).itemsize if self.stores_permutation else 0
        if self.quantizes_values:
            value_codes = r * 4 * _words(d, self.value_bits)
            value_params = 2 * value_pairs * self.scale_bytes
        else:
            value_codes, value_params = r * d * self.full_bytes, 0
        from mixkvq_jax.layout import padding_bytes_per_block  # layout imports config

        return {
            "key_codes": key_codes,
            "key_scales_zeros": key_params,
            "key_permutation": perm,
            "value_codes": value_codes,
            "value_scales_zeros": value_params,
            # Each stored field pads a block to whole rows of 128 elements
            # (`mixkvq_jax.layout`): allocated, so counted.
            "row_padding": padding_bytes_per_block(self),
        }

    def fixed_bytes(self) -> dict[str, int]:
        """Bytes per (sequence, KV head) that do not grow with the sequence: the
        statistics fixed at the first chunk (per_channel / per_tensor scales and zeros,
        the K-smoothing mean in float32) and the full-precision sink tokens."""
        return {
            "key_fixed_scales_zeros": 2 * self.fixed_key_params * self.scale_bytes,
            "value_fixed_scales_zeros": 2 * self.fixed_value_params * self.scale_bytes,
            "key_mean": 4 * self.head_dim if self.smooths_keys else 0,
            "sink_keys_values": 2 * self.sink_tokens * self.head_dim * self.full_bytes,
        }

    @property
    def bytes_per_token(self) -> float:
        """Steady-state bytes per cached token per KV head (one layer), keys + values,
        scales, zero points and channel indices included (residual window and the
        per-sequence constant `fixed_bytes` excluded)."""
        return sum(self.block_bytes().values()) / self.residual_length

    @property
    def bf16_bytes_per_token(self) -> int:
        """The same for an unquantized BF16 cache: 2 x head_dim x 2 bytes."""
        return 4 * self.head_dim

    @property
    def compression_vs_bf16(self) -> float:
        """bytes_per_token / BF16 bytes_per_token (0.19 means 19% of BF16)."""
        return self.bytes_per_token / self.bf16_bytes_per_token

    def num_blocks(self, max_len: int) -> int:
        """Quantized blocks needed so a cache can hold ``max_len`` tokens."""
        return -(-max_len // self.residual_length)

    def cache_bytes(self, *, num_layers: int, batch: int, num_kv_heads: int, max_len: int) -> int:
        """Bytes of the arrays `cache.init_cache` allocates for these dimensions."""
        per_head = self.num_blocks(max_len) * sum(self.block_bytes().values())
        per_head += 2 * self.residual_length * self.head_dim * self.full_bytes  # window
        per_head += self.head_dim * 4  # running mean |q| (float32)
        per_head += sum(self.fixed_bytes().values())  # first-chunk statistics, sinks
        per_layer = batch * num_kv_heads * per_head + batch * 4  # + query count (int32)
        return num_layers * per_layer + batch * (4 + 1)  # + lengths (int32), overflow (bool)

    def describe(self) -> str:
        full, i8, i4, i2 = self.key_channel_counts
        keys = f"keys full/int8/int4/int2 = {full}/{i8}/{i4}/{i2} ({self.average_key_bits:.2f} b)"
        vals = f"values {self.value_bits} b" if self.quantizes_values else "values full"
        if self.rotates_values:
            vals += " (Hadamard-rotated)"
        extra = ""
        if self.uses_kv_pareto_options:
            extra = (f", granularity k/v = {self.effective_key_granularity}/"
                     f"{self.effective_value_granularity}"
                     + (", K-smoothing" if self.smooths_keys else ""))
        if self.sink_tokens:
            extra += f", {self.sink_tokens} sink tokens full"
        return (
            f"{self.name}: {keys}, {vals}{extra}, R={self.residual_length}, "
            f"{self.bytes_per_token:.1f} B/token/head ({100 * self.compression_vs_bf16:.1f}% "
            "of bf16)"
        )


# ---- presets ---------------------------------------------------------------------------
_PRESET_KEYS = {"name", "description", "key", "value", "residual_length", "salience",
                "salience_base_bits", "full_dtype", "scale_dtype", "key_granularity",
                "value_granularity", "key_smoothing", "sink_tokens"}
_KEY_KEYS = {"full", "int8", "int4", "int2", "bits", "group_size"}
_VALUE_KEYS = {"bits", "group_size", "rotation"}


def available_presets() -> list[str]:
    """Names of the presets shipped in configs/kv/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _check_keys(section: str, given: Mapping[str, Any], allowed: set[str], source: str) -> None:
    unknown = sorted(str(k) for k in set(given) - allowed)
    if unknown:
        raise KVConfigError(
            f"{source}: unknown {section} key(s) {unknown}; allowed: {sorted(allowed)}"
        )


def _resolve_tiers(spec: Mapping[str, Any], head_dim: int, source: str) -> dict[str, int]:
    """Turn a tier spec (fractions of head_dim, absolute counts, or 'rest') into counts."""
    if "bits" in spec:  # uniform keys: `bits: 2` means every channel int2
        bits = spec["bits"]
        if bits not in (*QUANT_BITS, 16):
            raise KVConfigError(f"{source}: key bits={bits} is unsupported; use 2, 4, 8 or 16")
        return {"full" if bits == 16 else f"int{bits}": head_dim}
    counts: dict[str, int] = {}
    rest = [t for t in ("full", "int8", "int4", "int2") if spec.get(t) == "rest"]
    if len(rest) > 1:
        raise KVConfigError(f"{source}: only one key tier may be 'rest', got {rest}")
    for tier in ("full", "int8", "int4", "int2"):
        value = spec.get(tier, 0)
        if value == "rest":
            continue
        if isinstance(value, float) and 0 <= value <= 1:
            counts[tier] = int(round(value * head_dim))
        elif isinstance(value, int) and value >= 0:
            counts[tier] = value
        else:
            raise KVConfigError(
                f"{source}: key tier {tier}={value!r}; give a fraction of head_dim in [0, 1], "
                "a channel count, or 'rest'"
            )
    if rest:
        counts[rest[0]] = head_dim - sum(counts.values())
    return counts


def config_from_dict(
    spec: Mapping[str, Any], head_dim: int, *, source: str = "config", **overrides: Any
) -> KVQuantConfig:
    """Build a config from a preset mapping (the YAML schema of configs/kv/)."""
    _check_keys("top-level", spec, _PRESET_KEYS, source)
    sections = {}
    for section in ("key", "value"):
        given = spec.get(section, {"bits": 16})
        if not isinstance(given, Mapping):
            raise KVConfigError(f"{source}: `{section}` must be a mapping (e.g. `{section}: "
                                f"{{bits: 2, group_size: 32}}`), got {given!r}")
        sections[section] = dict(given)
    key, value = sections["key"], sections["value"]
    _check_keys("key", key, _KEY_KEYS, source)
    _check_keys("value", value, _VALUE_KEYS, source)
    tiers = _resolve_tiers(key, head_dim, source)
    kwargs: dict[str, Any] = {
        "name": spec.get("name", source),
        "head_dim": head_dim,
        "key_channels_full": tiers.get("full", 0),
        "key_channels_int8": tiers.get("int8", 0),
        "key_channels_int4": tiers.get("int4", 0),
        "key_channels_int2": tiers.get("int2", 0),
        "key_group_size": key.get("group_size", 32),
        "value_bits": value.get("bits", 16),
        "value_group_size": value.get("group_size", 32),
        "value_rotation": value.get("rotation", "none"),
    }
    for field in ("residual_length", "salience", "salience_base_bits", "full_dtype",
                  "scale_dtype", "key_granularity", "value_granularity", "key_smoothing",
                  "sink_tokens"):
        if field in spec:
            kwargs[field] = spec[field]
    fields = {f.name for f in dataclasses.fields(KVQuantConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise KVConfigError(f"unknown KVQuantConfig field(s) {bad}; allowed: {sorted(fields)}")
    kwargs.update(overrides)
    return KVQuantConfig(**kwargs)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def parse_kv_yaml(data: bytes, source: str) -> dict[str, Any]:
    """The mapping a preset YAML holds, its name defaulting to ``source``'s stem; every
    problem (not UTF-8, not YAML, not a mapping, unknown keys) is a `KVConfigError`."""
    if len(data) > MAX_PRESET_FILE_BYTES:
        raise KVConfigError(f"{source}: {len(data)} bytes is too large for a preset YAML "
                            f"(at most {MAX_PRESET_FILE_BYTES}); pass the right file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KVConfigError(f"{source}: not a UTF-8 text file ({err.reason} at byte "
                            f"{err.start}); pass a preset YAML") from None
    try:
        spec = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:
        raise KVConfigError(f"{source}: not valid YAML ({_one_line(err)})") from None
    if not isinstance(spec, Mapping):
        raise KVConfigError(f"{source}: a preset must be a YAML mapping (like "
                            f"configs/kv/mixkvq.yaml), got {type(spec).__name__}")
    if not all(isinstance(k, str) for k in spec):
        raise KVConfigError(f"{source}: preset keys must be strings, got "
                            f"{sorted(map(repr, spec))}")
    _check_keys("top-level", spec, _PRESET_KEYS, source)
    return {"name": Path(source).stem, **spec}


def read_kv_spec(name_or_path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(file, parsed mapping) of a preset name or YAML path: everything `load_kv_config`
    checks that does not need the model's head_dim, so CLIs can call it before loading a
    model. Raises `KVConfigError`."""
    text = str(name_or_path)
    if not text.strip():
        raise KVConfigError(f"empty KV preset name; choose one of "
                            f"{', '.join(available_presets())} or pass a preset YAML path")
    path = Path(text)
    if path.is_dir():
        raise KVConfigError(f"KV preset path {path} is a directory; pass a preset YAML file")
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = PRESET_DIR / f"{text}.yaml"
        if "/" in text or not path.is_file():
            raise KVConfigError(
                f"unknown KV preset {text!r}; choose one of {', '.join(available_presets())} "
                "or pass a path to a preset YAML"
            )
    if not path.is_file():
        raise KVConfigError(f"KV preset file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KVConfigError(f"cannot read KV preset file {path}: {err.strerror}") from None
    return path, parse_kv_yaml(data, str(path))


def load_kv_config(name_or_path: str | Path, head_dim: int, **overrides: Any) -> KVQuantConfig:
    """Load a preset by name (``mixkvq``, ``kivi2``, ...) or from a YAML file path.

    ``overrides`` replace fields after resolution, e.g. ``full_dtype="float32"``.
    """
    path, spec = read_kv_spec(name_or_path)
    return config_from_dict(spec, head_dim, source=str(path), **overrides)
