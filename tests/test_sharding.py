"""Tensor/data-parallel sharding of params and cache (`mixkvq_jax.models.sharding`).

The multi-device checks run in a subprocess with 4 virtual CPU devices
(``--xla_force_host_platform_device_count=4``): this pytest process already initialized
JAX with one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mixkvq_jax.cache import init_cache
from mixkvq_jax.config import load_kv_config
from mixkvq_jax.models import ModelConfig, param_shapes
from mixkvq_jax.models.sharding import (
    ShardingError,
    cache_partition_specs,
    make_mesh,
    param_partition_specs,
)

TINY = {"family": "llama", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
        "max_position_embeddings": 512}


def _specs_by_path(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): spec for path, spec in flat}


def test_param_partition_specs_layout():
    cfg = ModelConfig(**TINY, attention_bias=True)
    specs = _specs_by_path(param_partition_specs(param_shapes(cfg), cfg))
    assert specs["embed/embedding"] == P("model", None)
    assert specs["lm_head/kernel"] == P(None, "model")
    for name in ("q_proj", "k_proj", "v_proj"):
        assert specs[f"layers/attn/{name}/kernel"] == P(None, None, "model")
        assert specs[f"layers/attn/{name}/bias"] == P(None, "model")
    assert specs["layers/attn/o_proj/kernel"] == P(None, "model", None)
    assert specs["layers/mlp/gate_proj/kernel"] == P(None, None, "model")
    assert specs["layers/mlp/up_proj/kernel"] == P(None, None, "model")
    assert specs["layers/mlp/down_proj/kernel"] == P(None, "model", None)
    for name in ("layers/attn_norm/scale", "layers/mlp_norm/scale", "norm/scale"):
        assert specs[name] == P()
    # The layer axis is never sharded.
    assert all(not s or s[0] is None for k, s in specs.items() if k.startswith("layers/"))
    # No model axis: everything replicated.
    replicated = _specs_by_path(param_partition_specs(param_shapes(cfg), cfg, ("data", None)))
    assert set(replicated.values()) == {P()}


def test_param_partition_specs_int4_kernels():
    from mixkvq_jax.awq import apply_to_tree, quantize_rtn

    cfg = ModelConfig(**TINY)
    quantized = jax.eval_shape(lambda p: apply_to_tree(
        p, lambda _, k: quantize_rtn(k, group_size=64), include=r"(attn|mlp)/.*kernel$"),
        param_shapes(cfg))
    specs = _specs_by_path(param_partition_specs(quantized, cfg))
    assert specs["layers/attn/q_proj/kernel/packed"] == P(None, None, "model")
    assert specs["layers/attn/q_proj/kernel/scales"] == P(None, None, "model")
    assert specs["layers/attn/q_proj/kernel/input_scale"] == P()
    assert specs["layers/attn/o_proj/kernel/packed"] == P()  # row-parallel int4: replicated


def test_cache_partition_specs():
    kv = load_kv_config("mixkvq", 32)
    cache = init_cache(kv, num_layers=2, batch=2, num_kv_heads=2, max_len=256)
    specs = cache_partition_specs(cache)
    assert specs.lengths == P("data") and specs.overflow == P("data")
    assert specs.layers.query_count == P(None, "data")
    for name in ("residual_keys", "residual_values", "key_full",
                 "value_codes", "key_codes", "key_scales", "key_zeros", "value_scales",
                 "value_zeros", "query_abs_sum"):
        assert getattr(specs.layers, name) == P(None, "data", "model"), name
    assert specs.config == cache.config and specs.max_len == cache.max_len  # static fields


def test_single_device_mesh_errors():
    mesh = make_mesh(1, 1)
    cfg = ModelConfig(**TINY)
    with pytest.raises(ShardingError, match="no axis 'tensor'"):
        param_partition_specs(param_shapes(cfg), cfg, ("data", "tensor"), mesh=mesh)
    explicit = jax.make_mesh((1, 1), ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with pytest.raises(ShardingError, match="AxisType.Auto"):
        param_partition_specs(param_shapes(cfg), cfg, mesh=explicit)
    with pytest.raises(ShardingError, match="needs 4 devices"):
        make_mesh(2, 2, devices=jax.devices()[:1])
    # A 1x1 mesh is a valid (trivial) placement.
    params = {"embed": {"embedding": jnp.zeros((256, 128))}}
    specs = param_partition_specs(params, cfg, mesh=mesh)
    assert specs["embed"]["embedding"] == P("model", None)


_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from mixkvq_jax.cache import init_cache
    from mixkvq_jax.config import load_kv_config
    from mixkvq_jax.models import ModelConfig, forward, init_params, param_shapes
    from mixkvq_jax.models.sharding import (
        ShardingError, make_mesh, param_partition_specs, shard_batch, shard_cache,
        shard_params)

    assert jax.device_count() == 4, jax.devices()
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, seed=0, init_std=0.05)
    # mixkvq tiers with 32-token blocks, so a block is flushed in prefill and in decode.
    kv = load_kv_config("mixkvq", cfg.head_dim, residual_length=32, key_group_size=16,
                        value_group_size=16, full_dtype="float32")
    B, T, STEPS = 2, 28, 6
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, T)).astype(np.int32)
    counts = np.asarray([28, 21], np.int32)
    step = jax.jit(forward, static_argnames=("config", "impl"))

    def run(params, cache, place):
        logits, cache = step(params, place(jnp.asarray(tokens)), cache,
                             place(jnp.asarray(counts)), config=cfg, impl="xla")
        out = [np.asarray(logits)]
        tok = jnp.asarray(out[0][np.arange(B), counts - 1].argmax(-1), jnp.int32)
        for _ in range(STEPS):  # quantized decode steps
            logits, cache = step(params, place(tok[:, None]), cache, config=cfg, impl="xla")
            out.append(np.asarray(logits))
            tok = jnp.asarray(out[-1][:, -1].argmax(-1), jnp.int32)
        return out, cache, tok

    new_cache = lambda: init_cache(kv, num_layers=cfg.num_layers, batch=B,
                                   num_kv_heads=cfg.num_kv_heads, max_len=128)
    ref, ref_cache, _ = run(params, new_cache(), lambda x: x)

    mesh = make_mesh(data=2, model=2)
    sp = shard_params(params, mesh, cfg)
    sc = shard_cache(new_cache(), mesh)
    place = lambda x: shard_batch(x, mesh)
    out, cache, tok = run(sp, sc, place)
    hlo = step.lower(sp, place(tok[:, None]), cache, config=cfg, impl="xla").compile()
    odd = ModelConfig(**{**TINY, "vocab_size": 255})
    heads6 = ModelConfig(**{**TINY, "num_heads": 6, "num_kv_heads": 3, "intermediate_size": 384})
    odd_specs = param_partition_specs(param_shapes(odd), odd, mesh=mesh)
    errors = {}
    for name, fn in {
        # 6 query heads do not split 4 ways (2 KV heads on 4 devices would: repeated)
        "model4": lambda: param_partition_specs(param_shapes(heads6), heads6,
                                                mesh=make_mesh(1, 4)),
        "cache_model4": lambda: shard_cache(new_cache(), make_mesh(1, 4)),
        "batch": lambda: shard_cache(new_cache(), make_mesh(4, 1)),
    }.items():
        try:
            fn()
            errors[name] = None
        except ShardingError as err:
            errors[name] = str(err)
    print(json.dumps({
        "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(ref, out)),
        "max_abs_logit": max(float(np.abs(a).max()) for a in ref),
        "lengths": np.asarray(cache.lengths).tolist(),
        "ref_lengths": np.asarray(ref_cache.lengths).tolist(),
        "q_spec": str(sp["layers"]["attn"]["q_proj"]["kernel"].sharding.spec),
        "o_spec": str(sp["layers"]["attn"]["o_proj"]["kernel"].sharding.spec),
        "cache_spec": str(cache.layers.residual_keys.sharding.spec),
        "cache_shard_shape": list(cache.layers.residual_keys.addressable_shards[0].data.shape),
        "all_reduce": "all-reduce" in hlo.as_text(),
        "odd_vocab_embed_spec": str(odd_specs["embed"]["embedding"]),
        "odd_vocab_q_spec": str(odd_specs["layers"]["attn"]["q_proj"]["kernel"]),
        "errors": errors,
    }))
""")


@pytest.fixture(scope="module")
def multi_device_result():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    script = f"TINY = {TINY!r}\n{_SCRIPT}"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_prefill_and_decode_match_single_device(multi_device_result):
    r = multi_device_result
    assert r["lengths"] == r["ref_lengths"] == [34, 27]  # 28/21 prompt tokens + 6 steps
    assert r["max_abs_logit"] > 0.1  # logits are not trivially zero
    assert r["max_abs_diff"] <= 1e-5, r
    # Placement really happened: heads split over "model", batch over "data".
    assert r["q_spec"] == str(P(None, None, "model"))
    assert r["o_spec"] == str(P(None, "model", None))
    assert r["cache_spec"] == str(P(None, "data", "model"))
    assert r["cache_shard_shape"] == [2, 1, 1, 32, 32]  # [L, B/2, H/2, R, D]
    assert r["all_reduce"]  # XLA inserted the tensor-parallel collectives
    # A vocab the model axis does not divide is replicated; the heads are still split.
    assert r["odd_vocab_embed_spec"] == str(P())
    assert r["odd_vocab_q_spec"] == str(P(None, None, "model"))


def test_bad_mesh_errors(multi_device_result):
    errors = multi_device_result["errors"]
    assert errors["model4"] is not None
    assert "size 4" in errors["model4"] and "num_kv_heads=3" in errors["model4"]
    assert "num_heads=6" in errors["model4"] and "\n" not in errors["model4"]
    assert "model-axis size in [1, 3, 6]" in errors["model4"]  # the sizes that would work
    assert "num_kv_heads=2" in errors["cache_model4"]
    assert "batch=2" in errors["batch"]
