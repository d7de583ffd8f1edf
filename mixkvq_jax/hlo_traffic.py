"""Estimate the device-memory (HBM) traffic of one execution of a compiled XLA program
from its optimized HLO text (``jax.jit(f).lower(...).compile().as_text()``).

``compiled.cost_analysis()`` cannot be used for this: it counts a loop body once (a scan
over 32 layers as one layer) and a Pallas kernel without a cost estimate as zero bytes.
This module walks the optimized program instead:

* **What counts.** Every top-level instruction of a non-fusion computation (the entry,
  loop bodies and conditions, conditional branches, called computations) that touches
  memory -- fusions, custom calls, copies, dots/convolutions, reduces, slices, scatters,
  gathers, collectives... -- reads its operands and writes its result: their bytes count,
  with the padding of the tiled layout (`mixkvq_jax.hlo_text.ArrayShape.bytes`). Buffers
  outside device memory (``S(1)``: TPU VMEM, semaphores, host) count 0. Free instructions
  (parameter, constant, tuple, get-tuple-element, bitcast, after-all, partition-id, ...)
  count 0; so do ``while`` / ``conditional`` / ``call`` themselves (their computations
  are walked instead) and the ``*-done`` half of async pairs.
* **Partial and in-place access.** A fusion whose root (or a root tuple element) is a
  ``dynamic-update-slice`` into a fusion parameter writes the update, not the buffer, and
  that parameter is not read; a fusion parameter used only through ``dynamic-slice`` /
  ``slice`` / ``gather`` (through bitcasts and nested fusions) reads the sliced bytes.
  The same holds for unfused ``dynamic-update-slice`` / ``dynamic-slice`` / ``slice`` /
  ``gather`` and for TPU's async ``slice-start``. A value that leaves a fusion (its root)
  counts whole.
* **Loops.** A ``while`` body runs ``n`` times and its condition ``n + 1`` times, ``n``
  from ``known_trip_count`` in the backend config (XLA:CPU/GPU print it) or, when absent
  (XLA:TPU), from the loop's pattern: the condition compares a counter (tuple element k)
  against a constant, the init tuple sets it to a constant, the body adds a constant. A
  loop whose bound is data-dependent (e.g. the blocks a sequence holds) is taken at its
  largest: the number of slices its body's ``dynamic-slice`` s take along a dim indexed
  by the counter (array dim / slice size; listed in `TrafficReport.bounded_loops`). A
  loop that matches none of these uses ``default_trip_count`` and is listed in
  `TrafficReport.unknown_trip_loops`. Nested loops multiply.
* **Conditionals** count their most expensive branch.
* **Pallas kernels** (``tpu_custom_call``) with a ``pl.CostEstimate`` count its
  ``bytes_accessed`` (what the kernel reads and writes: e.g. one layer of a stacked
  cache it receives whole) instead of their operand and result sizes; kernels without
  one count operands + results and are listed in `TrafficReport.kernels_without_cost`.

Blind spots (this is an estimate, not a simulator): a fusion is assumed to read each
operand once (a fusion that re-reads an operand, e.g. a gather that revisits rows, or
a kernel whose DMA re-fetches blocks, is undercounted); reads XLA satisfies from VMEM
via memory-space assignment count only their HBM side (the ``copy-start`` prefetch);
partial reads through anything but (dynamic-)slice/gather (e.g. a reduce over a
window, a select of a prefix) count the whole operand; a ``conditional`` counts its
costliest branch whatever branch runs; a Pallas ``CostEstimate`` is trusted as given.

`suspicious` lists cache-sized copies the caller should not see: top-level ``copy``,
``transpose``, ``dynamic-slice``, ``slice`` and ``slice-start``, and fusions whose root
(under bitcasts) is one of those, whose result is at least ``suspicious_min_bytes``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

from mixkvq_jax.hlo_text import (
    ArrayShape,
    Computation,
    Instruction,
    Module,
    parse_module,
    parse_shape,
)

FREE_OPCODES = frozenset({
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
    "partition-id", "replica-id", "add-dependency", "opt-barrier", "domain",
    "get-dimension-size", "set-dimension-size",
})
SLICING = frozenset({"dynamic-slice", "slice", "gather"})
SUSPICIOUS = frozenset({"copy", "transpose", "dynamic-slice", "slice", "slice-start"})
_COMPARE_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "EQ": "EQ", "NE": "NE"}


@dataclasses.dataclass(frozen=True)
class TrafficRow:
    """One counted instruction: ``bytes`` per execution, run ``multiplier`` times."""

    computation: str
    name: str
    opcode: str
    bytes: int
    multiplier: int
    shape: str
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.multiplier


@dataclasses.dataclass(frozen=True)
class SuspiciousOp:
    """A copy / transpose / slice of at least the caller's threshold."""

    computation: str
    name: str
    op: str  # opcode, or "fusion(<root opcode>)"
    shape: str
    bytes: int  # result bytes (tiled), whatever memory space
    multiplier: int
    memory: str  # "HBM" or "on-chip" (result memory space)


@dataclasses.dataclass
class TrafficReport:
    """HBM traffic of one execution; see the module docstring for the rules."""

    total_bytes: int
    rows: list[TrafficRow]
    suspicious: list[SuspiciousOp]
    unknown_trip_loops: list[str]
    kernels_with_cost: list[str]
    kernels_without_cost: list[str]
    loops: dict[str, int]  # while instruction name -> trip count used
    bounded_loops: list[str] = dataclasses.field(default_factory=list)
    # `while` instructions of the entry computation -> their bytes, all trips included
    entry_loops: dict[str, int] = dataclasses.field(default_factory=dict)

    def scaled_loop(self, trips: int, to: int) -> float:
        """Total bytes with the heaviest entry-level loop of ``trips`` trips (e.g. the
        layer scan of a model compiled at ``trips`` layers) run ``to`` times instead:
        the loop's bytes per trip times ``to``, the rest once. A model compiled with
        fewer layers than it has is measured this way; XLA's placement of whole
        stacks in on-chip memory at a small depth stays a one-off outside the loop."""
        candidates = [(b, name) for name, b in self.entry_loops.items()
                      if self.loops.get(name) == trips]
        if not candidates:
            raise ValueError(f"no entry-level loop of {trips} trips in this program")
        loop_bytes = max(candidates)[0]
        return self.total_bytes + loop_bytes * (to / trips - 1)

    def top(self, n: int = 10) -> list[TrafficRow]:
        """The ``n`` rows with the most bytes over all executions."""
        return sorted(self.rows, key=lambda r: -r.total_bytes)[:n]


def _hbm(leaves: Iterable[ArrayShape]) -> int:
    return sum(s.bytes for s in leaves if s.in_device_memory)


def _through_bitcasts(comp: Computation, name: str) -> Instruction | None:
    inst = comp.by_name.get(name)
    while inst is not None and inst.opcode in ("bitcast", "copy") and inst.operands:
        inst = comp.by_name.get(inst.operands[0])
    return inst


def _const_int(comp: Computation, name: str) -> int | None:
    inst = _through_bitcasts(comp, name)
    while inst is not None and inst.opcode == "convert" and inst.operands:
        inst = _through_bitcasts(comp, inst.operands[0])
    if inst is None or inst.opcode != "constant":
        return None
    try:
        return int(inst.operand_text.strip())
    except ValueError:
        return None


def _gte_index(comp: Computation, name: str) -> int | None:
    """k if ``name`` is (a bitcast of) get-tuple-element(parameter(0)), index=k."""
    inst = _through_bitcasts(comp, name)
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    source = comp.by_name.get(inst.operands[0]) if inst.operands else None
    if source is None or source.opcode != "parameter":
        return None
    match = inst.attrs.split("index=", 1)
    return int(match[1].split(",")[0].split()[0]) if len(match) == 2 else None


class _Walker:
    def __init__(self, module: Module, default_trip_count: int,
                 suspicious_min_bytes: int | None, bounded_trip_count: int | None = None
                 ) -> None:
        self.module = module
        self.default_trip_count = default_trip_count
        self.bounded_trip_count = bounded_trip_count
        self.min_bytes = suspicious_min_bytes
        self.rows: list[TrafficRow] = []
        self.suspicious: list[SuspiciousOp] = []
        self.unknown: list[str] = []
        self.with_cost: list[str] = []
        self.without_cost: list[str] = []
        self.loops: dict[str, int] = {}
        self.bounded: list[str] = []
        self.entry_loops: dict[str, int] = {}

    # ---- loops ---------------------------------------------------------------------------
    def trip_count(self, comp: Computation, inst: Instruction) -> int | None:
        known = inst.backend_config.get("known_trip_count")
        if isinstance(known, dict) and "n" in known:
            return int(known["n"])
        cond = self.module.computations.get(next(iter(inst.called("condition")), ""))
        body = self.module.computations.get(next(iter(inst.called("body")), ""))
        if cond is None or body is None or cond.root is None or body.root is None:
            return None
        root = cond.root
        if root.opcode != "compare" or len(root.operands) != 2:
            return None
        direction = root.attrs.split("direction=", 1)[-1][:2]
        k, bound = _gte_index(cond, root.operands[0]), _const_int(cond, root.operands[1])
        if k is None:
            k, bound = _gte_index(cond, root.operands[1]), _const_int(cond, root.operands[0])
            direction = _COMPARE_FLIP.get(direction, "")
        if k is None or bound is None or not inst.operands:
            return None
        init_tuple = _through_bitcasts(comp, inst.operands[0])
        if init_tuple is None or init_tuple.opcode != "tuple" or k >= len(init_tuple.operands):
            return None
        start = _const_int(comp, init_tuple.operands[k])
        if body.root.opcode != "tuple" or k >= len(body.root.operands):
            return None
        step_inst = _through_bitcasts(body, body.root.operands[k])
        if start is None or step_inst is None or step_inst.opcode != "add":
            return None
        a, b = step_inst.operands[:2]
        step = _const_int(body, b) if _gte_index(body, a) == k else (
            _const_int(body, a) if _gte_index(body, b) == k else None)
        if not step:
            return None
        if direction == "LT" and step > 0:
            return max(0, math.ceil((bound - start) / step))
        if direction == "LE" and step > 0:
            return max(0, math.ceil((bound + 1 - start) / step))
        if direction == "GT" and step < 0:
            return max(0, math.ceil((start - bound) / -step))
        if direction == "GE" and step < 0:
            return max(0, math.ceil((start - bound + 1) / -step))
        return None

    def _counter_index(self, inst: Instruction) -> int | None:
        """The tuple index of the counter the loop's condition compares."""
        cond = self.module.computations.get(next(iter(inst.called("condition")), ""))
        if cond is None or cond.root is None or cond.root.opcode != "compare":
            return None
        for operand in cond.root.operands:
            k = _gte_index(cond, operand)
            if k is not None:
                return k
        return None

    def slice_bound(self, inst: Instruction) -> int | None:
        """Trip count of a loop whose count is data-dependent (e.g. the blocks a sequence
        holds), taken at its largest: the most slices its body's dynamic-slices can take
        along a dim indexed by the loop counter (array dim / slice size)."""
        body = self.module.computations.get(next(iter(inst.called("body")), ""))
        k = self._counter_index(inst)
        if body is None or k is None:
            return None
        memo: dict[str, bool] = {}

        def depends(name: str) -> bool:
            if name not in memo:
                memo[name] = False
                x = body.by_name.get(name)
                memo[name] = x is not None and (
                    _gte_index(body, name) == k
                    or (x.opcode != "parameter" and any(depends(o) for o in x.operands)))
            return memo[name]

        bounds = self._slice_counts(body, depends)
        return max(bounds) if bounds else None

    def _slice_counts(self, comp: Computation, depends: Callable[[str], bool],
                      depth: int = 0) -> list[int]:
        counts: list[int] = []
        for x in comp.instructions:
            if x.opcode == "dynamic-slice" and x.operands:
                array = comp.by_name.get(x.operands[0])
                if array is None or len(array.leaves) != 1 or len(x.leaves) != 1:
                    continue
                for d, (full, part) in enumerate(zip(array.leaves[0].dims, x.leaves[0].dims,
                                                     strict=False)):
                    if part < full and d + 1 < len(x.operands) and depends(x.operands[d + 1]):
                        counts.append(-(-full // max(part, 1)))
            elif x.opcode == "fusion" and depth < 4:
                fused = self.module.computations.get(next(iter(x.called("calls")), ""))
                if fused is None:
                    continue
                memo: dict[str, bool] = {}

                def inner(name: str, fused: Computation = fused, x: Instruction = x,
                          memo: dict[str, bool] = memo) -> bool:
                    if name not in memo:
                        memo[name] = False
                        y = fused.by_name.get(name)
                        if y is None:
                            return False
                        if y.opcode == "parameter":
                            j = int(y.operand_text.strip() or -1)
                            memo[name] = 0 <= j < len(x.operands) and depends(x.operands[j])
                        else:
                            memo[name] = any(inner(o) for o in y.operands)
                    return memo[name]

                counts += self._slice_counts(fused, inner, depth + 1)
        return counts

    # ---- instruction costs ---------------------------------------------------------------
    def operand_leaves(self, comp: Computation, inst: Instruction, index: int
                       ) -> tuple[ArrayShape, ...]:
        source = comp.by_name.get(inst.operands[index]) if index < len(inst.operands) else None
        return source.leaves if source is not None else ()

    def param_read(self, fused: Computation, name: str, full: int) -> int:
        """Bytes a fusion reads of the parameter (or value) ``name``: the sliced bytes when
        it is used only through slices, 0 when only updated in place, else ``full``."""
        root = fused.root
        if root is not None and (name == root.name or (root.opcode == "tuple"
                                                       and name in root.operands)):
            return full  # the value leaves the computation: its consumer reads it all
        total = 0
        for user, index in fused.users.get(name, []):
            if user.opcode == "bitcast" or user.opcode == "get-tuple-element":
                total += self.param_read(fused, user.name, full)
            elif user.opcode in SLICING and index == 0:  # reads the slice, wherever it goes
                total += sum(x.bytes for x in user.leaves)
            elif user.opcode == "dynamic-update-slice" and index == 0:
                continue
            elif user.opcode == "fusion" and self._nested_param(user, index) is not None:
                nested, param = self._nested_param(user, index)  # type: ignore[misc]
                total += self.param_read(nested, param.name, full)
            else:
                return full
            if total >= full:
                return full
        return total

    def _nested_param(self, fusion: Instruction, index: int
                      ) -> tuple[Computation, Instruction] | None:
        nested = self.module.computations.get(next(iter(fusion.called("calls")), ""))
        param = None if nested is None else nested.parameter(index)
        return None if nested is None or param is None else (nested, param)

    def fusion_bytes(self, comp: Computation, inst: Instruction) -> tuple[int, str]:
        fused = self.module.computations.get(next(iter(inst.called("calls")), ""))
        if fused is None or fused.root is None:
            return self.plain_bytes(comp, inst), ""
        total, notes = 0, []
        for i in range(len(inst.operands)):
            leaves = self.operand_leaves(comp, inst, i)
            if not any(s.in_device_memory for s in leaves):
                continue
            full = _hbm(leaves)
            param = fused.parameter(i)
            read = full if param is None else self.param_read(fused, param.name, full)
            if read < full:
                notes.append(f"param {i}: {read} of {full} B")
            total += read
        root = fused.root
        outputs = root.operands if root.opcode == "tuple" else (root.name,)
        result = inst.leaves
        for j, out_name in enumerate(outputs):
            if j >= len(result) or not result[j].in_device_memory:
                continue
            out = _through_bitcasts(fused, out_name)
            if out is not None and out.opcode == "dynamic-update-slice":
                target = _through_bitcasts(fused, out.operands[0])
                if target is not None and target.opcode == "parameter":
                    update = fused.by_name.get(out.operands[1])
                    written = _hbm(update.leaves) if update is not None else result[j].bytes
                    notes.append(f"in-place update: {written} of {result[j].bytes} B")
                    total += written
                    continue
            total += result[j].bytes
        return total, "; ".join(notes)

    def plain_bytes(self, comp: Computation, inst: Instruction) -> int:
        return sum(_hbm(self.operand_leaves(comp, inst, i))
                   for i in range(len(inst.operands))) + _hbm(inst.leaves)

    def cost(self, comp: Computation, inst: Instruction) -> tuple[int, str]:
        """(HBM bytes of one execution of ``inst``, note)."""
        op = inst.opcode
        if op == "fusion":
            return self.fusion_bytes(comp, inst)
        if op == "custom-call" and inst.custom_call_target == "tpu_custom_call":
            estimate = _find_key(inst.backend_config, "cost_estimate")
            if isinstance(estimate, dict) and "bytes_accessed" in estimate:
                self.with_cost.append(inst.name)
                return int(estimate["bytes_accessed"]), "Pallas CostEstimate.bytes_accessed"
            self.without_cost.append(inst.name)
            return self.plain_bytes(comp, inst), "Pallas kernel without CostEstimate"
        if op == "dynamic-update-slice":
            update = _hbm(self.operand_leaves(comp, inst, 1))
            rest = sum(_hbm(self.operand_leaves(comp, inst, i))
                       for i in range(2, len(inst.operands)))
            return 2 * update + rest, "in-place update"
        if op in SLICING:
            base = self.operand_leaves(comp, inst, 0)
            read = (sum(x.bytes for x in inst.leaves)
                    if any(x.in_device_memory for x in base) else 0)
            rest = sum(_hbm(self.operand_leaves(comp, inst, i))
                       for i in range(1, len(inst.operands)))
            return read + _hbm(inst.leaves) + rest, ""
        if op == "copy-start":
            dest = inst.leaves[:1]
            return _hbm(self.operand_leaves(comp, inst, 0)) + _hbm(dest), ""
        if op == "slice-start":
            sliced = inst.leaves[-2:-1]  # ((operand), slice, context)
            read = (sum(s.bytes for s in sliced)
                    if any(s.in_device_memory for s in self.operand_leaves(comp, inst, 0))
                    else 0)
            return read + _hbm(sliced), ""
        return self.plain_bytes(comp, inst), ""

    # ---- suspicious ops ------------------------------------------------------------------
    def check_suspicious(self, comp: Computation, inst: Instruction, multiplier: int) -> None:
        if self.min_bytes is None:
            return
        op = inst.opcode
        label = op
        if op == "fusion":
            fused = self.module.computations.get(next(iter(inst.called("calls")), ""))
            root = None if fused is None or fused.root is None else fused.root
            while root is not None and root.opcode == "bitcast" and root.operands:
                root = fused.by_name.get(root.operands[0]) if fused else None
            if root is None or root.opcode not in SUSPICIOUS:
                return
            label = f"fusion({root.opcode})"
        elif op not in SUSPICIOUS:
            return
        leaves = inst.leaves[-2:-1] if op == "slice-start" else inst.leaves
        size = sum(s.bytes for s in leaves)
        if size >= self.min_bytes:
            memory = "HBM" if any(s.in_device_memory for s in leaves) else "on-chip"
            self.suspicious.append(SuspiciousOp(comp.name, inst.name, label, inst.shape, size,
                                                multiplier, memory))

    # ---- walking -------------------------------------------------------------------------
    def walk(self, name: str, multiplier: int) -> int:
        comp = self.module.computations[name]
        total = 0
        for inst in comp.instructions:
            total += self.visit(comp, inst, multiplier)
        return total

    def visit(self, comp: Computation, inst: Instruction, multiplier: int) -> int:
        op = inst.opcode
        if op in FREE_OPCODES or op.endswith(("-done", "-update")):
            return 0
        if op == "while":
            n = self.trip_count(comp, inst)
            if n is None:
                n = self.slice_bound(inst)
                if n is not None:
                    self.bounded.append(f"{comp.name}/{inst.name}")
                    if self.bounded_trip_count is not None:
                        n = min(n, self.bounded_trip_count)
            if n is None:
                n = self.default_trip_count
                self.unknown.append(f"{comp.name}/{inst.name}")
            self.loops[inst.name] = n
            body = self.walk(inst.called("body")[0], multiplier * n)
            cond = self.walk(inst.called("condition")[0], multiplier * (n + 1))
            if comp.name == self.module.entry:
                self.entry_loops[inst.name] = body + cond
            return body + cond
        if op == "conditional":
            branches = (inst.called("branch_computations")
                        or inst.called("true_computation") + inst.called("false_computation"))
            best: tuple[int, list[TrafficRow], list[SuspiciousOp]] | None = None
            for branch in branches:
                rows, sus = self.rows, self.suspicious
                self.rows, self.suspicious = [], []
                cost = self.walk(branch, multiplier)
                if best is None or cost > best[0]:
                    best = (cost, self.rows, self.suspicious)
                self.rows, self.suspicious = rows, sus
            if best is None:
                return 0
            self.rows += best[1]
            self.suspicious += best[2]
            return best[0]
        if op == "call" or (op == "async-start" and inst.called("calls")):
            called = inst.called("to_apply") or inst.called("calls")
            return sum(self.walk(c, multiplier) for c in called)
        self.check_suspicious(comp, inst, multiplier)
        bytes_, note = self.cost(comp, inst)
        if bytes_:
            label = f"fusion:{inst.fusion_kind}" if op == "fusion" else op
            if op == "custom-call":
                label = f"custom-call:{inst.custom_call_target}"
            self.rows.append(TrafficRow(comp.name, inst.name, label, bytes_, multiplier,
                                        inst.shape, note))
        return bytes_ * multiplier


def _find_key(tree: object, key: str) -> object:
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def estimate_traffic(hlo: str | Module, *, default_trip_count: int = 1,
                     suspicious_min_bytes: int | None = None,
                     bounded_trip_count: int | None = None) -> TrafficReport:
    """HBM bytes one execution of the program moves (see the module docstring).

    Args:
      hlo: optimized HLO text (``compiled.as_text()``) or a parsed `Module`.
      default_trip_count: trip count of a loop whose count cannot be found (such loops
        are listed in ``unknown_trip_loops``).
      suspicious_min_bytes: list copies / transposes / slices whose result has at least
        this many bytes (None: list none).
      bounded_trip_count: take a loop whose count is data-dependent at this many trips
        (at most its bound) instead of its bound: a step's typical case where the bound
        is a rare worst case (e.g. the serving engine's decode step, whose window-flush
        loops run once per sequence whose window fills: usually none or one).
    """
    module = parse_module(hlo) if isinstance(hlo, str) else hlo
    walker = _Walker(module, default_trip_count, suspicious_min_bytes, bounded_trip_count)
    total = walker.walk(module.entry, 1)
    return TrafficReport(total, walker.rows, walker.suspicious, walker.unknown,
                         walker.with_cost, walker.without_cost, walker.loops, walker.bounded,
                         walker.entry_loops)


__all__ = ["SuspiciousOp", "TrafficReport", "TrafficRow", "estimate_traffic", "parse_shape"]
