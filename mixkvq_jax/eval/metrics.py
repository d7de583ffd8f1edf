"""Fidelity of a KV-cache preset on real text: perplexity, KL to the unquantized cache,
top-1 agreement, overall and binned by position.

A token sequence is processed in chunks (default 128) through the model's single
`forward` (the same function prefill and decode use): every chunk attends to the
earlier chunks *through the cache*, so once a 128-token block is complete, later
positions read it quantized; the chunk itself is attended in full precision, as in
chunked prefill. One jitted chunk function is compiled per preset and reused for every
chunk (the last chunk is right-padded to the same shape).

The reference is the unquantized cache with ``full_dtype=float32`` (`reference_config`:
the ``bf16`` preset's semantics, nothing quantized, stored exactly so that the model in
float32 is the reference). The ``bf16`` preset itself (bfloat16 storage) is evaluated like
any other preset, so the table shows what BF16 storage costs too.

For each predicted position i (the model has read tokens 0..i and predicts i+1):

* NLL ``-log p(x_{i+1})``; perplexity is ``exp(mean NLL)``;
* ``KL(P_ref || P_preset)`` of the next-token distributions, in float32 from
  log-softmax;
* top-1 agreement: argmax of the preset's distribution equals the reference's.

Library::

    ref = compute_reference(params, model_config, tokens, chunk=128)
    scores = score_preset(params, model_config, load_kv_config("kivi2", 64), ref)
    row = summarize(scores, ref)          # dict: ppl, kl, top1, per-bin columns
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from mixkvq_jax.aot import CompileCache
from mixkvq_jax.cache import init_cache
from mixkvq_jax.config import KVConfigError, KVQuantConfig, load_kv_config
from mixkvq_jax.errors import UserError
from mixkvq_jax.models import ModelConfig, forward
from mixkvq_jax.models.transformer import Params

METRICS = ("ppl", "kl", "top1")
METRIC_HELP = {
    "ppl": "perplexity exp(mean NLL)",
    "kl": "mean KL(reference || preset) of next-token distributions (nats)",
    "top1": "fraction of positions whose argmax matches the reference",
}
DEFAULT_BIN_EDGES = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768)
REFERENCE_NAME = "fp32-ref"


def check_metrics(names: Sequence[str]) -> list[str]:
    """Validate metric names (one-line `UserError` for an unknown one)."""
    out = []
    for name in names:
        name = name.strip()
        if name not in METRICS:
            raise UserError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        out.append(name)
    if not out:
        raise UserError(f"no metric given; choose from {', '.join(METRICS)}")
    return out


def reference_config(head_dim: int) -> KVQuantConfig:
    """The unquantized cache stored in float32: the ``bf16`` preset with exact storage."""
    return load_kv_config("bf16", head_dim, full_dtype="float32", scale_dtype="float32",
                          name=REFERENCE_NAME)


# ---- preset specs ------------------------------------------------------------------------
def parse_preset_spec(spec: str, head_dim: int) -> KVQuantConfig:
    """A preset from ``NAME_OR_YAML[:field=value,field=value]``.

    ``mixkvq:salience=range_only`` is the mixkvq preset with range-only salience; the
    config is named ``mixkvq[range_only]``: a text value stands alone, others keep their
    field (``kivi2:sink_tokens=1`` is ``kivi2[sink_tokens=1]``).
    """
    spec = spec.strip()
    if not spec:
        raise UserError("empty preset name")
    base, _, rest = spec.partition(":") if not _looks_like_windows_path(spec) else (spec, "", "")
    overrides: dict[str, Any] = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UserError(f"preset spec {spec!r}: override {item!r} is not field=value")
            overrides[key.strip()] = yaml.safe_load(value.strip())
    try:
        config = load_kv_config(base, head_dim, **overrides)
    except KVConfigError as err:
        raise UserError(str(err)) from None
    if overrides:
        label = ",".join(v if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
        config = dataclasses.replace(config, name=f"{config.name}[{label}]")
    return config


def _looks_like_windows_path(spec: str) -> bool:
    return len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/"


# ---- the jitted chunk steps --------------------------------------------------------------
def _log_probs(params: Params, cache: Any, tokens: jax.Array, counts: jax.Array,
               config: ModelConfig, impl: str) -> tuple[jax.Array, Any]:
    logits, cache = forward(params, tokens, cache, counts, config=config, impl=impl)
    return jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1), cache


def _reference_step(params: Params, cache: Any, tokens: jax.Array, counts: jax.Array,
                    targets: jax.Array, *, config: ModelConfig, impl: str
                    ) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """tokens/targets [1, C] -> (cache, log-probs [C, V], NLL [C], argmax [C])."""
    logp, cache = _log_probs(params, cache, tokens, counts, config, impl)
    nll = -jnp.take_along_axis(logp, targets[0, :, None], axis=-1)[:, 0]
    return cache, logp, nll, jnp.argmax(logp, axis=-1).astype(jnp.int32)


def _compare_step(params: Params, cache: Any, tokens: jax.Array, counts: jax.Array,
                  targets: jax.Array, ref_logp: jax.Array, *, config: ModelConfig, impl: str
                  ) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """(cache, NLL [C], KL(ref || this) [C], argmax [C]), all float32 / int32."""
    logp, cache = _log_probs(params, cache, tokens, counts, config, impl)
    nll = -jnp.take_along_axis(logp, targets[0, :, None], axis=-1)[:, 0]
    p_ref = jnp.exp(ref_logp)
    kl = jnp.sum(jnp.where(p_ref > 0, p_ref * (ref_logp - logp), 0.0), axis=-1)
    return cache, nll, kl, jnp.argmax(logp, axis=-1).astype(jnp.int32)


_JITTED = {
    "reference": jax.jit(_reference_step, static_argnames=("config", "impl"),
                         donate_argnames=("cache",)),
    "compare": jax.jit(_compare_step, static_argnames=("config", "impl"),
                       donate_argnames=("cache",)),
}




_compile = CompileCache(_JITTED, max_entries=16)


def _chunks(tokens: np.ndarray, chunk: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(inputs [1, C], targets [1, C], valid count) per chunk, the last one padded."""
    n = len(tokens) - 1
    out = []
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        inputs = np.zeros((1, chunk), np.int32)
        targets = np.zeros((1, chunk), np.int32)
        inputs[0, :count] = tokens[start:start + count]
        targets[0, :count] = tokens[start + 1:start + 1 + count]
        out.append((inputs, targets, count))
    return out


def _progress(iterable: Any, desc: str, total: int, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="chunk", file=sys.stderr, leave=False)


def _check_inputs(model_config: ModelConfig, tokens: np.ndarray, chunk: int) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    if chunk < 1:
        raise UserError(f"chunk size must be >= 1, got {chunk}")
    if len(tokens) < 2:
        raise UserError(f"need at least 2 tokens (inputs + a target), got {len(tokens)}")
    if len(tokens) - 1 > model_config.max_context:
        raise UserError(f"{len(tokens) - 1} tokens of context exceed the model's maximum "
                        f"context {model_config.max_context}")
    if tokens.min() < 0 or tokens.max() >= model_config.vocab_size:
        raise UserError(f"token ids must lie in [0, {model_config.vocab_size})")
    return tokens


# ---- reference and presets ------------------------------------------------------------------
@dataclasses.dataclass
class Reference:
    """The unquantized run over one token sequence, kept for comparisons.

    Attributes:
      tokens: int32 [N + 1]: N inputs and the last target.
      chunk: tokens per chunk.
      kv_config: the reference cache config (`reference_config`).
      log_probs: per chunk, float32 [chunk, V] next-token log-probs (padding rows in the
        last chunk are unused).
      nll, top1: [N] per position.
      seconds, compile_seconds: wall time of the chunk loop and of compiling.
    """

    tokens: np.ndarray
    chunk: int
    kv_config: KVQuantConfig
    log_probs: list[jax.Array]
    nll: np.ndarray
    top1: np.ndarray
    seconds: float
    compile_seconds: float

    @property
    def num_positions(self) -> int:
        return len(self.tokens) - 1


@dataclasses.dataclass
class PresetScores:
    """Per-position results of one preset against a `Reference`."""

    config: KVQuantConfig
    nll: np.ndarray
    kl: np.ndarray
    agree: np.ndarray
    seconds: float
    compile_seconds: float

    @property
    def name(self) -> str:
        return self.config.name


def _new_cache(kv_config: KVQuantConfig, model_config: ModelConfig, n: int) -> Any:
    if kv_config.head_dim != model_config.head_dim:
        raise UserError(f"KV preset {kv_config.name} is for head_dim {kv_config.head_dim}; "
                        f"the model has head_dim {model_config.head_dim}")
    return init_cache(kv_config, num_layers=model_config.num_layers, batch=1,
                      num_kv_heads=model_config.num_kv_heads, max_len=n)


def compute_reference(params: Params, model_config: ModelConfig, tokens: np.ndarray, *,
                      chunk: int = 128, impl: str = "auto", kv_config: KVQuantConfig | None = None,
                      progress: bool = True) -> Reference:
    """Run the unquantized cache over ``tokens`` (int [N + 1]) and keep its log-probs.

    Memory: N x vocab x 4 bytes (4096 tokens x 49152 vocab = 0.8 GB).
    """
    tokens = _check_inputs(model_config, tokens, chunk)
    kv_config = kv_config or reference_config(model_config.head_dim)
    n = len(tokens) - 1
    chunks = _chunks(tokens, chunk)
    cache = _new_cache(kv_config, model_config, n)
    static = {"config": model_config, "impl": impl}
    first = chunks[0]
    step, compile_s = _compile("reference", (params, cache, jnp.asarray(first[0]),
                                             jnp.asarray([first[2]], jnp.int32),
                                             jnp.asarray(first[1])), static)
    log_probs, nll, top1 = [], [], []
    t0 = time.perf_counter()
    for inputs, targets, count in _progress(chunks, f"reference {kv_config.name}", len(chunks),
                                            progress):
        cache, logp, c_nll, c_top1 = step(params, cache, jnp.asarray(inputs),
                                          jnp.asarray([count], jnp.int32), jnp.asarray(targets))
        log_probs.append(logp)
        nll.append(np.asarray(c_nll)[:count])
        top1.append(np.asarray(c_top1)[:count])
    seconds = time.perf_counter() - t0
    return Reference(tokens, chunk, kv_config, log_probs, np.concatenate(nll).astype(np.float64),
                     np.concatenate(top1), seconds, compile_s)


def score_preset(params: Params, model_config: ModelConfig, kv_config: KVQuantConfig,
                 reference: Reference, *, impl: str = "auto",
                 progress: bool = True) -> PresetScores:
    """Run ``kv_config`` over the reference's tokens, chunk by chunk, and compare."""
    chunks = _chunks(reference.tokens, reference.chunk)
    cache = _new_cache(kv_config, model_config, reference.num_positions)
    static = {"config": model_config, "impl": impl}
    first = chunks[0]
    step, compile_s = _compile("compare", (params, cache, jnp.asarray(first[0]),
                                           jnp.asarray([first[2]], jnp.int32),
                                           jnp.asarray(first[1]), reference.log_probs[0]),
                               static)
    nll, kl, top1 = [], [], []
    t0 = time.perf_counter()
    for (inputs, targets, count), ref_logp in _progress(
            zip(chunks, reference.log_probs, strict=True), kv_config.name, len(chunks), progress):
        cache, c_nll, c_kl, c_top1 = step(params, cache, jnp.asarray(inputs),
                                          jnp.asarray([count], jnp.int32),
                                          jnp.asarray(targets), ref_logp)
        nll.append(np.asarray(c_nll)[:count])
        kl.append(np.asarray(c_kl)[:count])
        top1.append(np.asarray(c_top1)[:count])
    seconds = time.perf_counter() - t0
    agree = np.concatenate(top1) == reference.top1
    return PresetScores(kv_config, np.concatenate(nll).astype(np.float64),
                        np.concatenate(kl).astype(np.float64), agree, seconds, compile_s)


def reference_scores(reference: Reference) -> PresetScores:
    """The reference as a `PresetScores` row (KL 0, agreement 1)."""
    n = reference.num_positions
    return PresetScores(reference.kv_config, reference.nll, np.zeros(n), np.ones(n, bool),
                        reference.seconds, reference.compile_seconds)


# ---- summaries ------------------------------------------------------------------------------
def _fmt_pos(x: int) -> str:
    return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)


def position_bins(n: int, edges: Sequence[int] = DEFAULT_BIN_EDGES) -> list[tuple[int, int, str]]:
    """(lo, hi, label) position bins covering [0, n): the edges below n, then n."""
    cuts = sorted({e for e in edges if 0 < e < n})
    bounds = [0, *cuts, n]
    return [(lo, hi, f"{_fmt_pos(lo)}-{_fmt_pos(hi)}") for lo, hi in zip(bounds, bounds[1:],
                                                                         strict=False)]


def _stats(nll: np.ndarray, kl: np.ndarray, agree: np.ndarray) -> dict[str, float]:
    return {"ppl": float(math.exp(np.mean(nll))), "kl": float(np.mean(kl)),
            "top1": float(np.mean(agree))}


def summarize(scores: PresetScores, edges: Sequence[int] = DEFAULT_BIN_EDGES) -> dict[str, Any]:
    """One table row: config facts, overall ppl/kl/top1, and ``{metric}@{bin}`` columns."""
    cfg = scores.config
    full, i8, i4, i2 = cfg.key_channel_counts
    row: dict[str, Any] = {
        "preset": cfg.name,
        "avg_key_bits": round(cfg.average_key_bits, 4),
        "value_bits": cfg.average_value_bits,
        "key_tiers": f"{full}/{i8}/{i4}/{i2}",
        "salience": cfg.salience if cfg.stores_permutation else "-",
        "full_dtype": cfg.full_dtype,
        "sink_tokens": cfg.sink_tokens,
        "bytes_per_token": round(cfg.bytes_per_token, 2),
        "pct_of_bf16": round(100 * cfg.compression_vs_bf16, 2),
        "positions": len(scores.nll),
        **_stats(scores.nll, scores.kl, scores.agree),
    }
    for lo, hi, label in position_bins(len(scores.nll), edges):
        for key, value in _stats(scores.nll[lo:hi], scores.kl[lo:hi],
                                 scores.agree[lo:hi]).items():
            row[f"{key}@{label}"] = value
    row["seconds"] = round(scores.seconds, 2)
    row["compile_seconds"] = round(scores.compile_seconds, 2)
    return row


def evaluate_presets(params: Params, model_config: ModelConfig, tokens: np.ndarray,
                     presets: Sequence[KVQuantConfig], *, chunk: int = 128, impl: str = "auto",
                     edges: Sequence[int] = DEFAULT_BIN_EDGES, progress: bool = True,
                     reference: Reference | None = None) -> list[dict[str, Any]]:
    """Summaries (see `summarize`) of the reference and of every preset on ``tokens``."""
    for cfg in presets:
        if cfg.head_dim != model_config.head_dim:
            raise UserError(f"KV preset {cfg.name} is for head_dim {cfg.head_dim}; the model "
                            f"has head_dim {model_config.head_dim}")
    if reference is None:
        reference = compute_reference(params, model_config, tokens, chunk=chunk, impl=impl,
                                      progress=progress)
    rows = [summarize(reference_scores(reference), edges)]
    for cfg in presets:
        rows.append(summarize(score_preset(params, model_config, cfg, reference, impl=impl,
                                           progress=progress), edges))
    return rows
