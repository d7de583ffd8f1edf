"""`mixkvq_jax.hlo_traffic`: HBM traffic from optimized HLO text (hand-written snippets in
the format XLA:TPU prints, and small programs compiled for the CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mixkvq_jax.hlo_text import parse_module, parse_shape, shape_bytes
from mixkvq_jax.hlo_traffic import estimate_traffic


# ---- shapes and layouts ----------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    # minor dim 8 -> 128 lanes, second-minor 256 stays: 2*8*3*256*128 words
    ("u32[2,8,3,256,8]{4,3,2,1,0:T(8,128)}", 2 * 8 * 3 * 256 * 128 * 4),
    # the same array with the 256-long dim minor in memory: no padding
    ("u32[2,8,3,256,8]{3,4,2,1,0:T(8,128)}", 2 * 8 * 3 * 256 * 8 * 4),
    # bf16 pairs sub-tiled (2,1): 3 rows pad to 8, 100 lanes to 128
    ("bf16[3,100]{1,0:T(8,128)(2,1)}", 8 * 128 * 2),
    ("bf16[40,128]{1,0:T(16,128)(2,1)}", 48 * 128 * 2),
    ("bf16[2,8,2,16,128,4]{4,5,3,2,1,0:T(4,128)(2,1)}", 2 * 8 * 2 * 16 * 4 * 128 * 2),
    ("s32[8]{0:T(128)}", 128 * 4),
    ("pred[8]{0:T(512)(128)(4,1)}", 512),
    ("f32[3,5]{1,0}", 60),  # no tiling: logical bytes
    ("f32[3,5]", 60),
    ("s4[256]{0:T(1024)E(4)}", 512),
    ("(f32[4]{0}, bf16[2,2]{1,0})", 16 + 8),
    ("f32[2,0,128]{2,1,0:T(8,128)}", 0),
])
def test_tiled_sizes(text: str, expected: int) -> None:
    assert shape_bytes(text) == expected


def test_memory_space_is_parsed() -> None:
    (vmem,) = parse_shape("bf16[8,256]{1,0:T(8,128)(2,1)S(1)}")
    (hbm,) = parse_shape("bf16[8,256]{1,0:T(8,128)(2,1)}")
    assert vmem.memory_space == 1 and not vmem.in_device_memory
    assert hbm.in_device_memory and vmem.bytes == hbm.bytes == 8 * 256 * 2
    assert shape_bytes("(f32[128]{0:T(128)S(1)}, f32[128]{0:T(128)})",
                       device_memory_only=True) == 512


# ---- hand-written modules --------------------------------------------------------------------
LOOP = """HloModule loop, is_scheduled=true

%body (p: (s32[], f32[64,128], f32[4,64,128])) -> (s32[], f32[64,128], f32[4,64,128]) {
  %p = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}, f32[4,64,128]{2,1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %h = f32[64,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %w = f32[4,64,128]{2,1,0:T(8,128)} get-tuple-element(%p), index=2
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %h2 = f32[64,128]{1,0:T(8,128)} tanh(%h)
  ROOT %t = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}, f32[4,64,128]{2,1,0:T(8,128)}) tuple(%next, %h2, %w)
}

%cond (c: (s32[], f32[64,128], f32[4,64,128])) -> pred[] {
  %c = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}, f32[4,64,128]{2,1,0:T(8,128)}) parameter(0)
  %n = s32[]{:T(128)} constant(TRIPS)
  %j = s32[]{:T(128)} get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %n), direction=LT
}

ENTRY %main (x: f32[64,128], w: f32[4,64,128]) -> f32[64,128] {
  %x = f32[64,128]{1,0:T(8,128)} parameter(0)
  %w = f32[4,64,128]{2,1,0:T(8,128)} parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %z = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}, f32[4,64,128]{2,1,0:T(8,128)}) tuple(%z, %x, %w)
  %loop = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}, f32[4,64,128]{2,1,0:T(8,128)}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[64,128]{1,0:T(8,128)} get-tuple-element(%loop), index=1
}
"""  # noqa: E501 (HLO lines as XLA prints them)
TANH = 2 * 64 * 128 * 4  # one tanh: read + write


def test_while_trip_count_from_the_loop_pattern() -> None:
    report = estimate_traffic(LOOP.replace("TRIPS", "7"))
    assert report.loops == {"loop": 7} and report.unknown_trip_loops == []
    (row,) = [r for r in report.rows if r.name == "h2"]
    assert row.multiplier == 7 and row.bytes == TANH
    # scalars occupy a 128-word tile: the add runs 7 times, the compare of the
    # condition 8 times, the copy of the init constant once
    assert report.total_bytes == 7 * TANH + 7 * 3 * 512 + 8 * 3 * 512 + 2 * 512


def test_while_known_trip_count_and_unknown_default() -> None:
    known = LOOP.replace("TRIPS", "7").replace(
        "body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"3"}}')
    assert estimate_traffic(known).loops == {"loop": 3}
    unknown = LOOP.replace("%n = s32[]{:T(128)} constant(TRIPS)",
                           "%n = s32[]{:T(128)} get-tuple-element(%c), index=0")
    report = estimate_traffic(unknown, default_trip_count=5)
    assert report.loops == {"loop": 5} and report.unknown_trip_loops == ["main/loop"]


def test_data_dependent_loop_is_bounded_by_its_slices() -> None:
    """A loop over the blocks a sequence holds (bound carried in the loop) is taken at its
    largest: the body slices 1 of 4 rows of w by the counter, so at most 4 trips."""
    text = LOOP.replace("%n = s32[]{:T(128)} constant(TRIPS)",
                        "%n = s32[]{:T(128)} get-tuple-element(%c), index=0").replace(
        "  %h2 = f32[64,128]{1,0:T(8,128)} tanh(%h)\n",
        "  %z0 = s32[]{:T(128)} constant(0)\n"
        "  %wi = f32[1,64,128]{2,1,0:T(8,128)} dynamic-slice(%w, %i, %z0, %z0), "
        "dynamic_slice_sizes={1,64,128}\n"
        "  %h2 = f32[64,128]{1,0:T(8,128)} tanh(%h)\n")
    report = estimate_traffic(text, default_trip_count=1)
    assert report.loops == {"loop": 4} and report.bounded_loops == ["main/loop"]
    assert report.unknown_trip_loops == []
    (row,) = [r for r in report.rows if r.name == "wi"]
    assert row.multiplier == 4 and row.bytes == 2 * 64 * 128 * 4 + 3 * 512  # + 3 indices
    # the typical case instead of the bound (e.g. one window flush per serving step)
    once = estimate_traffic(text, bounded_trip_count=1)
    assert once.loops == {"loop": 1} and once.bounded_loops == ["main/loop"]
    (row,) = [r for r in once.rows if r.name == "wi"]
    assert row.multiplier == 1 and once.total_bytes < report.total_bytes


STACK = "f32[4,64,128]{2,1,0:T(8,128)}"
LAYER = 64 * 128 * 4
DUS_AND_SLICE = f"""HloModule parts, is_scheduled=true

%update (param_0: f32[4,64,128], param_1: f32[1,8,128], param_2: s32[]) -> f32[4,64,128] {{
  %param_0 = {STACK} parameter(0)
  %param_1 = f32[1,8,128]{{2,1,0:T(8,128)}} parameter(1)
  %param_2 = s32[]{{:T(128)}} parameter(2)
  %zero = s32[]{{:T(128)}} constant(0)
  ROOT %dus = {STACK} dynamic-update-slice(%param_0, %param_1, %param_2, %zero, %zero)
}}

%take (param_0.1: f32[4,64,128], param_1.1: s32[]) -> f32[64,128] {{
  %param_0.1 = {STACK} parameter(0)
  %param_1.1 = s32[]{{:T(128)}} parameter(1)
  %zero.1 = s32[]{{:T(128)}} constant(0)
  %ds = f32[1,64,128]{{2,1,0:T(8,128)}} dynamic-slice(%param_0.1, %param_1.1, %zero.1, %zero.1), dynamic_slice_sizes={{1,64,128}}
  ROOT %b = f32[64,128]{{1,0:T(8,128)}} bitcast(%ds)
}}

%scale (param_0.2: f32[4,64,128]) -> f32[4,64,128] {{
  %param_0.2 = {STACK} parameter(0)
  ROOT %neg = {STACK} negate(%param_0.2)
}}

ENTRY %main (s: f32[4,64,128], u: f32[1,8,128], i: s32[]) -> (f32[4,64,128], f32[64,128], f32[128,64]) {{
  %s = {STACK} parameter(0)
  %u = f32[1,8,128]{{2,1,0:T(8,128)}} parameter(1)
  %i = s32[]{{:T(128)}} parameter(2)
  %new = {STACK} fusion(%s, %u, %i), kind=kLoop, calls=%update
  %layer = f32[64,128]{{1,0:T(8,128)}} fusion(%new, %i), kind=kLoop, calls=%take
  %t = f32[128,64]{{1,0:T(8,128)}} transpose(%layer), dimensions={{1,0}}
  %whole = {STACK} fusion(%new), kind=kLoop, calls=%scale
  ROOT %out = ({STACK}, f32[64,128]{{1,0:T(8,128)}}, f32[128,64]{{1,0:T(8,128)}}) tuple(%whole, %layer, %t)
}}
"""  # noqa: E501


def test_a_slice_into_vmem_reads_hbm() -> None:
    """A dynamic-slice fusion whose result lands in VMEM (S(1)) still reads its slice."""
    text = DUS_AND_SLICE.replace(
        "%ds = f32[1,64,128]{2,1,0:T(8,128)}", "%ds = f32[1,64,128]{2,1,0:T(8,128)S(1)}"
    ).replace("%layer = f32[64,128]{1,0:T(8,128)} fusion",
              "%layer = f32[64,128]{1,0:T(8,128)S(1)} fusion")
    rows = {r.name: r for r in estimate_traffic(text).rows}
    assert rows["layer"].bytes == LAYER + 512  # the slice read, no HBM write


def test_in_place_update_and_sliced_reads() -> None:
    report = estimate_traffic(DUS_AND_SLICE, suspicious_min_bytes=LAYER // 4)
    rows = {r.name: r for r in report.rows}
    update = 8 * 128 * 4
    # DUS fusion: reads the update (and the index), writes the update; not the stack
    assert rows["new"].bytes == update + 512 + update
    # dynamic-slice fusion: reads one layer of the stack, writes it
    assert rows["layer"].bytes == LAYER + 512 + LAYER
    assert rows["t"].bytes == LAYER + 128 * 128 * 4  # the result's 64 lanes pad to 128
    # an elementwise fusion over the stack reads and writes all of it
    assert rows["whole"].bytes == 2 * 4 * LAYER
    assert report.total_bytes == sum(r.bytes for r in report.rows)
    listed = {(s.name, s.op) for s in report.suspicious}
    assert listed == {("layer", "fusion(dynamic-slice)"), ("t", "transpose")}
    assert estimate_traffic(DUS_AND_SLICE, suspicious_min_bytes=2 * LAYER + 1).suspicious == []


KERNEL = """HloModule kernel, is_scheduled=true

%on_true (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0:T(1024)} parameter(0)
  ROOT %ea = f32[1024]{0:T(1024)} exponential(%a)
}

%on_false (b: f32[1024]) -> f32[1024] {
  %b = f32[1024]{0:T(1024)} parameter(0)
  %eb = f32[1024]{0:T(1024)} exponential(%b)
  ROOT %lb = f32[1024]{0:T(1024)} log(%eb)
}

ENTRY %main (x: f32[16,64,128], q: f32[8,128], p: pred[], v: f32[1024]) -> (f32[8,128], f32[8,128], f32[1024]) {
  %x = f32[16,64,128]{2,1,0:T(8,128)} parameter(0)
  %q = f32[8,128]{1,0:T(8,128)} parameter(1)
  %p = pred[]{:T(512)} parameter(2)
  %v = f32[1024]{0:T(1024)} parameter(3)
  %with = f32[8,128]{1,0:T(8,128)} custom-call(%q, %x), custom_call_target="tpu_custom_call", backend_config={"flag_configs":[],"custom_call_config":{"body":"TUzvUg==","cost_estimate":{"flops":"1","transcendentals":"0","bytes_accessed":"40960","remote_bytes_transferred":"0"},"needs_layout_passes":true}}
  %without = f32[8,128]{1,0:T(8,128)} custom-call(%q, %x), custom_call_target="tpu_custom_call", backend_config={"flag_configs":[],"custom_call_config":{"body":"TUzvUg=="}}
  %vmem = f32[16,64,128]{2,1,0:T(8,128)S(1)} copy(%x)
  %branch = f32[1024]{0:T(1024)} conditional(%p, %v, %v), true_computation=%on_true, false_computation=%on_false
  ROOT %out = (f32[8,128]{1,0:T(8,128)}, f32[8,128]{1,0:T(8,128)}, f32[1024]{0:T(1024)}) tuple(%with, %without, %branch)
}
"""  # noqa: E501


def test_pallas_cost_estimate_conditional_and_copies() -> None:
    report = estimate_traffic(KERNEL, suspicious_min_bytes=2**18)
    rows = {r.name: r for r in report.rows}
    stack, q = 16 * 64 * 128 * 4, 8 * 128 * 4
    assert rows["with"].bytes == 40960  # the kernel's own estimate
    assert rows["without"].bytes == q + stack + q  # operands + result
    assert report.kernels_with_cost == ["with"] and report.kernels_without_cost == ["without"]
    assert rows["vmem"].bytes == stack  # HBM read only: the result is in VMEM
    assert {r.name for r in report.rows} >= {"eb", "lb"} and "ea" not in rows  # costlier branch
    assert rows["eb"].bytes == rows["lb"].bytes == 2 * 4096
    (copy,) = report.suspicious
    assert (copy.name, copy.op, copy.bytes, copy.memory) == ("vmem", "copy", stack, "on-chip")


def test_parser_reads_tuple_shapes_and_called_computations() -> None:
    module = parse_module(LOOP.replace("TRIPS", "2"))
    assert module.entry == "main" and set(module.computations) == {"body", "cond", "main"}
    loop = module.computations["main"].by_name["loop"]
    assert loop.opcode == "while" and loop.operands == ("init",)
    assert loop.called("body") == ("body",) and loop.called("condition") == ("cond",)
    assert len(loop.leaves) == 3


# ---- programs compiled for the CPU -----------------------------------------------------------
def _compiled_text(fn, *args, donate: tuple[int, ...] = ()) -> str:  # noqa: ANN001
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text()


def test_cpu_scan_counts_every_iteration() -> None:
    steps, d = 6, 256

    def f(w: jax.Array, x: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    text = _compiled_text(f, jax.ShapeDtypeStruct((steps, d, d), jnp.float32),
                          jax.ShapeDtypeStruct((8, d), jnp.float32))
    report = estimate_traffic(text)
    assert list(report.loops.values()) == [steps] and report.unknown_trip_loops == []
    matrix = d * d * 4
    # XLA:CPU slices each matrix out of the stack (read + write one matrix, not the
    # stack), then the dot reads it: about 3 matrices per iteration, every iteration
    (sliced,) = [r for r in report.rows if "dynamic-slice" in r.name]
    assert sliced.multiplier == steps and 2 * matrix <= sliced.bytes <= 2 * matrix + 64
    assert 2 * steps * matrix <= report.total_bytes <= 4 * steps * matrix


def test_cpu_in_place_update_of_a_donated_buffer() -> None:
    n = 1 << 20

    def f(buf: jax.Array, row: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(buf, row, (i, 0))

    text = _compiled_text(f, jax.ShapeDtypeStruct((n // 256, 256), jnp.float32),
                          jax.ShapeDtypeStruct((1, 256), jnp.float32),
                          jax.ShapeDtypeStruct((), jnp.int32), donate=(0,))
    report = estimate_traffic(text)
    assert 0 < report.total_bytes <= 4 * 256 * 4 + 64  # the row, not the 4 MiB buffer


def test_cpu_transpose_is_listed() -> None:
    def f(x: jax.Array) -> jax.Array:
        return x.T + 1.0

    text = _compiled_text(f, jax.ShapeDtypeStruct((512, 256), jnp.float32))
    report = estimate_traffic(text, suspicious_min_bytes=256 * 1024)
    assert report.total_bytes == 2 * 512 * 256 * 4
    report = estimate_traffic(_compiled_text(lambda x: x.T.copy() * 1, jax.ShapeDtypeStruct(
        (512, 256), jnp.float32)), suspicious_min_bytes=256 * 1024)
    assert report.total_bytes >= 2 * 512 * 256 * 4
