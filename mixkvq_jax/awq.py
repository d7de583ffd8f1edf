"""AWQ w4a16 weight quantization (Lin et al. 2023, arXiv 2306.00978) as pure JAX functions.

A kernel ``W`` of shape [in_features, out_features] (used as ``x @ W``) is stored as 4-bit
codes in groups of ``group_size`` consecutive *input* rows: every output column has its own
asymmetric scale and zero point per group, computed, rounded and packed by the project's
one quantizer (`mixkvq_jax.quant`: round half to even, scale rounded up and zero rounded
down to the parameter dtype, planar uint32 packing). AWQ adds a per-input-channel scale
``s`` chosen on calibration activations, so that ``y = (x / s) @ Q(W * s)``: input
channels that carry large activations get scaled up before quantization and so lose less
precision where it matters. ``quantize_rtn`` is the plain round-to-nearest baseline
(``s = 1``).

Why not Google's qwix (``qwix/contrib/awq.py`` + ``awq_core.py``): qwix applies AWQ through
its provider machinery, which intercepts ``jax.lax.dot_general`` / ``jnp.einsum`` inside
Flax modules and stores weights as its own ``QArray`` (unpacked ``jnp.int4`` plus its own
quantizer), whereas our models are plain pytrees of arrays called through one
``dense(x, kernel, bias)`` and need packed uint32 codes from `quant.pack` with the same
scale/zero convention as the KV cache, so reusing it would mean a second quantizer and a
second storage format. Its search also minimises a diagonal proxy (weight error weighted
by mean |x| per channel, grid ``linspace(0, 1)``) rather than the AWQ reference's actual
output error ``||x @ W - (x / s) @ Q(W * s)||^2`` on the calibration tokens over
``alpha in {0, 1/grid, ..., (grid-1)/grid}``; we implement the reference objective here
(about 100 lines), in pure JAX with no new dependency.

Shapes: ``in`` = in_features, ``out`` = out_features, ``G`` = group_size, ``n`` = tokens.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mixkvq_jax import quant

__all__ = [
    "DEFAULT_INCLUDE",
    "Int4Weight",
    "apply_to_tree",
    "awq_search_scale",
    "calibrate_awq",
    "calibrate_rtn",
    "check_group_size",
    "collect_activations",
    "int4_layout",
    "quantize_awq",
    "quantize_rtn",
    "rebuild_int4",
]

_MIN_SCALE = 1e-4  # clamp of mean|x|^alpha, as in the AWQ reference (auto_scale.py)


@flax.struct.dataclass
class Int4Weight:
    """A group-quantized kernel; a pytree whose leaves are all arrays (Orbax-savable).

    Attributes:
      packed: uint32 [ceil(in / (32 / bits)), out], the codes packed along in_features
        with `quant.pack` (planar layout).
      scales: [in / G, out] in the parameter dtype (bf16 / f16 / f32).
      zeros: [in / G, out] in the parameter dtype.
      input_scale: [in] AWQ per-input-channel scale ``s`` in the parameter dtype; the
        layer computes ``(x / s) @ Q(W * s)``. All ones for round-to-nearest.
      in_features, group_size, bits: static (not pytree leaves).

    A stacked weight (from `apply_to_tree` over [L, in, out] kernels) has an extra leading
    [L] axis on every leaf; `dequantize` handles it, `matmul` wants one layer (slice it, or
    use it inside ``jax.lax.scan`` / ``jax.vmap`` over layers).
    """

    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array
    input_scale: jax.Array
    in_features: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False, default=4)

    @property
    def out_features(self) -> int:
        return self.packed.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the arrays (codes + scales + zeros + input scale)."""
        return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(self))

    def dequantize(self, dtype: jnp.dtype | None = None) -> jax.Array:
        """Effective kernel ``Q(W * s) / s``: [..., in, out] in ``dtype`` (default: the
        parameter dtype), so that ``x @ w.dequantize()`` equals ``w.matmul(x)``."""
        dtype = dtype or self.scales.dtype
        codes = quant.unpack(self.packed, self.bits, length=self.in_features, axis=-2)
        w = quant.dequantize(codes, self.scales, self.zeros, axis=-2, dtype=jnp.float32)
        return (w / self.input_scale.astype(jnp.float32)[..., :, None]).astype(dtype)

    def matmul(self, x: jax.Array, *, dtype: jnp.dtype | None = None) -> jax.Array:
        """``(x / s) @ Q(W * s)`` for x [..., in] -> [..., out], dequantizing in the graph.

        The codes are unpacked and dequantized to ``dtype`` (default ``x.dtype``, e.g.
        bf16 or f32) inside whatever jit calls this; products accumulate in f32 and the
        result is cast to ``dtype``.
        """
        if self.packed.ndim != 2:
            raise ValueError(
                f"matmul takes one layer's weight, got packed codes of shape "
                f"{self.packed.shape}; slice the stacked Int4Weight (jax.tree.map(lambda a: "
                "a[i], w)) or call matmul inside jax.lax.scan / jax.vmap over the layers"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight takes {self.in_features}")
        dtype = dtype or x.dtype
        codes = quant.unpack(self.packed, self.bits, length=self.in_features, axis=0)
        w = quant.dequantize(codes, self.scales, self.zeros, axis=0, dtype=dtype)
        xs = (x.astype(jnp.float32) / self.input_scale.astype(jnp.float32)).astype(dtype)
        return jnp.matmul(xs, w, preferred_element_type=jnp.float32).astype(dtype)


def _check_kernel(kernel: jax.Array, group_size: int) -> None:
    if kernel.ndim != 2:
        raise ValueError(
            f"expected a 2-D kernel [in_features, out_features], got shape {kernel.shape}; "
            "use apply_to_tree for stacked [layers, in, out] kernels"
        )
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"expected a floating-point kernel, got {kernel.dtype}")
    in_features = kernel.shape[0]
    if group_size <= 0 or in_features % group_size:
        divisors = [g for g in (256, 128, 64, 32, 16, 8) if in_features % g == 0]
        hint = f"e.g. group_size={divisors[0]}" if divisors else "e.g. group_size=in_features"
        raise ValueError(
            f"in_features={in_features} is not a multiple of group_size={group_size}: "
            f"choose a group size that divides in_features ({hint}) or zero-pad the kernel's "
            "input rows (and the activations' features) to a multiple of the group size"
        )


def _param_dtype(kernel: jax.Array, param_dtype: jnp.dtype | None) -> np.dtype:
    return np.dtype(param_dtype or kernel.dtype)


def _quantize_scaled(
    kernel: jax.Array, s: jax.Array, group_size: int, bits: int, param_dtype: np.dtype
) -> quant.Quantized:
    """Codes / scales / zeros of ``W * s`` (s [in] already rounded to ``param_dtype``)."""
    scaled = kernel.astype(jnp.float32) * s.astype(jnp.float32)[:, None]
    return quant.quantize(scaled, bits, axis=0, group_size=group_size, param_dtype=param_dtype)


def _pack(
    q: quant.Quantized, s: jax.Array, in_features: int, group_size: int, bits: int
) -> Int4Weight:
    return Int4Weight(
        packed=quant.pack(q.codes, bits, axis=0),
        scales=q.scales,
        zeros=q.zeros,
        input_scale=s,
        in_features=in_features,
        group_size=group_size,
        bits=bits,
    )


def quantize_rtn(
    kernel: jax.Array,
    group_size: int = 128,
    bits: int = 4,
    *,
    param_dtype: jnp.dtype | None = None,
) -> Int4Weight:
    """Round-to-nearest baseline: kernel [in, out] -> `Int4Weight` with ``input_scale = 1``.

    ``param_dtype`` (scales, zeros, input scale) defaults to the kernel's dtype.
    """
    _check_kernel(kernel, group_size)
    pdt = _param_dtype(kernel, param_dtype)
    s = jnp.ones((kernel.shape[0],), pdt)
    return _pack(_quantize_scaled(kernel, s, group_size, bits, pdt), s, kernel.shape[0],
                 group_size, bits)


def _output_error(
    x: jax.Array, ref: jax.Array, kernel: jax.Array, s: jax.Array,
    group_size: int, bits: int, param_dtype: np.dtype,
) -> jax.Array:
    """Mean over [n, out] of ``(x @ W - (x / s) @ Q(W * s))^2``; x [n, in] f32."""
    q = _quantize_scaled(kernel, s, group_size, bits, param_dtype)
    w = quant.dequantize(q.codes, q.scales, q.zeros, axis=0, dtype=jnp.float32)
    out = jnp.matmul(x / s.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return jnp.mean((ref - out) ** 2)


def awq_search_scale(
    kernel: jax.Array,
    activations: jax.Array,
    group_size: int = 128,
    grid: int = 20,
    *,
    bits: int = 4,
    param_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, jax.Array]:
    """AWQ grid search of the per-input-channel scale for kernel [in, out].

    For ``alpha`` in ``{0, 1/grid, ..., (grid-1)/grid}`` (the reference's [0, 1) grid):
    ``s = clip(mean_n |x|, 1e-4)^alpha``, normalised ``s /= sqrt(max(s) * min(s))`` and
    rounded to ``param_dtype``; keep the ``s`` that minimises the output error
    ``mean((x @ W - (x / s) @ Q(W * s))^2)`` on the calibration activations, with ``Q``
    exactly the quantizer `quantize_awq` stores. ``alpha = 0`` is ``s = 1``, i.e.
    round-to-nearest, which wins ties.

    Args:
      kernel: [in, out] float.
      activations: [..., in] inputs of this layer on calibration data (flattened to
        [n, in] tokens).
      group_size, grid, bits: quantization group, number of alphas, code width.
      param_dtype: storage dtype of scales / zeros / s (default: the kernel's dtype).

    Returns:
      ``(input_scale [in] in param_dtype, best_error)``: the chosen ``s`` and its mean
      squared output error (f32 scalar) on the calibration tokens.
    """
    _check_kernel(kernel, group_size)
    quant._check_bits(bits)
    if activations.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"activations have {activations.shape[-1]} features but the kernel has "
            f"in_features={kernel.shape[0]}; pass this layer's inputs [n_tokens, in_features]"
        )
    if grid < 1:
        raise ValueError(f"grid={grid} must be >= 1")
    return _search(kernel, activations, group_size, grid, bits,
                   _param_dtype(kernel, param_dtype))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _search(
    kernel: jax.Array, activations: jax.Array, group_size: int, grid: int, bits: int,
    param_dtype: np.dtype,
) -> tuple[jax.Array, jax.Array]:
    x = activations.reshape(-1, activations.shape[-1]).astype(jnp.float32)
    ref = jnp.matmul(x, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    x_mean = jnp.mean(jnp.abs(x), axis=0)

    def candidate(alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = jnp.maximum(jnp.power(x_mean, alpha), _MIN_SCALE)
        s = (s / jnp.sqrt(s.max() * s.min())).astype(param_dtype)
        return s, _output_error(x, ref, kernel, s, group_size, bits, param_dtype)

    alphas = jnp.arange(grid, dtype=jnp.float32) / grid
    # Sequential over alphas: a batched search would hold `grid` copies of the kernel.
    scales, errors = jax.lax.map(candidate, alphas)
    best = jnp.argmin(errors)  # first minimum: alpha = 0 (RTN) wins ties
    return scales[best], errors[best]


def quantize_awq(
    kernel: jax.Array,
    activations: jax.Array,
    group_size: int = 128,
    bits: int = 4,
    grid: int = 20,
    *,
    param_dtype: jnp.dtype | None = None,
) -> Int4Weight:
    """AWQ: kernel [in, out] + calibration activations [..., in] -> `Int4Weight`.

    ``input_scale`` is the `awq_search_scale` result; the codes are ``Q(W * s)``.
    """
    pdt = _param_dtype(kernel, param_dtype)
    s, _ = awq_search_scale(kernel, activations, group_size, grid, bits=bits, param_dtype=pdt)
    return _pack(_quantize_scaled(kernel, s, group_size, bits, pdt), s, kernel.shape[0],
                 group_size, bits)


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def apply_to_tree(
    params: Any,
    fn: Callable[..., Any],
    *,
    include: str | None = None,
    exclude: str | None = None,
    activations: Mapping[str, jax.Array] | None = None,
) -> Any:
    """Replace matching kernel leaves of ``params`` by ``fn(path, kernel[, acts])``.

    A leaf is transformed when it is a floating array of rank 2 ([in, out]) or 3 (stacked
    layers [L, in, out]) and its "/"-joined path (e.g. ``"layers/mlp/up/kernel"``) matches
    ``re.search(include)`` (default: every such leaf) and not ``re.search(exclude)``.
    Other leaves, including existing `Int4Weight`s, are returned unchanged.

    ``fn`` always sees one layer: ``fn(path, kernel [in, out])``, or, when
    ``activations`` is given, ``fn(path, kernel, activations[path])`` with activations
    [n, in] for a 2-D kernel and [L, n, in] for a stacked one. Stacked kernels are
    mapped over the leading axis with ``jax.lax.map`` (vmap semantics, one layer in
    memory at a time), so ``fn`` must be traceable; its outputs gain a leading [L] axis.

    Example::

        q = apply_to_tree(params, lambda p, k, a: quantize_awq(k, a),
                          include=r"(attn|mlp)/.*kernel$", activations=calib)
    """
    inc = re.compile(include) if include is not None else None
    exc = re.compile(exclude) if exclude is not None else None

    def visit(path: tuple[Any, ...], leaf: Any) -> Any:
        if isinstance(leaf, Int4Weight) or not hasattr(leaf, "ndim"):
            return leaf
        if leaf.ndim not in (2, 3) or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        name = _path_str(path)
        if (inc is not None and not inc.search(name)) or (exc is not None and exc.search(name)):
            return leaf
        args: tuple[jax.Array, ...] = (leaf,)
        if activations is not None:
            if name not in activations:
                raise ValueError(
                    f"no calibration activations for kernel {name!r}; add them under that "
                    "key or leave the path out with include/exclude"
                )
            acts = activations[name]
            if leaf.ndim == 3 and (acts.ndim != 3 or acts.shape[0] != leaf.shape[0]):
                raise ValueError(
                    f"stacked kernel {name!r} of shape {leaf.shape} needs activations "
                    f"[{leaf.shape[0]}, n_tokens, {leaf.shape[1]}], got {acts.shape}"
                )
            args = (leaf, acts)
        if leaf.ndim == 2:
            return fn(name, *args)
        return jax.lax.map(lambda a: fn(name, *a), args)

    return jax.tree_util.tree_map_with_path(
        visit, params, is_leaf=lambda x: isinstance(x, Int4Weight)
    )


# ---- AWQ on a model's real activations ------------------------------------------------------
# Every linear layer of the decoder stack; embeddings and the LM head stay in full precision.
DEFAULT_INCLUDE = r"^layers/(attn|mlp)/[^/]+/kernel$"


class _Recorder:
    """Stands in for a kernel inside one traced layer: records its input, then multiplies.

    `models.layers.dense` calls ``kernel.matmul(x)`` on any kernel with that method, so
    the layer's own code runs unchanged and the recorded inputs are exactly what each
    projection sees (after the norms, the attention, the SwiGLU gate).
    """

    def __init__(self, kernel: jax.Array, name: str, sink: dict[str, jax.Array]) -> None:
        self.kernel, self.name, self.sink = kernel, name, sink

    def matmul(self, x: jax.Array) -> jax.Array:
        self.sink[self.name] = x.reshape(-1, x.shape[-1])
        return jnp.matmul(x, self.kernel.astype(x.dtype))


def _linear_modules(layer: Any) -> list[tuple[str, Any]]:
    from flax import nnx

    from mixkvq_jax.models.layers import Linear

    return [("/".join(map(str, path)), m) for path, m in nnx.iter_graph(layer)
            if isinstance(m, Linear)]


@functools.partial(jax.jit, static_argnames=("graphdef", "scale"))
def _layer_inputs(graphdef: Any, layer_state: Any, h: jax.Array, cos: jax.Array, sin: jax.Array,
                  lengths: jax.Array, *, scale: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One decoder layer on h [B, T, E] (cache-free causal attention): (output [B, T, E],
    {"attn/q_proj": inputs [B*T, in], ...}) with the inputs of every linear layer."""
    from flax import nnx

    from mixkvq_jax.models.layers import causal_attention

    layer = nnx.merge(graphdef, layer_state)
    sink: dict[str, jax.Array] = {}
    for name, module in _linear_modules(layer):
        module.kernel.set_value(_Recorder(module.kernel.get_value(), name, sink))

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return causal_attention(q, k, v, scale=scale, lengths=lengths), None

    out, _ = layer(h, (cos, sin), attend, None)
    return out, sink


def collect_activations(params: Any, model_config: Any, tokens: Any,
                        lengths: Any = None) -> dict[str, jax.Array]:
    """Inputs of every decoder linear layer when the model reads ``tokens``.

    Args:
      params: the model's params tree (float kernels; see `mixkvq_jax.models`).
      model_config: its `ModelConfig`.
      tokens: int [T] or [B, T] calibration token ids.
      lengths: optional int [B] valid tokens per row (right padding is dropped).

    Returns:
      ``{"layers/attn/q_proj/kernel": [L, n, in], ...}`` (n = valid tokens) in the
      activation dtype: the ``activations`` argument of `apply_to_tree`. The layers run
      one at a time (one compiled layer, called L times), so only one layer's
      activations are live besides the collected ones.
    """
    import math

    from flax import nnx

    from mixkvq_jax.models import module_from_params

    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    b, t = tokens.shape
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    model = module_from_params(params, model_config)
    h = model.embed(tokens)
    cos, sin = model.rope(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    graphdef, state = nnx.split(model.layers)
    keep = np.asarray((np.arange(t)[None, :] < np.asarray(lengths)[:, None]).reshape(-1))
    per_layer: dict[str, list[jax.Array]] = {}
    for i in range(model_config.num_layers):
        layer_state = jax.tree.map(lambda a, i=i: a[i], state)
        h, sink = _layer_inputs(graphdef, layer_state, h, cos, sin, lengths,
                                scale=1.0 / math.sqrt(model_config.head_dim))
        for name, x in sink.items():
            per_layer.setdefault(f"layers/{name}/kernel", []).append(x[keep])
    return {name: jnp.stack(xs) for name, xs in per_layer.items()}


def check_group_size(params: Any, group_size: int, *, include: str | None = DEFAULT_INCLUDE,
                     exclude: str | None = None) -> list[str]:
    """Paths of the kernels `calibrate_awq` would quantize; ValueError (naming a kernel and
    the group sizes that would work) when one's in_features is not a multiple of
    ``group_size``. Cheap: reads shapes only, so callers can check before long work."""
    inc = re.compile(include) if include is not None else None
    exc = re.compile(exclude) if exclude is not None else None
    matched: list[tuple[str, int]] = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = _path_str(path)
        if getattr(leaf, "ndim", 0) not in (2, 3):
            continue
        if (inc is not None and not inc.search(name)) or (exc is not None and exc.search(name)):
            continue
        matched.append((name, int(leaf.shape[-2])))
    if not matched:
        raise ValueError(f"no kernel matches include={include!r} / exclude={exclude!r}")
    for name, in_features in matched:
        if group_size <= 0 or in_features % group_size:
            ok = [g for g in (256, 128, 64, 32, 16, 8)
                  if all(n % g == 0 for _, n in matched)]
            hint = f" (e.g. {ok[0]})" if ok else ""
            raise ValueError(
                f"AWQ group_size={group_size} does not divide in_features={in_features} of "
                f"{name}; use a group size dividing every quantized kernel's input "
                f"features{hint}"
            )
    return [name for name, _ in matched]


def calibrate_awq(params: Any, model_config: Any, tokens: Any, *, group_size: int = 128,
                  grid: int = 20, bits: int = 4, include: str | None = DEFAULT_INCLUDE,
                  exclude: str | None = None, param_dtype: jnp.dtype | None = None,
                  lengths: Any = None) -> Any:
    """AWQ w4a16 of a model on its own calibration activations.

    Runs the model over ``tokens`` (int [T] or [B, T]), records the input of every
    linear layer (`collect_activations`) and replaces each kernel whose path matches
    ``include`` (default: every attention / MLP projection, not the embeddings or the LM
    head) and not ``exclude`` by `quantize_awq` of it on those inputs: an `Int4Weight`
    with a leading [L] axis, which the models' `dense` multiplies with in the jitted
    forward (dequantized on the fly). Other leaves are returned unchanged.

    ``param_dtype`` is the storage dtype of scales / zeros / input scales (default: each
    kernel's dtype). Activations come from the un-quantized model (as the AWQ reference,
    which searches every layer's scales on full-precision inputs).
    """
    check_group_size(params, group_size, include=include, exclude=exclude)
    acts = collect_activations(params, model_config, tokens, lengths)
    return apply_to_tree(
        params,
        lambda path, k, a: quantize_awq(k, a, group_size=group_size, bits=bits, grid=grid,
                                        param_dtype=param_dtype),
        include=include, exclude=exclude, activations=acts,
    )


def calibrate_rtn(params: Any, *, group_size: int = 128, bits: int = 4,
                  include: str | None = DEFAULT_INCLUDE, exclude: str | None = None,
                  param_dtype: jnp.dtype | None = None) -> Any:
    """Round-to-nearest int4 of the same kernels `calibrate_awq` would quantize (baseline)."""
    check_group_size(params, group_size, include=include, exclude=exclude)
    return apply_to_tree(
        params, lambda path, k: quantize_rtn(k, group_size, bits, param_dtype=param_dtype),
        include=include, exclude=exclude,
    )


def int4_layout(params: Any) -> dict[str, dict[str, int]]:
    """``{path: {"in_features", "group_size", "bits"}}`` of every `Int4Weight` in params
    (the static fields a checkpoint must keep to rebuild them)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda x: isinstance(x, Int4Weight)):
        if isinstance(leaf, Int4Weight):
            out[_path_str(path)] = {"in_features": leaf.in_features,
                                    "group_size": leaf.group_size, "bits": leaf.bits}
    return out


def rebuild_int4(params: Any, layout: Mapping[str, Mapping[str, int]]) -> Any:
    """Inverse of saving: turn the ``{"packed", "scales", "zeros", "input_scale"}`` dicts
    at the paths of ``layout`` (`int4_layout`) back into `Int4Weight` s."""
    params = dict(params)
    for name, static in layout.items():
        keys = name.split("/")
        node = params
        parents = []
        for key in keys[:-1]:
            parents.append((node, key))
            node[key] = dict(node[key])
            node = node[key]
        raw = node[keys[-1]]
        if isinstance(raw, Int4Weight):
            continue
        node[keys[-1]] = Int4Weight(packed=raw["packed"], scales=raw["scales"],
                                    zeros=raw["zeros"], input_scale=raw["input_scale"],
                                    in_features=int(static["in_features"]),
                                    group_size=int(static["group_size"]),
                                    bits=int(static["bits"]))
    return params
