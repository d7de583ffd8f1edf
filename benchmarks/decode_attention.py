"""Decode attention over the quantized cache: the XLA path vs the Pallas kernel, side by side.

For each preset x batch x context it times one decode-attention call (one query token
per sequence, all cached tokens attended) of `attention.history_attention_xla` and of
`pallas_kernels.decode_attention.cached_attention_pallas` (jit, block_until_ready,
median of N after warm-up), the HBM bytes one call reads (the used blocks of every
cache array, the residual window and the query; MixKVQ's per-block gathered query
included), the achieved GB/s, and its fraction of the device's copy bandwidth measured
in the same run. Prints a table and writes ``benchmarks/results/decode_attention_<device>.csv``.

    python benchmarks/decode_attention.py            # 1k..32k, batch 1 and 8
    python benchmarks/decode_attention.py --quick    # CPU smoke run (< 2 min)

On CPU the Pallas kernel only runs in interpret mode (a correctness tool, orders of
magnitude slower than compiled code), so it is timed at the smallest context and batch
only and marked ``interpret`` in the table; other CPU rows show ``-``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mixkvq_jax import attention as attn
from mixkvq_jax import cache as kvc
from mixkvq_jax.config import KVQuantConfig, load_kv_config
from mixkvq_jax.pallas_kernels import decode_attention as da

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("bf16", "int8", "kivi2", "mixkvq")
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def device_name() -> str:
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or jax.default_backend()


def median_seconds(fn: Callable[..., Any], args: tuple[Any, ...], iters: int,
                   warmup: int) -> float:
    """Median wall time of ``fn(*args)`` (results blocked on) over ``iters`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(megabytes: int, iters: int) -> float:
    """Device copy bandwidth in GB/s: bytes read + written by an elementwise pass."""
    n = megabytes * 2**20 // 4
    x = jnp.arange(n, dtype=jnp.float32)
    fn = jax.jit(lambda a: a + 1.0)
    seconds = median_seconds(fn, (x,), iters, warmup=2)
    return 2 * x.nbytes / seconds / 1e9


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "head_dim"))
def pseudo_random(shape: tuple[int, ...], dtype: str, head_dim: int) -> jax.Array:
    """Cheap deterministic filler: hashed iota (no RNG, compiles in milliseconds)."""
    i = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits = i * jnp.uint32(2654435761) ^ (i >> 7)
    if jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        unit = (bits >> 8).astype(jnp.float32) / float(1 << 24)  # [0, 1)
        return (unit - 0.5).astype(dtype)
    if jnp.dtype(dtype) == jnp.uint32:
        return bits
    return (bits % jnp.uint32(head_dim)).astype(dtype)  # permutation indices, counts


def random_layer(config: KVQuantConfig, batch: int, kv_heads: int,
                 context: int) -> kvc.LayerKVCache:
    """A full one-layer cache of ``context`` tokens per sequence with arbitrary contents
    (timing does not depend on the values; filling by prefill would dominate the run)."""
    layer = jax.eval_shape(lambda: kvc.init_layer(config, batch=batch, num_kv_heads=kv_heads,
                                                  max_len=context))
    return jax.tree.map(
        lambda x: pseudo_random(x.shape, str(x.dtype), config.head_dim), layer)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    bandwidth = copy_bandwidth(args.copy_mb, iters=max(3, args.iters))
    print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}; "
          f"copy bandwidth {bandwidth:.1f} GB/s")
    rows = []
    smallest = (min(args.contexts), min(args.batches))
    for name in args.presets:
        config = load_kv_config(name, args.head_dim)
        scale = args.head_dim**-0.5
        xla = jax.jit(functools.partial(attn.history_attention_xla, config=config,
                                        scale=scale))
        pallas = jax.jit(functools.partial(da.cached_attention_pallas, config=config,
                                           scale=scale, interpret=on_cpu))
        for batch in args.batches:
            for context in args.contexts:
                layer = random_layer(config, batch, args.kv_heads, context)
                inputs = (
                    jax.random.normal(jax.random.key(1), (batch, 1, args.q_heads, args.head_dim)),
                    layer,
                    jnp.full((batch,), context, jnp.int32),
                )
                nbytes = da.kernel_bytes_read(layer, [context] * batch, config, args.q_heads)
                t_xla = median_seconds(xla, inputs, args.iters, args.warmup)
                note = ""
                t_pallas = math.nan
                run_pallas = args.pallas == "on" or (
                    args.pallas == "auto" and (not on_cpu or (context, batch) == smallest))
                if run_pallas and da.unsupported_reason(inputs[0], layer, config) is None:
                    if on_cpu:  # interpret mode: one timed call is plenty
                        t_pallas = median_seconds(pallas, inputs, 1, 1)
                        note = "pallas in interpret mode"
                    else:
                        t_pallas = median_seconds(pallas, inputs, args.iters, args.warmup)
                elif args.pallas == "off":
                    note = "pallas off"
                elif on_cpu:
                    note = "pallas skipped (CPU: interpret mode only)"
                rows.append({
                    "device": jax.devices()[0].device_kind, "preset": name, "batch": batch,
                    "context": context, "kv_heads": args.kv_heads, "q_heads": args.q_heads,
                    "head_dim": args.head_dim, "bytes_read": nbytes,
                    "xla_ms": 1e3 * t_xla, "pallas_ms": 1e3 * t_pallas,
                    "xla_gbps": nbytes / t_xla / 1e9,
                    "pallas_gbps": nbytes / t_pallas / 1e9,
                    "copy_gbps": bandwidth, "note": note,
                })
                print_row(rows[-1])
                del layer, inputs
    return rows


HEADER = (f"{'preset':7} {'B':>2} {'ctx':>6} {'MB read':>8} {'XLA ms':>8} {'Pallas ms':>9} "
          f"{'XLA GB/s':>8} {'Pal GB/s':>8} {'XLA %bw':>7} {'Pal %bw':>7} {'speedup':>7}  note")


def _fmt(x: float, spec: str, unit: str = "") -> str:
    """``format(x, spec) + unit``, or a right-aligned ``-`` of the same width for NaN."""
    width = int(re.sub(r"\D*(\d+).*", r"\1", spec)) + len(unit)
    return f"{'-':>{width}}" if math.isnan(x) else format(x, spec) + unit


def print_row(row: dict[str, Any]) -> None:
    if print_row.first:  # type: ignore[attr-defined]
        print(HEADER)
        print_row.first = False  # type: ignore[attr-defined]
    bw = row["copy_gbps"]
    cells = [
        f"{row['preset']:7}", f"{row['batch']:>2}", f"{row['context']:>6}",
        f"{row['bytes_read'] / 1e6:>8.2f}", f"{row['xla_ms']:>8.3f}",
        _fmt(row["pallas_ms"], ">9.3f"), f"{row['xla_gbps']:>8.1f}",
        _fmt(row["pallas_gbps"], ">8.1f"), f"{100 * row['xla_gbps'] / bw:>6.1f}%",
        _fmt(100 * row["pallas_gbps"] / bw, ">6.1f", "%"),
        _fmt(row["xla_ms"] / row["pallas_ms"], ">6.2f", "x"), f" {row['note']}",
    ]
    print(" ".join(cells), flush=True)


print_row.first = True  # type: ignore[attr-defined]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--iters", type=int, default=20, help="timed calls (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--copy-mb", type=int, default=512, help="array size for the bandwidth probe")
    p.add_argument("--pallas", choices=("auto", "on", "off"), default="auto",
                   help="auto: on TPU/GPU everywhere, on CPU only the smallest case")
    p.add_argument("--quick", action="store_true",
                   help="small CPU smoke run: contexts 1k and 2k, batch 1, 5 iterations")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default: results/)")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.batches = [1024, 2048], [1]
        args.iters, args.warmup, args.copy_mb = 5, 1, 64
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    write_csv(rows, args.out or RESULTS / f"decode_attention_{device_name()}.csv")


if __name__ == "__main__":
    main(sys.argv[1:])
