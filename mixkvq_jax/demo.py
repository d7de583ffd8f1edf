"""`python -m mixkvq_jax.demo`: each preset on a synthetic KV stream, no model needed.

Streams random keys (with a few outlier channels the queries lean on, as in real
models) and values through every preset's cache, then prints bytes per token, the
ratio to BF16 and the attention-output error against exact attention.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mixkvq_jax import attention, cache
from mixkvq_jax.config import load_kv_config

PRESETS = ("bf16", "int8", "kivi4", "kivi2", "mixkvq")


def synthetic_stream(tokens: int, kv_heads: int, q_heads: int, head_dim: int, seed: int = 0):
    """keys/values [1, 1, T, H, D] and queries [1, 1, T, Hq, D] with outlier channels."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(1, 1, tokens, kv_heads, head_dim))
    outliers = rng.choice(head_dim, size=4, replace=False)
    keys[..., outliers] *= 8.0
    queries = rng.normal(size=(1, 1, tokens, q_heads, head_dim)) * 0.5
    queries[..., outliers] *= 3.0
    values = rng.normal(size=(1, 1, tokens, kv_heads, head_dim))
    return tuple(jnp.asarray(x, jnp.float32) for x in (keys, values, queries))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    kv_heads, q_heads = 2, 8
    keys, values, queries = synthetic_stream(args.tokens, kv_heads, q_heads, args.head_dim)
    probe = queries[0, :, -1:]  # [1, 1, Hq, D]: the newest query attends to everything
    group = q_heads // kv_heads
    k_all = jnp.repeat(keys[0, 0], group, axis=1)
    v_all = jnp.repeat(values[0, 0], group, axis=1)
    scores = jnp.einsum("hd,thd->ht", probe[0, 0], k_all) * args.head_dim**-0.5
    exact = jnp.einsum("ht,thd->hd", jax.nn.softmax(scores, -1), v_all)

    print(f"{args.tokens} tokens, {kv_heads} KV heads x head_dim {args.head_dim}, "
          f"{q_heads} query heads\n")
    print(f"{'preset':8} {'key bits':>8} {'B/token/head':>13} {'vs bf16':>8} {'cache MiB':>10} "
          f"{'attn rel. err':>14}")
    for name in PRESETS:
        cfg = load_kv_config(name, args.head_dim)
        kv = cache.init_cache(cfg, num_layers=1, batch=1, num_kv_heads=kv_heads,
                              max_len=args.tokens)
        kv = jax.jit(cache.prefill)(kv, keys, values, queries)
        layer = jax.tree.map(lambda x: x[0], kv.layers)
        got = attention.cached_attention(probe, layer, kv.lengths, cfg, impl="xla").out[0, 0]
        err = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
        print(f"{name:8} {cfg.average_key_bits:8.2f} {cfg.bytes_per_token:13.1f} "
              f"{cfg.compression_vs_bf16:8.1%} {cache.memory_bytes(kv) / 2**20:10.3f} "
              f"{err:14.2e}")


if __name__ == "__main__":
    main()
