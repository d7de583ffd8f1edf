"""mixkvq_jax.eval.longctx: needle prompts, seeded prompt sets, Wilson intervals, the
``longctx`` CLI end to end on the tiny random demo Llama, and its bad input."""

from __future__ import annotations

import csv
import random

import pytest

from mixkvq_jax.errors import UserError
from mixkvq_jax.eval import longctx as lc
from mixkvq_jax.eval.cli import main

WORDS = "cache key value token block query model group window memory number".split()


def _text(n_sentences: int = 400, seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize()
                    + "." for _ in range(n_sentences))


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize("tokenizer_kind", ["chars", "bpe"])
def test_needle_sits_at_a_sentence_boundary_near_the_depth(tokenizer_kind, demo_model):
    tok = _chars if tokenizer_kind == "chars" else demo_model[2]
    sentences = lc.tokenize_sentences(tok, _text())
    for length in (600, 1500):
        starts = []
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            p = lc.make_needle_prompt(tok, sentences, length=length, depth=depth, key="apple",
                                      value="1234567", start=5)
            assert len(p.tokens) == length and p.answer == "1234567"
            needle = lc.text_mod.tokenize(tok, lc.NEEDLE_TEMPLATE.format(key="apple",
                                                                         value="1234567"))
            head = len(lc.text_mod.tokenize(tok, lc.NEEDLE_INTRO))
            question = lc.text_mod.tokenize(tok, lc.NEEDLE_QUESTION.format(key="apple"))
            n_hay = length - head - len(needle) - len(question)
            start = head + round(p.actual_depth * n_hay)
            assert list(p.tokens[start:start + len(needle)]) == needle
            assert list(p.tokens[-len(question):]) == question
            # within one sentence of the requested depth (sentences here are < 90 tokens)
            assert abs(p.actual_depth - depth) * n_hay <= max(len(s) for s in sentences)
            starts.append(start)
        assert starts == sorted(starts)


def test_prompt_sets_are_seeded_and_cycle_depths(demo_model):
    tok = demo_model[2]
    kwargs = dict(tasks=("passkey", "needle"), lengths=[200, 260], depths=[0.2, 0.8],
                  samples=3)
    a = lc.build_prompts(tok, _text(), seed=4, **kwargs)
    b = lc.build_prompts(tok, _text(), seed=4, **kwargs)
    c = lc.build_prompts(tok, _text(), seed=5, **kwargs)
    assert [p.tokens for p in a] == [p.tokens for p in b] != [p.tokens for p in c]
    assert [(p.task, p.length, p.depth) for p in a[:6]] == [
        ("passkey", 200, 0.2), ("passkey", 200, 0.8), ("passkey", 200, 0.2),
        ("passkey", 260, 0.2), ("passkey", 260, 0.8), ("passkey", 260, 0.2)]
    assert {len(p.answer) for p in a if p.task == "needle"} == {7}
    assert lc.extract_number(" 1234567.\nThe", 7) == "1234567"
    assert lc.extract_number(" 12345678", 7) is None


def test_wilson_interval_and_summary():
    lo, hi = lc.wilson_interval(30, 30)
    assert hi == 1.0 and lo == pytest.approx(0.8865, abs=1e-4)
    lo, hi = lc.wilson_interval(0, 30)
    assert lo == 0.0 and hi == pytest.approx(0.1135, abs=1e-4)
    lo, hi = lc.wilson_interval(15, 30)
    assert (lo, hi) == (pytest.approx(0.3315, abs=1e-4), pytest.approx(0.6685, abs=1e-4))
    rows = [{"task": "needle", "length": 512, "preset": p, "correct": ok}
            for p, hits in (("ref", [1, 1, 1, 1]), ("q", [1, 0, 1, 0])) for ok in hits]
    summary = {s["preset"]: s for s in lc.summarize(rows, "ref")}
    assert summary["q"]["accuracy"] == 0.5 and summary["q"]["vs_reference"] == 0.5
    table = lc.markdown_table(list(summary.values()), ["ref", "q"])
    assert "| needle | 512 | 4/4 100% [51-100] | 2/4 50% [15-85] (0.50x) |" in table


def test_bad_prompts_are_one_line_errors(demo_model):
    tok = demo_model[2]
    sentences = lc.tokenize_sentences(tok, _text())
    with pytest.raises(UserError, match="too short"):
        lc.make_needle_prompt(tok, sentences, length=40, depth=0.5, key="a", value="1234567",
                              start=0)
    with pytest.raises(UserError, match="depth"):
        lc.make_needle_prompt(tok, sentences, length=400, depth=1.5, key="a", value="1234567",
                              start=0)
    with pytest.raises(UserError, match="fewer than"):
        lc.make_needle_prompt(tok, sentences[:3], length=400, depth=0.5, key="a",
                              value="1234567", start=0)
    with pytest.raises(UserError, match="unknown long-context task"):
        lc.build_prompts(tok, _text(), tasks=["haystack"], lengths=[300], depths=[0.5],
                         samples=1, seed=0)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_longctx_end_to_end(capsys, demo_checkpoint, tmp_path):
    text = tmp_path / "hay.txt"
    text.write_text(_text())
    rc, out, err = _cli(capsys, "longctx", "--ckpt", str(demo_checkpoint), "--text", str(text),
                        "--lengths", "200", "--samples", "2", "--batch", "2", "--chunk", "64",
                        "--presets", "kivi2", "--out-dir", str(tmp_path), "--tag", "t",
                        "--no-progress", "--impl", "xla")
    assert rc == 0, err
    assert "| task | length | fp32-ref | kivi2 |" in out and "| needle | 200 |" in out
    with open(tmp_path / "t_answers.csv") as f:
        answers = list(csv.DictReader(f))
    assert len(answers) == 2 * 2 * 2  # tasks x samples x (reference + kivi2)
    assert {a["preset"] for a in answers} == {"fp32-ref", "kivi2"}
    with open(tmp_path / "t.csv") as f:
        summary = list(csv.DictReader(f))
    assert {(s["task"], s["preset"]) for s in summary} == {
        (t, p) for t in ("passkey", "needle") for p in ("fp32-ref", "kivi2")}
    assert (tmp_path / "t.png").stat().st_size > 1000
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("# Long-context retrieval") and "prefill in chunks of 64" in md


def test_cli_longctx_bad_input_is_one_line(capsys, demo_checkpoint, tmp_path):
    text = tmp_path / "hay.txt"
    text.write_text(_text())
    base = ("longctx", "--ckpt", str(demo_checkpoint), "--text", str(text), "--no-progress")
    cases = [
        (("--depths", "0.5,1.5"), "--depths must lie in [0, 1]"),
        (("--tasks", "passkey,haystack"), "unknown long-context task"),
        (("--lengths", "4096"), "exceeds the model's maximum context"),
        (("--lengths", "30"), "too short"),
        (("--presets", "kivi9"), "unknown KV preset"),
        (("--samples", "0"), "--samples must be >= 1"),
    ]
    for extra, message in cases:
        rc, _, err = _cli(capsys, *base, *extra)
        assert rc == 2, extra
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
