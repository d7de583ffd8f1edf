"""Tables, CSV and a plot of `mixkvq_jax.tpu_aot` results (one `StepResult` per row)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixkvq_jax.tpu_targets import Chip

GiB = 2**30
COLUMNS = (
    "model", "topology", "chip", "preset", "impl", "step", "batch", "context", "tokens",
    "layers", "layers_compiled", "compile_s", "fits", "hbm_needed_bytes", "hbm_bytes",
    "traffic_bytes", "weights_bytes", "cache_bytes", "floor_bytes", "ratio", "est_ms",
    "floor_ms", "copies", "unknown_loops", "bounded_loops", "stack_ops_in_loop",
    "kernels_without_cost", "error", "mesh", "gathers",
)


def _num(value: float, spec: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def _copies(row: Any) -> str:
    if not row.copies:
        return "none"
    total = sum(c["bytes"] * c["times"] for c in row.copies)
    return f"{len(row.copies)} ({total / GiB:.2f} GiB)"


def summary_line(row: Any) -> str:
    """One line per step for progress output."""
    if row.error:
        return f"  failed: {row.error}"
    return (f"  compile {row.compile_s:.1f} s, traffic {row.traffic_bytes / GiB:.2f} GiB "
            f"(floor {row.floor_bytes / GiB:.2f}, {row.ratio:.2f}x), {row.est_ms:.1f} ms, "
            f"fits {row.fits}, copies {_copies(row)}")


def markdown(rows: Sequence[Any], chip: Chip) -> str:
    """The results table, then the copies found and any caveats, as markdown."""
    first = rows[0]
    chunk = next((r.tokens for r in rows if r.step == "prefill"), "-")
    head = (f"{first.model} ({first.layers} layers, bf16 weights), batch {first.batch}, "
            f"context {first.context}, prefill chunk {chunk}; "
            f"{first.topology} ({chip.name}: {chip.hbm_bytes / GiB:.0f} GiB HBM, "
            f"{chip.hbm_bandwidth / 1e9:.0f} GB/s); compiled at {first.layers_compiled} "
            f"layers (unless a row says otherwise) and extrapolated to {first.layers}. "
            "Traffic: HBM bytes per step estimated from the optimized HLO; floor: weights + "
            "the cache's bytes read once.")
    cols = ("| preset | impl | step | fits (needed / HBM GiB) | compile s | traffic GiB "
            "| floor GiB | traffic / floor | est. ms | floor ms | cache-sized copies |")
    lines = [cols, "|" + "---|" * (cols.count("|") - 1)]
    for r in rows:
        if r.error:
            fits = (f"NO (>= {r.hbm_needed_bytes / GiB:.1f} / {r.hbm_bytes / GiB:.0f})"
                    if r.hbm_needed_bytes else "-")
            error = r.error.replace("|", "/")
            error = error if len(error) <= 170 else error[:167] + "..."
            lines.append(f"| {r.preset} | {r.impl} | {r.step} | {fits} | compile failed: "
                         f"{error} | | | | | | |")
            continue
        fits = (f"{'yes' if r.fits else 'NO'} ({r.hbm_needed_bytes / GiB:.1f} / "
                f"{r.hbm_bytes / GiB:.0f})")
        step = r.step if r.layers_compiled == first.layers_compiled else (
            f"{r.step} (at {r.layers_compiled} layers)")
        lines.append("| " + " | ".join([
            r.preset, r.impl, step, fits, _num(r.compile_s, ".1f"),
            _num(r.traffic_bytes / GiB, ".2f"), f"{r.floor_bytes / GiB:.2f}",
            _num(r.ratio, ".2f") + "x", _num(r.est_ms, ".1f"), f"{r.floor_ms:.1f}",
            _copies(r)]) + " |")
    out = [head, "\n".join(lines)]
    details = []
    for r in rows:
        for c in r.copies:
            details.append(f"| {r.preset} | {r.impl} | {r.step} | "
                           f"{r.layers_compiled.split(',')[-1]} | {c['op']} | `{c['shape']}` "
                           f"| {c['bytes'] / 2**20:.1f} | {c['times']} | {c['memory']} |")
    if details:
        out.append("Cache-sized copies / transposes / slices in the compiled steps (at the "
                   "deeper compiled depth; MiB per instance, times per step at that depth):"
                   "\n\n| preset | impl | step | layers | op | shape | MiB | times | result in |"
                   "\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(details))
    notes = []
    for r in rows:
        if r.unknown_loops:
            notes.append(f"- {r.preset} {r.impl} {r.step}: loops without a known trip "
                         f"count (counted once): {', '.join(r.unknown_loops)}")
        if r.stack_ops_in_loop:
            notes.append(f"- {r.preset} {r.impl} {r.step}: {r.stack_ops_in_loop} copies of a "
                         "whole [layers, ...] stack run in every layer: their cost grows as "
                         "layers^2, so the linear extrapolation undercounts it")
        if r.bounded_loops:
            notes.append(f"- {r.preset} {r.impl} {r.step}: data-dependent loops taken at a "
                         f"full cache (trip count from their slices): "
                         f"{len(r.bounded_loops)}")
        if r.gathers:
            notes.append(f"- {r.preset} {r.impl} {r.step}: {len(r.gathers)} cache-sized "
                         "collectives (all-gather / all-to-all / collective-permute): "
                         + ", ".join(sorted({g['op'] for g in r.gathers})))
        if r.kernels_without_cost:
            notes.append(f"- {r.preset} {r.impl} {r.step}: Pallas kernels without a "
                         f"CostEstimate: {', '.join(r.kernels_without_cost)}")
    if notes:
        out.append("\n".join(notes))
    return "\n\n".join(out)


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return json.dumps(value)
    return value


def plot(rows: Sequence[Any], path: Path) -> None:
    """Estimated ms per step (bars) and the floor (black ticks), one panel per step kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(dict.fromkeys(r.step for r in rows))
    fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps), 4), squeeze=False)
    for ax, step in zip(axes[0], steps, strict=True):
        sel = [r for r in rows if r.step == step]
        labels = [f"{r.preset}\n{r.impl}" for r in sel]
        values = [0.0 if r.error else r.est_ms for r in sel]
        colors = ["tab:red" if r.error else ("tab:blue" if r.fits else "tab:orange")
                  for r in sel]
        xs = range(len(sel))
        ax.bar(xs, values, color=colors)
        ax.scatter(xs, [r.floor_ms for r in sel], marker="_", s=400, color="black",
                   label="floor (weights + cache once)", zorder=3)
        for x, r in zip(xs, sel, strict=True):
            if r.error:
                ax.text(x, 0, "failed", ha="center", va="bottom", rotation=90, fontsize=8)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set(ylabel="estimated ms per step at HBM bandwidth",
               title=f"{step} ({sel[0].chip}; orange: does not fit)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: Sequence[Any], md: str, out_dir: Path, tag: str) -> Path:
    """Write ``tpu_aot_<tag>.csv``, ``.md`` and ``.png`` under ``out_dir``; the stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"tpu_aot_{tag}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            data = dataclasses.asdict(r)
            writer.writerow({k: _csv_value(data[k]) for k in COLUMNS})
    stem.with_suffix(".md").write_text(md + "\n")
    plot(rows, stem.with_suffix(".png"))
    return stem
