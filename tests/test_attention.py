"""attention.py: the XLA path over the quantized cache, against plain softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import QUANT_PRESETS, random_stream, small_config, softmax_attention

from mixkvq_jax import attention as attn
from mixkvq_jax import cache as kvc
from mixkvq_jax.config import load_kv_config

L, B, H, HQ, D = 1, 3, 2, 8, 32
LENGTHS = [0, 21, 77]  # empty, window only, blocks + window (R = 32)
prefill_jit = jax.jit(kvc.prefill)
history_jit = jax.jit(attn.history_attention_xla, static_argnames=("config", "scale",
                                                                   "blocks_per_step"))


def _filled(cfg, seed=0, lengths=LENGTHS, keys=None):
    k, v, q = random_stream(seed, L, B, max(lengths), H, HQ, cfg.head_dim)
    if keys is not None:
        k = keys
    cache = kvc.init_cache(cfg, num_layers=L, batch=B, num_kv_heads=H, max_len=128)
    cache = prefill_jit(cache, k, v, q, jnp.asarray(lengths))
    layer = jax.tree.map(lambda x: x[0], cache.layers)
    return cache, layer, k[0], v[0]


def _queries(seed, c=2, head_dim=D):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, c, HQ, head_dim)), jnp.float32)


def test_full_precision_cache_equals_plain_attention():
    cfg = small_config("bf16")  # full_dtype float32
    cache, layer, k, v = _filled(cfg)
    q = _queries(1)
    got = history_jit(q, layer, cache.lengths, config=cfg, scale=0.2, blocks_per_step=1)
    want = softmax_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), LENGTHS, 0.2)
    np.testing.assert_allclose(got.out[1:], want[1:], atol=1e-5)
    assert bool(jnp.all(got.out[0] == 0)) and bool(jnp.all(jnp.isneginf(got.lse[0])))


@pytest.mark.parametrize("name", ["bf16", *QUANT_PRESETS])
@pytest.mark.parametrize("blocks_per_step", [1, 2])
def test_equals_attention_over_dequantized_cache(name, blocks_per_step):
    """Scale folding == dequantize-then-attend, for every preset (GQA 4, ragged batch)."""
    cfg = small_config(name)
    cache, layer, _, _ = _filled(cfg, seed=2)
    keys, values = kvc.dequantize_layer(layer, cache.lengths, cfg)
    q = _queries(3)
    got = history_jit(q, layer, cache.lengths, config=cfg, scale=0.2,
                      blocks_per_step=blocks_per_step)
    want = softmax_attention(q, keys, values, LENGTHS, 0.2)
    np.testing.assert_allclose(got.out, jnp.nan_to_num(want), atol=1e-5)


def _output_error(name, keys=None, q=None, head_dim=D):
    return _output_error_with(name, keys, q, head_dim, {})


def _output_error_with(name, keys, q, head_dim, overrides):
    cfg = small_config(name, head_dim=head_dim, **overrides)
    lengths = [96, 96, 96]  # 3 quantized blocks, empty window: all history quantized
    cache, layer, k, v = _filled(cfg, seed=4, lengths=lengths, keys=keys)
    q = _queries(5, head_dim=head_dim) if q is None else q
    got = history_jit(q, layer, cache.lengths, config=cfg, scale=head_dim**-0.5,
                      blocks_per_step=8)
    want = softmax_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), lengths,
                             head_dim**-0.5)
    return float(jnp.sqrt(jnp.mean((got.out - want) ** 2)))


def test_error_shrinks_as_bits_grow():
    errors = {name: _output_error(name) for name in ("int8", "kivi4", "kivi2")}
    assert errors["int8"] < errors["kivi4"] < errors["kivi2"], errors


def _outlier_case(d=64):
    """Keys with 4 wide channels the query leans on and 2 wider ones it ignores."""
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(L, B, 96, H, d))
    used, ignored = [3, 17, 40, 51], [5, 9]
    keys[..., used] *= 6.0
    keys[..., ignored] *= 12.0
    q = rng.normal(size=(B, 2, HQ, d)) * 0.3
    q[..., used] = 2.0 * np.sign(rng.normal(size=(B, 2, HQ, len(used))))
    q[..., ignored] = 0.0
    return jnp.asarray(keys, jnp.float32), jnp.asarray(q, jnp.float32)


@pytest.mark.parametrize("name", ["kivi2", "mixkvq"])
def test_sink_tokens_make_an_attention_sink_exact(name):
    """Token 0 as a real sink (keys aligned with the query, so it draws most of the
    attention, with an outlier value): keeping it in full precision cuts the error."""
    rng = np.random.default_rng(11)
    keys = rng.normal(size=(L, B, 96, H, D))
    q = jnp.asarray(rng.normal(size=(B, 2, HQ, D)), jnp.float32)
    keys[:, :, 0] = 3.0 * np.asarray(q[:, 0, ::4])[None]  # sink: aligned with head 0's query
    keys = jnp.asarray(keys, jnp.float32)
    errors = {s: _output_error_with(name, keys, q, D, {"sink_tokens": s}) for s in (0, 1)}
    assert errors[1] < 0.5 * errors[0], errors


def test_mixkvq_beats_kivi2_when_the_query_leans_on_outlier_channels():
    keys, q = _outlier_case()
    mix = _output_error("mixkvq", keys, q, head_dim=64)
    kivi = _output_error("kivi2", keys, q, head_dim=64)
    assert load_kv_config("mixkvq", 64).average_key_bits < 2.8
    # Both store 2-bit values, so part of the error is shared; keys make the difference.
    assert mix < 0.6 * kivi, (mix, kivi)


def test_query_term_matters_range_only_ranks_the_ignored_channels_first():
    keys, q = _outlier_case()
    query_aware = _output_error("mixkvq", keys, q, head_dim=64)
    cfg = dict(salience="range_only")
    range_only = _output_error_with("mixkvq", keys, q, 64, cfg)
    assert query_aware < range_only, (query_aware, range_only)


def test_attend_and_update_equals_causal_attention_in_chunks():
    """Prefill in chunks then decode through attend_and_update == one causal attention."""
    cfg = small_config("bf16")
    rng = np.random.default_rng(8)
    t = 70
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, n, D)), jnp.float32) for n in (HQ, H, H))
    step = jax.jit(attn.attend_and_update, static_argnames=("config", "scale", "impl"))
    layer = jax.tree.map(lambda x: x[0], kvc.init_cache(
        cfg, num_layers=1, batch=1, num_kv_heads=H, max_len=t).layers)
    outs, length = [], 0
    for size in (40, 20, 1, 1, 8):
        counts = jnp.asarray([size])
        sl = slice(length, length + size)
        out, layer = step(q[:, sl], k[:, sl], v[:, sl], layer, jnp.asarray([length]), counts,
                          config=cfg, scale=0.2, impl="xla")
        outs.append(out)
        length += size
    got = jnp.concatenate(outs, axis=1)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, HQ // H, axis=2)) * 0.2
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1),
                      jnp.repeat(v, HQ // H, axis=2))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_merge_partials_with_an_empty_side():
    out = jnp.ones((1, 1, 2, 4))
    full = attn.Partial(out, jnp.zeros((1, 1, 2)))
    empty = attn.Partial(jnp.zeros_like(out), jnp.full((1, 1, 2), -jnp.inf))
    merged = attn.merge_partials(full, empty)
    np.testing.assert_array_equal(merged.out, out)
    both_empty = attn.merge_partials(empty, empty)
    assert bool(jnp.all(jnp.isfinite(both_empty.out)))


def test_dispatch_names_and_errors():
    assert attn.resolve_impl("auto") == "xla"  # CPU
    with pytest.raises(ValueError, match="unknown; use one of auto, xla"):
        attn.resolve_impl("cuda")
    cfg = small_config("kivi2")
    cache, layer, _, _ = _filled(cfg)
    with pytest.raises(ValueError, match="head_dim=32"):
        attn.cached_attention(jnp.ones((B, 1, HQ, 16)), layer, cache.lengths, cfg)
