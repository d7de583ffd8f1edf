"""Pallas kernels: interpret-mode results vs the XLA oracle, bit-exact quantize-and-pack,
and cross-platform lowering (TPU Mosaic, CUDA Triton) on this CPU-only machine.

Both kernel bodies (``backend="tpu"`` and ``backend="gpu"``) run in interpret mode;
lowering checks export for the real platforms, then re-parse and verify the embedded
Mosaic / Triton module with its dialect's op verifiers (compiling needs the device).
"""

from __future__ import annotations

import base64
import json
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from helpers import random_stream, small_config

from mixkvq_jax import attention as attn
from mixkvq_jax import cache as kvc
from mixkvq_jax import quant
from mixkvq_jax.config import load_kv_config
from mixkvq_jax.layout import block_fields
from mixkvq_jax.pallas_kernels import decode_attention as da
from mixkvq_jax.pallas_kernels import quantize_pack as qp

BACKENDS = ["tpu", "gpu"]
ORACLE_PRESETS = ["bf16", "int8", "kivi4", "kivi2", "mixkvq"]
# R = 32: empty, window only (< R), exactly one block, blocks + window (not multiples of R).
LENGTHS = [0, 21, 32, 77, 100]
MAX_LEN = 128  # 4 block slots
SCALE = 0.3

_prefill = jax.jit(kvc.prefill)
_oracle = jax.jit(attn.history_attention_xla, static_argnames=("config", "scale"))


def _pallas(q, layer, lengths, cfg, backend, num_splits=2, blocks_per_step=2):
    fn = jax.jit(
        da.cached_attention_pallas,
        static_argnames=("config", "scale", "interpret", "backend", "num_splits",
                         "blocks_per_step"),
    )
    return fn(q, layer, lengths, config=cfg, scale=SCALE, interpret=True, backend=backend,
              num_splits=num_splits, blocks_per_step=blocks_per_step)


def _layer(cfg, kv_heads, q_heads, lengths=LENGTHS, seed=0):
    """A one-layer cache filled by `prefill` with random data, and its lengths."""
    batch = len(lengths)
    k, v, q = random_stream(seed, 1, batch, max(lengths), kv_heads, q_heads, cfg.head_dim)
    cache = kvc.init_cache(cfg, num_layers=1, batch=batch, num_kv_heads=kv_heads,
                           max_len=MAX_LEN)
    cache = _prefill(cache, k, v, q, jnp.asarray(lengths))
    return jax.tree.map(lambda x: x[0], cache.layers), cache.lengths


def _query(batch, q_heads, head_dim, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(batch, 1, q_heads, head_dim)), jnp.float32)


def _assert_matches(got: attn.Partial, want: attn.Partial) -> None:
    np.testing.assert_allclose(got.out, want.out, atol=1e-4, rtol=0)
    assert bool(jnp.all(jnp.isneginf(got.lse) == jnp.isneginf(want.lse)))
    finite = jnp.isfinite(want.lse)
    np.testing.assert_allclose(jnp.where(finite, got.lse, 0), jnp.where(finite, want.lse, 0),
                               atol=1e-4, rtol=0)


# ---- decode attention == XLA oracle ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ORACLE_PRESETS)
def test_decode_matches_xla_oracle(name, backend):
    """Every preset, GQA 4, head_dim 64, a ragged batch incl. length 0 and < R."""
    cfg = small_config(name, head_dim=64)
    layer, lengths = _layer(cfg, kv_heads=2, q_heads=8)
    q = _query(len(LENGTHS), 8, 64)
    want = _oracle(q, layer, lengths, config=cfg, scale=SCALE)
    _assert_matches(_pallas(q, layer, lengths, cfg, backend), want)
    assert bool(jnp.all(want.out[0] == 0)) and bool(jnp.isneginf(want.lse[0]).all())


# Slabs wider than a group (W = 8 words > G = 4 tokens, Wv = 16 > Gv = 8): split runs.
NARROW_GROUPS = {"key_group_size": 4, "value_group_size": 8}


@pytest.mark.parametrize(
    ("name", "head_dim", "kv_heads", "q_heads", "backend", "overrides"),
    [
        ("kivi4", 128, 2, 2, "tpu", {}),  # GQA 1 (MHA), head_dim 128
        ("kivi4", 128, 1, 8, "gpu", {}),  # GQA 8, head_dim 128
        ("int8", 64, 3, 9, "tpu", NARROW_GROUPS),  # GQA 3 (SmolLM2's 9q / 3kv): padding
        ("int8", 64, 2, 2, "gpu", NARROW_GROUPS),  # GQA 1
    ],
)
def test_decode_gqa_ratios_and_head_dims(name, head_dim, kv_heads, q_heads, backend,
                                         overrides):
    cfg = small_config(name, head_dim=head_dim, **overrides)
    lengths = [77, 0, 13]
    layer, lens = _layer(cfg, kv_heads, q_heads, lengths=lengths, seed=3)
    q = _query(len(lengths), q_heads, head_dim, seed=4)
    want = _oracle(q, layer, lens, config=cfg, scale=SCALE)
    _assert_matches(_pallas(q, layer, lens, cfg, backend, num_splits=3, blocks_per_step=4),
                    want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_past_the_length_are_never_read(backend):
    """Slots past each sequence's blocks hold NaN: the kernel must not touch them (the
    TPU index map clamps to the last valid block, the GPU loop stops at it)."""
    cfg = small_config("int8", head_dim=32)
    lengths = [40, 100, 0]
    layer, lens = _layer(cfg, kv_heads=2, q_heads=4, lengths=lengths)
    q = _query(len(lengths), 4, 32)
    want = _oracle(q, layer, lens, config=cfg, scale=SCALE)
    used = (lens // cfg.residual_length)[:, None, None]  # [B, 1, 1]
    fields = block_fields(cfg)

    def poison(name: str, x: jax.Array) -> jax.Array:
        """NaN scales / zeros in the rows of every block past the sequence's last."""
        slot = jnp.arange(x.shape[2]) // fields[name].rows  # [NB * rows]: each row's block
        return jnp.where((slot[None, None, :] >= used)[..., None], jnp.nan, x)

    poisoned = layer.replace(**{name: poison(name, getattr(layer, name)) for name in
                                ("key_scales", "key_zeros", "value_scales", "value_zeros")})
    got = _pallas(q, poisoned, lens, cfg, backend, num_splits=1, blocks_per_step=1)
    _assert_matches(got, want)


# ---- paged cache: the kernels read blocks through a block table ---------------------------
def _to_pool(layer, cfg, pages: int, seed: int = 0):
    """A one-layer cache's blocks scattered into a pool [P, H, rows, 128] per field at
    random pages (NaN-poisoned elsewhere), and the block table [B, NB] that finds them."""
    fields = block_fields(cfg)
    b, h = layer.value_codes.shape[:2]
    nb = layer.value_codes.shape[2] // fields["value_codes"].rows
    table = np.random.default_rng(seed).permutation(pages)[:b * nb].reshape(b, nb)

    def pool(name):
        x = getattr(layer, name)
        rows = fields[name].rows
        blocks = x.reshape(b, h, nb, rows, 128).transpose(0, 2, 1, 3, 4).reshape(
            b * nb, h, rows, 128)
        fill = jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else 0
        empty = jnp.full((pages, h, rows, 128), fill, x.dtype)
        return empty.at[table.reshape(-1)].set(blocks)

    paged = layer.replace(**{name: pool(name) for name in fields})
    return paged, jnp.asarray(table, jnp.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["bf16", "kivi2", "mixkvq"])
def test_paged_decode_matches_the_plain_reference(name, backend):
    """Blocks in a shuffled pool read through the block table (TPU: scalar-prefetched
    page per grid step; GPU: page pointer offsets) == the XLA path on the contiguous
    cache. Unused pages hold NaN: reading one would show."""
    cfg = small_config(name, head_dim=64, **({"sink_tokens": 1} if name == "mixkvq" else {}))
    layer, lengths = _layer(cfg, kv_heads=2, q_heads=8)
    pool, table = _to_pool(layer, cfg, pages=3 * len(LENGTHS) * 4)
    q = _query(len(LENGTHS), 8, 64)
    want = _oracle(q, layer, lengths, config=cfg, scale=SCALE)
    fn = jax.jit(da.cached_attention_pallas,
                 static_argnames=("config", "scale", "interpret", "backend", "num_splits"))
    got = fn(q, pool, lengths, config=cfg, scale=SCALE, interpret=True, backend=backend,
             num_splits=2, block_table=table)
    _assert_matches(got, want)
    # The XLA path reads the same pool through the table (one gather a step).
    xla = _oracle(q, pool, lengths, config=cfg, scale=SCALE, block_table=table)
    _assert_matches(xla, want)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", ["kivi2", "mixkvq"])
def test_paged_decode_kernel_lowers(name, platform):
    """The paged kernels (real presets, a stacked pool of 64 pages) lower for TPU and
    CUDA and pass their dialect's verifiers."""
    from mixkvq_jax import paged

    cfg = load_kv_config(name, 128)
    cache = paged.init_paged_cache(cfg, num_layers=2, slots=2, num_kv_heads=8, pages=64,
                                   max_len=1024)
    q = jnp.zeros((2, 1, 32, 128), jnp.float32)
    backend = "tpu" if platform == "tpu" else "gpu"

    def fn(q, layers, lengths, table):
        return da.cached_attention_pallas(q, layers, lengths, cfg, scale=0.1, backend=backend,
                                          layer_index=1, block_table=table)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verified = _lower(fn, (q, cache.layers, jnp.zeros((2,), jnp.int32),
                               cache.block_table), platform)
    assert verified == [True]


def test_tpu_kernel_under_the_tpu_semantics_interpreter():
    """The TPU body under `pltpu.InterpretParams` (simulated DMAs, VMEM scratch and
    scalar prefetch, as Mosaic would run them) also matches the oracle."""
    from jax.experimental.pallas import tpu as pltpu

    cfg = small_config("bf16", head_dim=32)
    layer, lengths = _layer(cfg, kv_heads=2, q_heads=4)
    q = _query(len(LENGTHS), 4, 32)
    got = da.cached_attention_pallas(q, layer, lengths, cfg, scale=SCALE,
                                     interpret=pltpu.InterpretParams(), backend="tpu",
                                     num_splits=2, blocks_per_step=2)
    _assert_matches(got, _oracle(q, layer, lengths, config=cfg, scale=SCALE))


def test_dispatch_through_cached_attention():
    """attention.cached_attention(impl="pallas_interpret") runs the kernel (the TPU body
    on CPU) with its default splits and blocks per step."""
    cfg = small_config("int8", head_dim=32)
    layer, lengths = _layer(cfg, kv_heads=2, q_heads=8)
    q = _query(len(LENGTHS), 8, 32)
    fn = jax.jit(attn.cached_attention, static_argnames=("config", "scale", "impl"))
    got = fn(q, layer, lengths, config=cfg, scale=SCALE, impl="pallas_interpret")
    _assert_matches(got, _oracle(q, layer, lengths, config=cfg, scale=SCALE))


# ---- unsupported calls ------------------------------------------------------------------
def test_unsupported_shapes_give_a_reason_and_fall_back_with_a_warning():
    cfg = small_config("kivi2", head_dim=64)
    layer, lengths = _layer(cfg, kv_heads=2, q_heads=8)
    chunk = jnp.ones((len(LENGTHS), 3, 8, 64), jnp.float32)
    reason = da.unsupported_reason(chunk, layer, cfg)
    assert reason is not None and "C=3" in reason and "\n" not in reason
    assert da.unsupported_reason(chunk[:, :1], layer, cfg) is None
    assert "multiple of 2 KV heads" in da.unsupported_reason(chunk[:, :1, :3], layer, cfg)

    attn._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="does not support this call.*C=3"):
        got = attn.cached_attention(chunk, layer, lengths, cfg, scale=SCALE,
                                    impl="pallas_interpret")
    want = attn.history_attention_xla(chunk, layer, lengths, cfg, scale=SCALE)
    np.testing.assert_array_equal(got.out, want.out)

    odd = small_config("kivi2", head_dim=64, residual_length=48)  # R not a power of two
    odd_layer = kvc.init_layer(odd, batch=1, num_kv_heads=2, max_len=96)
    q = jnp.ones((1, 1, 8, 64))
    assert "power-of-two" in da.unsupported_reason(q, odd_layer, odd, backend="gpu")
    assert da.unsupported_reason(q, odd_layer, odd, backend="tpu") is None
    with pytest.raises(ValueError, match="power-of-two"):
        da.cached_attention_pallas(q, odd_layer, jnp.zeros(1, jnp.int32), odd, scale=1.0,
                                   interpret=True, backend="gpu")
    with pytest.raises(ValueError, match="pallas_interpret"):  # CPU, not interpreted
        da.cached_attention_pallas(q[:, :, :8], odd_layer, jnp.zeros(1, jnp.int32), odd,
                                   scale=1.0)
    assert "scale_dtype" in qp.unsupported_reason(small_config("kivi2", scale_dtype="float16"))
    # bf16 values of head_dim 256 are 256-wide rows: the TPU body takes parts <= 128 wide
    wide = small_config("bf16", head_dim=256)
    wide_layer = kvc.init_layer(wide, batch=1, num_kv_heads=2, max_len=256)
    q = jnp.ones((1, 1, 4, 256))
    assert "value_codes" in da.unsupported_reason(q, wide_layer, wide, backend="tpu")
    assert da.unsupported_reason(q, wide_layer, wide, backend="gpu") is None


# ---- quantize-and-pack == cache.quantize_blocks, bit for bit ----------------------------
def _blocks(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shape = (2, 3, cfg.residual_length, cfg.head_dim)
    keys = rng.normal(size=shape)
    keys[..., 1] *= 10  # an outlier channel
    keys[0, 0, :, 2] = 0.7  # a constant channel: zero range, scale 0
    values = rng.normal(size=shape)
    values[1, 1, 3, :] = -1.25  # a constant token
    mean_q = np.abs(rng.normal(size=(2, 3, cfg.head_dim)))
    return tuple(jnp.asarray(x, jnp.float32).astype(cfg.full_dtype)
                 for x in (keys, values, mean_q))


@pytest.mark.parametrize(
    ("name", "backend", "overrides"),
    [
        ("int8", "tpu", {}),
        ("int8", "tpu", NARROW_GROUPS),
        ("int8", "gpu", NARROW_GROUPS),
        ("kivi2", "tpu", {"scale_dtype": "float32"}),
        ("mixkvq", "tpu", {}),
        ("mixkvq", "tpu", {"full_dtype": "bfloat16"}),  # bf16 inputs, as in the real cache
        ("bf16", "tpu", {}),  # nothing quantized: no kernel call at all
        ("k4v2", "gpu", {}),
    ],
)
def test_quantize_pack_equals_quantize_blocks_exactly(name, backend, overrides):
    cfg = small_config(name, **overrides)
    keys, values, mean_q = _blocks(cfg)
    want = kvc.quantize_blocks(keys, values, mean_q, cfg)
    got = qp.quantize_blocks_pallas(keys, values, mean_q, cfg, interpret=True,
                                    backend=backend)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g, w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, path[0]
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path[0]))


def test_scale_rounding_matches_quant_round_toward():
    """The bit-level bfloat16 rounding equals quant._round_toward everywhere, incl.
    exact values, ties, negatives, tiny/huge numbers, +-inf and NaN."""
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.normal(size=4000) * 10.0 ** rng.integers(-30, 30, size=4000),
        np.asarray(jnp.asarray(rng.normal(size=500), jnp.bfloat16), np.float32),
        [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-40],
    ]).astype(np.float32)
    x = jnp.asarray(x)
    for up in (True, False):
        want = quant._round_toward(x, jnp.bfloat16, jnp.inf if up else -jnp.inf)
        got = qp._round_to_scale_dtype(x, jnp.bfloat16, up)
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.bfloat16), np.float32),
                                      np.asarray(want, np.float32))
    y = jnp.asarray(np.arange(-8, 520) / 2.0, jnp.float32)  # every half-integer tie
    np.testing.assert_array_equal(qp._round_half_even(y, "gpu"), jnp.round(y))


# ---- lowering for TPU (Mosaic) and CUDA (Triton) without the hardware -------------------
def _custom_call_configs(module_text: str, target: str) -> list[str | bytes]:
    """backend_config attributes of every ``target`` custom call in a StableHLO module."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    found = []
    with jax_mlir.make_ir_context():
        module = ir.Module.parse(module_text)

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        attrs = child.operation.attributes
                        if (child.operation.name == "stablehlo.custom_call"
                                and ir.StringAttr(attrs["call_target_name"]).value == target):
                            if "mhlo.backend_config" in attrs:  # Triton: a dictionary
                                config = ir.DictAttr(attrs["mhlo.backend_config"])
                                found.append(ir.StringAttr(config["ir"]).value_bytes)
                            else:  # Mosaic: JSON with the base64 serialized kernel
                                found.append(ir.StringAttr(attrs["backend_config"]).value)
                        walk(child.operation)

        walk(module.operation)
    return found


def _verify_mosaic(config_json: str) -> bool:
    """Deserialize a tpu_custom_call's Mosaic kernel and run the MLIR op verifiers."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager
    from jaxlib.mosaic.python import tpu

    body = base64.b64decode(json.loads(config_json)["custom_call_config"]["body"])
    ctx = jax_mlir.make_ir_context()
    tpu.register_dialect(ctx)
    with ctx, ir.Location.unknown():
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(body)
        PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
        return module.operation.verify()


def _verify_triton(blob: bytes) -> bool:
    """Parse a Triton custom call's module (tt dialect) and run the MLIR op verifiers
    (which enforce, e.g., Triton's power-of-two tensor shapes)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    ctx = jax_mlir.make_ir_context()
    triton.dialect.register_dialect(ctx)
    with ctx:
        return ir.Module.parse(blob).operation.verify()


def _lower(fn, args, platform: str) -> list:
    jitted = jax.jit(fn)
    if platform == "tpu":
        text = jax.export.export(jitted, platforms=["tpu"])(*args).mlir_module()
        assert "tpu_custom_call" in text
        configs = _custom_call_configs(text, "tpu_custom_call")
        return [_verify_mosaic(c) for c in configs]
    lowered = jitted.trace(*args).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()
    configs = _custom_call_configs(str(lowered.compiler_ir("stablehlo")), "__gpu$xla.gpu.triton")
    return [_verify_triton(c) for c in configs]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", ["bf16", "kivi2", "mixkvq"])
def test_decode_kernel_lowers(name, platform):
    """Real presets (R = 128, head_dim 128, 8 KV / 32 query heads) lower for TPU and
    CUDA, and the embedded kernel module passes its dialect's verifiers."""
    cfg = load_kv_config(name, 128)
    layer = kvc.init_layer(cfg, batch=2, num_kv_heads=8, max_len=1024)
    q = jnp.zeros((2, 1, 32, 128), jnp.float32)
    backend = "tpu" if platform == "tpu" else "gpu"

    def fn(q, layer, lengths):
        return da.cached_attention_pallas(q, layer, lengths, cfg, scale=0.1, backend=backend)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verified = _lower(fn, (q, layer, jnp.zeros((2,), jnp.int32)), platform)
    assert verified == [True]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_quantize_pack_kernel_lowers(platform):
    cfg = load_kv_config("mixkvq", 128)
    keys = jnp.zeros((2, 8, 128, 128), jnp.bfloat16)
    backend = "tpu" if platform == "tpu" else "gpu"

    def fn(k, v, m):
        return qp.quantize_blocks_pallas(k, v, m, cfg, backend=backend)

    verified = _lower(fn, (keys, keys, jnp.zeros((2, 8, 128))), platform)
    assert verified == [True]


def test_versions_used(capsys):
    with capsys.disabled():
        print(f"\n[pallas kernels tested with jax {jax.__version__}, "
              f"jaxlib {jaxlib.__version__}]")
