"""Sharding rules for the params tree and the KV cache over a ``("data", "model")`` mesh.

Tensor parallelism in the Megatron layout, expressed only as `PartitionSpec` s on the
inputs; the model code is unchanged. Jit `forward` / `forward_full` and call them with
arrays placed by `shard_params` / `shard_cache`: XLA's SPMD partitioner propagates the
shardings and inserts the collectives (one all-reduce after ``o_proj`` and one after
``down_proj`` per layer).

Params (``L`` = layers, never sharded; ``m`` = the model axis)::

    embed.embedding [V, E]        -> (m, None)     vocab-sharded (replicated when the
    lm_head.kernel  [E, V]        -> (None, m)      model-axis size does not divide V)
    q/k/v_proj.kernel [L, E, H*D] -> (None, None, m)  heads on the output axis
    q/k/v_proj.bias   [L, H*D]    -> (None, m)
    o_proj.kernel   [L, H*D, E]   -> (None, m, None)  heads on the input axis
    gate/up_proj.kernel [L, E, F] -> (None, None, m); their bias [L, F] -> (None, m)
    down_proj.kernel [L, F, E]    -> (None, m, None)
    norms, o_proj / down_proj biases -> replicated

AWQ `Int4Weight` kernels: column-parallel ones (q/k/v/gate/up) shard the output axis of
their codes, scales and zeros; row-parallel ones (o/down) are replicated (their codes
are packed along the input axis in a layout that does not split evenly).

GQA with fewer KV heads than the model axis (8 KV heads on 16 devices): the k/v
projections are replicated and each KV head is repeated ``m // num_kv_heads`` times
(consecutively) before it enters the cache (`cache_kv_heads`), so every device holds the
one KV head its query heads read; the model axis must divide the query heads and be a
multiple of the KV heads. Exact: query head i still reads a copy of KV head
``i // (Hq // num_kv_heads)``, and MixKVQ's statistic averages the original group.

Cache: every `LayerKVCache` array [L, B, H, ...] -> (None, data, m); the per-sequence
``lengths`` / ``overflow`` [B] -> (data,). So each device holds its KV heads of its
sequences, next to the k/v projection columns that produce them.

The mesh must use `AxisType.Auto` axes (automatic partitioning); `make_mesh` builds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixkvq_jax.cache import layer_partition_specs
from mixkvq_jax.errors import UserError

from .config import ModelConfig

MeshAxes = tuple[str | None, str | None]
DEFAULT_MESH_AXES: MeshAxes = ("data", "model")
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")

__all__ = [
    "DEFAULT_MESH_AXES", "ShardingError", "batch_sharding", "cache_kv_heads",
    "cache_partition_specs",
    "make_mesh", "param_partition_specs", "shard_batch", "shard_cache", "shard_params",
]


class ShardingError(UserError, ValueError):
    """A mesh does not fit the model or the batch; the message names the numbers."""


def make_mesh(data: int = 1, model: int | None = None, *,
              devices: Sequence[Any] | None = None,
              axis_names: tuple[str, str] = ("data", "model")) -> Mesh:
    """A ``(data, model)`` mesh with automatic-partitioning axes.

    ``model`` defaults to ``len(devices) // data``; ``data * model`` must equal the
    number of devices (default ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // max(data, 1)
    if data < 1 or model < 1 or data * model != len(devices):
        raise ShardingError(
            f"a mesh of data={data} x model={model} needs {data * model} devices, "
            f"there are {len(devices)}; pick sizes whose product is {len(devices)}"
        )
    return jax.make_mesh((data, model), tuple(axis_names), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    if axis is None:
        return 1
    if axis not in mesh.shape:
        raise ShardingError(
            f"the mesh has axes {tuple(mesh.axis_names)} but no axis {axis!r}; build it "
            f"with that axis name or pass mesh_axes=(data_axis, model_axis)"
        )
    return int(mesh.shape[axis])


def _check_mesh(mesh: Mesh, mesh_axes: MeshAxes) -> tuple[int, int]:
    """(data size, model size); rejects non-Auto axes that this sharding would use."""
    sizes = (_axis_size(mesh, mesh_axes[0]), _axis_size(mesh, mesh_axes[1]))
    for axis in mesh_axes:
        if axis is None:
            continue
        kind = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis]
        if kind != AxisType.Auto:
            raise ShardingError(
                f"mesh axis {axis!r} is {kind.name}; the model relies on automatic "
                "partitioning: build the mesh with axis_types=(jax.sharding.AxisType.Auto,) "
                "* n, e.g. mixkvq_jax.models.sharding.make_mesh(data, model)"
            )
    return sizes


def cache_kv_heads(model_config: ModelConfig, model_size: int) -> int:
    """KV heads the cache holds on a model axis of ``model_size`` devices: the model's
    ``num_kv_heads`` when the axis divides them, else ``model_size`` (each KV head
    repeated ``model_size // num_kv_heads`` times, consecutively, so every device holds
    the one KV head its query heads read, as MaxText does for GQA on wide meshes)."""
    hkv = model_config.num_kv_heads
    return hkv if hkv % model_size == 0 else model_size


def _valid_model_sizes(model_config: ModelConfig, limit: int) -> list[int]:
    return [n for n in range(1, limit + 1) if _model_axis_problem(model_config, n) is None]


def _model_axis_problem(model_config: ModelConfig, size: int) -> str | None:
    hq, hkv, f = model_config.num_heads, model_config.num_kv_heads, model_config.intermediate_size
    if hq % size:
        return f"does not divide num_heads={hq}"
    if hkv % size and size % hkv:
        return (f"neither divides num_kv_heads={hkv} nor is a multiple of it (KV heads are "
                "repeated only a whole number of times)")
    if f % size:
        return f"does not divide intermediate_size={f}"
    return None


def _check_model_axis(model_config: ModelConfig, size: int, axis: str) -> None:
    problem = _model_axis_problem(model_config, size)
    if problem is not None:
        ok = _valid_model_sizes(model_config, max(size, 8))
        raise ShardingError(
            f"mesh axis {axis!r} has size {size}, which {problem} (num_heads="
            f"{model_config.num_heads}, num_kv_heads={model_config.num_kv_heads}); use a "
            f"model-axis size in {ok}"
        )
    f = model_config.intermediate_size
    if f % size:
        raise ShardingError(
            f"mesh axis {axis!r} has size {size}, which does not divide "
            f"intermediate_size={f}; use a model-axis size that divides it"
        )


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(str(getattr(key, attr)))
                break
    return tuple(out)


def _leaf_spec(names: tuple[str, ...], ndim: int, model: str | None, shard_vocab: bool,
               shard_kv: bool = True) -> P:
    if not names or model is None:
        return P()
    top = names[0]
    if top == "embed":  # embedding [V, E]
        return P(model, None) if shard_vocab and ndim == 2 else P()
    if top == "lm_head":  # kernel [E, V] (an Int4Weight: [..., V] leaves)
        if not shard_vocab or names[-1] == "input_scale":
            return P()
        return P(*([None] * (ndim - 1)), model)
    if top != "layers" or len(names) < 4:
        return P()
    proj, field = names[2], names[3]
    quantized = len(names) > 4  # an Int4Weight kernel: .../kernel/<packed|scales|...>
    if proj in ("k_proj", "v_proj") and not shard_kv:
        return P()  # fewer KV heads than devices: computed everywhere, then repeated
    if proj in _COLUMN_PARALLEL:
        if quantized and names[-1] == "input_scale":
            return P()
        return P(*([None] * (ndim - 1)), model)  # kernel [L, E, out] / bias [L, out]
    if proj in _ROW_PARALLEL and field == "kernel" and not quantized and ndim == 3:
        return P(None, model, None)  # kernel [L, in, E]
    return P()


def param_partition_specs(params: Any, model_config: ModelConfig,
                          mesh_axes: MeshAxes = DEFAULT_MESH_AXES, *,
                          mesh: Mesh | None = None) -> Any:
    """A tree like ``params`` with a `PartitionSpec` per leaf (see the module docstring).

    Args:
      params: the model's params tree (`mixkvq_jax.models.init_params` layout), or its
        `jax.ShapeDtypeStruct` s.
      model_config: the model.
      mesh_axes: ``(data_axis, model_axis)`` names; ``None`` for an axis disables it.
        Params only use the model axis (they are replicated over data).
      mesh: optional; when given, its model-axis size is checked against the heads and
        MLP width (`ShardingError`), and the vocab is sharded only if it divides evenly.
        Without it the vocab is always sharded.
    """
    model = mesh_axes[1]
    shard_vocab = shard_kv = True
    if mesh is not None and model is not None:
        _, size = _check_mesh(mesh, mesh_axes)
        _check_model_axis(model_config, size, model)
        shard_vocab = model_config.vocab_size % size == 0
        shard_kv = model_config.num_kv_heads % size == 0
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _leaf_spec(_names(path), np.ndim(x), model, shard_vocab, shard_kv),
        params)


def cache_partition_specs(cache: Any, mesh_axes: MeshAxes = DEFAULT_MESH_AXES) -> Any:
    """A `QuantizedKVCache`-shaped tree of `PartitionSpec` s: batch over the data axis,
    KV heads over the model axis, the layer axis unsharded.

    Usable as ``in_specs`` / ``out_specs`` of `jax.shard_map` (e.g.
    ``mesh_axes=("data", None)`` for a data-parallel map with whole heads per device).
    """
    data, model = mesh_axes
    return cache.replace(layers=layer_partition_specs(cache.layers, data, model),
                         lengths=P(data), overflow=P(data))


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P))


def shard_params(params: Any, mesh: Mesh, model_config: ModelConfig,
                 mesh_axes: MeshAxes = DEFAULT_MESH_AXES) -> Any:
    """Place ``params`` on ``mesh`` by `param_partition_specs` (`jax.device_put`).

    Raises `ShardingError` when the model-axis size does not divide the KV heads, the
    query heads or the MLP width, or the mesh lacks an axis / uses non-Auto axes.
    """
    specs = param_partition_specs(params, model_config, mesh_axes, mesh=mesh)
    return jax.device_put(params, _named(mesh, specs))


def _check_cache(cache: Any, mesh: Mesh, mesh_axes: MeshAxes) -> None:
    data_size, model_size = _check_mesh(mesh, mesh_axes)
    if cache.batch % data_size:
        raise ShardingError(
            f"mesh axis {mesh_axes[0]!r} has size {data_size}, which does not divide the "
            f"cache's batch={cache.batch}; use a batch that is a multiple of {data_size}"
        )
    if cache.num_kv_heads % model_size:
        raise ShardingError(
            f"mesh axis {mesh_axes[1]!r} has size {model_size}, which does not divide the "
            f"cache's num_kv_heads={cache.num_kv_heads}; use a model-axis size that divides it "
            f"or a cache of cache_kv_heads(config, {model_size}) heads (KV heads repeated)"
        )


def shard_cache(cache: Any, mesh: Mesh, mesh_axes: MeshAxes = DEFAULT_MESH_AXES) -> Any:
    """Place a `QuantizedKVCache` on ``mesh`` by `cache_partition_specs`.

    Raises `ShardingError` when the data-axis size does not divide the batch or the
    model-axis size does not divide the KV heads.
    """
    _check_cache(cache, mesh, mesh_axes)
    return jax.device_put(cache, _named(mesh, cache_partition_specs(cache, mesh_axes)))


def batch_sharding(mesh: Mesh, mesh_axes: MeshAxes = DEFAULT_MESH_AXES) -> NamedSharding:
    """Leading (batch) axis over the data axis, the rest replicated: for tokens, counts."""
    return NamedSharding(mesh, P(mesh_axes[0]))


def shard_batch(x: Any, mesh: Mesh, mesh_axes: MeshAxes = DEFAULT_MESH_AXES) -> Any:
    """Place every array of ``x`` (tokens [B, T], counts [B], ...) batch-sharded."""
    data_size, _ = _check_mesh(mesh, mesh_axes)
    for leaf in jax.tree.leaves(x):
        if np.shape(leaf)[0] % data_size:
            raise ShardingError(
                f"mesh axis {mesh_axes[0]!r} has size {data_size}, which does not divide "
                f"the batch={np.shape(leaf)[0]}; use a batch that is a multiple of {data_size}"
            )
    return jax.device_put(x, batch_sharding(mesh, mesh_axes))
