"""Report outputs: a markdown table, a CSV and a KL-vs-average-key-bits plot."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixkvq_jax.errors import UserError
from mixkvq_jax.eval.metrics import REFERENCE_NAME, check_metrics

_FORMATS = {"ppl": "{:.4f}", "kl": "{:.4g}", "top1": "{:.4f}"}


def _fmt(key: str, value: Any) -> str:
    base = key.split("@")[0]
    if isinstance(value, float) and base in _FORMATS:
        return _FORMATS[base].format(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def binned_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Position-bin labels present in the rows, in order (``0-512``, ``512-1k``, ...)."""
    labels: list[str] = []
    for key in rows[0]:
        if "@" in key:
            label = key.split("@", 1)[1]
            if label not in labels:
                labels.append(label)
    return labels


def markdown_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = ("ppl", "kl", "top1"),
                   *, binned: Sequence[str] = ("kl",)) -> str:
    """One row per preset: bits, bytes, the chosen metrics overall, ``binned`` metrics per
    position bin."""
    metrics = check_metrics(metrics)
    binned = [m for m in check_metrics(binned) if m in metrics] if binned else []
    labels = binned_labels(rows)
    head = ["preset", "avg key bits", "value bits", "key tiers f/8/4/2", "salience",
            "sink tokens", "% of bf16 bytes", *metrics,
            *(f"{m} {lab}" for m in binned for lab in labels)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["preset"], _fmt("", r["avg_key_bits"]), _fmt("", r["value_bits"]),
                 r["key_tiers"], r["salience"], str(r.get("sink_tokens") or 0),
                 _fmt("", r["pct_of_bf16"]),
                 *(_fmt(m, r[m]) for m in metrics),
                 *(_fmt(m, r[f"{m}@{lab}"]) for m in binned for lab in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def gap_closed(rows: Sequence[dict[str, Any]], preset: str, *, low: str = "kivi2",
               high: str = "bf16", metric: str = "kl") -> float | None:
    """Fraction of the ``metric`` gap between ``low`` and ``high`` that ``preset`` closes."""
    by = {r["preset"]: r for r in rows}
    if not all(k in by for k in (preset, low, high)):
        return None
    gap = by[low][metric] - by[high][metric]
    return None if gap == 0 else (by[low][metric] - by[preset][metric]) / gap


def plot_kl_vs_bits(rows: Sequence[dict[str, Any]], path: str | Path, *, metric: str = "kl",
                    curve: Sequence[str] = (), title: str = "") -> None:
    """``metric`` vs average key bits: one point per preset (named in the legend, with its
    value bits), the ``curve`` presets joined as a line (sorted by bits). Log axes for KL;
    the reference (KL 0) is left out."""
    (metric,) = check_metrics([metric])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install matplotlib") from None
    rows = [r for r in rows if r["preset"] != REFERENCE_NAME]
    floor = 1e-7

    def y_of(r: dict[str, Any]) -> float:
        return max(float(r[metric]), floor) if metric == "kl" else float(r[metric])

    def label(r: dict[str, Any]) -> str:
        return f"{r['preset']} ({float(r['avg_key_bits']):.3g} b keys, V{float(r['value_bits']):g})"

    fig, ax = plt.subplots(figsize=(8, 5.2))
    markers = "osD^vP*Xh<>p"
    points = [r for r in rows if r["preset"] not in curve]
    for i, r in enumerate(points):
        ax.scatter(float(r["avg_key_bits"]), y_of(r), s=45, zorder=3, marker=markers[i % 12],
                   label=label(r))
    curve_rows = sorted((r for r in rows if r["preset"] in curve),
                        key=lambda r: float(r["avg_key_bits"]))
    if curve_rows:
        xs = [float(r["avg_key_bits"]) for r in curve_rows]
        ax.plot(xs, [y_of(r) for r in curve_rows], "o-", color="black", zorder=4, ms=5,
                label="MixKVQ calibrated, Optuna TPE: "
                      + ", ".join(r["preset"].removeprefix("mixkvq_") for r in curve_rows))
    ax.set_xscale("log", base=2)
    if metric == "kl":
        ax.set_yscale("log")
    ax.set_xlabel("average key bits (codes only)")
    ax.set_ylabel({"kl": "mean KL(ref || preset) [nats]", "ppl": "perplexity",
                   "top1": "top-1 agreement with ref"}[metric])
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by `write_csv`, numbers parsed back to int / float."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"CSV file {p} does not exist")

    def parse(v: str) -> Any:
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with p.open(newline="") as f:
        rows = [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows or "preset" not in rows[0] or "avg_key_bits" not in rows[0]:
        raise UserError(f"{p} is not a fidelity CSV (needs preset and avg_key_bits columns)")
    return rows


def target_checks(rows: Sequence[dict[str, Any]], *, calibrated: str | None = None,
                  handmade: str = "mixkvq", range_only: str = "mixkvq[range_only]"
                  ) -> list[tuple[str, bool | None, str]]:
    """The issue's fidelity targets as (description, met or None if not measured, detail)."""
    by = {r["preset"]: r for r in rows}
    out: list[tuple[str, bool | None, str]] = []

    def kl(name: str) -> float | None:
        return by[name]["kl"] if name in by else None

    order = ["bf16", "int8", "kivi4", "kivi2"]
    vals = [kl(n) for n in order]
    if all(v is not None for v in vals):
        ok = all(a < b for a, b in zip(vals, vals[1:], strict=False))  # type: ignore[operator]
        out.append(("KL bf16 < int8 < kivi4 < kivi2", ok,
                    " < ".join(f"{n} {v:.3g}" for n, v in zip(order, vals, strict=True))))
    frac = gap_closed(rows, handmade)
    if frac is not None:
        bits = by[handmade]["avg_key_bits"]
        ok = frac >= 0.75 and bits <= 2.82
        detail = f"{100 * frac:.1f}% at {bits:g} bits"
        sinks = int(by[handmade].get("sink_tokens") or 0)
        same_sinks = f"kivi2[sink_tokens={sinks}]"
        if sinks and same_sinks in by:  # how much is more than the sinks alone
            frac_same = gap_closed(rows, handmade, low=same_sinks)
            if frac_same is not None:
                detail += f" ({100 * frac_same:.1f}% of the gap of {same_sinks}, same sinks)"
        out.append((f"{handmade} (<= 2.82 avg key bits) closes >= 75% of the kivi2-bf16 KL gap",
                    ok, detail))
    if kl(range_only) is not None and kl(handmade) is not None:
        out.append(("range_only salience worse than query-aware", kl(range_only) > kl(handmade),
                    f"{range_only} {kl(range_only):.4g} vs {handmade} {kl(handmade):.4g}"))
    if calibrated and kl(calibrated) is not None and kl(handmade) is not None:
        out.append((f"{calibrated} at least as good as {handmade}",
                    kl(calibrated) <= kl(handmade),
                    f"{kl(calibrated):.4g} ({by[calibrated]['avg_key_bits']:g} b) vs "
                    f"{kl(handmade):.4g} ({by[handmade]['avg_key_bits']:g} b)"))
    return out


def format_checks(checks: Sequence[tuple[str, bool | None, str]]) -> str:
    marks = {True: "MET", False: "NOT MET", None: "n/a"}
    return "\n".join(f"- [{marks[ok]}] {desc}: {detail}" for desc, ok, detail in checks)
