"""rotation.py: Hadamard-rotated value storage, through the cache, the attention
dispatch (XLA and both Pallas bodies) and the preset YAML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_stream, small_config, softmax_attention

from mixkvq_jax import attention as attn
from mixkvq_jax import cache as kvc
from mixkvq_jax.config import KVConfigError, config_from_dict, load_kv_config
from mixkvq_jax.rotation import hadamard, rotate_values, unrotate_values

L, B, H, HQ, D = 1, 3, 2, 8, 64
LENGTHS = [0, 21, 77]  # empty, window only, blocks + window (R = 32)


@pytest.mark.parametrize("order", [1, 2, 8, 64, 128])
def test_hadamard_is_orthonormal_and_its_own_inverse(order):
    h = hadamard(order).astype(np.float64)
    np.testing.assert_allclose(h @ h, np.eye(order), atol=1e-6)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(np.abs(h), order**-0.5, rtol=1e-6)


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two size, got 48"):
        hadamard(48)


def test_preset_yaml_and_errors():
    spec = {"key": {"bits": 2, "group_size": 16},
            "value": {"bits": 2, "group_size": 16, "rotation": "hadamard"}}
    cfg = config_from_dict(spec, 64)
    assert cfg.rotates_values and "Hadamard-rotated" in cfg.describe()
    # bytes and layout are the unrotated preset's
    plain = config_from_dict({**spec, "value": {"bits": 2, "group_size": 16}}, 64)
    assert cfg.block_bytes() == plain.block_bytes()
    assert not load_kv_config("bf16", 64, value_rotation="hadamard").rotates_values
    with pytest.raises(KVConfigError, match="power-of-two head_dim, got 48") as err:
        config_from_dict(spec, 48)
    assert "\n" not in str(err.value)
    with pytest.raises(KVConfigError, match="rotation 'walsh' is unknown"):
        load_kv_config("kivi2", 64, value_rotation="walsh")
    with pytest.raises(KVConfigError, match="unknown value key"):
        config_from_dict({"value": {"bits": 2, "rotate": "hadamard"}}, 64)


def test_rotation_is_a_no_op_for_configs_without_it():
    x = jnp.ones((2, 64))
    cfg = load_kv_config("kivi2", 64)
    assert rotate_values(x, cfg) is x and unrotate_values(x, cfg) is x


def _filled(cfg, seed=0, lengths=LENGTHS, values=None):
    k, v, q = random_stream(seed, L, B, max(lengths), H, HQ, cfg.head_dim)
    if values is not None:
        v = values
    cache = kvc.init_cache(cfg, num_layers=L, batch=B, num_kv_heads=H, max_len=128)
    cache = jax.jit(kvc.prefill)(cache, k, v, q, jnp.asarray(lengths))
    return cache, jax.tree.map(lambda x: x[0], cache.layers), k[0], v[0]


@pytest.mark.parametrize("sinks", [0, 1])
def test_cache_stores_rotated_values_and_dequantizes_them_back(sinks):
    cfg = small_config("int8", head_dim=D, value_rotation="hadamard", sink_tokens=sinks)
    cache, layer, _, v = _filled(cfg)
    # Sequence 1 (21 tokens) is all in the window, stored exactly in the rotated basis.
    window = layer.residual_values[1, :, :21]
    want = jnp.swapaxes(v[1, :21], 0, 1) @ hadamard(D)
    np.testing.assert_allclose(window, want, atol=1e-5)
    # dequantize_layer is in the model's basis: int8 error only, for every token.
    _, values = kvc.dequantize_layer(layer, cache.lengths, cfg)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(values[b, :, :n], jnp.swapaxes(v[b, :n], 0, 1), atol=0.05)
        if sinks and n > cfg.residual_length:  # the sink comes back exactly
            np.testing.assert_allclose(values[b, :, 0], v[b, 0], atol=1e-5)


@pytest.mark.parametrize("impl,platform", [("xla", None), ("pallas_interpret", "tpu"),
                                           ("pallas_interpret", "gpu")])
@pytest.mark.parametrize("name", ["kivi2", "mixkvq"])
def test_every_backend_attends_in_the_model_basis(name, impl, platform):
    """The dispatch rotates each backend's output back: attention over a rotated cache
    equals plain attention over its dequantized (model-basis) values."""
    cfg = small_config(name, head_dim=D, value_rotation="hadamard", sink_tokens=1)
    cache, layer, _, _ = _filled(cfg, seed=2)
    keys, values = kvc.dequantize_layer(layer, cache.lengths, cfg)
    q = jnp.asarray(np.random.default_rng(3).normal(size=(B, 1, HQ, D)), jnp.float32)
    got = attn.cached_attention(q, layer, cache.lengths, cfg, scale=0.125, impl=impl,
                                platform=platform)
    want = jnp.nan_to_num(softmax_attention(q, keys, values, LENGTHS, 0.125))
    np.testing.assert_allclose(got.out, want, atol=1e-4)


def test_rotation_cuts_the_attention_error_of_heavy_tailed_two_bit_values():
    """Heavy-tailed values (Student t, 2 degrees of freedom; real values have a few large
    entries per token): the rotation spreads each token's large entries over all its
    channels, the 2-bit per-token steps shrink and the attention error falls."""
    rng = np.random.default_rng(5)
    lengths = [96] * B  # three quantized blocks, empty window: all history quantized
    values = jnp.asarray(rng.standard_t(2, size=(L, B, 96, H, D)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(B, 1, HQ, D)), jnp.float32)

    def error(rotation):
        cfg = small_config("k8v2", head_dim=D, value_rotation=rotation)  # value error rules
        cache, layer, k, v = _filled(cfg, seed=6, lengths=lengths, values=values)
        got = attn.cached_attention(q, layer, cache.lengths, cfg, scale=0.125, impl="xla")
        want = softmax_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), lengths,
                                 0.125)
        return float(jnp.sqrt(jnp.mean((got.out - want) ** 2)))

    plain, rotated = error("none"), error("hadamard")
    assert rotated < 0.85 * plain, (rotated, plain)


def test_model_over_a_rotated_cache_matches_the_exact_cache(hf_checkpoint, exact_kv):
    """Chunked prefill (blocks quantized mid-prompt) and decode steps of a tiny Llama
    over an int8 cache with rotated values: logits within int8 error of the exact
    cache's, as close as the unrotated int8 cache's (a basis mix-up would be far off)."""
    from mixkvq_jax.checkpoint import load_checkpoint
    from mixkvq_jax.models import forward

    pytest.importorskip("torch")
    cfg, params, _ = load_checkpoint(hf_checkpoint("llama3").path, "float32")
    step = jax.jit(forward, static_argnames=("config", "impl"))
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size - 1, size=40).astype(np.int32)

    def logits(kv):
        cache = kvc.init_cache(kv, num_layers=cfg.num_layers, batch=1,
                               num_kv_heads=cfg.num_kv_heads, max_len=64)
        out = []
        for start, stop in [(0, 8), (8, 16), (16, 24), (24, 32), *((t, t + 1)
                                                                    for t in range(32, 40))]:
            got, cache = step(params, jnp.asarray(ids[None, start:stop]), cache, None,
                              config=cfg, impl="xla")
            out.append(np.asarray(got[0]))
        return np.concatenate(out)

    exact = logits(exact_kv(cfg.head_dim))
    int8 = dict(residual_length=16, key_group_size=16, value_group_size=16,
                scale_dtype="float32", full_dtype="float32")
    rotated = np.abs(logits(load_kv_config("int8", cfg.head_dim, value_rotation="hadamard",
                                           **int8)) - exact).max()
    plain = np.abs(logits(load_kv_config("int8", cfg.head_dim, **int8)) - exact).max()
    assert 0 < rotated < 2 * plain, (rotated, plain)
