"""A small parser for XLA's optimized HLO text (``compiled.as_text()``): computations,
instructions, shapes with their layouts, and the bytes a buffer occupies.

Only what `mixkvq_jax.hlo_traffic` needs is parsed: per instruction its name, result
shape, opcode, operand names, called computations, fusion kind, custom-call target and
``backend_config`` (as JSON when it is JSON). Shapes keep their layout, so a buffer's size
includes the padding of its tiled layout on TPU:

* ``u32[2,8,3,256,8]{4,3,2,1,0:T(8,128)}``: dims in physical order (major to minor, from
  the minor-to-major list) are padded so that the minor-most dims are multiples of the
  first tile (8 rows x 128 lanes); later tiles (``(2,1)`` packs bf16 pairs) tile the tile;
  ``T(*,128)``-style ``*`` entries combine dims and pad nothing.
* ``S(n)``: memory space; 0 (or none) is device memory (HBM on TPU), 1 is on-chip VMEM.
* ``E(n)``: element size in bits (sub-byte types).
A shape with no tiling counts its logical bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any

# Bits per element of each HLO primitive type (pred is a byte on every backend).
ELEMENT_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8,
    "f8e5m2fnuz": 8, "f8e4m3": 8, "f8e3m4": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4,
    "token": 0, "opaque": 0,
}

_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?")
_TILES = re.compile(r"T((?:\([^)]*\))+)")
_GROUP = re.compile(r"\(([^)]*)\)")
_NAME = re.compile(r"%([\w.\-]+)")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")


@dataclasses.dataclass(frozen=True)
class ArrayShape:
    """One array buffer: dtype, logical dims, layout (minor-to-major), tiles, memory space."""

    dtype: str
    dims: tuple[int, ...]
    minor_to_major: tuple[int, ...] = ()
    tiles: tuple[tuple[int | None, ...], ...] = ()
    memory_space: int = 0
    element_bits: int | None = None

    @property
    def bits(self) -> int:
        if self.element_bits is not None:
            return self.element_bits
        if self.dtype not in ELEMENT_BITS:
            raise ValueError(f"unknown HLO element type {self.dtype!r}")
        return ELEMENT_BITS[self.dtype]

    @property
    def logical_bytes(self) -> int:
        return math.ceil(math.prod(self.dims) * self.bits / 8)

    @property
    def physical_dims(self) -> tuple[int, ...]:
        """Dims from major to minor in memory."""
        if len(self.minor_to_major) != len(self.dims):
            return self.dims
        return tuple(self.dims[i] for i in reversed(self.minor_to_major))

    @property
    def bytes(self) -> int:
        """Bytes of the buffer with the padding of its tiled layout."""
        if not self.tiles or not self.dims:
            elements = math.prod(self.dims) if self.dims else 1
            if self.tiles:  # a tiled scalar occupies one padded tile
                elements = _tiled_elements((1,), self.tiles)
            return math.ceil(elements * self.bits / 8)
        return math.ceil(_tiled_elements(self.physical_dims, self.tiles) * self.bits / 8)

    @property
    def in_device_memory(self) -> bool:
        """True for HBM (memory space 0); VMEM (1), semaphores, host memory are not."""
        return self.memory_space == 0


def _tiled_elements(dims: tuple[int, ...], tiles: tuple[tuple[int | None, ...], ...]) -> int:
    """Elements (padding included) of ``dims`` (physical order) laid out in ``tiles``.

    Each tile splits the minor dims of the shape so far into (tile counts, tile dims),
    padding them to whole tiles; the next tile applies to that tiled shape (so
    ``T(512)(128)(4,1)`` pads a pred[8] to 512 bytes, not more)."""
    shape = list(dims)
    for tile in tiles:
        shape = [1] * max(0, len(tile) - len(shape)) + shape
        k = len(tile)
        lead, minor = shape[: len(shape) - k], shape[len(shape) - k:]
        sizes = [d if t is None else t for d, t in zip(minor, tile, strict=True)]
        counts = [-(-d // t) if t else 1 for d, t in zip(minor, sizes, strict=True)]
        shape = lead + counts + sizes
    return math.prod(shape)


def _parse_layout(text: str) -> tuple[tuple[int, ...], tuple[tuple[int | None, ...], ...],
                                      int, int | None]:
    body = text[1:-1]
    order_text, _, extras = body.partition(":")
    order = tuple(int(x) for x in order_text.split(",") if x.strip())
    tiles: tuple[tuple[int | None, ...], ...] = ()
    match = _TILES.search(extras)
    if match:
        tiles = tuple(
            tuple(None if x.strip() == "*" else int(x) for x in group.split(",") if x.strip())
            for group in _GROUP.findall(match.group(1))
        )
        extras = extras[: match.start()] + extras[match.end():]
    space = re.search(r"S\((\d+)\)", extras)
    bits = re.search(r"E\((\d+)\)", extras)
    return (order, tiles, int(space.group(1)) if space else 0,
            int(bits.group(1)) if bits else None)


@functools.lru_cache(maxsize=65536)
def parse_shape(text: str) -> tuple[ArrayShape, ...]:
    """The array leaves of an HLO shape (a tuple shape gives several, ``()`` none)."""
    leaves = []
    for dtype, dims_text, layout in _ARRAY.findall(text):
        if dtype not in ELEMENT_BITS:
            continue
        dims = tuple(int(d.strip().lstrip("<=")) for d in dims_text.split(",") if d.strip())
        order, tiles, space, bits = _parse_layout(layout) if layout else ((), (), 0, None)
        leaves.append(ArrayShape(dtype, dims, order, tiles, space, bits))
    return tuple(leaves)


def shape_bytes(text: str, *, device_memory_only: bool = False) -> int:
    """Bytes of every leaf of an HLO shape (``device_memory_only``: HBM leaves only)."""
    return sum(s.bytes for s in parse_shape(text)
               if s.in_device_memory or not device_memory_only)


@dataclasses.dataclass
class Instruction:
    """One HLO instruction of a computation."""

    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    is_root: bool = False
    operand_text: str = ""

    def called(self, key: str) -> tuple[str, ...]:
        """Computations named by attribute ``key`` (``calls``, ``body``, ``to_apply``...)."""
        match = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attrs)
        if not match:
            return ()
        return tuple(n.lstrip("%") for n in re.findall(r"%?([\w.\-]+)", match.group(1)))

    @property
    def fusion_kind(self) -> str:
        match = re.search(r"\bkind=(k\w+)", self.attrs)
        return match.group(1) if match else ""

    @property
    def custom_call_target(self) -> str:
        match = re.search(r'custom_call_target="([^"]*)"', self.attrs)
        return match.group(1) if match else ""

    @functools.cached_property
    def backend_config(self) -> dict[str, Any]:
        """``backend_config`` as a dict ({} when absent or not JSON)."""
        start = self.attrs.find("backend_config=")
        if start < 0:
            return {}
        text = self.attrs[start + len("backend_config="):]
        if text.startswith('"'):  # an escaped JSON string
            try:
                text, _ = json.JSONDecoder().raw_decode(text)
            except json.JSONDecodeError:
                return {}
        try:
            value, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def leaves(self) -> tuple[ArrayShape, ...]:
        return parse_shape(self.shape)


@dataclasses.dataclass
class Computation:
    """A named computation: instructions in text order, by name, and its root."""

    name: str
    is_entry: bool
    instructions: list[Instruction] = dataclasses.field(default_factory=list)
    by_name: dict[str, Instruction] = dataclasses.field(default_factory=dict)
    root: Instruction | None = None

    def parameter(self, index: int) -> Instruction | None:
        for inst in self.instructions:
            if inst.opcode == "parameter" and re.match(rf"^{index}\b", inst.operand_text):
                return inst
        return None

    @functools.cached_property
    def users(self) -> dict[str, list[tuple[Instruction, int]]]:
        """name -> [(user instruction, operand index)]."""
        out: dict[str, list[tuple[Instruction, int]]] = {}
        for inst in self.instructions:
            for i, op in enumerate(inst.operands):
                out.setdefault(op, []).append((inst, i))
        return out


@dataclasses.dataclass
class Module:
    """The computations of an HLO module; ``entry`` names the entry computation."""

    computations: dict[str, Computation]
    entry: str


def _balanced(text: str, start: int, open_ch: str = "(", close_ch: str = ")") -> int:
    """Index just past the bracket group opening at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} in HLO text: {text[start:start + 80]!r}")


def parse_instruction(line: str) -> Instruction | None:
    """One instruction line, or None if the line is not an instruction."""
    head = _INSTR.match(line)
    if not head:
        return None
    pos = head.end()
    if line.startswith("(", pos):
        end = _balanced(line, pos)
    else:
        end = pos
        while end < len(line) and not line[end].isspace():
            end += 1
    shape = line[pos:end]
    op = _OPCODE.match(line, end)
    if not op:
        return None
    args_end = _balanced(line, op.end() - 1)
    operand_text = line[op.end():args_end - 1]
    inst = Instruction(name=head.group(2), shape=shape, opcode=op.group(1),
                       operands=tuple(_NAME.findall(operand_text)),
                       attrs=line[args_end:], is_root=bool(head.group(1)),
                       operand_text=operand_text)
    return inst


def parse_module(text: str) -> Module:
    """Parse HLO module text (as printed by ``compiled.as_text()``)."""
    computations: dict[str, Computation] = {}
    entry = ""
    current: Computation | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith(("HloModule", "//")):
            continue
        if current is None:
            match = _HEADER.match(line)
            if match and line.endswith("{"):
                current = Computation(match.group(2), bool(match.group(1)))
                if current.is_entry:
                    entry = current.name
            continue
        if line == "}":
            computations[current.name] = current
            current = None
            continue
        inst = parse_instruction(line)
        if inst is None:
            continue
        current.instructions.append(inst)
        current.by_name[inst.name] = inst
        if inst.is_root:
            current.root = inst
    for comp in computations.values():
        if comp.root is None and comp.instructions:
            comp.root = comp.instructions[-1]
    if not entry:
        raise ValueError("HLO text has no ENTRY computation")
    return Module(computations, entry)
