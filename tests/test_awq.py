"""Tests for AWQ w4a16 weight quantization (mixkvq_jax.awq), CPU, a few seconds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixkvq_jax import awq, quant

IN, OUT, G = 512, 256, 128


def _kernel(seed: int = 0, shape: tuple[int, ...] = (IN, OUT), dtype=jnp.float32) -> jax.Array:
    """Plain Gaussian weights (no structure that favours either method)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 0.05, dtype)


OUTLIERS = (3, 100, 257, 400)  # ~1% of input channels, as in LLM activations


def _activations(seed: int, n: int = 512, outlier_gain: float = 20.0) -> jax.Array:
    """[n, IN] standard normal tokens whose few OUTLIERS channels are ``outlier_gain``x
    larger: the activation pattern of LLM layers that AWQ is designed for."""
    x = np.random.default_rng(seed).standard_normal((n, IN))
    x[:, list(OUTLIERS)] *= outlier_gain
    return jnp.asarray(x, jnp.float32)


def _out_mse(kernel: jax.Array, w: awq.Int4Weight, x: jax.Array) -> float:
    ref = jnp.matmul(x, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return float(jnp.mean((ref - w.matmul(x)) ** 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rtn_round_trip_within_half_step(dtype) -> None:
    kernel = _kernel(dtype=dtype)
    w = awq.quantize_rtn(kernel, group_size=G)
    assert w.packed.dtype == jnp.uint32 and w.packed.shape == (IN // 8, OUT)
    assert w.scales.shape == w.zeros.shape == (IN // G, OUT)
    assert w.scales.dtype == w.zeros.dtype == w.input_scale.dtype == dtype
    assert bool(jnp.all(w.input_scale == 1))
    codes = quant.unpack(w.packed, 4, length=IN, axis=0)
    assert int(codes.max()) <= 15
    err = jnp.abs(w.dequantize(jnp.float32) - kernel.astype(jnp.float32))
    half_step = jnp.repeat(w.scales.astype(jnp.float32), G, axis=0) / 2
    assert bool(jnp.all(err <= half_step * (1 + 1e-6)))
    # Groups run along in_features: each output column has its own scale per 128 rows.
    assert float(jnp.std(w.scales.astype(jnp.float32))) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nbytes_is_four_bits_plus_group_overhead(dtype) -> None:
    w = awq.quantize_rtn(_kernel(dtype=dtype), group_size=G)
    p = jnp.dtype(dtype).itemsize
    # codes: 4 bits each; scale + zero per (group, out column); one s per input channel.
    expected = IN * OUT // 2 + 2 * (IN // G) * OUT * p + IN * p
    assert w.nbytes == expected
    if dtype == jnp.bfloat16:
        bits_per_weight = 8 * w.nbytes / (IN * OUT)
        assert bits_per_weight == 4 + 2 * 16 / G + 16 / OUT  # 4.3125 here; -> 4.25 as OUT grows
        assert w.nbytes < 0.28 * IN * OUT * 2  # vs the bf16 kernel


def test_awq_beats_rtn_on_outlier_channels_held_out() -> None:
    kernel = _kernel(seed=0)
    calib, held_out = _activations(seed=1), _activations(seed=2)
    rtn = awq.quantize_rtn(kernel, group_size=G)
    w = awq.quantize_awq(kernel, calib, group_size=G)

    # The search's reported error is the stored weight's error (same quantizer).
    s, best = awq.awq_search_scale(kernel, calib, group_size=G)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(w.input_scale))
    np.testing.assert_allclose(float(best), _out_mse(kernel, w, calib), rtol=1e-4)

    # AWQ <= RTN on the calibration set holds by construction (alpha = 0 is RTN), so the
    # claim is checked on held-out tokens of the same distribution, by a wide margin.
    rtn_err, awq_err = _out_mse(kernel, rtn, held_out), _out_mse(kernel, w, held_out)
    assert awq_err < 0.5 * rtn_err, (awq_err, rtn_err)
    # ...because the salient (outlier) input channels were scaled up before quantization.
    s = np.asarray(w.input_scale)
    assert s[list(OUTLIERS)].min() > np.delete(s, list(OUTLIERS)).max()


def test_awq_is_harmless_without_outliers() -> None:
    kernel = _kernel(seed=3)
    calib, held_out = _activations(4, outlier_gain=1.0), _activations(5, outlier_gain=1.0)
    rtn = awq.quantize_rtn(kernel, group_size=G)
    w = awq.quantize_awq(kernel, calib, group_size=G)
    assert _out_mse(kernel, w, held_out) <= 1.05 * _out_mse(kernel, rtn, held_out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jit_matmul_equals_dequantized_matmul(dtype) -> None:
    kernel = _kernel(dtype=dtype)
    w = awq.quantize_awq(kernel, _activations(1, n=128), group_size=G)
    x = _activations(6, n=6).reshape(2, 3, IN).astype(dtype)
    y = jax.jit(lambda w, x: w.matmul(x))(w, x)
    assert y.shape == (2, 3, OUT) and y.dtype == dtype
    ref = jnp.matmul(x.astype(jnp.float32), w.dequantize(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=tol * scale)


def test_stacked_kernels_via_apply_to_tree() -> None:
    n_layers, n = 3, 128
    stacked = _kernel(seed=7, shape=(n_layers, IN, OUT))
    acts = jnp.stack([_activations(10 + i, n=n) for i in range(n_layers)])
    params = {
        "embed": {"embedding": _kernel(seed=8, shape=(64, IN))},
        "layers": {"mlp": {"kernel": stacked, "bias": jnp.zeros((n_layers, OUT))}},
        "head": {"kernel": _kernel(seed=9)},
    }
    q = awq.apply_to_tree(
        params, lambda path, k, a: awq.quantize_awq(k, a, group_size=G, grid=5),
        include=r"kernel$", exclude=r"^head/", activations={"layers/mlp/kernel": acts},
    )
    assert q["embed"]["embedding"] is params["embed"]["embedding"]
    assert q["head"]["kernel"] is params["head"]["kernel"]
    assert q["layers"]["mlp"]["bias"] is params["layers"]["mlp"]["bias"]
    w = q["layers"]["mlp"]["kernel"]
    assert isinstance(w, awq.Int4Weight)
    assert w.packed.shape == (n_layers, IN // 8, OUT)
    assert w.scales.shape == (n_layers, IN // G, OUT)
    assert w.input_scale.shape == (n_layers, IN)
    assert w.dequantize().shape == (n_layers, IN, OUT)
    for i in range(n_layers):  # each layer equals quantizing that layer alone
        one = awq.quantize_awq(stacked[i], acts[i], group_size=G, grid=5)
        np.testing.assert_array_equal(np.asarray(w.packed[i]), np.asarray(one.packed))
        np.testing.assert_array_equal(np.asarray(w.input_scale[i]), np.asarray(one.input_scale))
        np.testing.assert_array_equal(np.asarray(w.scales[i]), np.asarray(one.scales))

    # One layer at a time inside a scan over the stacked weight.
    x = acts[0, :4]
    _, ys = jax.lax.scan(lambda c, wl: (c, wl.matmul(x)), None, w)
    np.testing.assert_allclose(np.asarray(ys[1]), np.asarray(x @ w.dequantize()[1]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slice the stacked"):
        w.matmul(x)

    # RTN needs no activations; a missing activation entry is an error naming the path.
    r = awq.apply_to_tree(params, lambda p, k: awq.quantize_rtn(k), include=r"mlp/kernel")
    assert r["layers"]["mlp"]["kernel"].packed.shape == (n_layers, IN // 8, OUT)
    with pytest.raises(ValueError, match="head/kernel"):
        awq.apply_to_tree(params, lambda p, k, a: awq.quantize_awq(k, a),
                          include=r"kernel$", activations={"layers/mlp/kernel": acts})


def test_orbax_round_trip(tmp_path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    w = awq.quantize_awq(_kernel(dtype=jnp.bfloat16), _activations(1, n=128), group_size=G)
    tree = {"layer0": {"kernel": w}}
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
        restored = ckptr.restore(path, abstract)
    r = restored["layer0"]["kernel"]
    assert isinstance(r, awq.Int4Weight)
    assert (r.in_features, r.group_size, r.bits) == (IN, G, 4)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(r), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_in_features_not_multiple_of_group_size_raises() -> None:
    kernel = _kernel(shape=(200, 16))
    with pytest.raises(ValueError, match=r"in_features=200 is not a multiple of group_size=128.*"
                                         r"choose a group size that divides"):
        awq.quantize_rtn(kernel, group_size=128)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        awq.quantize_awq(kernel, jnp.ones((8, 200)), group_size=128)
    with pytest.raises(ValueError, match="in_features=512"):
        awq.quantize_awq(_kernel(), jnp.ones((8, 100)), group_size=G)


# ---- AWQ on a model's own activations -------------------------------------------------------
OUTLIER_CHANNELS = [3, 100, 200]


@pytest.fixture(scope="module")
def outlier_model(demo_model):
    """The demo model (hidden 256, 2 layers) with a few RMSNorm channels 20x larger, so the
    q/k/v and gate/up inputs carry outlier channels as in real LLMs; calibration and
    held-out token ids."""
    from mixkvq_jax.models import init_params

    config, _, _ = demo_model
    params = init_params(config, seed=1, init_std=0.05)
    for norm in ("attn_norm", "mlp_norm"):
        scale = params["layers"][norm]["scale"]
        params["layers"][norm]["scale"] = scale.at[:, OUTLIER_CHANNELS].multiply(20.0)
    rng = np.random.default_rng(0)
    calib = rng.integers(2, config.vocab_size, (2, 64))
    held_out = rng.integers(2, config.vocab_size, (2, 64))
    return config, params, calib, held_out


def test_collect_activations_are_each_layers_inputs(outlier_model) -> None:
    from mixkvq_jax.models import rms_norm

    config, params, calib, _ = outlier_model
    acts = awq.collect_activations(params, config, calib)
    names = {f"layers/{m}/kernel" for m in ("attn/q_proj", "attn/k_proj", "attn/v_proj",
                                            "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                                            "mlp/down_proj")}
    assert set(acts) == names
    n = calib.size
    assert acts["layers/attn/q_proj/kernel"].shape == (config.num_layers, n, config.hidden_size)
    assert acts["layers/mlp/down_proj/kernel"].shape == (config.num_layers, n,
                                                         config.intermediate_size)
    # Layer 0's attention input is the normed embedding; q, k and v read the same input.
    emb = params["embed"]["embedding"][jnp.asarray(calib).reshape(-1)]
    want = rms_norm(emb, params["layers"]["attn_norm"]["scale"][0], config.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(acts["layers/attn/q_proj/kernel"][0]),
                               np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(acts["layers/attn/k_proj/kernel"]),
                                  np.asarray(acts["layers/attn/v_proj/kernel"]))
    # Right padding is dropped with lengths.
    short = awq.collect_activations(params, config, calib, lengths=[64, 10])
    assert short["layers/mlp/up_proj/kernel"].shape[1] == 74


@pytest.fixture(scope="module")
def quantized_models(outlier_model):
    config, params, calib, _ = outlier_model
    q_awq = awq.calibrate_awq(params, config, calib, group_size=G, grid=10)
    q_rtn = awq.calibrate_rtn(params, group_size=G)
    return q_awq, q_rtn


def test_calibrate_awq_beats_rtn_on_the_model(outlier_model, quantized_models) -> None:
    from mixkvq_jax.models import forward_full

    config, params, calib, held_out = outlier_model
    q_awq, q_rtn = quantized_models
    # Embeddings (the tied head) and norms are not quantized; every decoder linear is.
    assert q_awq["embed"]["embedding"] is params["embed"]["embedding"]
    kernels = {k: v for k, v in q_awq["layers"]["attn"].items()} | dict(q_awq["layers"]["mlp"])
    assert all(isinstance(m["kernel"], awq.Int4Weight) for m in kernels.values())

    # Per layer, on the calibration activations: AWQ <= RTN (alpha = 0 is RTN), and
    # strictly lower where the inputs have outlier channels.
    acts = awq.collect_activations(params, config, calib)
    for name, x in acts.items():
        module, proj = name.split("/")[1:3]
        w_awq = q_awq["layers"][module][proj]["kernel"]
        w_rtn = q_rtn["layers"][module][proj]["kernel"]
        k = params["layers"][module][proj]["kernel"]
        for layer in range(config.num_layers):
            one = lambda w, i=layer: jax.tree.map(lambda a: a[i], w)  # noqa: E731
            e_awq = _out_mse(k[layer], one(w_awq), x[layer])
            e_rtn = _out_mse(k[layer], one(w_rtn), x[layer])
            assert e_awq <= e_rtn * (1 + 1e-5), (name, layer, e_awq, e_rtn)
            if proj == "q_proj":
                assert e_awq < 0.7 * e_rtn, (name, layer, e_awq, e_rtn)

    # The whole model (jitted forward, int4 dequantized on the fly) on held-out tokens.
    run = jax.jit(forward_full, static_argnames="config")
    ref = run(params, jnp.asarray(held_out), config=config)
    err = {k: float(jnp.mean((run(q, jnp.asarray(held_out), config=config) - ref) ** 2))
           for k, q in (("awq", q_awq), ("rtn", q_rtn))}
    assert err["awq"] < 0.8 * err["rtn"], err


def test_model_int4_bytes_are_four_bits_plus_group_overhead(quantized_models) -> None:
    from mixkvq_jax.memory import tree_bytes

    q_awq, _ = quantized_models
    for module in ("attn", "mlp"):
        for proj, leaf in q_awq["layers"][module].items():
            w = leaf["kernel"]
            n_layers, words, out = w.packed.shape
            n = n_layers * w.in_features * out
            # f32 scales / zeros / input scale here (the model's dtype): 32 bits each.
            assert 8 * tree_bytes(w) / n == 4 + 2 * 32 / G + 32 / out, proj


def test_int4_params_save_and_restore(outlier_model, quantized_models, tmp_path) -> None:
    from mixkvq_jax.checkpoint import load_checkpoint, restore_params, save_params
    from mixkvq_jax.models import cast_params, forward_full

    config, _, _, held_out = outlier_model
    q = cast_params(quantized_models[0], jnp.bfloat16)
    save_params(tmp_path / "awq", q, config)
    _, restored = restore_params(tmp_path / "awq")  # no target: rebuilt from the layout
    w, r = q["layers"]["mlp"]["down_proj"]["kernel"], restored["layers"]["mlp"]["down_proj"][
        "kernel"]
    assert isinstance(r, awq.Int4Weight)
    assert (r.in_features, r.group_size, r.bits) == (w.in_features, w.group_size, w.bits)
    assert jax.tree.structure(restored) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(held_out)
    np.testing.assert_array_equal(np.asarray(forward_full(q, tokens, config=config)),
                                  np.asarray(forward_full(restored, tokens, config=config)))
    _, loaded, _ = load_checkpoint(tmp_path / "awq", "bfloat16")
    assert isinstance(loaded["layers"]["attn"]["q_proj"]["kernel"], awq.Int4Weight)


def test_check_group_size_names_the_kernel(outlier_model) -> None:
    _, params, _, _ = outlier_model
    assert "layers/mlp/down_proj/kernel" in awq.check_group_size(params, 128)
    with pytest.raises(ValueError, match=r"group_size=96 does not divide in_features=256 of "
                                         r"layers/attn/\w+/kernel.*\(e\.g\. 256\)"):
        awq.check_group_size(params, 96)
    with pytest.raises(ValueError, match="no kernel matches"):
        awq.check_group_size(params, 128, include="nothing")
