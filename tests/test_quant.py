"""quant.py: grouped asymmetric quantization and planar bit-packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixkvq_jax import quant


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [1, 5, 16, 37, 64, 130])
def test_pack_unpack_round_trip(bits, length):
    rng = np.random.default_rng(bits * 1000 + length)
    codes = jnp.asarray(rng.integers(0, 2**bits, size=(3, length)), jnp.uint8)
    words = quant.pack(codes, bits)
    assert words.dtype == jnp.uint32
    assert words.shape == (3, -(-length * bits // 32))
    np.testing.assert_array_equal(quant.unpack(words, bits, length=length), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_along_other_axis_and_planar_layout(bits):
    rng = np.random.default_rng(0)
    codes = jnp.asarray(rng.integers(0, 2**bits, size=(64, 5)), jnp.uint8)
    words = quant.pack(codes, bits, axis=0)
    np.testing.assert_array_equal(quant.unpack(words, bits, length=64, axis=0), codes)
    # Planar: slab j (bits [b*j, b*(j+1)) of every word) holds codes [j*W, (j+1)*W).
    n_words = 64 * bits // 32
    slab1 = (np.asarray(words) >> bits) & (2**bits - 1)
    np.testing.assert_array_equal(slab1, np.asarray(codes)[n_words : 2 * n_words])


@pytest.mark.parametrize("bitcast", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_word_major_unpack_is_the_planar_codes_reordered(bits, bitcast):
    """[..., W, k] element (w, j) is code j * W + w, from the sub-byte bitcast (CPU) and
    from the shift-and-mask fallback (other backends) alike; `natural_order` undoes it."""
    rng = np.random.default_rng(bits)
    codes = jnp.asarray(rng.integers(0, 2**bits, size=(3, 2, 128)), jnp.uint8)
    words = quant.pack(codes, bits)
    k = 32 // bits
    got = quant.unpack_word_major(words, bits, bitcast=bitcast)
    assert got.shape == (3, 2, 128 // k, k) and got.dtype == jnp.int32
    expected = np.asarray(codes).reshape(3, 2, k, 128 // k).swapaxes(-1, -2)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(quant.natural_order(got.reshape(3, 2, 128), bits), codes)
    # natural_order on another axis (the attention reorders scores / outputs that way)
    np.testing.assert_array_equal(
        quant.natural_order(jnp.moveaxis(got.reshape(3, 2, 128), -1, 0), bits, axis=0),
        jnp.moveaxis(codes, -1, 0))


@pytest.mark.parametrize("bits, to_bits", [(2, 2), (4, 2), (8, 2), (8, 4), (2, 4)])
def test_word_major_orders_convert_into_each_other(bits, to_bits):
    """`word_major_order` inverts `natural_order`; `rewrap_word_major` moves an axis from
    one bit width's word-major order to another's (one transpose when narrowing, the
    attention's MixKVQ INT4 tile in INT2 token order) on any axis."""
    codes = jnp.asarray(np.random.default_rng(bits).integers(0, 2**bits, (2, 128)))
    np.testing.assert_array_equal(  # the order unpack_word_major gives packed codes
        quant.word_major_order(codes, bits),
        quant.unpack_word_major(quant.pack(codes, bits), bits).reshape(2, 128))
    natural = jnp.arange(2 * 128).reshape(2, 128)
    wide = quant.word_major_order(natural, bits)
    np.testing.assert_array_equal(quant.natural_order(wide, bits), natural)
    expected = quant.word_major_order(natural, to_bits)
    np.testing.assert_array_equal(quant.rewrap_word_major(wide, bits, to_bits), expected)
    np.testing.assert_array_equal(
        quant.rewrap_word_major(wide.T, bits, to_bits, axis=0), expected.T)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length, group", [
    (128, 32),  # groups span whole words: G % W == 0 (the presets)
    (128, 128),  # one group (per-token values)
    (128, 1),  # a pair per code (per-token keys, per-channel values): W % G == 0
    (96, 4),  # 2-bit: W = 6, G = 4 straddles words unevenly (the generic fallback)
])
def test_word_major_dequantize_matches_dequantize(bits, length, group):
    rng = np.random.default_rng(length + group)
    x = jnp.asarray(rng.normal(size=(2, 5, length)), jnp.float32)
    q = quant.quantize(x, bits, group_size=group, param_dtype=jnp.bfloat16)
    words = quant.pack(q.codes, bits)
    out = quant.dequantize_word_major(quant.unpack_word_major(words, bits), q.scales,
                                      q.zeros, bits)
    np.testing.assert_array_equal(
        quant.natural_order(out.reshape(2, 5, length), bits),
        quant.dequantize(q.codes, q.scales, q.zeros))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_error_within_half_step(dtype, bits, param_dtype):
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.normal(size=(4, 96)) * 3 + 1, dtype)
    q = quant.quantize(x, bits, axis=-1, group_size=32, param_dtype=param_dtype)
    assert q.codes.shape == x.shape and q.scales.shape == (4, 3)
    assert q.scales.dtype == param_dtype
    assert int(q.codes.max()) <= 2**bits - 1
    back = quant.dequantize(q.codes, q.scales, q.zeros, axis=-1)
    step = jnp.repeat(q.scales.astype(jnp.float32), 32, axis=-1)
    err = jnp.abs(back - x.astype(jnp.float32))
    # Half a step of the stored scale, plus float32 rounding of z + c * s.
    assert bool(jnp.all(err <= step / 2 * (1 + 1e-5) + 1e-6))


def test_groups_along_tokens_axis():
    """Keys: per channel over groups of G tokens (axis=-2 of [tokens, channels])."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    q = quant.quantize(x, 4, axis=0, group_size=32)
    assert q.scales.shape == (2, 8)
    ref = quant.quantize(x[:32].T, 4, axis=-1)  # first group, one row per channel
    np.testing.assert_array_equal(q.scales[0], ref.scales[:, 0])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_exact_on_representable_values(bits, dtype):
    rng = np.random.default_rng(2)
    levels = 2**bits - 1
    codes = rng.integers(0, levels + 1, size=(5, 32))
    codes[:, 0], codes[:, 1] = 0, levels  # each group spans the full code range
    scale, zero = 0.25, -1.5
    x = jnp.asarray(zero + codes * scale, dtype)
    q = quant.quantize(x, bits, group_size=32, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(q.codes, codes)
    back = quant.dequantize(q.codes, q.scales, q.zeros)
    np.testing.assert_array_equal(back, x.astype(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_zero_range_groups_are_exact_and_finite(dtype, param_dtype):
    value = 0.75 if param_dtype == jnp.bfloat16 else 0.123456789
    x = jnp.full((3, 64), value, dtype).at[0].set(0.0)
    q = quant.quantize(x, 2, group_size=32, param_dtype=param_dtype)
    back = quant.dequantize(q.codes, q.scales, q.zeros)
    assert bool(jnp.all(jnp.isfinite(back)))
    np.testing.assert_array_equal(back, x.astype(jnp.float32))


def test_non_finite_values_stay_in_their_group():
    x = jnp.ones((1, 64)).at[0, 3].set(jnp.nan).at[0, 40].set(1.5)
    q = quant.quantize(x, 2, group_size=32)
    back = quant.dequantize(q.codes, q.scales, q.zeros)
    assert bool(jnp.all(jnp.isfinite(back[0, 32:])))
    assert not bool(jnp.all(jnp.isfinite(back[0, :32])))


def test_rounds_half_to_even():
    # scale 1, zero 0: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    x = jnp.asarray([[0.0, 0.5, 1.5, 2.5, 3.0, 3.0, 3.0, 3.0]])
    q = quant.quantize(x, 2, group_size=8)
    np.testing.assert_array_equal(q.codes[0, :4], [0, 0, 2, 2])


def test_jit_compatible():
    x = jnp.linspace(-1, 1, 128).reshape(2, 64)
    f = jax.jit(lambda x: quant.pack(quant.quantize(x, 4, group_size=32).codes, 4))
    assert f(x).shape == (2, 8)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="bits=3 is unsupported"):
        quant.quantize(jnp.ones((4, 32)), 3)
    with pytest.raises(ValueError, match="not a multiple of group_size=32"):
        quant.quantize(jnp.ones((4, 40)), 2, group_size=32)
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize(jnp.ones((4, 32), jnp.int32), 2)


def test_quantize_with_fixed_params_clamps_out_of_range_values():
    """Parameters fixed at prefill: later values outside the range get the end codes."""
    scale, zero = quant.quant_params(jnp.asarray([-1.0, 0.0]), jnp.asarray([2.0, 0.0]), 2)
    x = jnp.asarray([[-5.0, 0.0], [0.0, 7.0], [1.0, -3.0], [9.0, 0.0]])  # [tokens, channels]
    codes = quant.quantize_with_params(x, scale[None], zero[None], 2)
    np.testing.assert_array_equal(codes, [[0, 0], [1, 0], [2, 0], [3, 0]])
    back = quant.dequantize(codes, scale[None], zero[None], axis=0)  # one group per column
    np.testing.assert_array_equal(back, [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
