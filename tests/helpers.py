"""Shared test helpers: small configs, random KV streams and plain softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np

from mixkvq_jax.config import KVQuantConfig, load_kv_config

QUANT_PRESETS = ["int8", "kivi4", "kivi2", "mixkvq", "k4v2", "k8v2"]


def small_config(name: str, head_dim: int = 32, **overrides) -> KVQuantConfig:
    """A preset shrunk for tests: R=32 tokens per block, groups of 16, fp32 full tier."""
    kwargs = dict(residual_length=32, key_group_size=16, value_group_size=16,
                  full_dtype="float32")
    kwargs.update(overrides)
    return load_kv_config(name, head_dim, **kwargs)


def random_stream(seed: int, layers: int, batch: int, tokens: int, kv_heads: int,
                  q_heads: int, head_dim: int):
    """keys, values [L, B, T, H, D] and queries [L, B, T, Hq, D], float32."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(layers, batch, tokens, kv_heads, head_dim))
    k[..., :2] *= 8  # a couple of outlier channels, as real keys have
    v = rng.normal(size=(layers, batch, tokens, kv_heads, head_dim))
    q = rng.normal(size=(layers, batch, tokens, q_heads, head_dim))
    return tuple(jnp.asarray(x, jnp.float32) for x in (k, v, q))


def append_one_by_one(cache, k, v, q, start: int):
    """Append tokens ``start:`` of k / v / q ([L, B, T, ...]) with one jitted, donating
    step each; returns (cache, how many times the step was traced)."""
    import jax

    from mixkvq_jax import cache as kvc

    traces = []

    def step(cache, k, v, q):
        traces.append(1)
        return kvc.append(cache, k, v, q)

    step_jit = jax.jit(step, donate_argnums=0)
    for t in range(start, k.shape[2]):
        cache = step_jit(cache, k[:, :, t], v[:, :, t], q[:, :, t])
    return cache, len(traces)


def softmax_attention(q, keys, values, lengths, scale):
    """Plain attention: q [B, C, Hq, D] over keys/values [B, H, T, D], first lengths[b]."""
    group = q.shape[2] // keys.shape[1]
    keys, values = jnp.repeat(keys, group, axis=1), jnp.repeat(values, group, axis=1)
    scores = jnp.einsum("bchd,bhtd->bcht", q, keys, precision="highest") * scale
    mask = jnp.arange(keys.shape[2])[None, :] < jnp.asarray(lengths)[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    return jnp.einsum("bcht,bhtd->bchd", jax.nn.softmax(scores, -1), values, precision="highest")
