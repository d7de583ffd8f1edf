"""Running sharded (`mixkvq_jax.mesh`, ``--mesh``): flag parsing and one-line errors in
process; the generate CLI on an 8-device CPU mesh against one device in ONE subprocess
(``--xla_force_host_platform_device_count=8`` must be set before JAX starts); the decode
step compiled deviceless for a 4-chip TPU (``v5e:2x2``) with no cache-sized all-gather.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mixkvq_jax import mesh as mesh_lib
from mixkvq_jax.errors import UserError
from mixkvq_jax.models import ModelConfig, param_shapes
from mixkvq_jax.models.sharding import cache_kv_heads, param_partition_specs

TINY = ModelConfig(family="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                   num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=512)


def test_parse_mesh():
    assert mesh_lib.parse_mesh("auto") is None
    assert mesh_lib.parse_mesh("data=2,model=4") == mesh_lib.MeshShape(2, 4)
    assert mesh_lib.parse_mesh("model=8").sizes(8) == (1, 8)
    assert mesh_lib.parse_mesh("data=2").sizes(8) == (2, 4)
    for bad, match in (("tensor=8", "axes data and model"), ("model=x", "not an integer"),
                       ("model=0", ">= 1"), ("data=1,data=2", "at most once"), ("", "auto")):
        with pytest.raises(UserError, match=match) as err:
            mesh_lib.parse_mesh(bad)
        assert "\n" not in str(err.value)


def test_gqa_rule_repeats_kv_heads_and_replicates_kv_projections():
    assert cache_kv_heads(TINY, 1) == cache_kv_heads(TINY, 2) == 2
    assert cache_kv_heads(TINY, 4) == 4 and cache_kv_heads(TINY, 8) == 8
    mesh = jax.make_mesh((1, 1), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = param_partition_specs(param_shapes(TINY), TINY, mesh=mesh)  # model=1: kv sharded
    assert specs["layers"]["attn"]["k_proj"]["kernel"] == P(None, None, "model")


def test_per_device_bytes():
    tree = {"a": jax.ShapeDtypeStruct((8, 6), jnp.float32),
            "b": jax.ShapeDtypeStruct((5,), jnp.int8)}
    specs = {"a": P("data", "model"), "b": P("model")}
    # a: [8/2, 6/4 -> 2] f32 = 32 bytes; b: ceil(5/4) = 2 int8
    assert mesh_lib.per_device_bytes(tree, specs, {"data": 2, "model": 4}) == 32 + 2
    assert mesh_lib.tree_bytes(tree) == 8 * 6 * 4 + 5


def test_one_line_errors_in_process():
    one = jax.devices()[:1]
    with pytest.raises(UserError, match="needs 8 devices, there are 1") as err:
        mesh_lib.choose_mesh(mesh_lib.MeshShape(2, 4), TINY, batch=2, devices=one)
    assert "\n" not in str(err.value) and "--mesh" in str(err.value)
    with pytest.raises(UserError, match=r"needs 12\.00 GiB per device .* has 8\.00 GiB"):
        mesh_lib.check_fit(12 * 2**30, 8 * 2**30, "llama weights + bf16 cache", None)
    mesh_lib.check_fit(2**30, None, "x", None)  # unknown device memory (CPU): no check
    assert mesh_lib.choose_mesh(None, TINY, batch=1, devices=one) is None


_PROMPTS = ("the cat runs over the green tree and the dog sleeps " * 5,
            "a king and a queen tell a story " * 16)

_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys, time
    import jax
    from mixkvq_jax import generate
    from mixkvq_jax.errors import UserError

    assert jax.device_count() == 8, jax.devices()
    CKPT, PROMPTS = sys.argv[1], sys.argv[2]

    def cli(*args):
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            generate._run_cli(["--ckpt", CKPT, "--prompts-file", PROMPTS, "--json", "--quiet",
                               "--max-new-tokens", "12", *args])
        d = json.loads(out.getvalue())
        return {"tokens": [c["token_ids"] for c in d["completions"]], "mesh": d["mesh"],
                "blocks": d["stats"]["block_tokens"], "cached": d["stats"]["cached_tokens"],
                "stderr_mesh": [x for x in err.getvalue().splitlines() if x.startswith("mesh:")],
                "seconds": round(time.perf_counter() - t0, 1)}

    runs = {}
    for preset in ("bf16", "kivi2", "mixkvq"):
        runs[preset + "/one"] = cli("--kv", preset)  # auto: one device on CPU
        # 2 KV heads on a model axis of 4 (GQA, KV heads repeated), batch over data=2
        runs[preset + "/data2_model4"] = cli("--kv", preset, "--mesh", "data=2,model=4")
    # the Pallas kernel per shard (shard_map, interpreted on CPU)
    runs["mixkvq/data2_model4_pallas"] = cli("--kv", "mixkvq", "--mesh", "data=2,model=4",
                                             "--attention-impl", "pallas_interpret")
    errors = {}
    for name, mesh in {"size": "data=3,model=3", "heads": "data=1,model=8",
                       "syntax": "tensor=8"}.items():
        try:
            cli("--kv", "bf16", "--mesh", mesh)
            errors[name] = None
        except UserError as err:
            errors[name] = str(err)
    print(json.dumps({"runs": runs, "errors": errors}))
""")


@pytest.fixture(scope="module")
def eight_devices(demo_checkpoint, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("mesh") / "prompts.txt"
    prompts.write_text("\n".join(_PROMPTS) + "\n")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(demo_checkpoint), str(prompts)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: v["seconds"] for k, v in result["runs"].items()})
    return result


@pytest.mark.parametrize("preset", ["bf16", "kivi2", "mixkvq"])
def test_cli_mesh_greedy_tokens_equal_one_device(eight_devices, preset):
    runs = eight_devices["runs"]
    one, sharded = runs[f"{preset}/one"], runs[f"{preset}/data2_model4"]
    assert one["mesh"] == "one cpu device" and one["stderr_mesh"] == ["mesh: one cpu device"]
    assert sharded["mesh"] == "data=2 x model=4 over 8 cpu devices"
    assert sharded["stderr_mesh"] == ["mesh: data=2 x model=4 over 8 cpu devices"]
    assert len(one["tokens"]) == 2 and all(len(t) == 12 for t in one["tokens"])
    # Quantized blocks were written (in prefill for both, during decode for the first).
    assert all(b > 0 for b in one["blocks"]), one
    assert one["cached"][0] // 128 > (one["cached"][0] - 11) // 128, one["cached"]
    assert sharded["tokens"] == one["tokens"]
    assert sharded["cached"] == one["cached"]


def test_pallas_kernel_per_shard_matches_one_device(eight_devices):
    runs = eight_devices["runs"]
    assert runs["mixkvq/data2_model4_pallas"]["tokens"] == runs["mixkvq/one"]["tokens"]


def test_cli_mesh_errors_are_one_line(eight_devices):
    errors = eight_devices["errors"]
    assert all(e is not None and "\n" not in e for e in errors.values()), errors
    assert "needs 9 devices, there are 8" in errors["size"]
    assert "does not divide num_heads=4" in errors["heads"]
    assert "data=2,model=4" in errors["heads"]  # the fix is named
    assert "data=D,model=M" in errors["syntax"]


@pytest.fixture(scope="module")
def v5e_2x2_decode():
    pytest.importorskip("libtpu")
    from mixkvq_jax import tpu_aot
    from mixkvq_jax.models.sharding import make_mesh
    from mixkvq_jax.tpu_targets import MODELS, tpu_devices

    devices = tpu_devices("v5e:2x2")
    mesh = make_mesh(1, 4, devices=devices)
    # smollm2 shapes (3 KV heads) do not split 4 ways; a small GQA model that does: 4 KV
    # heads over 4 chips, 16 query heads, 2 layers.
    config = dataclasses.replace(MODELS["smollm2"], num_heads=16, num_kv_heads=4,
                                 num_layers=2)
    return {preset: tpu_aot.measure("decode", config, preset, devices[0], batch=8,
                                    context=4096, layers=2, mesh=mesh, topology="v5e:2x2")
            for preset in ("bf16", "mixkvq")}


def test_v5e_2x2_sharded_decode_has_no_cache_sized_all_gather(v5e_2x2_decode):
    for preset, row in v5e_2x2_decode.items():
        assert not row.error, (preset, row.error)
        assert row.mesh == "data=1 x model=4"
        assert row.fits and 0 < row.hbm_needed_bytes < row.hbm_bytes
        assert row.cache_bytes > 0
        assert row.gathers == [], (preset, row.gathers)


def test_fit_check_byte_model_matches_a_compile_at_the_max_batch():
    """`tpu_fit`: the max batch its byte model predicts, compiled for real, fits, and XLA
    needs within 5% of what the model said (a small GQA model at 128k tokens, where the
    bf16 cache, not the weights, fills v5e:2x2's chips)."""
    pytest.importorskip("libtpu")
    from mixkvq_jax.tpu_fit import fit_rows
    from mixkvq_jax.tpu_targets import MODELS

    config = dataclasses.replace(MODELS["smollm2"], num_heads=16, num_kv_heads=4)
    (row,) = fit_rows(config, "v5e:2x2", "bf16", [131072], validate=True)
    assert not row.error, row.error
    assert row.mesh == "data=1 x model=4" and row.gathers == 0
    assert 2 <= row.model_max_batch < 64, row
    # the byte model: one more sequence would not fit
    per_seq = row.cache_bytes_per_seq + row.activation_bytes_per_seq
    assert row.needed_bytes <= row.hbm_bytes < row.needed_bytes + per_seq + 1, row
    # the compile at that batch fits, and XLA needs what the byte model said (within 5%)
    assert row.validated and row.max_batch == row.model_max_batch, row
    assert row.validated_needed_bytes <= row.hbm_bytes, row
    assert abs(row.validated_needed_bytes - row.needed_bytes) < 0.05 * row.needed_bytes, row
