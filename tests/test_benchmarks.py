"""benchmarks/decode.py runs end to end at tiny sizes (worker processes, CSV, table, plot),
so it cannot rot. No timing is asserted: only that every figure is produced and that
the byte accounting, which does not depend on the machine, is right."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_smoke(demo_checkpoint, tmp_path, capsys):
    bench = _load_benchmark()
    rc = bench.main(["--ckpt", str(demo_checkpoint), "--contexts", "200",
                     "--presets", "fp32,kivi2,mixkvq", "--batch", "1,2", "--steps", "2",
                     "--warmup", "1", "--chunk", "64", "--budget-gb", "1", "--out",
                     str(tmp_path), "--tag", "smoke"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "decode_smoke.csv")))
    assert len(rows) == 3 * 1 * 2
    by = {(r["preset"], int(r["context"]), int(r["batch"])): r for r in rows}
    for row in rows:
        assert float(row["tokens_per_s"]) > 0 and float(row["compile_s"]) > 0
        assert row["fastest_fp"] == "fp32"  # the only full-precision preset of this run
        assert float(row["ratio_vs_fastest_fp"]) > 0
    for key, row in by.items():  # prefill is timed at the smallest batch only
        assert (row["prefill_s"] != "nan") == (key[2] == 1), row
    # Bytes: the pytree's growth per token is what the config's formula says.
    from mixkvq_jax.checkpoint import load_hf_config
    from mixkvq_jax.config import load_kv_config

    model = load_hf_config(demo_checkpoint)
    for preset in ("fp32", "kivi2", "mixkvq"):
        kv = load_kv_config(preset, model.head_dim)
        per_token = float(by[(preset, 200, 2)]["kv_bytes_per_token"])
        expected = kv.bytes_per_token * model.num_layers * model.num_kv_heads
        assert per_token == pytest.approx(expected), preset
    for preset in ("kivi2", "mixkvq"):
        assert float(by[(preset, 200, 1)]["kv_per_token_vs_bf16"]) <= 0.22
        assert float(by[(preset, 200, 1)]["budget_ratio_vs_bf16"]) >= 4.0
    assert float(by[("fp32", 200, 1)]["kv_per_token_vs_bf16"]) == pytest.approx(2.0)
    out = capsys.readouterr().out
    assert "| preset | context | batch |" in out and "compile s, 30 layers" in out
    assert (tmp_path / "decode_smoke.md").read_text().count("\n| kivi2 |") == 2 + 1  # + compile
    assert (tmp_path / "decode_smoke.png").stat().st_size > 10_000


def test_decode_benchmark_rejects_unknown_preset(capsys):
    bench = _load_benchmark()
    assert bench.main(["--presets", "kivi3", "--contexts", "64"]) == 2
    assert "kivi3" in capsys.readouterr().err
