"""Qwen2 / Qwen2.5 and Qwen3: `ModelConfig` from an HF ``config.json`` dict.

Qwen2 puts a bias on the q/k/v projections (always; o has none). Qwen3 drops it
(``attention_bias`` then covers q/k/v and o, as in Llama), adds an RMSNorm over
head_dim on queries and keys before RoPE (``qk_norm``), and may set ``head_dim``
independently of ``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import ModelConfig, hf_common_fields


def _window(cfg: Mapping[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    return int(window) if cfg.get("use_sliding_window") and window else None


def qwen2_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """`ModelConfig` for ``Qwen2ForCausalLM`` (Qwen2 and Qwen2.5)."""
    fields = hf_common_fields(cfg, family="qwen2", source=source, default_max_positions=32768)
    return ModelConfig(**fields, attention_bias=True, sliding_window=_window(cfg))


def qwen3_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """`ModelConfig` for ``Qwen3ForCausalLM``."""
    fields = hf_common_fields(cfg, family="qwen3", source=source, default_max_positions=32768)
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(**fields, attention_bias=bias, attention_out_bias=bias, qk_norm=True,
                       sliding_window=_window(cfg))
