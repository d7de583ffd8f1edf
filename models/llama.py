"""Llama 2 / 3 / 3.1 / 3.2 and Mistral: `ModelConfig` from an HF ``config.json`` dict.

Both families use the shared `DecoderLayer` unchanged: no q/k norm; optional biases
(HF ``attention_bias`` covers q/k/v *and* o, ``mlp_bias`` the MLP); Llama 3.1+ adds
``llama3`` RoPE scaling; Llama 3.2 1B/3B tie the embeddings. Mistral v0.1's
``sliding_window`` (4096) is recorded: the cache keeps full history, so generation is
capped at that length where it would differ from windowed attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import ModelConfig, hf_common_fields


def llama_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """`ModelConfig` for ``LlamaForCausalLM``."""
    fields = hf_common_fields(cfg, family="llama", source=source, default_max_positions=2048)
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(**fields, attention_bias=bias, attention_out_bias=bias,
                       mlp_bias=bool(cfg.get("mlp_bias", False)))


def mistral_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """`ModelConfig` for ``MistralForCausalLM``."""
    fields = hf_common_fields(cfg, family="mistral", source=source,
                              default_max_positions=32768)
    window = cfg.get("sliding_window")
    return ModelConfig(**fields, sliding_window=int(window) if window else None)
