"""memory.py: weights + KV cache + prefill activations, each measured, and the total."""

import jax
import pytest

from mixkvq_jax import memory
from mixkvq_jax.awq import apply_to_tree, quantize_rtn
from mixkvq_jax.cache import init_cache, memory_bytes
from mixkvq_jax.config import load_kv_config


@pytest.mark.parametrize("preset", ["bf16", "int8", "kivi2", "mixkvq", "k4v2"])
def test_kv_bytes_from_pytree_equal_formula(demo_model, preset):
    config, _, _ = demo_model
    kv = load_kv_config(preset, config.head_dim)
    from_tree, from_formula = memory.kv_cache_bytes(kv, config, batch=3, context=1000)
    assert from_tree == from_formula
    real = init_cache(kv, num_layers=config.num_layers, batch=3,
                      num_kv_heads=config.num_kv_heads, max_len=1000)
    assert memory_bytes(real) == from_tree


def test_activation_peak_falls_with_the_prefill_chunk(demo_model):
    config, params, _ = demo_model
    kv = load_kv_config("kivi2", config.head_dim)
    big = memory.prefill_activation_bytes(params, config, kv, chunk=256, context=1024)
    small = memory.prefill_activation_bytes(params, config, kv, chunk=32, context=1024)
    assert 0 < small < big


def test_report_total_is_the_sum_and_awq_weights_are_smaller(demo_model):
    config, params, _ = demo_model
    kv = load_kv_config("bf16", config.head_dim)
    report = memory.memory_report(params, config, kv, context=512, prefill_chunk=64)
    assert report.total_bytes == (report.weights_bytes + report.kv_cache_bytes
                                  + report.activation_bytes)
    assert report.weights_bytes == sum(x.nbytes for x in jax.tree.leaves(params))
    assert report.kv_cache_bytes == report.kv_cache_formula_bytes
    int4 = apply_to_tree(params, lambda path, k: quantize_rtn(k, group_size=64),
                         include=r"layers/(attn|mlp)/.*kernel")
    assert memory.tree_bytes(int4) < 0.6 * report.weights_bytes
    assert set(report.as_dict()) >= {"weights_bytes", "kv_cache_bytes", "activation_bytes",
                                     "total_bytes"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be positive"):
        memory.memory_report({}, None, None, context=0)


def test_total_matches_xla_peak_of_the_compiled_prefill(demo_model):
    """bf16 weights + bf16 KV: the memory model (array bytes + KV formula + activations)
    against XLA's buffer accounting of the compiled prefill chunk, whose arguments are
    the real params and a really allocated cache; within 1%."""
    import jax.numpy as jnp
    import numpy as np

    from mixkvq_jax.models import cast_params

    config, params, _ = demo_model
    params = cast_params(params, jnp.bfloat16)
    kv = load_kv_config("bf16", config.head_dim)
    report = memory.memory_report(params, config, kv, context=512, prefill_chunk=64)
    cache = init_cache(kv, num_layers=config.num_layers, batch=1,
                       num_kv_heads=config.num_kv_heads, max_len=512)
    xla = memory.compiled_prefill_footprint(params, config, kv, chunk=64, context=512,
                                            cache=cache)
    assert abs(report.total_bytes - xla.peak_bytes) <= 0.01 * xla.peak_bytes
    assert report.measured_peak_bytes == xla.peak_bytes and report.total_rel_error < 0.01
    # The arguments XLA counts are the weights and the allocated cache, plus the chunk's
    # tokens and counts (int32 [1, 64] and [1]).
    allocated = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves((params, cache)))
    assert xla.argument_bytes == allocated + 4 * (64 + 1)
    assert memory_bytes(cache) == report.kv_cache_formula_bytes
    # Activations are what prefill adds: nonzero, and the logits are one token's only.
    assert report.activation_bytes == xla.activation_bytes > config.vocab_size * 4
