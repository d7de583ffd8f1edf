"""The KV Pareto sweep (mixkvq_jax.pareto): input checks, the Pareto rule, and the tiny sweep
end to end (configs/sweeps/tiny.yaml on the demo checkpoint), interrupted and resumed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from mixkvq_jax import pareto
from mixkvq_jax.demo_checkpoint import TRAINING_TEXT
from mixkvq_jax.errors import UserError

TINY = yaml.safe_load((pareto.SWEEP_DIR / "tiny.yaml").read_text())


def _write(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _main_error(capsys, argv: list[str]) -> str:
    assert pareto.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "demo.txt"
    path.write_text(TRAINING_TEXT * 12)
    return path


# ---- bad input: one line, exit 2, before any long work -----------------------------------
@pytest.mark.parametrize("change, expected", [
    ({"chunk_size": [64]}, r"unknown key 'chunk_size'; allowed: .*chunk_sizes"),
    ({"awq": {"group": 64}}, r"unknown awq key 'group'; allowed: calib_offset, calib_tokens, "
                             r"exclude, grid, group_size, include"),
    ({"granularity": ["per_row"]}, r"unknown granularity 'per_row' in 'per_row'; choose from "
                                   r"per_block, per_token, per_channel, per_tensor"),
    ({"granularity": ["per_channel/per_row"]}, r"unknown granularity 'per_row'"),
    ({"kv": ["bf16", "k3v3"]}, r"unknown KV preset 'k3v3'; choose from .*k2v2"),
    ({"weights": ["bf16", "awq-w3"]}, r"unknown weights 'awq-w3'; choose from bf16, awq-w4"),
    ({"tasks": ["ppl", "mmlu"]}, r"unknown task 'mmlu'; choose from ppl, kl, top1, passkey"),
    ({"primary_metric": "passkey"}, r"primary_metric 'passkey' is not one of the tasks"),
    ({"k_smoothing": ["yes"]}, r"k_smoothing: 'yes' is not true/false"),
    ({"chunk_sizes": [0]}, r"chunk_sizes must be a positive integer"),
])
def test_sweep_yaml_mistakes_are_named(tmp_path, capsys, change, expected) -> None:
    import re

    path = _write(tmp_path, {**TINY, **change})
    err = _main_error(capsys, ["--config", str(path), "--ckpt", "/nonexistent"])
    assert re.search(expected, err), err
    assert str(path) in err  # which file


def test_unknown_sweep_name_and_missing_key(tmp_path, capsys) -> None:
    err = _main_error(capsys, ["--config", "tinny"])
    assert "unknown sweep 'tinny'" in err and "tiny" in err and "smollm2" in err
    spec = {k: v for k, v in TINY.items() if k != "kv"}
    err = _main_error(capsys, ["--config", str(_write(tmp_path, spec))])
    assert "missing key 'kv'" in err


def test_no_text_names_the_flag(tmp_path, capsys, monkeypatch, demo_checkpoint) -> None:
    from mixkvq_jax.eval import text as text_mod

    monkeypatch.setattr(text_mod, "default_text_path", lambda: None)
    err = _main_error(capsys, ["--config", "tiny", "--ckpt", str(demo_checkpoint)])
    assert "--text" in err and "needs text" in err
    err = _main_error(capsys, ["--config", "tiny", "--ckpt", str(demo_checkpoint),
                               "--text", str(tmp_path / "missing.txt")])
    assert "missing.txt does not exist" in err


def test_awq_group_size_checked_against_the_model(tmp_path, capsys, demo_checkpoint,
                                                  text_file) -> None:
    path = _write(tmp_path, {**TINY, "awq": {**TINY["awq"], "group_size": 96}})
    err = _main_error(capsys, ["--config", str(path), "--ckpt", str(demo_checkpoint),
                               "--text", str(text_file)])
    assert "group_size=96 does not divide in_features=256" in err and "e.g. 256" in err


def test_grid_builds_every_config_up_front() -> None:
    sweep = pareto.parse_sweep({**TINY, "kv": ["bf16", "k4v2", "mixkvq"],
                                "granularity": ["per_block", "per_channel/per_token"],
                                "k_smoothing": [False, True], "chunk_sizes": [64, 256]},
                               source="t")
    with pytest.raises(UserError, match=r"sweep point bf16\|mixkvq\|per_block\|ksmooth: "):
        pareto.build_grid(sweep, 64)  # multi-tier keys take no granularity / smoothing
    sweep = pareto.parse_sweep({**TINY, "kv": ["bf16", "k4v2"],
                                "granularity": ["per_block", "per_channel/per_token"],
                                "k_smoothing": [False, True], "chunk_sizes": [64, 256]},
                               source="t")
    points = pareto.build_grid(sweep, 64)
    # bf16 KV: one point per (weights, chunk); k4v2: 2 granularities x 2 smoothing.
    assert len(points) == 2 * 2 * (1 + 2 * 2)
    assert len({p.id for p in points}) == len(points)
    by_id = {p.id: p.kv_config for p in points}
    cfg = by_id["awq-w4|k4v2|per_channel/per_token|ksmooth|c256"]
    assert (cfg.key_granularity, cfg.value_granularity, cfg.key_smoothing) == (
        "per_channel", "per_token", True)
    assert cfg.name == "k4v2[per_channel/per_token,ksmooth]"
    plain = by_id["bf16|k4v2|per_block|-|c64"]
    assert (plain.key_granularity, plain.key_smoothing, plain.name) == ("per_block", False, "k4v2")
    assert by_id["bf16|bf16|-|-|c64"].is_full_precision


def test_pareto_mask() -> None:
    cost = [10, 5, 5, 8, 12, 3]
    kl = [0.1, 0.3, 0.2, 0.2, 0.05, float("nan")]
    # (5, 0.3) is dominated by (5, 0.2); (8, 0.2) by (5, 0.2); NaN never optimal.
    assert pareto.pareto_mask(cost, kl, higher_is_better=False) == [
        True, False, True, False, True, False]
    acc = [0.9, 0.5, 0.7, 0.7, 1.0, 0.1]
    assert pareto.pareto_mask(cost, acc, higher_is_better=True) == [
        True, False, True, False, True, True]


def test_shipped_sweeps_parse() -> None:
    assert {"tiny", "smollm2"} <= set(pareto.available_sweeps())
    for name in pareto.available_sweeps():
        sweep = pareto.load_sweep(name)
        assert sweep.primary_metric in sweep.tasks
    big = pareto.load_sweep("smollm2")
    assert len(pareto.build_grid(big, 64)) == 2 * (1 + 6 * 4 * 2) * 2


# ---- end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, demo_checkpoint, text_file) -> dict:
    """configs/sweeps/tiny.yaml on the demo checkpoint: first interrupted after two
    points (--limit 2), then resumed."""
    out = tmp_path_factory.mktemp("pareto")
    argv = ["--config", "tiny", "--ckpt", str(demo_checkpoint), "--text", str(text_file),
            "--out", str(out), "--no-progress"]
    assert pareto.main([*argv, "--limit", "2"]) == 0
    with (out / "pareto.csv").open() as f:
        first = list(csv.DictReader(f))
    png_after_first = (out / "pareto.png").exists()
    assert pareto.main(argv) == 0
    return {"out": out, "argv": argv, "first": first, "png_after_first": png_after_first,
            "rows": pareto.read_rows(out / "pareto.csv")}


def test_sweep_csv_resume_and_plot(tiny_sweep, capsys) -> None:
    first, rows = tiny_sweep["first"], tiny_sweep["rows"]
    assert len(first) == 2 and not tiny_sweep["png_after_first"]
    assert [r["point"] for r in rows] == [
        "bf16|bf16|-|-|c64", "bf16|k2v2|per_token|ksmooth|c64",
        "awq-w4|bf16|-|-|c64", "awq-w4|k2v2|per_token|ksmooth|c64"]
    # Resumed, not recomputed: the first two rows are unchanged (their run time too).
    for old, new in zip(first, rows[:2], strict=True):
        assert float(old["seconds"]) == new["seconds"] and float(old["kl"]) == new["kl"]
    for column in ("weights_bytes", "kv_bytes", "activation_bytes", "total_bytes", "ppl", "kl",
                   "top1", "pareto", "key_granularity", "value_granularity", "k_smoothing"):
        assert column in rows[0], column
    assert sum(r["pareto"] for r in rows) >= 1
    png = tiny_sweep["out"] / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # A third run finds every point done and evaluates nothing.
    assert pareto.main(tiny_sweep["argv"]) == 0
    assert "0 point(s) evaluated, 4 already in the CSV" in capsys.readouterr().out


def test_sweep_rows_are_sound(tiny_sweep) -> None:
    by = {r["point"]: r for r in tiny_sweep["rows"]}
    base = by["bf16|bf16|-|-|c64"]
    for r in by.values():
        assert r["total_bytes"] == r["weights_bytes"] + r["kv_bytes"] + r["activation_bytes"]
        assert r["kv_bytes"] == r["kv_formula_bytes"]
        assert r["context"] == 256 and r["chunk"] == 64
    # The memory model against XLA's own accounting of the compiled prefill chunk, whose
    # arguments are the real params and cache: within 1% (bf16 weights + bf16 KV).
    assert abs(base["total_bytes"] - base["measured_peak_bytes"]) <= 0.01 * base[
        "measured_peak_bytes"]
    assert base["total_vs_bf16"] == 1.0
    # AWQ int4 weights: about a third of the bf16 bytes (embeddings stay bf16).
    awq = by["awq-w4|bf16|-|-|c64"]
    assert awq["weights_bytes"] < 0.4 * base["weights_bytes"]
    # k2v2 per-token + K-smoothing stores less than bf16 KV.
    k2 = by["bf16|k2v2|per_token|ksmooth|c64"]
    assert k2["kv_bytes"] < 0.5 * base["kv_bytes"]
    assert (k2["key_granularity"], k2["value_granularity"], k2["k_smoothing"]) == (
        "per_token", "per_token", True)
    # Against the float32 model: bf16 everything is nearly exact; int4 weights are not.
    assert base["kl"] < 0.01 < awq["kl"]
    assert 0.9 < base["top1"] <= 1.0
    # The cheapest point is always on the frontier, and so is the most accurate one.
    assert min(by.values(), key=lambda r: r["total_bytes"])["pareto"]
    assert min(by.values(), key=lambda r: r["kl"])["pareto"]


def test_resume_refuses_a_different_setup(tiny_sweep, tmp_path, capsys, demo_checkpoint,
                                          text_file) -> None:
    out = tmp_path / "copy"
    out.mkdir()
    (out / "pareto.csv").write_bytes((tiny_sweep["out"] / "pareto.csv").read_bytes())
    spec = {**TINY, "eval_tokens": 128}
    err = _main_error(capsys, ["--config", str(_write(tmp_path, spec)), "--ckpt",
                               str(demo_checkpoint), "--text", str(text_file), "--out", str(out),
                               "--no-progress", "--limit", "0"])
    assert "different sweep setup" in err and "--fresh" in err


def test_cli_module_dry_run(demo_checkpoint, text_file) -> None:
    """``python -m mixkvq_jax.pareto`` checks everything and lists the points (no eval)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mixkvq_jax.pareto", "--config", "tiny", "--ckpt",
           str(demo_checkpoint), "--text", str(text_file), "--dry-run"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "4 points" in out.stdout and "k2v2[per_token,ksmooth]" in out.stdout
    bad = subprocess.run([*cmd[:3], "--config", "tiny", "--limit", "-1"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --limit must be >= 0, got -1"


def test_passkey_task(tmp_path, capsys, demo_checkpoint) -> None:
    """Passkey accuracy as the primary metric (no text needed: bf16 weights, no ppl/kl);
    a prompt length too short for the key is refused before anything runs."""
    spec = {**TINY, "weights": ["bf16"], "kv": ["k2v2"], "granularity": ["per_block"],
            "k_smoothing": [False], "tasks": ["passkey"], "primary_metric": "passkey",
            "passkey": {"lengths": [100], "depths": [0.5]}}
    argv = ["--ckpt", str(demo_checkpoint), "--out", str(tmp_path / "out"), "--no-progress"]
    err = _main_error(capsys, ["--config", str(_write(tmp_path, spec, "short.yaml")), *argv])
    assert "passkey: passkey length 100 is too short" in err and "use at least" in err
    spec["passkey"] = {"lengths": [200], "depths": [0.5]}
    assert pareto.main(["--config", str(_write(tmp_path, spec)), *argv]) == 0
    (row,) = pareto.read_rows(tmp_path / "out" / "pareto.csv")
    assert row["passkey"] in (0.0, 1.0) and row["pareto"]  # one prompt; the only point
    assert "kl" not in row and row["kv_bytes"] > 0
