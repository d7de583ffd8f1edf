"""salience.py: MixKVQ ranks by mean|q| x step; range_only by step alone."""

import jax.numpy as jnp
import numpy as np

from mixkvq_jax.config import load_kv_config
from mixkvq_jax.salience import abs_query_per_kv_head, channel_permutation, query_mean


def _keys_and_query():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(128, 8)) * 0.1
    keys[:, 2] *= 10  # wide channel the query relies on
    keys[:, 5] *= 30  # wider channel the query ignores
    mean_abs_q = np.full(8, 1.0)
    mean_abs_q[5] = 0.001
    mean_abs_q[2] = 5.0
    return jnp.asarray(keys), jnp.asarray(mean_abs_q)


def test_query_aware_promotes_the_channel_the_query_uses():
    keys, mean_q = _keys_and_query()
    cfg = load_kv_config("mixkvq", 8, value_group_size=8)
    perm = channel_permutation(keys, mean_q, cfg)
    assert int(perm[0]) == 2
    assert list(np.asarray(perm)).index(5) > list(np.asarray(perm)).index(2)


def test_range_only_promotes_the_widest_channel():
    keys, mean_q = _keys_and_query()
    cfg = load_kv_config("mixkvq", 8, value_group_size=8, salience="range_only")
    assert int(channel_permutation(keys, mean_q, cfg)[0]) == 5


def test_none_is_identity_and_permutation_is_a_permutation():
    keys, mean_q = _keys_and_query()
    cfg = load_kv_config("mixkvq", 8, value_group_size=8, salience="none")
    np.testing.assert_array_equal(channel_permutation(keys, mean_q, cfg), np.arange(8))
    cfg = load_kv_config("mixkvq", 8, value_group_size=8)
    perm = channel_permutation(jnp.stack([keys, -keys]), mean_q, cfg)
    assert perm.shape == (2, 8)
    assert sorted(np.asarray(perm[1]).tolist()) == list(range(8))


def test_gqa_statistic_averages_query_heads_and_skips_padding():
    q = jnp.asarray(np.arange(1, 2 * 3 * 4 * 2 + 1, dtype=np.float32).reshape(1, 2, 4, 6) * -1)
    q = q.reshape(1, 2, 4, 6)
    valid = jnp.asarray([[True, False]])
    per_head = abs_query_per_kv_head(q, 2, valid)  # 4 q heads share 2 kv heads
    assert per_head.shape == (1, 2, 2, 6)
    expected = np.abs(np.asarray(q[0, 0])).reshape(2, 2, 6).mean(1)
    np.testing.assert_allclose(per_head[0, 0], expected)
    np.testing.assert_array_equal(per_head[0, 1], 0)
    mean = query_mean(per_head.sum(1), jnp.asarray([1]))
    np.testing.assert_allclose(mean[0], expected)
