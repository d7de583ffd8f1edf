"""`ModelConfig`: the static description of a decoder-only Llama/Mistral/Qwen model.

One frozen, hashable dataclass covers every supported family; the families differ only
in fields (biases, q/k norm, RoPE scaling, tied embeddings), never in code. Because it is
hashable it can be a `jax.jit` static argument.

HF ``config.json`` files map onto it in `mixkvq_jax.checkpoint.model_config_from_hf_dict`
(per-family defaults live in `models.llama` and `models.qwen`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixkvq_jax.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(UserError, ValueError):
    """A model configuration is invalid or unsupported; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_parameters`` / ``rope_scaling``).

    Attributes:
      rope_type: ``linear`` (positions divided by ``factor``) or ``llama3`` (Llama 3.1's
        piecewise wavelength scaling; see `rope_inv_freq`).
      factor: the scaling factor.
      low_freq_factor, high_freq_factor, original_max_position_embeddings: ``llama3``
        parameters (ignored for ``linear``).
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES[1:]:
            raise ModelConfigError(
                f"unsupported RoPE scaling type {self.rope_type!r}; supported: "
                f"{', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ModelConfigError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ModelConfigError(
                "llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer.

    Attributes:
      family: ``llama``, ``mistral``, ``qwen2`` or ``qwen3`` (reports, defaults only).
      vocab_size, hidden_size, intermediate_size: embedding and MLP widths.
      num_layers: decoder layers (stacked on a leading axis and scanned).
      num_heads, num_kv_heads: query and key/value heads (GQA when they differ).
      head_dim: channels per head (Qwen3 may have head_dim != hidden / heads).
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_scaling: optional `RopeScaling`.
      max_position_embeddings: the model's maximum context.
      tie_word_embeddings: the output projection is the transposed embedding.
      attention_bias: bias on the q/k/v projections (Qwen2, or HF ``attention_bias``).
      attention_out_bias: bias on the o projection (HF Llama/Qwen3 ``attention_bias``).
      mlp_bias: bias on the MLP projections (HF Llama ``mlp_bias``).
      qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
      sliding_window: attention window of the checkpoint (Mistral v0.1), or None; the
        cache attends to the full history, so generation is capped to this length.
      bos_token_id, eos_token_ids: special tokens from the checkpoint config.
      architecture: the HF ``architectures[0]`` name, for reports.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelConfigError(
                f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(
                    f"model config: {name} must be a positive int, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"model config: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if not self.rms_norm_eps > 0:
            raise ModelConfigError(
                f"model config: rms_norm_eps must be > 0, got {self.rms_norm_eps}"
            )
        if isinstance(self.rope_scaling, Mapping):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated tokens) this model attends over exactly."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def num_params(self) -> int:
        """Parameter count (biases and norms included)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        per_layer += (q + 2 * kv) * self.attention_bias + h * self.attention_out_bias
        per_layer += (2 * self.intermediate_size + h) * self.mlp_bias + 2 * d * self.qk_norm
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * per_layer + h

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; `from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ModelConfigError(f"model config: unknown field(s) {unknown}")
        kwargs = dict(data)
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = RopeScaling(**kwargs["rope_scaling"])
        kwargs["eos_token_ids"] = tuple(kwargs.get("eos_token_ids", ()))
        return cls(**kwargs)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies, float32 [head_dim // 2], as HF transformers computes them.

    ``llama3`` scaling (HF ``_compute_llama3_parameters``): with wavelength
    ``w = 2 pi / f``, frequencies with ``w < L / high_freq_factor`` are kept, those with
    ``w > L / low_freq_factor`` are divided by ``factor``, and the band between is
    interpolated with ``s = (L / w - low) / (high - low)``:
    ``f' = (1 - s) f / factor + s f`` (``L = original_max_position_embeddings``).
    ``linear`` scaling divides every frequency by ``factor``.
    """
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


# ---- HF config.json -> ModelConfig (shared by the per-family helpers) -------------------
def _rope_from_hf(cfg: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5 ``rope_parameters`` or 4.x
    ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters")
    scaling = dict(params) if isinstance(params, Mapping) else {}
    legacy = cfg.get("rope_scaling")
    if isinstance(legacy, Mapping):
        scaling = {**legacy, **scaling}
    theta = float(scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if float(scaling.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ModelConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type in (None, "default"):
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(
            f"{source}: RoPE type {rope_type!r} is not supported; supported: "
            f"{', '.join(ROPE_TYPES)}"
        )
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: v for k, v in scaling.items() if k in fields and v is not None}
    if rope_type == "llama3":
        missing = sorted({"factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings"} - set(kwargs))
        if missing:
            raise ModelConfigError(f"{source}: llama3 RoPE scaling is missing {missing}")
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def hf_common_fields(cfg: Mapping[str, Any], *, family: str, source: str,
                     default_max_positions: int) -> dict[str, Any]:
    """The fields every family reads the same way from an HF ``config.json`` dict."""
    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ModelConfigError(f"{source}: config is missing {key!r}")
        return cfg[key]

    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ModelConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    theta, scaling = _rope_from_hf(cfg, source)
    eos = _token_ids(cfg.get("eos_token_id"))
    bos = cfg.get("bos_token_id")
    return {
        "family": family,
        "vocab_size": int(need("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(need("intermediate_size")),
        "num_layers": int(need("num_hidden_layers")),
        "num_heads": heads,
        "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(cfg.get("max_position_embeddings")
                                       or default_max_positions),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_ids": eos,
        "architecture": (cfg.get("architectures") or [""])[0],
    }
