"""cache.py: the quantized KV-cache pytree, prefill / append, dequantize, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import QUANT_PRESETS, append_one_by_one, random_stream, small_config

from mixkvq_jax import cache as kvc
from mixkvq_jax import quant
from mixkvq_jax.config import load_kv_config

L, B, H, HQ, D = 2, 2, 2, 4, 32
prefill_jit = jax.jit(kvc.prefill)
append_jit = jax.jit(kvc.append)


def _new(cfg, max_len=160, batch=B):
    return kvc.init_cache(cfg, num_layers=L, batch=batch, num_kv_heads=H, max_len=max_len)


def _tokens(cache, keys_or_values):
    """Dequantized [L, B, T, H, D] view of the first T tokens (T = keys.shape[2])."""
    t = keys_or_values.shape[2]
    k, v = kvc.dequantize(cache)
    return jnp.swapaxes(k[:, :, :, :t], 2, 3), jnp.swapaxes(v[:, :, :, :t], 2, 3)


# Granularities whose parameters come from the tokens they quantize keep this invariant;
# per_channel / per_tensor and K-smoothing fix statistics at the first chunk, so a
# different first chunk gives different codes (tests/test_granularity.py covers those).
STREAMING_CASES = [(name, {}) for name in ["bf16", *QUANT_PRESETS]] + [
    ("k4v2", dict(key_granularity="per_token", value_granularity="per_token")),
    ("int8", dict(key_granularity="per_token")),
]


@pytest.mark.parametrize("name, overrides", STREAMING_CASES)
def test_prefill_then_appends_equals_one_shot(name, overrides):
    cfg = small_config(name, **overrides)
    k, v, q = random_stream(0, L, B, 100, H, HQ, D)
    streamed = prefill_jit(_new(cfg), k[:, :, :45], v[:, :, :45], q[:, :, :45])
    for t in range(45, 100):
        streamed = append_jit(streamed, k[:, :, t], v[:, :, t], q[:, :, t])
    one_shot = prefill_jit(_new(cfg), k, v, q)
    assert streamed.lengths.tolist() == [100, 100]
    # Identical arrays, but for float summation order in the running |q| statistic.
    np.testing.assert_allclose(streamed.layers.query_abs_sum, one_shot.layers.query_abs_sum,
                               rtol=1e-5)
    k_back, v_back = _tokens(streamed, k)
    no_stat = lambda c: c.replace(layers=c.layers.replace(query_abs_sum=0))
    for a, b in zip(jax.tree.leaves(no_stat(streamed)), jax.tree.leaves(no_stat(one_shot)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    if name == "bf16":
        np.testing.assert_array_equal(k_back, k)
        np.testing.assert_array_equal(v_back, v)
    else:
        # the 100 % 32 = 4 newest tokens sit in the full-precision window
        np.testing.assert_array_equal(k_back[:, :, 96:], k[:, :, 96:])
        assert float(jnp.abs(k_back - k).max()) > 0


def test_blocks_equal_direct_quantization_kivi():
    """kivi2 block = per-channel 2-bit over groups of 16 tokens, per-token values."""
    cfg = small_config("kivi2")
    k, v, q = random_stream(1, L, B, 64, H, HQ, D)
    cache = prefill_jit(_new(cfg), k, v, q)
    k_back, v_back = _tokens(cache, k)
    block = k[0, 1, 32:64, 1]  # layer 0, sequence 1, block 1, head 1: [R, D]
    direct = quant.quantize(block, 2, axis=0, group_size=16, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        k_back[0, 1, 32:64, 1], quant.dequantize(direct.codes, direct.scales, direct.zeros, axis=0)
    )
    vd = quant.quantize(v[0, 1, 32:64, 1], 2, axis=-1, group_size=16, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        v_back[0, 1, 32:64, 1], quant.dequantize(vd.codes, vd.scales, vd.zeros, axis=-1)
    )


def test_mixkvq_block_uses_salience_of_its_moment():
    """Block j is ranked with mean|q| over the queries up to its last token."""
    cfg = small_config("mixkvq", head_dim=64)
    k, v, q = random_stream(2, 1, 1, 64, 1, 2, 64)
    cache = prefill_jit(
        kvc.init_cache(cfg, num_layers=1, batch=1, num_kv_heads=1, max_len=64), k, v, q
    )
    mean_q = jnp.abs(q[0, 0, :64]).mean(axis=1).mean(axis=0)  # all 64 queries, both heads
    expected = kvc.quantize_blocks(k[0, 0, 32:64, 0], v[0, 0, 32:64, 0], mean_q, cfg)
    parts = kvc.block_parts(cache.layers, cfg)  # [L, B, H, NB, ...]
    np.testing.assert_array_equal(parts["key_permutation"][0, 0, 0, 1],
                                  expected["key_permutation"])
    for got, want in zip(parts["key_codes"], expected["key_codes"], strict=True):
        np.testing.assert_array_equal(got[0, 0, 0, 1], want)
    k_back, _ = _tokens(cache, k)
    # the bf16 tier holds the two most salient channels exactly
    full = np.asarray(expected["key_permutation"][:2])
    np.testing.assert_array_equal(k_back[0, 0, 32:64, 0][:, full], k[0, 0, 32:64, 0][:, full])


@pytest.mark.parametrize("name, overrides", [
    ("kivi2", {}), ("mixkvq", {}),
    # fixed statistics are per sequence: padding and the other sequence do not leak in
    ("k4v2", dict(key_granularity="per_channel", value_granularity="per_tensor",
                  key_smoothing=True)),
])
def test_ragged_batch_equals_each_sequence_alone(name, overrides):
    cfg = small_config(name, **overrides)
    k, v, q = random_stream(3, L, B, 80, H, HQ, D)
    counts = jnp.asarray([80, 37])
    batched = prefill_jit(_new(cfg), k, v, q, counts)
    for t in range(5):  # decode a few tokens on top of different lengths
        kt, vt, qt = (x[:, :, 79 - t] for x in (k, v, q))
        batched = append_jit(batched, kt, vt, qt)
    assert batched.lengths.tolist() == [85, 42]
    for s, n in enumerate([80, 37]):
        alone = prefill_jit(_new(cfg, batch=1), k[:, s:s + 1, :n], v[:, s:s + 1, :n],
                            q[:, s:s + 1, :n])
        for t in range(5):
            alone = append_jit(alone, *(x[:, s:s + 1, 79 - t] for x in (k, v, q)))
        ka, va = kvc.dequantize(alone)
        kb, vb = kvc.dequantize(batched)
        np.testing.assert_array_equal(kb[:, s, :, : n + 5], ka[:, 0, :, : n + 5])
        np.testing.assert_array_equal(vb[:, s, :, : n + 5], va[:, 0, :, : n + 5])


def test_no_retrace_across_300_appends():
    cfg = small_config("mixkvq")
    k, v, q = random_stream(4, L, B, 300, H, HQ, D)
    cache, traces = append_one_by_one(_new(cfg, max_len=320), k, v, q, 0)
    assert traces == 1
    assert cache.lengths.tolist() == [300, 300]


@pytest.mark.parametrize("name, overrides", [
    ("bf16", {}), ("fp32", {}), ("int8", {}), ("kivi2", {}), ("mixkvq", {}),
    ("kivi2", {"sink_tokens": 4}), ("fp32", {"sink_tokens": 2})])
def test_memory_bytes_equals_formula(name, overrides):
    for head_dim in (64, 128):
        cfg = load_kv_config(name, head_dim, **overrides)
        cache = kvc.init_cache(cfg, num_layers=3, batch=2, num_kv_heads=2, max_len=1000)
        assert kvc.memory_bytes(cache) == cfg.cache_bytes(
            num_layers=3, batch=2, num_kv_heads=2, max_len=1000
        )


def test_mixkvq_under_22_percent_of_bf16_at_long_context():
    sizes = {}
    for name in ("bf16", "mixkvq", "kivi2"):
        cfg = load_kv_config(name, 64)
        cache = kvc.init_cache(cfg, num_layers=1, batch=1, num_kv_heads=1, max_len=32768)
        sizes[name] = kvc.memory_bytes(cache)
    # The lane-dense block layout pads each MixKVQ block at head_dim 64 by 224 B (1.75
    # B/token: its 6944 B are not a multiple of 512 B rows); at head_dim 128 by 64 B.
    # Steady state that is 21.9% of bf16; with the residual windows at 32k, 22.2%.
    assert sizes["mixkvq"] / sizes["bf16"] < 0.2225
    assert load_kv_config("mixkvq", 64).compression_vs_bf16 < 0.22
    assert sizes["kivi2"] / sizes["bf16"] < 0.20


def test_constant_keys_round_trip_without_nan():
    cfg = small_config("mixkvq")
    k = jnp.full((L, B, 64, H, D), 0.5)
    cache = prefill_jit(_new(cfg), k, k, k.repeat(2, axis=3))
    k_back, v_back = _tokens(cache, k)
    np.testing.assert_array_equal(k_back, k)
    np.testing.assert_array_equal(v_back, k)


def test_overflow_is_an_error_eagerly_and_a_flag_under_jit():
    cfg = small_config("kivi2")
    k, v, q = random_stream(5, L, B, 40, H, HQ, D)
    with pytest.raises(kvc.CacheOverflowError, match="larger max_len"):
        kvc.prefill(_new(cfg, max_len=32), k, v, q)
    cache = prefill_jit(_new(cfg, max_len=32), k, v, q)
    assert cache.overflow.tolist() == [True, True]
    with pytest.raises(kvc.CacheOverflowError, match="exceeded the cache capacity of 32"):
        kvc.check_overflow(cache)
    kvc.check_overflow(prefill_jit(_new(cfg, max_len=64), k, v, q))


def test_bad_shapes_name_the_expected_layout():
    cache = _new(small_config("kivi2"))
    k, v, q = random_stream(6, L, B, 4, H, HQ, D)
    with pytest.raises(ValueError, match=r"expected \[layers=2, batch=2, tokens, kv_heads=2"):
        kvc.prefill(cache, k[:, :1], v[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="q_heads"):
        kvc.prefill(cache, k, v, q[..., :3, :])
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        kvc.init_cache(small_config("kivi2"), num_layers=1, batch=1, num_kv_heads=1, max_len=0)


# ---- attention sinks ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kivi2", "mixkvq", "k4v2"])
@pytest.mark.parametrize("chunks", [(100,), (1, 2, 30, 67), (3, 97)])
def test_sink_tokens_are_stored_exactly_and_kept_out_of_the_first_block(name, chunks):
    """The first S tokens land in the sink buffer exactly, however the stream is chunked;
    the first block's codes and scales do not see them (an outlier there changes
    nothing), and `dequantize_layer` returns them exactly."""
    s = 3
    cfg = small_config(name, sink_tokens=s)
    k, v, q = random_stream(5, L, B, 100, H, HQ, D)
    loud_k = k.at[:, :, :s].multiply(100.0)  # sink tokens way outside the block's range
    loud_v = v.at[:, :, :s].multiply(100.0)

    def stream(keys, values):
        cache, start = _new(cfg), 0
        for n in chunks:  # one chunk shape, right-padded (one compile per preset)
            pad = ((0, 0), (0, 0), (0, 100 - n), (0, 0), (0, 0))
            k_, v_, q_ = (jnp.pad(x[:, :, start : start + n], pad) for x in (keys, values, q))
            cache = prefill_jit(cache, k_, v_, q_, jnp.full((B,), n, jnp.int32))
            start += n
        return cache

    quiet, loud = stream(k, v), stream(loud_k, loud_v)
    np.testing.assert_array_equal(loud.layers.sink_keys, jnp.swapaxes(loud_k[:, :, :s], 2, 3))
    np.testing.assert_array_equal(loud.layers.sink_values, jnp.swapaxes(loud_v[:, :, :s], 2, 3))
    blocks = lambda c: [getattr(c.layers, f) for f in kvc.BLOCK_FIELDS]
    for a, b in zip(jax.tree.leaves(blocks(quiet)), jax.tree.leaves(blocks(loud)), strict=True):
        np.testing.assert_array_equal(a, b)
    k_back, v_back = _tokens(loud, loud_k)
    np.testing.assert_array_equal(k_back[:, :, :s], loud_k[:, :, :s])
    np.testing.assert_array_equal(v_back[:, :, :s], loud_v[:, :, :s])


def test_sink_tokens_wait_in_the_window_until_the_first_block_is_full():
    cfg = small_config("kivi2", sink_tokens=2)
    k, v, q = random_stream(6, L, B, 20, H, HQ, D)
    cache = prefill_jit(_new(cfg), k, v, q, jnp.asarray([20, 1]))
    # Sequence 1 holds one token: the sink buffer has it, the second slot is still empty.
    np.testing.assert_array_equal(cache.layers.sink_keys[:, 1, :, 0], k[:, 1, 0])
    assert not bool(jnp.any(cache.layers.sink_keys[:, 1, :, 1]))
    k_back, _ = _tokens(cache, k)  # the window (R = 32) still serves every token
    np.testing.assert_array_equal(k_back[:, 0], k[:, 0])


@pytest.mark.parametrize("name, overrides", [
    ("mixkvq", {}), ("bf16", {"sink_tokens": 2}),
    ("k4v2", {"key_granularity": "per_channel", "value_granularity": "per_tensor"})])
def test_bits_round_trip_restores_every_field(name, overrides):
    """The CPU layer scan carries 16-bit floats as uint16 bits: `from_bits` must know
    every such field (a new 16-bit field missing from it would be read as integers)."""
    cfg = small_config(name, full_dtype="bfloat16", scale_dtype="bfloat16", **overrides)
    layer = kvc.init_layer(cfg, batch=1, num_kv_heads=1, max_len=64)
    back = kvc.from_bits(jax.tree.map(kvc.to_bits, layer), cfg)
    for field in layer.__dataclass_fields__:
        for a, b in zip(jax.tree.leaves(getattr(layer, field)),
                        jax.tree.leaves(getattr(back, field)), strict=True):
            assert a.dtype == b.dtype, field
