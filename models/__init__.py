"""Flax NNX models for Llama 2/3 (3.1/3.2 RoPE scaling, tied embeddings), Mistral,
Qwen2/2.5 and Qwen3 over the quantized KV cache; one shared decoder layer.

Typical use::

    from mixkvq_jax.models import forward, init_params, ModelConfig
    logits, cache = jax.jit(forward, static_argnames=("config", "impl"),
                            donate_argnames=("cache",))(params, tokens, cache, counts,
                                                        config=cfg)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .config import ModelConfig, ModelConfigError, RopeScaling, rope_inv_freq
from .layers import (
    MLP,
    Attention,
    DecoderLayer,
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    causal_attention,
    dense,
    rms_norm,
    rope_tables,
)
from .llama import llama_from_hf, mistral_from_hf
from .qwen import qwen2_from_hf, qwen3_from_hf
from .transformer import (
    CausalLM,
    Params,
    cast_params,
    forward,
    forward_full,
    init_params,
    module_from_params,
    param_shapes,
)

# HF ``architectures[0]`` -> config converter. Every entry runs through the same layer.
HF_ARCHITECTURES: dict[str, Callable[[Mapping[str, Any], str], ModelConfig]] = {
    "LlamaForCausalLM": llama_from_hf,
    "MistralForCausalLM": mistral_from_hf,
    "Qwen2ForCausalLM": qwen2_from_hf,
    "Qwen3ForCausalLM": qwen3_from_hf,
}
# HF ``model_type`` -> architecture, for config dicts without ``architectures``.
HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

__all__ = [
    "HF_ARCHITECTURES", "HF_MODEL_TYPES", "MLP", "Attention", "CausalLM", "DecoderLayer",
    "Embed", "Linear", "ModelConfig", "ModelConfigError", "Params", "RMSNorm", "RopeScaling",
    "apply_rope", "cast_params", "causal_attention", "dense", "forward", "forward_full",
    "init_params", "llama_from_hf", "mistral_from_hf", "module_from_params", "param_shapes",
    "qwen2_from_hf", "qwen3_from_hf", "rms_norm", "rope_inv_freq", "rope_tables",
]
