"""mixkvq_jax.eval: chunked fidelity metrics, passkey prompts, calibration, bad input.

Everything runs on the tiny random demo Llama (head_dim 64, real BPE tokenizer) with
300 scored positions in chunks of 64, so the 128-token blocks of the presets are
quantized mid-sequence; all tests share those shapes (compiled once per preset).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixkvq_jax.config import load_kv_config
from mixkvq_jax.errors import UserError
from mixkvq_jax.eval import calibrate as cal
from mixkvq_jax.eval import passkey as pk
from mixkvq_jax.eval import text as text_mod
from mixkvq_jax.eval.cli import main
from mixkvq_jax.eval.metrics import (
    check_metrics,
    compute_reference,
    parse_preset_spec,
    position_bins,
    reference_config,
    score_preset,
    summarize,
)

N_POSITIONS = 300
CHUNK = 64
WORDS = ("cache key value token block channel query model quantize group the a of and to "
         "in bits range salience window long context memory number").split()


def _text(n_words: int = 900, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_words // 9):
        words = [rng.choice(WORDS) for _ in range(9)]
        sentences.append(" ".join(words).capitalize() + ".")
    return "\n".join(" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt.gz"
    path.write_bytes(gzip.compress(_text().encode("utf-8")))
    return path


@pytest.fixture(scope="module")
def window(demo_model, text_file) -> np.ndarray:
    _, _, tok = demo_model
    ids = text_mod.tokenize(tok, text_mod.read_text(text_file))
    return text_mod.token_window(ids, N_POSITIONS, offset=5)


@pytest.fixture(scope="module")
def reference(demo_model, window):
    cfg, params, _ = demo_model
    return compute_reference(params, cfg, window, chunk=CHUNK, progress=False)


# ---- metrics ---------------------------------------------------------------------------------
def test_chunked_reference_equals_full_forward(demo_model, window, reference):
    from mixkvq_jax.models import forward_full  # (local: ruff sorts this package oddly)

    cfg, params, _ = demo_model
    logits = forward_full(params, jnp.asarray(window[None, :-1]), config=cfg)[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(window[1:, None]), -1)[:, 0])
    assert reference.nll.shape == (N_POSITIONS,)
    ppl_full, ppl_chunked = math.exp(nll.mean()), math.exp(reference.nll.mean())
    assert abs(ppl_chunked - ppl_full) / ppl_full < 1e-4
    np.testing.assert_allclose(reference.nll, nll, atol=1e-3)
    np.testing.assert_array_equal(reference.top1, np.asarray(jnp.argmax(logp, -1)))


def test_kl_of_reference_with_itself_is_zero(demo_model, reference):
    cfg, params, _ = demo_model
    same = score_preset(params, cfg, reference_config(cfg.head_dim), reference, progress=False)
    assert np.all(same.kl == 0.0)
    assert same.agree.all()
    np.testing.assert_array_equal(same.nll, reference.nll)


def test_quantized_preset_diverges_and_bins_cover_positions(demo_model, reference):
    cfg, params, _ = demo_model
    scores = score_preset(params, cfg, load_kv_config("kivi2", cfg.head_dim), reference,
                          progress=False)
    # Positions < 128 read no quantized block (the chunk itself is full precision):
    # bf16-stored window only; later ones read the INT2 block.
    assert scores.kl[128:].mean() > 10 * scores.kl[:128].mean() > 0
    row = summarize(scores, edges=(0, 128, 256))
    assert [b[2] for b in position_bins(N_POSITIONS, (0, 128, 256))] == [
        "0-128", "128-256", "256-300"]
    assert row["kl"] == pytest.approx(float(np.mean(scores.kl)))
    weighted = (128 * row["kl@0-128"] + 128 * row["kl@128-256"] + 44 * row["kl@256-300"]) / 300
    assert weighted == pytest.approx(row["kl"])
    assert row["avg_key_bits"] == 2.0 and row["positions"] == N_POSITIONS
    assert 0 <= row["top1"] <= 1 and row["ppl"] > 1


def test_preset_specs_and_default_bins():
    cfg = parse_preset_spec("mixkvq:salience=range_only", 64)
    assert cfg.salience == "range_only" and cfg.name == "mixkvq[range_only]"
    assert parse_preset_spec("kivi2", 64).name == "kivi2"
    sinks = parse_preset_spec("kivi2:sink_tokens=1", 64)
    assert sinks.sink_tokens == 1 and sinks.name == "kivi2[sink_tokens=1]"
    assert [b[2] for b in position_bins(4096)] == ["0-512", "512-1k", "1k-2k", "2k-4k"]
    with pytest.raises(UserError, match="unknown KV preset"):
        parse_preset_spec("nope", 64)
    with pytest.raises(UserError, match="field=value"):
        parse_preset_spec("mixkvq:range_only", 64)


# ---- passkey ---------------------------------------------------------------------------------
def _char_tokenizer(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize("tokenizer_kind", ["chars", "bpe"])
def test_passkey_key_is_placed_at_requested_depth(tokenizer_kind, demo_model):
    tok = _char_tokenizer if tokenizer_kind == "chars" else demo_model[2]
    encode = (_char_tokenizer if tokenizer_kind == "chars"
              else (lambda s: tok.encode(s, add_special_tokens=False)))
    unit = len(encode(pk.FILLER))
    for length in (400, 1500):
        starts = []
        for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            s = pk.make_passkey_prompt(tok, length=length, depth=depth, passkey="48213")
            assert len(s.tokens) == length
            key = encode(pk.KEY_TEMPLATE.format(key="48213"))
            assert list(s.tokens[s.key_start:s.key_end]) == key
            intro = len(encode(pk.INTRO))
            n_filler = length - intro - len(key) - len(encode(pk.QUESTION))
            assert abs(s.actual_depth - depth) <= unit / n_filler + 1e-9
            assert s.actual_depth == (s.key_start - intro) / n_filler
            # the key sits at `depth` of the filler: tokens before it / all filler tokens
            assert abs((s.key_start - intro) - depth * n_filler) <= unit
            assert list(s.tokens[-len(encode(pk.QUESTION)):]) == encode(pk.QUESTION)
            starts.append(s.key_start)
        assert starts == sorted(starts) and starts[0] == len(encode(pk.INTRO))
        assert starts[-1] + len(key) <= length - len(encode(pk.QUESTION))


def test_passkey_samples_answers_and_errors():
    samples = pk.build_samples(_char_tokenizer, [600, 700], [0.2, 0.8], 2, seed=3)
    again = pk.build_samples(_char_tokenizer, [600, 700], [0.2, 0.8], 2, seed=3)
    assert [s.passkey for s in samples] == [s.passkey for s in again]
    assert len(samples) == 8 and all(len(s.passkey) == 5 for s in samples)
    assert pk.extract_answer(" 48213. Remember") == "48213"
    assert pk.extract_answer(" 482134") is None and pk.extract_answer("no digits") is None
    with pytest.raises(UserError, match="too short"):
        pk.make_passkey_prompt(_char_tokenizer, length=100, depth=0.5, passkey="12345")
    with pytest.raises(UserError, match="depth"):
        pk.make_passkey_prompt(_char_tokenizer, length=1000, depth=1.5, passkey="12345")


# ---- calibration -----------------------------------------------------------------------------
def test_calibration_reproducible_and_within_budget(demo_model, window, tmp_path):
    cfg, params, _ = demo_model

    def run(seed: int) -> cal.CalibrationResult:
        return cal.calibrate(params, cfg, window, budget=2.7, trials=3, seed=seed,
                             chunk=CHUNK, allow_int8=True, progress=False)

    first, second = run(7), run(7)
    keys = ("full", "int8", "int4", "int2", "objective", "params", "cached")
    assert [[t[k] for k in keys] for t in first.trials] == [
        [t[k] for k in keys] for t in second.trials]
    assert first.config == second.config
    assert first.config.average_key_bits <= 2.7
    assert all(sum(t[k] for k in ("full", "int8", "int4", "int2")) == 64 for t in first.trials)
    assert first.objective == min(t["objective"] for t in first.trials)

    loaded = cal.write_outputs(first, tmp_path / "mixkvq_cal2p7.yaml", tmp_path / "log.csv")
    assert loaded.key_channel_counts == first.config.key_channel_counts
    assert loaded.sink_tokens == first.config.sink_tokens == 1  # from the mixkvq base
    assert load_kv_config(tmp_path / "mixkvq_cal2p7.yaml", 64).name == "mixkvq_cal2p7"
    assert (tmp_path / "log.csv").read_text().startswith("trial,full,int8,int4,int2")
    # A base with rotated values (`--base` YAML) keeps them in the written preset.
    rotated = dataclasses.replace(
        first, config=dataclasses.replace(first.config, value_rotation="hadamard"))
    assert cal.write_outputs(rotated, tmp_path / "rotated.yaml", None).rotates_values


def test_budget_helpers():
    assert cal.budget_label(2.7) == "2p7" and cal.budget_label(3.0) == "3p0"
    assert cal.check_budget(2.7, 64) == 44 and cal.check_budget(2.0, 64) == 0
    counts = cal.tiers_from_params(1, 0.5, 44, 64)
    assert counts == (1, 2, 9, 52) and sum(counts) == 64
    assert (16 * 1 + 8 * 2 + 4 * 9 + 2 * 52) / 64 <= 2.7
    with pytest.raises(UserError, match="no tier assignment"):
        cal.check_budget(1.9, 64)


# ---- text and bad input ----------------------------------------------------------------------
def test_text_reading(tmp_path, text_file):
    plain = tmp_path / "plain.txt"
    plain.write_text(gzip.decompress(text_file.read_bytes()).decode())
    assert text_mod.read_text(plain) == text_mod.read_text(text_file)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        text_mod.read_text(bad)
    with pytest.raises(UserError, match="does not exist"):
        text_mod.read_text(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="shorter than the requested context"):
        text_mod.token_window(list(range(50)), 100)
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        check_metrics(["kl", "bleu"])


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_bad_input_is_one_line(capsys, demo_checkpoint, text_file, tmp_path):
    cases = [
        (("calibrate", "--budget", "1.5", "--text", str(text_file)), "no tier assignment"),
        (("report", "--metrics", "ppl,bleu", "--text", str(text_file)), "unknown metric"),
        (("report", "--plot-metric", "acc", "--text", str(text_file)), "unknown metric"),
        (("report", "--presets", "kivi9", "--text", str(text_file)), "unknown KV preset"),
        (("report", "--text", str(tmp_path / "none.txt")), "does not exist"),
        (("report", "--ckpt", str(demo_checkpoint), "--text", str(text_file), "--tokens",
          "1000", "--offset", "100000"), "shorter than the requested context"),
        (("calibrate", "--budget", "2.7", "--trials", "0"), "--trials must be >= 1"),
    ]
    for argv, message in cases:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2, argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_report_end_to_end(capsys, demo_checkpoint, text_file, tmp_path):
    rc, out, err = _cli(capsys, "report", "--ckpt", str(demo_checkpoint), "--text",
                        str(text_file), "--offset", "5", "--tokens", str(N_POSITIONS),
                        "--chunk", str(CHUNK), "--presets", "kivi2", "--out-dir",
                        str(tmp_path), "--tag", "t", "--no-progress", "--bins", "128,256")
    assert rc == 0, err
    assert "| kivi2 |" in out and "| fp32-ref |" in out and "kl 128-256" in out
    assert (tmp_path / "t.csv").read_text().startswith("preset,")
    assert (tmp_path / "t.png").stat().st_size > 1000
    rc, out, err = _cli(capsys, "plot", str(tmp_path / "t.csv"), "--out", str(tmp_path / "u.png"))
    assert rc == 0, err
    assert "| kivi2 |" in out and (tmp_path / "u.png").stat().st_size > 1000
