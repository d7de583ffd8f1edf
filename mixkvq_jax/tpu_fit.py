"""Fit check before renting a TPU slice: per chip, do the weights + cache + activations of a
sharded decode step fit, and what is the largest batch per preset at each context?

    python -m mixkvq_jax.tpu_fit --models llama3-8b,qwen3-8b \\
        --topologies v5e:2x2,v5e:2x4,v6e:2x2 --presets bf16,kivi2,mixkvq \\
        --contexts 8192,32768

Per (model, topology, preset) the decode step is compiled deviceless for the topology's
chips with the ``--mesh`` the generate CLI would use (`mixkvq_jax.mesh`; default all
chips on ``model``) by `mixkvq_jax.tpu_aot.measure` at a reference batch and context
(``--ref-batch``, ``--ref-context``; 1 and 2 layers, extrapolated to full depth). That
compile gives, per chip, XLA's memory analysis (``needed``), the cache-sized collectives
(there should be none: the cache stays sharded) and the HBM traffic per step.

**Byte model.** Per chip, ``needed(B, T) = W + C(B, T) + F + a * B``: ``W`` the
weights and ``C`` the cache one chip holds (exact, from the shapes and the partition
specs, `mixkvq_jax.mesh.per_device_bytes`); what the compile needs beyond them
(activations, logits, XLA temporaries) is a fixed ``F`` plus ``a`` per sequence, fitted
to XLA's memory analysis of two compiles at ``B_ref`` and ``2 B_ref`` (context
``T_ref``). The max batch is the largest multiple of the ``data`` axis with
``needed <= HBM`` (the HBM XLA:TPU lets a program use, `usable_hbm_bytes`); the step
time is the compiled traffic per step at the reference scaled to ``W + C(B, T)``
(traffic / (W + C) measured at the reference), at the chip's
HBM bandwidth. ``--validate`` compiles at the predicted max batch and context; where
XLA needs more than the budget there, it steps the batch down by the overshoot (at the
model's bytes per sequence) and compiles again (at most ``VALIDATE_TRIES`` compiles), so
the reported max batch is one a compile says fits (``validated``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixkvq_jax.errors import UserError, run_cli
from mixkvq_jax.models import ModelConfig

GiB = 2**30
VALIDATE_TRIES = 3
RESULTS = Path("benchmarks") / "results"


@dataclasses.dataclass
class FitRow:
    """One (model, topology, preset, context): per-chip bytes and the max batch."""

    model: str
    topology: str
    mesh: str
    preset: str
    context: int
    hbm_bytes: int  # usable per chip (`usable_hbm_bytes`)
    weights_bytes: int  # per chip
    cache_bytes_per_seq: float  # per chip, one sequence at ``context``
    activation_bytes_per_seq: float  # per chip, from the two reference compiles
    activation_fixed_bytes: float  # per chip, the part that does not grow with the batch
    max_batch: int
    needed_bytes: int  # per chip at max_batch (the byte model)
    est_ms: float  # decode step at max_batch
    ref_batch: int
    ref_context: int
    ref_needed_bytes: int  # XLA's memory analysis at the reference, full depth
    gathers: int  # cache-sized collectives in the reference compile
    validated_needed_bytes: int = 0  # XLA at (max_batch, context) with --validate
    model_max_batch: int = 0  # the byte model's max batch (before validation)
    validated: bool = False  # max_batch compiled and fits
    error: str = ""


@functools.cache
def usable_hbm_bytes(device: Any) -> int:
    """HBM a program may use on ``device``'s chip, as XLA:TPU states it when a program
    asks for more (v5e: 15.75G of 16 GiB; v6e: 31.25G of 32 GiB): one deviceless compile
    of a buffer bigger than the chip. Falls back to the chip's HBM size."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from mixkvq_jax.tpu_targets import chip_of

    total = chip_of(device).hbm_bytes
    x = jax.ShapeDtypeStruct((2 * total,), jnp.uint8, sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda a: a + 1).lower(x).compile()
    except Exception as err:  # noqa: BLE001  (the RESOURCE_EXHAUSTED we asked for)
        found = re.search(r"exceeds available HBM \(([\d.]+)([GM])\)", str(err))
        if found:
            return int(float(found.group(1)) * (GiB if found.group(2) == "G" else 2**20))
    return total


def fit_rows(model: str | ModelConfig, topology: str, preset: str, contexts: Sequence[int], *,
             mesh_text: str = "auto", ref_batch: int = 8, ref_context: int = 8192,
             layers: int = 1, validate: bool = False) -> list[FitRow]:
    """`FitRow` s of one model (a `tpu_targets.MODELS` name or a config) / topology /
    preset: two reference compiles, plus one per context with ``validate``."""
    import jax.numpy as jnp

    from mixkvq_jax import mesh as mesh_lib
    from mixkvq_jax import tpu_aot
    from mixkvq_jax.config import load_kv_config
    from mixkvq_jax.models import param_shapes
    from mixkvq_jax.tpu_targets import chip_of, model_config, tpu_devices

    config = model if isinstance(model, ModelConfig) else model_config(model)
    model = model if isinstance(model, str) else config.architecture
    devices = tpu_devices(topology)
    shape = mesh_lib.parse_mesh(mesh_text) or mesh_lib.MeshShape(data=1)
    mesh = mesh_lib.choose_mesh(shape, config, batch=ref_batch, devices=devices)
    chip = chip_of(devices[0])
    budget = usable_hbm_bytes(devices[0])
    kv = load_kv_config(preset, config.head_dim)
    weights = mesh_lib.weight_bytes(param_shapes(config, jnp.bfloat16), config, mesh)
    data = 1 if mesh is None else mesh.shape["data"]

    def cache_chip(batch: int, context: int) -> int:
        cache = tpu_aot.abstract_cache(config, kv, batch=batch, context=context, mesh=mesh)
        return mesh_lib.cache_bytes(cache, mesh)

    def compile_at(batch: int, context: int) -> Any:
        return tpu_aot.measure("decode", config, preset, devices[0], batch=batch,
                               context=context, layers=layers, model_name=model,
                               topology=topology, mesh=mesh)

    ref, ref2 = compile_at(ref_batch, ref_context), compile_at(2 * ref_batch, ref_context)
    label = mesh_lib.describe(mesh).split(" over ")[0]
    if ref.error or ref2.error:
        return [FitRow(model, topology, label, preset, t, budget, weights, 0.0, 0.0, 0.0,
                       0, 0, float("nan"), ref_batch, ref_context, ref.hbm_needed_bytes, 0,
                       error=ref.error or ref2.error) for t in contexts]
    # beyond weights + cache: a part per sequence (from the two batches) and a fixed part
    extra = [r.hbm_needed_bytes - weights - cache_chip(b, ref_context)
             for r, b in ((ref, ref_batch), (ref2, 2 * ref_batch))]
    activations = max(0.0, (extra[1] - extra[0]) / ref_batch)
    fixed = max(0.0, extra[0] - activations * ref_batch)
    traffic_per_byte = ref.traffic_bytes / (weights + cache_chip(ref_batch, ref_context))
    rows = []
    for context in contexts:
        per_seq = cache_chip(data, context) / data

        def needed(batch: int, context: int = context, per_seq: float = per_seq) -> int:
            return int(weights + fixed + (per_seq + activations) * batch)

        batch = 0
        while needed(batch + data) <= budget and batch < 1 << 16:
            batch += data
        est_ms = 1e3 * traffic_per_byte * (weights + per_seq * batch) / chip.hbm_bandwidth
        row = FitRow(model, topology, label, preset, context, budget, weights,
                     per_seq, activations, fixed, batch, needed(batch), est_ms if batch else
                     float("nan"), ref_batch, ref_context, ref.hbm_needed_bytes,
                     len(ref.gathers) + len(ref2.gathers), model_max_batch=batch)
        for _ in range(VALIDATE_TRIES if validate and batch else 0):
            check = compile_at(row.max_batch, context)
            row.validated_needed_bytes, row.error = check.hbm_needed_bytes, check.error
            over = check.hbm_needed_bytes - budget
            if over <= 0 and not check.error:
                row.validated = True
                break
            if over <= 0 or row.max_batch <= data:  # an error other than HBM: stop here
                break
            step = data * -(-over // int(data * (per_seq + activations)))
            row.max_batch = max(data, row.max_batch - step)
        if row.max_batch != batch:
            row.needed_bytes = needed(row.max_batch)
            row.est_ms = (1e3 * traffic_per_byte * (weights + per_seq * row.max_batch)
                          / chip.hbm_bandwidth)
        rows.append(row)
    return rows


def markdown(rows: Sequence[FitRow]) -> str:
    """Max batch per chip budget: one line per (model, topology, context)."""
    presets = list(dict.fromkeys(r.preset for r in rows))
    head = ("| model | topology (mesh) | context | "
            + " | ".join(f"{p} max batch (ms/step)" for p in presets) + " |")
    lines = [head, "|" + "---|" * (3 + len(presets))]
    keys = list(dict.fromkeys((r.model, r.topology, r.mesh, r.context) for r in rows))
    for model, topology, mesh, context in keys:
        cells = []
        for p in presets:
            r = next((x for x in rows if (x.model, x.topology, x.preset, x.context)
                      == (model, topology, p, context)), None)
            if r is None or r.error and not r.max_batch:
                cells.append("error" if r else "-")
            elif r.max_batch == 0:
                cells.append("does not fit")
            else:  # *: the byte model's figure, not confirmed by a compile
                mark = "" if r.validated else "*"
                cells.append(f"{r.max_batch}{mark} ({r.est_ms:.1f})")
        lines.append(f"| {model} | {topology} ({mesh}) | {context // 1024}k | "
                     + " | ".join(cells) + " |")
    lines.append("\n(*: the byte model's max batch, not confirmed by a compile at that batch: "
                 "run with --validate)")
    return "\n".join(lines)


def read_csv(path: Path) -> list[FitRow]:
    """`FitRow` s written by `write_csv`."""
    types = {f.name: f.type for f in dataclasses.fields(FitRow)}

    def value(name: str, text: str) -> Any:
        kind = types[name]
        if kind == "int":
            return int(text or 0)
        if kind == "float":
            return float(text or "nan")
        if kind == "bool":
            return text == "True"
        return text

    with path.open() as f:
        return [FitRow(**{k: value(k, v) for k, v in r.items()}) for r in csv.DictReader(f)]


def sentence(rows: Sequence[FitRow], model: str, topology: str, context: int) -> str:
    """E.g. ``llama3-8b, 32k context, v5e:2x2: mixkvq fits batch 40; bf16 fits batch 8``."""
    parts = [f"{r.preset} fits batch {r.max_batch}" for r in rows
             if (r.model, r.topology, r.context) == (model, topology, context)]
    return f"{model}, {context // 1024}k context, {topology}: " + "; ".join(parts)


def write_csv(rows: Sequence[FitRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(FitRow)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))


def build_parser() -> argparse.ArgumentParser:
    from mixkvq_jax.cli import ArgParser
    from mixkvq_jax.tpu_aot import _csv_list, _positive

    p = ArgParser(prog="python -m mixkvq_jax.tpu_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=_csv_list(), default=["llama3-8b"])
    p.add_argument("--topologies", type=_csv_list(), default=["v5e:2x2"])
    p.add_argument("--presets", type=_csv_list(), default=["bf16", "kivi2", "mixkvq"])
    p.add_argument("--contexts", type=_csv_list(), default=["8192", "32768"])
    p.add_argument("--mesh", default="auto",
                   help="data=D,model=M as in the generate CLI; auto: all chips on model")
    p.add_argument("--ref-batch", type=_positive, default=8)
    p.add_argument("--ref-context", type=_positive, default=8192)
    p.add_argument("--layers", type=_positive, default=1,
                   help="compile with N and N+1 layers, extrapolate to the model's depth")
    p.add_argument("--validate", action="store_true",
                   help="compile again at each predicted max batch (slow)")
    p.add_argument("--out", type=Path, default=RESULTS / "tpu_fit.csv")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        contexts = [int(c) for c in args.contexts]
    except ValueError:
        raise UserError(f"--contexts {args.contexts}: expected integers") from None
    rows: list[FitRow] = []
    for model in args.models:
        for topology in args.topologies:
            for preset in args.presets:
                print(f"[{model} {topology} {preset}]", file=sys.stderr, flush=True)
                new = fit_rows(model, topology, preset, contexts, mesh_text=args.mesh,
                               ref_batch=args.ref_batch, ref_context=args.ref_context,
                               layers=args.layers, validate=args.validate)
                for r in new:
                    print(f"  {r.context}: max batch {r.max_batch}, "
                          f"{r.needed_bytes / GiB:.2f} / {r.hbm_bytes / GiB:.2f} GiB, "
                          f"gathers {r.gathers} {r.error}", file=sys.stderr, flush=True)
                rows.extend(new)
                write_csv(rows, args.out)
    print(markdown(rows))
    for model in args.models:
        for topology in args.topologies:
            for context in contexts:
                print(sentence(rows, model, topology, context))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
