"""Flax models vs HF transformers (PyTorch) on tiny random checkpoints, through the real
loader; chunked prefill; layer plumbing."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixkvq_jax import models
from mixkvq_jax.cache import dequantize, init_cache
from mixkvq_jax.checkpoint import load_checkpoint

ModelConfig, ModelConfigError, RopeScaling = (
    models.ModelConfig, models.ModelConfigError, models.RopeScaling)
forward, forward_full, init_params = models.forward, models.forward_full, models.init_params
rope_inv_freq = models.rope_inv_freq

torch = pytest.importorskip("torch")

FAMILIES = ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"]
PROMPT_LEN = 27  # > 16-token blocks of the exact preset: prefill already fills one block
DECODE_STEPS = 8  # crosses the next block boundary at 32
TOL = 1e-4

_forward = jax.jit(forward, static_argnames=("config", "impl"))
_forward_full = jax.jit(forward_full, static_argnames=("config",))


def _ids(vocab: int, n: int, seed: int) -> np.ndarray:
    """Random ids avoiding BOS/EOS of the tiny configs (1 and 127)."""
    return np.random.default_rng(seed).integers(2, vocab - 1, size=n).astype(np.int32)


def _empty_cache(cfg: ModelConfig, kv: object, batch: int = 1, max_len: int = 64) -> object:
    return init_cache(kv, num_layers=cfg.num_layers, batch=batch,
                      num_kv_heads=cfg.num_kv_heads, max_len=max_len)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_hf_prefill_then_decode(name, hf_checkpoint, exact_kv):
    ck = hf_checkpoint(name)
    cfg, params, _ = load_checkpoint(ck.path, "float32")
    ids = _ids(cfg.vocab_size, PROMPT_LEN + DECODE_STEPS, seed=FAMILIES.index(name))
    with torch.no_grad():
        ref = ck.model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()

    if name in ("llama3", "qwen3"):  # the cache-free path shares the layer code
        full = _forward_full(params, jnp.asarray(ids[None]), config=cfg)[0]
        np.testing.assert_allclose(np.asarray(full), ref, atol=TOL, rtol=0)

    cache = _empty_cache(cfg, exact_kv(cfg.head_dim))
    logits, cache = _forward(params, jnp.asarray(ids[None, :PROMPT_LEN]), cache, None,
                             config=cfg, impl="xla")
    assert logits.shape == (1, PROMPT_LEN, cfg.vocab_size)
    assert float(jnp.max(jnp.abs(logits[0] - ref[:PROMPT_LEN]))) < TOL
    for t in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        logits, cache = _forward(params, jnp.asarray(ids[None, t:t + 1]), cache, None,
                                 config=cfg, impl="xla")
        assert float(jnp.max(jnp.abs(logits[0, 0] - ref[t]))) < TOL, f"decode position {t}"
    assert int(cache.lengths[0]) == PROMPT_LEN + DECODE_STEPS


# Every family's logits are checked above; the generation loop is family-independent, so
# the default run checks it on two families (GQA + llama3 RoPE; Qwen3) and -m slow on all.
@pytest.mark.parametrize("name", [
    n if n in ("llama3", "qwen3") else pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES
])
def test_greedy_generation_matches_hf_generate(name, hf_checkpoint, exact_kv):
    from mixkvq_jax.generate import generate

    ck = hf_checkpoint(name)
    cfg, params, _ = load_checkpoint(ck.path, "float32")
    prompt = _ids(cfg.vocab_size, PROMPT_LEN, seed=10 + FAMILIES.index(name))
    with torch.no_grad():
        out = ck.model.generate(torch.tensor(prompt[None], dtype=torch.long), do_sample=False,
                                max_new_tokens=20, eos_token_id=127, pad_token_id=0)
    expected = out[0, PROMPT_LEN:].tolist()
    ours = generate(params, cfg, exact_kv(cfg.head_dim), [prompt.tolist()], max_new_tokens=20,
                    impl="xla")[0]
    assert ours == expected


def test_chunked_prefill_equals_one_shot(hf_checkpoint, exact_kv):
    ck = hf_checkpoint("llama3")
    cfg, params, _ = load_checkpoint(ck.path, "float32")
    kv = exact_kv(cfg.head_dim)
    ids = _ids(cfg.vocab_size, PROMPT_LEN, seed=3)
    padded = np.zeros((1, 32), np.int32)
    padded[0, :PROMPT_LEN] = ids

    one_shot, cache_one = _forward(params, jnp.asarray(padded), _empty_cache(cfg, kv),
                                   jnp.asarray([PROMPT_LEN], jnp.int32), config=cfg, impl="xla")
    cache = _empty_cache(cfg, kv)
    chunks = []
    for start in range(0, 32, 8):
        count = np.int32(min(8, PROMPT_LEN - start))
        logits, cache = _forward(params, jnp.asarray(padded[:, start:start + 8]), cache,
                                 jnp.asarray([count]), config=cfg, impl="xla")
        chunks.append(np.asarray(logits[0, :count]))
    chunked = np.concatenate(chunks)
    np.testing.assert_allclose(chunked, np.asarray(one_shot[0, :PROMPT_LEN]), atol=TOL, rtol=0)
    assert cache.lengths.tolist() == cache_one.lengths.tolist() == [PROMPT_LEN]
    k1, v1 = dequantize(cache_one)
    k2, v2 = dequantize(cache)
    np.testing.assert_allclose(k1[..., :PROMPT_LEN, :], k2[..., :PROMPT_LEN, :], atol=1e-5)
    np.testing.assert_allclose(v1[..., :PROMPT_LEN, :], v2[..., :PROMPT_LEN, :], atol=1e-5)


def test_bits_form_cache_gives_the_same_steps(hf_checkpoint):
    """A cache held in `bits_form` (how decode loops keep it on CPU) gives bit-identical
    logits and, back in float form, the same cache as the float form, through a prefill
    that quantizes a block (bf16 scales, a sink) and decode steps."""
    from mixkvq_jax.cache import bits_form, float_form
    from mixkvq_jax.config import load_kv_config

    cfg, params, _ = load_checkpoint(hf_checkpoint("llama3").path, "float32")
    kv = load_kv_config("mixkvq", cfg.head_dim, residual_length=16, key_group_size=8,
                        value_group_size=8)
    ids = jnp.asarray(_ids(cfg.vocab_size, 19, seed=5)[None])
    as_floats, as_bits = _empty_cache(cfg, kv), bits_form(_empty_cache(cfg, kv))
    assert as_bits.layers.key_scales.dtype == jnp.uint16
    for start, stop in ((0, 17), (17, 18), (18, 19)):  # a bf16-scale block, then decode
        la, as_floats = _forward(params, ids[:, start:stop], as_floats, None, config=cfg,
                                 impl="xla")
        lb, as_bits = _forward(params, ids[:, start:stop], as_bits, None, config=cfg,
                               impl="xla")
        np.testing.assert_array_equal(la, lb)
    assert as_bits.layers.key_scales.dtype == jnp.uint16  # stays in bits form
    back = float_form(as_bits)
    for a, b in zip(jax.tree.leaves(as_floats), jax.tree.leaves(back), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_logit_index_and_padding_do_not_leak(hf_checkpoint, exact_kv):
    """Right padding is invisible: logits of the valid tokens match an unpadded run."""
    ck = hf_checkpoint("qwen3")
    cfg, params, _ = load_checkpoint(ck.path, "float32")
    kv = exact_kv(cfg.head_dim)
    ids = _ids(cfg.vocab_size, 32, seed=4)
    tokens = np.stack([ids, np.concatenate([ids[:19], np.full(13, 5, np.int32)])])
    counts = jnp.asarray([32, 19], jnp.int32)
    logits, cache = _forward(params, jnp.asarray(tokens), _empty_cache(cfg, kv, batch=2),
                             counts, config=cfg, impl="xla")
    np.testing.assert_allclose(logits[1, :19], logits[0, :19], atol=TOL, rtol=0)
    assert cache.lengths.tolist() == [32, 19]
    last, _ = _forward(params, jnp.asarray(tokens), _empty_cache(cfg, kv, batch=2), counts,
                       config=cfg, impl="xla", logit_index=counts - 1)
    np.testing.assert_allclose(last[0], logits[0, 31], atol=1e-6)
    np.testing.assert_allclose(last[1], logits[1, 18], atol=1e-6)


def test_llama3_rope_frequencies_match_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                     max_position_embeddings=131072, rope_scaling=dict(scaling))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig(family="llama", vocab_size=8, hidden_size=4096, intermediate_size=8,
                      num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128,
                      rope_theta=500000.0, rope_scaling=RopeScaling(**scaling))
    np.testing.assert_allclose(rope_inv_freq(cfg), ref.numpy(), rtol=1e-6)


_MATMUL_CALLS: list[tuple[int, ...]] = []


@flax.struct.dataclass
class _CountingKernel:
    """A stand-in quantized kernel: `dense` must call its ``matmul``."""

    kernel: jax.Array

    def matmul(self, x: jax.Array) -> jax.Array:
        _MATMUL_CALLS.append(x.shape)  # at trace time
        return x @ self.kernel


def test_dense_dispatches_to_kernel_objects():
    cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    params = init_params(cfg, seed=1, init_std=0.2)
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 16, 16) and not np.allclose(q[0], q[1])  # one RNG split per layer
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    tokens = jnp.arange(6, dtype=jnp.int32)[None]
    ref = _forward_full(params, tokens, config=cfg)
    params["layers"]["mlp"]["down_proj"]["kernel"] = _CountingKernel(
        params["layers"]["mlp"]["down_proj"]["kernel"])
    _MATMUL_CALLS.clear()
    out = _forward_full(params, tokens, config=cfg)
    assert _MATMUL_CALLS == [(1, 6, 32)], "kernel.matmul was not called (once per trace)"
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_model_config_round_trip_and_errors():
    cfg = ModelConfig(family="qwen3", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                      rope_scaling=RopeScaling("linear", factor=2.0), eos_token_ids=(3, 4))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(ModelConfig.from_dict(cfg.to_dict())) == hash(cfg)
    with pytest.raises(ModelConfigError, match="multiple of num_kv_heads"):
        ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                    num_layers=1, num_heads=3, num_kv_heads=2, head_dim=8)
    with pytest.raises(ModelConfigError, match="RoPE scaling type"):
        RopeScaling("yarn")


def test_bf16_params_run_and_stay_close(hf_checkpoint):
    ck = hf_checkpoint("llama3")
    cfg, params32, _ = load_checkpoint(ck.path, "float32")
    _, params16, _ = load_checkpoint(ck.path, "bf16")
    assert params16["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    ids = jnp.asarray(_ids(cfg.vocab_size, 12, seed=5)[None])
    l32 = forward_full(params32, ids, config=cfg)
    l16 = forward_full(params16, ids, config=cfg)
    assert l16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(l32 - l16))) < 0.1 * float(jnp.max(jnp.abs(l32)))


def test_awq_int4_kernels_plug_into_dense():
    """`awq.Int4Weight` leaves (stacked [L, ...]) run through `dense` inside the layer scan
    and give the model computed with their dequantized kernels."""
    from mixkvq_jax import awq

    cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    params = init_params(cfg, seed=2, init_std=0.2)
    quantized = awq.apply_to_tree(params, lambda _, k: awq.quantize_rtn(k, group_size=16),
                                  include=r"(attn/o_proj|mlp/up_proj)/kernel$")
    assert isinstance(quantized["layers"]["mlp"]["up_proj"]["kernel"], awq.Int4Weight)
    is_int4 = lambda x: isinstance(x, awq.Int4Weight)
    dequantized = jax.tree.map(lambda w: w.dequantize(jnp.float32) if is_int4(w) else w,
                               quantized, is_leaf=is_int4)
    tokens = jnp.arange(7, dtype=jnp.int32)[None]
    np.testing.assert_allclose(_forward_full(quantized, tokens, config=cfg),
                               _forward_full(dequantized, tokens, config=cfg), atol=1e-4)
