"""Running on several devices: the ``--mesh`` flag, the default mesh, what a device holds.

One implementation used by the generate CLI, the notebooks and the deviceless TPU fit
check (`mixkvq_jax.tpu_aot`):

* `parse_mesh` reads ``data=1,model=8`` (either axis may be left out: size 1 / the
  rest of the devices) or ``auto``;
* `choose_mesh` turns that into a `jax.sharding.Mesh` (or ``None``: one device). ``auto``
  keeps one device when the weights and the cache fit it, else puts every local device
  on the ``model`` axis (the largest size the heads allow);
* `check_mesh` rejects, in one line naming the fix, a mesh whose size is not the device
  count, an axis that does not divide what it shards (the batch, the heads, the MLP
  width) and a model that does not fit even sharded (bytes needed vs available);
* `per_device_bytes` is what one device holds of a tree placed by `PartitionSpec` s.

The placement rules themselves (weights by heads / MLP width over ``model``, the cache by
batch over ``data`` and KV heads over ``model``, KV heads repeated when the model axis is
wider than them) are `mixkvq_jax.models.sharding`. Multi-host slices: `initialize_distributed`
calls ``jax.distributed.initialize()`` when the environment names a coordinator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixkvq_jax.errors import UserError
from mixkvq_jax.models import ModelConfig
from mixkvq_jax.models.sharding import (
    ShardingError,
    _model_axis_problem,
    cache_kv_heads,
    cache_partition_specs,
    make_mesh,
    param_partition_specs,
    shard_params,
)

GiB = 2**30
# Weights + cache may use this share of a device's memory before `auto` shards the model
# (the rest: activations, logits, XLA's temporaries).
FIT_FRACTION = 0.85
# Environment variables that mean "this process is one host of a multi-host slice".
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Requested axis sizes; ``None``: fill with the remaining devices (``model``) or 1."""

    data: int | None = None
    model: int | None = None

    def sizes(self, devices: int) -> tuple[int, int]:
        data = self.data or (devices // self.model if self.model else 1)
        model = self.model or max(devices // max(data, 1), 1)
        return data, model


def parse_mesh(text: str) -> MeshShape | None:
    """``"data=2,model=4"`` -> `MeshShape`; ``"auto"`` -> ``None`` (see `choose_mesh`)."""
    text = text.strip()
    if text == "auto":
        return None
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in ("data", "model") or name in sizes:
            raise UserError(f"--mesh {text!r}: expected auto or data=D,model=M (axes data "
                            "and model, each at most once), e.g. --mesh data=1,model=8")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"--mesh {text!r}: {name}={value.strip()!r} is not an integer; "
                            "e.g. --mesh data=1,model=8") from None
        if sizes[name] < 1:
            raise UserError(f"--mesh {text!r}: {name} must be >= 1")
    if not sizes:
        raise UserError(f"--mesh {text!r}: expected auto or data=D,model=M")
    return MeshShape(**sizes)


def initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` (arguments from the environment) when a
    coordinator is named (multi-host TPU slices, ``JAX_COORDINATOR_ADDRESS``); call it
    before anything touches the devices. True if it ran."""
    if not any(os.environ.get(name) for name in DISTRIBUTED_ENV):
        return False
    jax.distributed.initialize()
    return True


@contextlib.contextmanager
def host_loading() -> Iterator[None]:
    """Arrays created inside go to host memory (the CPU device) when the default device
    is an accelerator, so weights too big for one chip load before they are sharded."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS=tpu)
        cpu = None
    if cpu is None or jax.default_backend() == "cpu":
        yield
        return
    with jax.default_device(cpu):
        yield


def device_memory_bytes(device: Any) -> int | None:
    """Bytes a device can allocate (``memory_stats()["bytes_limit"]``), None if unknown
    (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (CPU and some plugins raise instead of returning None)
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def tree_bytes(tree: Any) -> int:
    """Logical bytes of every array leaf (size x itemsize)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def per_device_bytes(tree: Any, specs: Any, axis_sizes: dict[str, int]) -> int:
    """Bytes one device holds of ``tree`` placed by ``specs`` (a matching tree of
    `PartitionSpec` s) on a mesh of ``axis_sizes``: every sharded dimension divided by
    its axis size, rounded up (uneven shards pad)."""
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    total = 0
    for x, spec in zip(leaves, spec_leaves, strict=True):
        shape = list(x.shape)
        for i, axis in enumerate(tuple(spec)):
            names = axis if isinstance(axis, tuple) else (axis,)
            split = math.prod(axis_sizes.get(n, 1) for n in names if n is not None)
            shape[i] = -(-shape[i] // split)
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def weight_bytes(params: Any, config: ModelConfig, mesh: Mesh | None) -> int:
    """Bytes of the weights one device holds (``mesh`` None: all of them)."""
    if mesh is None:
        return tree_bytes(params)
    specs = param_partition_specs(params, config, mesh=mesh)
    return per_device_bytes(params, specs, dict(mesh.shape))


def cache_bytes(cache: Any, mesh: Mesh | None) -> int:
    """Bytes of a `QuantizedKVCache` one device holds (``mesh`` None: all of it)."""
    if mesh is None:
        return tree_bytes(cache)
    return per_device_bytes(cache, cache_partition_specs(cache), dict(mesh.shape))


def placement_bytes(params: Any, cache: Any, config: ModelConfig, mesh: Mesh | None) -> int:
    """Bytes of weights + cache one device holds (``mesh`` None: one device holds all).
    ``params`` / ``cache`` may be arrays or `jax.ShapeDtypeStruct` s."""
    return weight_bytes(params, config, mesh) + cache_bytes(cache, mesh)


def describe(mesh: Mesh | None) -> str:
    """``data=1 x model=8 over 8 tpu devices`` (or ``one cpu device``)."""
    if mesh is None:
        return f"one {jax.devices()[0].platform} device"
    return (f"data={mesh.shape['data']} x model={mesh.shape['model']} over {mesh.size} "
            f"{mesh.devices.flat[0].platform} devices")


def _auto_model_size(config: ModelConfig, devices: int) -> int:
    return max(n for n in range(1, devices + 1)
               if devices % n == 0 and _model_axis_problem(config, n) is None)


def choose_mesh(shape: MeshShape | None, config: ModelConfig, *, batch: int,
                needed_bytes: int = 0, devices: Sequence[Any] | None = None) -> Mesh | None:
    """The mesh to run on: ``shape`` (`parse_mesh`) over ``devices`` (default all), or for
    ``None`` (``auto``): one device when ``needed_bytes`` (weights + cache on one device)
    fit its memory (unknown memory, CPU: fits), else all devices on ``model``. Returns
    ``None`` for one device. Raises `UserError` (one line) for a mesh that cannot work:
    see `check_mesh` (``batch`` only steers ``auto``: generation pads a batch the data
    axis does not divide)."""
    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        limit = device_memory_bytes(devices[0])
        if len(devices) == 1 or limit is None or needed_bytes <= FIT_FRACTION * limit:
            return None
        model = _auto_model_size(config, len(devices))
        data = len(devices) // model if batch % (len(devices) // model) == 0 else 1
        shape = MeshShape(data=data, model=model)
        devices = devices[: data * model]
    data, model = shape.sizes(len(devices))
    if data * model != len(devices):
        hint = (f"data={shape.data or 1},model={len(devices) // (shape.data or 1)}"
                if len(devices) % (shape.data or 1) == 0 else f"model={len(devices)}")
        raise UserError(f"--mesh data={data},model={model} needs {data * model} devices, "
                        f"there are {len(devices)}; use e.g. --mesh {hint}")
    if data * model == 1:
        return None
    mesh = make_mesh(data, model, devices=devices)
    check_mesh(mesh, config)
    return mesh


def check_mesh(mesh: Mesh, config: ModelConfig, *, batch: int | None = None) -> None:
    """One-line `UserError` when ``data`` does not divide ``batch`` (if given) or ``model``
    does not divide the heads / MLP width (naming sizes that would)."""
    data, model = mesh.shape["data"], mesh.shape["model"]
    if batch is not None and batch % data:
        good = [d for d in range(1, mesh.size + 1) if mesh.size % d == 0 and batch % d == 0]
        raise UserError(f"--mesh data={data} does not divide the batch of {batch} "
                        f"sequences; use data in {good} (model = {mesh.size} / data) or a "
                        f"batch that is a multiple of {data}")
    problem = _model_axis_problem(config, model)
    if problem is not None:
        good = [n for n in range(1, mesh.size + 1)
                if mesh.size % n == 0 and _model_axis_problem(config, n) is None]
        fix = ", ".join(f"data={mesh.size // n},model={n}" for n in good[-2:])
        raise UserError(f"--mesh model={model} {problem} (num_heads={config.num_heads}, "
                        f"num_kv_heads={config.num_kv_heads}); use e.g. --mesh {fix}")


def check_fit(needed: int, available: int | None, what: str, mesh: Mesh | None) -> None:
    """One-line `UserError` when ``needed`` bytes per device exceed ``available``."""
    if available is not None and needed > available:
        raise UserError(
            f"{what} needs {needed / GiB:.2f} GiB per device on {describe(mesh)} but a "
            f"device has {available / GiB:.2f} GiB; use more devices (--mesh model=N), a "
            "smaller KV preset, fewer sequences or a shorter context")


def kv_heads(config: ModelConfig, mesh: Mesh | None) -> int:
    """KV heads of the cache on ``mesh`` (`models.sharding.cache_kv_heads`)."""
    return config.num_kv_heads if mesh is None else cache_kv_heads(config, mesh.shape["model"])


def place_params(params: Any, config: ModelConfig, mesh: Mesh | None) -> Any:
    """Weights sharded over ``mesh`` (`models.sharding.shard_params`), or on the default
    device (after `host_loading`) when ``mesh`` is None."""
    if mesh is None:
        return jax.device_put(params, jax.devices()[0])
    return shard_params(params, mesh, config)


def replicated(x: Any, mesh: Mesh) -> Any:
    """Every array of ``x`` copied to every device of ``mesh``."""
    return jax.device_put(x, NamedSharding(mesh, P()))


__all__ = [
    "MeshShape", "ShardingError", "cache_bytes", "check_fit", "check_mesh", "choose_mesh",
    "describe", "device_memory_bytes", "host_loading", "initialize_distributed", "kv_heads",
    "parse_mesh", "per_device_bytes", "place_params", "placement_bytes", "replicated", "tree_bytes",
    "weight_bytes",
]
