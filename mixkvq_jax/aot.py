"""Ahead-of-time compiled variants of jitted functions, cached by argument shapes.

Compiling explicitly (``lower(...).compile()``) lets callers report compile time apart
from run time; the cache keeps the most recently used variants.
"""

from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax


class CompileCache:
    """``cache(name, args, static)`` -> (compiled ``jitted[name]`` for these argument
    shapes and static arguments, seconds spent compiling now: 0.0 on a hit)."""

    def __init__(self, jitted: Mapping[str, Any], *, max_entries: int = 32) -> None:
        self._jitted = jitted
        self._max_entries = max_entries
        self._compiled: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def __call__(self, name: str, args: tuple[Any, ...],
                 static: dict[str, Any]) -> tuple[Any, float]:
        leaves, treedef = jax.tree.flatten(args)
        key = (name, treedef, tuple(sorted(static.items())),
               tuple((x.shape, str(x.dtype), bool(getattr(x, "weak_type", False)),
                      getattr(x, "sharding", None)) for x in leaves))
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers.*")
            compiled = self._jitted[name].lower(*args, **static).compile()
        self._compiled[key] = compiled
        if len(self._compiled) > self._max_entries:
            self._compiled.popitem(last=False)
        return compiled, time.perf_counter() - t0

    def clear(self) -> None:
        self._compiled.clear()
