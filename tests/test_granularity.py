"""KV Pareto options: key/value quantization granularities and K-smoothing.

Each granularity is checked on data constant along the axis it groups (zero error, and a
nonzero error for a mismatched granularity so the check can fail), the attention path
against attention over the dequantized cache, K-smoothing against no smoothing, fixed
statistics against the first chunk, and the byte formula against the pytree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import append_one_by_one, random_stream, small_config
from test_attention import softmax_attention

from mixkvq_jax import attention as attn
from mixkvq_jax import cache as kvc
from mixkvq_jax import quant
from mixkvq_jax.config import GRANULARITIES, load_kv_config
from mixkvq_jax.pallas_kernels import decode_attention as kernels

L, B, H, HQ, D = 1, 2, 2, 4, 32  # small_config: R = 32, key/value groups of 16
prefill_jit = jax.jit(kvc.prefill)
append_jit = jax.jit(kvc.append)
history_jit = jax.jit(attn.history_attention_xla,
                      static_argnames=("config", "scale", "blocks_per_step"))


def _new(cfg, max_len=64, batch=B):
    return kvc.init_cache(cfg, num_layers=L, batch=batch, num_kv_heads=H, max_len=max_len)


def _tokens(cache, t):
    """Dequantized keys and values [L, B, t, H, D] of the first t tokens."""
    k, v = kvc.dequantize(cache)
    return jnp.swapaxes(k[:, :, :, :t], 2, 3), jnp.swapaxes(v[:, :, :, :t], 2, 3)


# ---- each granularity quantizes along the right axis -----------------------------------
def _pattern(kind, seed, tokens=64):
    """[L, B, T, H, D] float32 data constant along one axis, bfloat16-exact values."""
    rng = np.random.default_rng(seed)
    levels = np.arange(-16, 16) / 4
    shape = (L, B, tokens, H, D)
    if kind == "token_constant":  # each token one value over all channels
        x = rng.choice(levels, size=(L, B, tokens, H, 1))
    elif kind == "channel_constant":  # each channel one value over all tokens
        x = rng.choice(levels, size=(L, B, 1, H, D))
    elif kind == "token_groups":  # per channel, constant over groups of 16 tokens
        x = np.repeat(rng.choice(levels, size=(L, B, tokens // 16, H, D)), 16, axis=2)
    elif kind == "channel_groups":  # per token, constant over groups of 16 channels
        x = np.repeat(rng.choice(levels, size=(L, B, tokens, H, D // 16)), 16, axis=4)
    else:  # "lattice": 2-bit levels of one scale per (sequence, head), not per token/channel
        x = rng.choice([-1.5, -0.5, 0.5], size=shape)
        x[:, :, 0, :, 0] = 1.5
    return jnp.asarray(np.broadcast_to(x, shape), jnp.float32)


KEY_PATTERN = {"per_block": "token_groups", "per_token": "token_constant",
               "per_channel": "channel_constant", "per_tensor": "lattice"}
VALUE_PATTERN = {"per_block": "channel_groups", "per_token": "token_constant",
                 "per_channel": "channel_constant", "per_tensor": "lattice"}
MISMATCH = {"per_block": "per_channel", "per_token": "per_channel",
            "per_channel": "per_token", "per_tensor": "per_token"}


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_granularity_quantizes_along_its_axis(granularity):
    """2-bit keys and values: exact for the matching granularity, lossy for another."""
    k = _pattern(KEY_PATTERN[granularity], 0)
    v = _pattern(VALUE_PATTERN[granularity], 1)
    q = _pattern("lattice", 2).repeat(HQ // H, axis=3)
    for g, exact in ((granularity, True), (MISMATCH[granularity], False)):
        cfg = small_config("k2v2", key_granularity=g, value_granularity=g)
        cache = prefill_jit(_new(cfg), k, v, q)  # 64 tokens = 2 blocks, empty window
        k_back, v_back = _tokens(cache, 64)
        if exact:
            np.testing.assert_array_equal(k_back, k)
            np.testing.assert_array_equal(v_back, v)
        else:
            assert float(jnp.abs(k_back - k).max()) > 0.05, g
            assert float(jnp.abs(v_back - v).max()) > 0.05, g


@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_attention_equals_attention_over_dequantized_cache(granularity, smoothing):
    """The XLA path (blocks one and several per step, ragged batch with window tokens)
    equals plain attention over `dequantize_layer` for every granularity."""
    cfg = small_config("k4v2", key_granularity=granularity, value_granularity=granularity,
                       key_smoothing=smoothing)
    lengths = [77, 40]
    k, v, q = random_stream(7, L, B, 77, H, HQ, D)
    k = k + 3.0  # an offset, so that smoothing matters
    cache = prefill_jit(_new(cfg, max_len=96), k, v, q, jnp.asarray(lengths))
    layer = jax.tree.map(lambda x: x[0], cache.layers)
    keys, values = kvc.dequantize_layer(layer, cache.lengths, cfg)
    np.testing.assert_allclose(keys[0, :, 64:77], jnp.swapaxes(k[0, 0, 64:77], 0, 1))  # window
    queries = jnp.asarray(np.random.default_rng(8).normal(size=(B, 2, HQ, D)), jnp.float32)
    want = softmax_attention(queries, keys, values, lengths, 0.2)
    for blocks_per_step in (1, 8):
        got = history_jit(queries, layer, cache.lengths, config=cfg, scale=0.2,
                          blocks_per_step=blocks_per_step)
        np.testing.assert_allclose(got.out, want, atol=2e-5)


# ---- K-smoothing --------------------------------------------------------------------
def _smoothing_run(name, granularity, smoothing, *, offset, tokens, seed=0, **overrides):
    """Decode-query attention output [B, 1, HQ, D] over a cache of ``tokens`` keys with a
    per-channel offset (N(0, 1) + offset * N(0, 1) per channel), and the exact output."""
    cfg = small_config(name, key_granularity=granularity, key_smoothing=smoothing,
                       **overrides)
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(L, B, tokens, H, D)) + offset * rng.normal(size=D)
    v = rng.normal(size=(L, B, tokens, H, D))
    q = rng.normal(size=(L, B, tokens, HQ, D))
    k, v, q = (jnp.asarray(x, jnp.float32) for x in (k, v, q))
    cache = prefill_jit(_new(cfg, max_len=tokens), k, v, q)
    layer = jax.tree.map(lambda x: x[0], cache.layers)
    query = jnp.asarray(rng.normal(size=(B, 1, HQ, D)), jnp.float32)
    got = history_jit(query, layer, cache.lengths, config=cfg, scale=D**-0.5,
                      blocks_per_step=None)
    exact = softmax_attention(query, jnp.swapaxes(k[0], 1, 2), jnp.swapaxes(v[0], 1, 2),
                              [tokens] * B, D**-0.5)
    return got.out, exact


@pytest.mark.parametrize("granularity", ["per_block", "per_channel"])
def test_smoothing_is_restored_exactly(granularity):
    """Per-channel quantization is shift-invariant, so with float32 scales the codes are
    the same with or without smoothing, and the outputs (109 tokens: 3 blocks + 13
    window tokens, which only an exact q . mean restoration leaves unchanged) agree."""
    plain, _ = _smoothing_run("k8v8", granularity, False, offset=3.0, tokens=109,
                              scale_dtype="float32")
    smooth, _ = _smoothing_run("k8v8", granularity, True, offset=3.0, tokens=109,
                               scale_dtype="float32")
    np.testing.assert_allclose(smooth, plain, atol=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_smoothing_8bit_agrees_with_no_smoothing(granularity):
    """k8v8 (bfloat16 scales), 269 tokens (8 blocks + 13 window tokens): the output with
    K-smoothing agrees with the one without to 1e-3 (mean absolute difference; 2e-3 for
    per_tensor, whose own 8-bit error is about 1e-3)."""
    plain, exact = _smoothing_run("k8v8", granularity, False, offset=1.0, tokens=269)
    smooth, _ = _smoothing_run("k8v8", granularity, True, offset=1.0, tokens=269)
    bound = 2e-3 if granularity == "per_tensor" else 1e-3
    assert float(jnp.abs(smooth - plain).mean()) <= bound
    assert float(jnp.abs(smooth - plain).max()) <= 1e-2
    assert float(jnp.abs(smooth - exact).mean()) <= bound


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_smoothing_lowers_2bit_error_with_channel_offset(granularity):
    """2-bit keys whose channels carry large offsets (10 x N(0, 1)): subtracting the
    per-channel mean shrinks the per-token / per-tensor range, and the output error."""
    plain, exact = _smoothing_run("k2v2", granularity, False, offset=10.0, tokens=96)
    smooth, _ = _smoothing_run("k2v2", granularity, True, offset=10.0, tokens=96)
    err_plain = float(jnp.abs(plain - exact).mean())
    err_smooth = float(jnp.abs(smooth - exact).mean())
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)


# ---- statistics fixed at the first chunk -------------------------------------------
def test_fixed_statistics_come_from_the_first_chunk_and_clamp_later_tokens():
    cfg = small_config("k4v4", key_granularity="per_channel", value_granularity="per_tensor",
                       key_smoothing=True)
    k, v, q = random_stream(9, L, B, 70, H, HQ, D)
    k = k.at[:, :, 60:].multiply(10.0)  # later tokens far outside the first chunk's range
    counts = jnp.asarray([40, 0])  # sequence 1 gets its first tokens in the second chunk
    cache = prefill_jit(_new(cfg, max_len=96), k[:, :, :40], v[:, :, :40], q[:, :, :40],
                        counts)
    cache = prefill_jit(cache, k[:, :, 40:60], v[:, :, 40:60], q[:, :, 40:60])
    fixed = {name: getattr(cache.layers, name) for name in kvc.FIXED_FIELDS}
    for t in range(60, 70):
        cache = append_jit(cache, k[:, :, t], v[:, :, t], q[:, :, t])
    for name in kvc.FIXED_FIELDS:  # untouched by later chunks and appends
        np.testing.assert_array_equal(getattr(cache.layers, name), fixed[name])

    # Sequence 0: its first chunk is tokens 0..39; sequence 1: tokens 40..59.
    for s, (lo, hi) in enumerate([(0, 40), (40, 60)]):
        keys, values = k[0, s, lo:hi], v[0, s, lo:hi]  # [T, H, D]
        mean = keys.mean(axis=0)
        np.testing.assert_allclose(cache.layers.key_mean[0, s], mean, rtol=1e-6, atol=1e-6)
        centered = keys - cache.layers.key_mean[0, s]
        scales, zeros = quant.quant_params(centered.min(0), centered.max(0), 4, jnp.bfloat16)
        np.testing.assert_array_equal(cache.layers.key_fixed_scales[0, s], scales)
        np.testing.assert_array_equal(cache.layers.key_fixed_zeros[0, s], zeros)
        v_min = values.min(axis=(0, 2))[:, None]
        v_max = values.max(axis=(0, 2))[:, None]
        scales, zeros = quant.quant_params(v_min, v_max, 4, jnp.bfloat16)
        np.testing.assert_array_equal(cache.layers.value_fixed_scales[0, s], scales)
        np.testing.assert_array_equal(cache.layers.value_fixed_zeros[0, s], zeros)

    # Block 1 of sequence 0 (tokens 32..63) holds the large tokens 60..63, clamped into
    # [mean + zero, mean + zero + 15 * scale] per channel.
    k_back, _ = _tokens(cache, 70)
    lo = cache.layers.key_mean[0, 0] + cache.layers.key_fixed_zeros[0, 0].astype(jnp.float32)
    hi = lo + 15 * cache.layers.key_fixed_scales[0, 0].astype(jnp.float32)
    block = k_back[0, 0, 32:64]  # [32, H, D]
    assert bool(jnp.all((block >= lo - 1e-5) & (block <= hi + 1e-5)))
    assert float(jnp.abs(block[28:] - k[0, 0, 60:64]).max()) > 5  # clamped, not stored
    np.testing.assert_array_equal(k_back[:, 0, 64:], k[:, 0, 64:])  # window: raw


def test_no_retrace_across_appends_with_fixed_statistics():
    cfg = small_config("k2v2", key_granularity="per_channel", value_granularity="per_token",
                       key_smoothing=True)
    k, v, q = random_stream(10, L, B, 120, H, HQ, D)
    cache = prefill_jit(_new(cfg, max_len=128), k[:, :, :20], v[:, :, :20], q[:, :, :20])
    cache, traces = append_one_by_one(cache, k, v, q, 20)
    assert traces == 1
    assert cache.lengths.tolist() == [120, 120]


# ---- bytes and dispatch ---------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", ["k4v2", "int8", "k2v2", "bf16"])
def test_memory_bytes_equals_formula(name, granularity, smoothing):
    cfg = load_kv_config(name, 64, key_granularity=granularity, value_granularity=granularity,
                         key_smoothing=smoothing)
    cache = kvc.init_cache(cfg, num_layers=2, batch=2, num_kv_heads=3, max_len=300)
    assert kvc.memory_bytes(cache) == cfg.cache_bytes(
        num_layers=2, batch=2, num_kv_heads=3, max_len=300)
    if name == "bf16":  # nothing quantized: the options have no effect
        assert kvc.memory_bytes(cache) == kvc.memory_bytes(kvc.init_cache(
            load_kv_config("bf16", 64), num_layers=2, batch=2, num_kv_heads=3, max_len=300))


def test_bytes_per_token_by_granularity():
    """k4v2, head_dim 64, R = 128, G = 32, bfloat16 scales: only the scale bytes move."""
    codes = 32 + 16  # 4-bit keys + 2-bit values
    per_block = load_kv_config("k4v2", 64)
    assert per_block.bytes_per_token == codes + 2 * 2 * 2 + 2 * 2 * 2
    for g, params in (("per_token", 4 + 4), ("per_channel", 0), ("per_tensor", 0)):
        cfg = load_kv_config("k4v2", 64, key_granularity=g, value_granularity=g)
        assert cfg.bytes_per_token == codes + params
    fixed = load_kv_config("k4v2", 64, key_granularity="per_channel",
                           value_granularity="per_tensor", key_smoothing=True).fixed_bytes()
    assert fixed == {"key_fixed_scales_zeros": 2 * 64 * 2, "value_fixed_scales_zeros": 2 * 2,
                     "key_mean": 64 * 4, "sink_keys_values": 0}


@pytest.mark.parametrize("overrides", [dict(key_granularity="per_token"),
                                       dict(value_granularity="per_tensor"),
                                       dict(key_smoothing=True)])
def test_pallas_kernel_declines_and_auto_falls_back(overrides):
    cfg = small_config("k4v2", **overrides)
    layer = jax.tree.map(lambda x: x[0], _new(cfg).layers)
    q = jnp.zeros((B, 1, HQ, D))
    assert "XLA path" in kernels.unsupported_reason(q, layer, cfg)
    default = small_config("k4v2")
    assert kernels.unsupported_reason(q, jax.tree.map(lambda x: x[0], _new(default).layers),
                                      default) is None
