"""Compile the decode step and a prefill chunk for a real TPU from a CPU host (deviceless,
libtpu's compiler) and report what the compiled program would cost on that chip.

    python -m mixkvq_jax.tpu_aot --model llama3-8b --topology v5e:1x1 \\
        --presets bf16,kivi2,mixkvq --impl auto,xla --batch 8 --context 32768

A topology of several chips (``v5e:2x2``) is compiled sharded over a ``--mesh``
(`mixkvq_jax.mesh`, as in the generate CLI; default all chips on ``model``): the inputs
are `NamedSharding` s of that mesh, bytes are per chip, and cache-sized collectives
(all-gather, all-to-all, collective-permute) are reported (``gathers``).

Per (preset, impl, step kind) -- ``decode``: one token per sequence, tokens [B, 1];
``prefill``: a chunk of tokens [B, C] -- the step is jitted with the cache donated and
bf16 weights, lowered on `jax.ShapeDtypeStruct` inputs placed on a TPU device of the
topology (nothing is allocated: params from `param_shapes`, the cache from
``jax.eval_shape(init_cache ...)``), and compiled by XLA:TPU and Mosaic. The platform
comes from the devices (`mixkvq_jax.target.platform_of` -> ``forward(platform=...)``).
Reported:

* **fits**: XLA's memory analysis -- argument + output - aliased (the donated cache) +
  temp + code bytes, at the model's full depth -- against the chip's HBM;
* **compile s**: lower + compile of the deepest variant compiled;
* **traffic**: HBM bytes per step estimated from the optimized HLO
  (`mixkvq_jax.hlo_traffic`: tiled padded sizes, loop trip counts, Pallas cost
  estimates); **floor**: the weights plus the cache's logical bytes (every leaf's
  nbytes), each read once; their **ratio**; **ms** at the chip's HBM bandwidth;
* **copies**: copy / transpose / (dynamic-)slice results of at least a quarter of one
  layer's cache bytes (`hlo_traffic` ``suspicious``).

**Depth.** A Llama-3-8B step does not fit a v5e (XLA refuses to compile it), so the step
is compiled with ``--layers N`` and ``N + 1`` layers (default 4 and 5; N - 1 and N when
N + 1 layers do not fit). Traffic: the layers are one ``lax.scan``; the entry-level
loop of N + 1 trips with the most bytes is the layer loop, and its bytes per trip are
counted ``L`` times, the rest of the program once (`TrafficReport.scaled_loop`). This
keeps what XLA does only at a small depth (prefetching a whole small stack into VMEM
ahead of the loop) a one-off instead of multiplying it by L, which a difference of two
compiles did (MixKVQ decode moved between 0.4x and 1.3x of its floor with the depths
compiled). Memory bytes are extrapolated linearly: ``q(L) = q(N) + (L - N) * (q(N + 1)
- q(N))``. An op that touches the whole stack inside the layer loop grows as L^2 and
is undercounted (it shows in the copies list). With ``N >= L`` the model is compiled
at full depth once.

Bad input (unknown topology, model or preset, libtpu missing) is one line and exit
status 2; a step that does not fit in HBM is a row with ``fits=False`` (an error only
with ``--require-fit``); a step that fails to compile is a row with its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixkvq_jax.errors import UserError, run_cli
from mixkvq_jax.hlo_text import parse_shape
from mixkvq_jax.hlo_traffic import TrafficReport, estimate_traffic
from mixkvq_jax.models import ModelConfig
from mixkvq_jax.tpu_targets import MODELS, TOPOLOGIES, Chip, chip_of, model_config, tpu_devices

IMPLS = ("auto", "xla", "pallas")
# Compiled depth N (and N + 1). At 2-3 layers XLA:TPU kept a whole small cache stack in
# VMEM and re-filled it every layer (MixKVQ's bf16 key tier at 32k x 8: 1.16x its floor
# at 3 layers, 1.00x at 5 and 7); from 4-5 layers on the figures no longer move.
DEFAULT_LAYERS = 4
STEPS = ("decode", "prefill")
RESULTS = Path("benchmarks") / "results"


@dataclasses.dataclass
class StepResult:
    """One compiled step, extrapolated to the model's depth (bytes, seconds, ms)."""

    model: str
    topology: str
    chip: str
    preset: str
    impl: str
    step: str
    batch: int
    context: int
    tokens: int  # tokens per sequence in the step (1 for decode, the chunk for prefill)
    layers: int
    layers_compiled: str
    compile_s: float = float("nan")
    hbm_needed_bytes: int = 0
    hbm_bytes: int = 0
    fits: bool = False
    traffic_bytes: float = float("nan")
    weights_bytes: int = 0
    cache_bytes: int = 0
    floor_bytes: int = 0
    ratio: float = float("nan")
    est_ms: float = float("nan")
    floor_ms: float = float("nan")
    copies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unknown_loops: list[str] = dataclasses.field(default_factory=list)
    bounded_loops: list[str] = dataclasses.field(default_factory=list)
    stack_ops_in_loop: int = 0  # copies of the whole [layers, ...] stack made every layer
    kernels_without_cost: list[str] = dataclasses.field(default_factory=list)
    error: str = ""
    mesh: str = ""  # "data=D x model=M" when compiled for several chips (bytes per chip)
    # all-gather / all-to-all / collective-permute results of at least a quarter of one
    # layer's cache bytes per chip (a cache gathered across chips)
    gathers: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Compiled:
    seconds: float
    memory_bytes: int
    traffic: TrafficReport
    gathers: list[dict[str, Any]] = dataclasses.field(default_factory=list)


GATHER_OPS = ("all-gather", "all-gather-start", "all-to-all", "collective-permute",
              "collective-permute-start")


def large_collectives(hlo: str, min_bytes: int) -> list[dict[str, Any]]:
    """Collectives that move data between chips (``GATHER_OPS``) whose result has at
    least ``min_bytes`` (per chip), anywhere in the optimized HLO text."""
    from mixkvq_jax.hlo_text import parse_module

    found = []
    for comp in parse_module(hlo).computations.values():
        for inst in comp.instructions:
            if inst.opcode in GATHER_OPS:
                size = max((x.bytes for x in inst.leaves), default=0)
                if size >= min_bytes:
                    found.append({"op": inst.opcode, "shape": inst.shape, "bytes": size,
                                  "computation": comp.name})
    return found


# ---- the steps -------------------------------------------------------------------------------
def _decode(params: Any, cache: Any, tokens: Any, counts: Any, *, config: ModelConfig,
            impl: str, platform: str) -> tuple[Any, Any]:
    """tokens int32 [B, 1] -> (greedy next tokens int32 [B], updated cache)."""
    import jax.numpy as jnp

    from mixkvq_jax.models import forward

    logits, cache = forward(params, tokens, cache, counts, config=config, impl=impl,
                            platform=platform, logit_index=jnp.zeros_like(counts))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def _prefill(params: Any, cache: Any, tokens: Any, counts: Any, *, config: ModelConfig,
             impl: str, platform: str) -> tuple[Any, Any]:
    """tokens int32 [B, C], counts [B] -> (logits f32 [B, V] at each last token, cache)."""
    import jax.numpy as jnp

    from mixkvq_jax.models import forward

    return forward(params, tokens, cache, counts, config=config, impl=impl, platform=platform,
                   logit_index=jnp.maximum(counts - 1, 0))


@functools.cache
def _jitted(step: str) -> Any:
    import jax

    fn = _decode if step == "decode" else _prefill
    return jax.jit(fn, static_argnames=("config", "impl", "platform"),
                   donate_argnames=("cache",))


# ---- abstract inputs -------------------------------------------------------------------------
def abstract_inputs(config: ModelConfig, kv_config: Any, device: Any, *, batch: int,
                    context: int, tokens: int, mesh: Any = None) -> tuple[Any, Any, Any, Any]:
    """(params bf16, cache, tokens int32 [B, tokens], counts int32 [B]) as
    `jax.ShapeDtypeStruct` s placed on ``device`` or, with ``mesh``, sharded over it as
    `mixkvq_jax.models.sharding` places them; nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    from mixkvq_jax.models import param_shapes
    from mixkvq_jax.models.sharding import cache_partition_specs, param_partition_specs

    params = param_shapes(config, jnp.bfloat16)
    cache = abstract_cache(config, kv_config, batch=batch, context=context, mesh=mesh)
    inputs = (jax.ShapeDtypeStruct((batch, tokens), jnp.int32),
              jax.ShapeDtypeStruct((batch,), jnp.int32))

    def place(x: Any, sharding: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    if mesh is None:
        one = SingleDeviceSharding(device)
        return jax.tree.map(lambda x: place(x, one), (params, cache, *inputs))
    named = (param_partition_specs(params, config, mesh=mesh), cache_partition_specs(cache),
             P("data"), P("data"))
    return jax.tree.map(lambda x, spec: place(x, NamedSharding(mesh, spec)),
                        (params, cache, *inputs), named)


def abstract_cache(config: ModelConfig, kv_config: Any, *, batch: int, context: int,
                   mesh: Any = None) -> Any:
    """The cache `init_cache` builds for ``config`` (shapes only); on ``mesh``, with the
    KV heads it holds there (`mixkvq_jax.mesh.kv_heads`)."""
    import jax

    from mixkvq_jax.cache import init_cache
    from mixkvq_jax.mesh import kv_heads

    return jax.eval_shape(lambda: init_cache(kv_config, num_layers=config.num_layers,
                                             batch=batch, num_kv_heads=kv_heads(config, mesh),
                                             max_len=context))


def tree_bytes(tree: Any) -> int:
    """Logical bytes of every array leaf (size x itemsize)."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


# ---- compiling ---------------------------------------------------------------------------
def compile_step(step: str, config: ModelConfig, kv_config: Any, device: Any, *, impl: str,
                 batch: int, context: int, tokens: int, copy_min_bytes: int,
                 default_trip_count: int = 1, mesh: Any = None) -> _Compiled:
    """Lower and compile one step for ``device`` (or sharded over ``mesh``: bytes are
    then per chip); its memory bytes and HBM traffic."""
    import jax

    from mixkvq_jax.target import platform_of

    args = abstract_inputs(config, kv_config, device, batch=batch, context=context,
                           tokens=tokens, mesh=mesh)
    platform = platform_of(args[0])
    t0 = time.perf_counter()
    with warnings.catch_warnings(), jax.set_mesh(mesh):
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        compiled = _jitted(step).lower(*args, config=config, impl=impl,
                                       platform=platform).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    needed = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    hlo = compiled.as_text()
    traffic = estimate_traffic(hlo, default_trip_count=default_trip_count,
                               suspicious_min_bytes=copy_min_bytes)
    return _Compiled(seconds, int(needed), traffic, large_collectives(hlo, copy_min_bytes))


def _leading_dim(shape: str) -> int | None:
    leaves = [x for x in parse_shape(shape) if x.dims]
    return leaves[-1].dims[0] if leaves else None  # slice-start: the slice, last but one


def _one_line(err: BaseException) -> str:
    """The first informative line of a compiler error."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    text = next((x for x in lines if not x.startswith(("See ", "===", "Traceback"))), "")
    return f"{type(err).__name__}: {text}"[:300]


def measure(step: str, config: ModelConfig, preset: str, device: Any, *, impl: str = "auto",
            batch: int = 8, context: int = 32768, prefill_chunk: int = 256,
            layers: int = 4,
            model_name: str = "", topology: str = "", default_trip_count: int = 1,
            mesh: Any = None) -> StepResult:
    """Compile ``step`` (``decode`` or ``prefill``) for ``device`` (or sharded over
    ``mesh``: bytes per chip) and report it at the model's full depth (see the module
    docstring for the depth extrapolation)."""
    import jax.numpy as jnp

    from mixkvq_jax.config import load_kv_config
    from mixkvq_jax.mesh import cache_bytes as cache_bytes_of
    from mixkvq_jax.mesh import describe, weight_bytes
    from mixkvq_jax.models import param_shapes

    kv_config = load_kv_config(preset, config.head_dim)
    chip: Chip = chip_of(device)
    depth = config.num_layers
    tokens = 1 if step == "decode" else prefill_chunk
    depths = (depth,) if layers >= depth else (layers, layers + 1)
    full_cache = abstract_cache(config, kv_config, batch=batch, context=context, mesh=mesh)
    weights = weight_bytes(param_shapes(config, jnp.bfloat16), config, mesh)
    cache_bytes = cache_bytes_of(full_cache, mesh)
    floor = weights + cache_bytes
    result = StepResult(
        model=model_name or config.architecture, topology=topology, chip=chip.name,
        preset=preset, impl=impl, step=step, batch=batch, context=context, tokens=tokens,
        layers=depth, layers_compiled=",".join(map(str, depths)), hbm_bytes=chip.hbm_bytes,
        weights_bytes=weights, cache_bytes=cache_bytes, floor_bytes=floor,
        floor_ms=1e3 * floor / chip.hbm_bandwidth,
        mesh="" if mesh is None else describe(mesh).split(" over ")[0])
    copy_min = max(1, cache_bytes // depth // 4)
    compiled: dict[int, _Compiled] = {}

    def compile_at(n: int) -> _Compiled:
        if n not in compiled:
            compiled[n] = compile_step(step, dataclasses.replace(config, num_layers=n),
                                       kv_config, device, impl=impl, batch=batch,
                                       context=context, tokens=tokens, copy_min_bytes=copy_min,
                                       default_trip_count=default_trip_count, mesh=mesh)
        return compiled[n]

    n = depths[0]
    try:
        for n in depths:
            compile_at(n)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as err:  # a kernel Mosaic rejects, an unsupported shape: report it
        over = re.search(r"\(([\d.]+)G\) exceeds available HBM", str(err))
        if over and len(depths) == 2 and depths[0] > 1 and n == depths[1]:
            depths = (depths[0] - 1, depths[0])  # N + 1 layers do not fit: use N - 1 and N
            result.layers_compiled = ",".join(map(str, depths))
            try:
                compile_at(depths[0])
                over = None
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as retry:
                err = retry
                over = re.search(r"\(([\d.]+)G\) exceeds available HBM", str(err))
        if depths[0] not in compiled or depths[-1] not in compiled:
            result.error = _one_line(err)
            if over:  # too big even at the compiled depth: needs at least that much
                result.hbm_needed_bytes = int(float(over.group(1)) * 2**30)
                result.error = f"does not fit at {n} layers: {result.error}"
            return result
    runs = [compiled[d] for d in depths]

    def at_depth(values: Sequence[float]) -> float:
        if len(values) == 1:
            return float(values[0])
        return values[0] + (depth - depths[0]) * (values[1] - values[0])

    last = runs[-1]
    result.compile_s = last.seconds
    result.hbm_needed_bytes = int(at_depth([c.memory_bytes for c in runs]))
    result.fits = result.hbm_needed_bytes <= chip.hbm_bytes
    try:  # the layer loop of the deepest compile, run `depth` times
        result.traffic_bytes = last.traffic.scaled_loop(depths[-1], depth)
    except ValueError:  # no loop of that trip count (e.g. XLA unrolled one layer)
        result.traffic_bytes = at_depth([c.traffic.total_bytes for c in runs])
    result.ratio = result.traffic_bytes / floor
    result.est_ms = 1e3 * result.traffic_bytes / chip.hbm_bandwidth
    result.copies = [
        {"op": s.op, "shape": s.shape, "bytes": s.bytes, "times": s.multiplier,
         "memory": s.memory, "name": s.name}
        for s in last.traffic.suspicious
    ]
    result.stack_ops_in_loop = sum(
        1 for c in last.traffic.suspicious
        if c.multiplier >= depths[-1] and _leading_dim(c.shape) == depths[-1])
    result.unknown_loops = sorted({u for c in runs for u in c.traffic.unknown_trip_loops})
    result.bounded_loops = sorted({u for c in runs for u in c.traffic.bounded_loops})
    result.kernels_without_cost = sorted(
        {k for c in runs for k in c.traffic.kernels_without_cost})
    result.gathers = last.gathers
    return result


# ---- CLI -------------------------------------------------------------------------------------
def _csv_list(choices: Sequence[str] | None = None) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list of {', '.join(choices or ())}")
        return items
    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixkvq_jax.tpu_aot",
                                description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="llama3-8b", choices=tuple(MODELS),
                     help="a named model shape (default llama3-8b)")
    src.add_argument("--ckpt", default=None,
                     help="a checkpoint directory: its config.json gives the shapes")
    p.add_argument("--topology", default="v5e:1x1",
                   help=f"TPU topology (default v5e:1x1; known: {', '.join(TOPOLOGIES)})")
    p.add_argument("--presets", type=_csv_list(), default=["bf16", "kivi2", "mixkvq"],
                   help="KV presets or preset YAML paths, comma-separated")
    p.add_argument("--impl", type=_csv_list(IMPLS), default=["auto"],
                   help="attention implementations, comma-separated (auto, xla, pallas)")
    p.add_argument("--steps", type=_csv_list(STEPS), default=list(STEPS),
                   help="step kinds: decode, prefill (default both)")
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--context", type=_positive, default=32768,
                   help="cache capacity in tokens per sequence")
    p.add_argument("--prefill-chunk", type=_positive, default=256,
                   help="tokens per sequence in the prefill step")
    p.add_argument("--layers", type=_positive, default=DEFAULT_LAYERS,
                   help="compile with N and N+1 layers and extrapolate to the model's depth")
    p.add_argument("--default-trip-count", type=_positive, default=1,
                   help="trip count of a loop whose count is not in the HLO (reported)")
    p.add_argument("--mesh", default="auto",
                   help="data=D,model=M over the topology's chips, as in the generate CLI; "
                        "auto: all chips on model (bytes are then per chip)")
    p.add_argument("--require-fit", action="store_true",
                   help="exit with an error if a step does not fit in HBM")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for CSV/markdown/png")
    p.add_argument("--tag", default=None,
                   help="output file stem suffix (default: the chip, plus the model when "
                        "it is not llama3-8b)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from mixkvq_jax import tpu_aot_report as report
    from mixkvq_jax.config import load_kv_config

    config = model_config(args.model, args.ckpt)
    name = Path(args.ckpt).name if args.ckpt else args.model
    for preset in args.presets:  # a bad preset fails before any compile
        load_kv_config(preset, config.head_dim)
    if "prefill" in args.steps and args.prefill_chunk > args.context:
        raise UserError(f"--prefill-chunk {args.prefill_chunk} is larger than --context "
                        f"{args.context}")
    from mixkvq_jax.mesh import MeshShape, check_mesh, choose_mesh, describe, parse_mesh

    devices = tpu_devices(args.topology)
    device = devices[0]
    chip = chip_of(device)
    mesh = None
    if len(devices) > 1:  # the mesh the generate CLI would use there, checked the same way
        shape = parse_mesh(args.mesh) or MeshShape(data=1)
        mesh = choose_mesh(shape, config, batch=args.batch, devices=devices)
        if mesh is not None:
            check_mesh(mesh, config, batch=args.batch)
        print(f"mesh: {describe(mesh)}", file=sys.stderr)
    rows = []
    for preset in args.presets:
        for impl in args.impl:
            for step in args.steps:
                print(f"[{preset} {impl} {step}]", file=sys.stderr, flush=True)
                row = measure(step, config, preset, device, impl=impl, batch=args.batch,
                              context=args.context, prefill_chunk=args.prefill_chunk,
                              layers=args.layers, model_name=name, topology=args.topology,
                              default_trip_count=args.default_trip_count, mesh=mesh)
                rows.append(row)
                print(report.summary_line(row), file=sys.stderr, flush=True)
    md = report.markdown(rows, chip)
    print(md)
    tag = args.tag or (chip.name if name == "llama3-8b" else f"{name}_{chip.name}")
    if mesh is not None and args.tag is None:
        tag += "_" + args.topology.split(":")[-1]
    stem = report.write(rows, md, args.out, tag)
    print(f"wrote {stem}.csv, .md, .png", file=sys.stderr)
    too_big = [r for r in rows if not r.fits and (r.hbm_needed_bytes or not r.error)]
    if args.require_fit and too_big:
        r = too_big[0]
        raise UserError(
            f"{r.model} {r.preset} {r.step} does not fit in {r.chip} HBM: needs "
            f"{r.hbm_needed_bytes / 2**30:.2f} GiB ({r.hbm_needed_bytes} bytes), available "
            f"{r.hbm_bytes / 2**30:.2f} GiB ({r.hbm_bytes} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
