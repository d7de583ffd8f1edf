"""Continuous batching over the paged quantized KV cache (`mixkvq_jax.paged`).

The engine owns one `PagedKVCache` with a fixed number of decode **slots** and a pool
of **pages** (one block of R tokens, all layers and KV heads, each). Requests wait in a
FIFO queue; one joins the running batch when a slot is free and the pool has the pages
its prompt plus ``max_tokens`` can fill (admission by free blocks: pages are reserved
up front, so a running sequence never runs out). Its prompt is prefilled in chunks of
``prefill_chunk`` tokens on its slot alone (`paged.take_slot`: a batch of one that
shares the pool), one chunk per engine step between decode steps, so running
sequences keep decoding while a long prompt is read. A finished or cancelled
sequence leaves at once and its pages go back to the pool.

Two compiled programs, whatever the traffic: the decode step for all slots (inactive
slots append nothing) and the prefill chunk for one slot. Both are pure functions of
(params, cache, ...) with the cache donated; the scheduler around them is plain
Python on the host (`PagePool`, the slot table, the queue) and runs in one thread
(`Engine.run_forever`); `submit` and `cancel` may be called from any thread.

Greedy output of a request does not depend on what else is running: its prefill runs
alone, and in a decode step every slot's arithmetic is its own (other slots only add
masked attention steps, which change nothing).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixkvq_jax import paged
from mixkvq_jax.cache import decode_loop_form
from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.errors import UserError
from mixkvq_jax.generate import SamplingConfig, sample_tokens
from mixkvq_jax.models import ModelConfig, forward
from mixkvq_jax.models.transformer import Params

TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class RequestError(UserError):
    """A request the engine can never serve (too long, bad ids, bad settings): HTTP 400."""


class Overloaded(Exception):
    """The queue is full: retry later (HTTP 429)."""


# ---- host-side bookkeeping ---------------------------------------------------------------
class PagePool:
    """The free list of the pool's pages (host side; the engine thread owns it)."""

    def __init__(self, pages: int) -> None:
        self.total = pages
        self._free = list(range(pages - 1, -1, -1))  # pop() hands out page 0 first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` pages, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(pages))


Event = tuple[str, Any]  # ("token", id) | ("done", finish_reason) | ("error", message)


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress.

    ``on_event`` is called from the engine thread with ``("token", id)`` for every
    generated token, then once ``("done", reason)`` (``eos`` | ``length`` | ``stop`` |
    ``cancelled`` | ``error``: a step failed, `Engine.last_error` says why). ``stop``
    (optional) sees the generated ids after each token and returns True to end the
    request (stop strings); ``eos`` ids end it too, and the engine's, unless
    ``ignore_eos`` (benchmarks: every request runs to ``max_tokens``).
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    eos: frozenset[int] = frozenset()
    on_event: Callable[[Event], None] | None = None
    stop: Callable[[list[int]], bool] | None = None
    ignore_eos: bool = False
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    # progress (engine thread)
    generated: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    prefilled: int = 0
    cancelled: bool = False
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


# ---- the two compiled programs --------------------------------------------------------------
def _sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array,
            top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next token per row: logits [S, V], per-row sampling settings [S] -> int32 [S]."""

    def one(lg, seed, step, t, k, p):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return sample_tokens(lg[None], key, t, k, p)[0]

    # All greedy (the usual batch): skip the per-row vocabulary sorts of top-k / top-p.
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: jax.vmap(one)(logits, seeds, steps, temperature, top_k, top_p),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _decode_step(params: Params, cache: paged.PagedKVCache, tokens: jax.Array,
                 active: jax.Array, sampling: tuple[jax.Array, ...], *, config: ModelConfig,
                 impl: str, platform: str | None = None
                 ) -> tuple[jax.Array, paged.PagedKVCache]:
    """Append ``tokens`` [S] to the active slots and sample each one's next token [S]
    (``sampling``: per-slot seeds, steps, temperature, top_k, top_p, each [S];
    ``platform``: the target, as in `mixkvq_jax.models.forward`)."""
    TRACE_COUNTS["decode_step"] += 1
    counts = active.astype(jnp.int32)
    logits, cache = forward(params, tokens[:, None], cache, counts, config=config, impl=impl,
                            logit_index=jnp.zeros_like(counts), platform=platform)
    return _sample(logits, *sampling), cache


def _prefill_chunk(params: Params, cache: paged.PagedKVCache, tokens: jax.Array,
                   count: jax.Array, slot: jax.Array, fresh: jax.Array,
                   sampling: tuple[jax.Array, ...], *, config: ModelConfig, impl: str
                   ) -> tuple[jax.Array, paged.PagedKVCache]:
    """Prefill ``count`` tokens of ``tokens`` [1, C] into slot ``slot`` (``fresh``: the
    slot's first chunk) and sample a token [1] from the last one's logits (used after
    the prompt's last chunk)."""
    TRACE_COUNTS["prefill_chunk"] += 1
    view = paged.take_slot(cache, slot, fresh)
    logits, view = forward(params, tokens, view, count, config=config, impl=impl,
                           logit_index=jnp.maximum(count - 1, 0))
    return _sample(logits, *sampling), paged.put_slot(cache, view, slot)


_DECODE = jax.jit(_decode_step, static_argnames=("config", "impl", "platform"),
                  donate_argnames=("cache",))
_PREFILL = jax.jit(_prefill_chunk, static_argnames=("config", "impl"),
                   donate_argnames=("cache",))


# ---- the engine ------------------------------------------------------------------------------
class Engine:
    """Continuous batching of generation requests over one paged cache.

    Args:
      params, model_config: the model.
      kv_config: the cache's `KVQuantConfig`.
      slots: sequences decoded together (the decode step's batch).
      pages: pages in the pool (each one block of ``kv_config.residual_length`` tokens).
      max_len: most tokens (prompt + generated) per sequence.
      prefill_chunk: prompt tokens per prefill call.
      max_queue: requests that may wait for admission; `submit` raises `Overloaded`
        beyond it.
      eos_token_ids: ids that end every request (added to each request's own).
      impl: attention implementation (`mixkvq_jax.attention.IMPLS`).
    """

    def __init__(self, params: Params, model_config: ModelConfig, kv_config: KVQuantConfig, *,
                 slots: int, pages: int, max_len: int, prefill_chunk: int = 128,
                 max_queue: int = 64, eos_token_ids: Sequence[int] = (),
                 impl: str = "auto") -> None:
        if kv_config.head_dim != model_config.head_dim:
            raise UserError(f"KV config {kv_config.name} is for head_dim {kv_config.head_dim}, "
                            f"the model has head_dim {model_config.head_dim}")
        if max_len > model_config.max_context:
            raise UserError(f"max_len {max_len} is beyond this model's context of "
                            f"{model_config.max_context} tokens; use at most that")
        self.params, self.model_config, self.kv_config = params, model_config, kv_config
        self.slots, self.max_len, self.impl = slots, max_len, impl
        self.prefill_chunk, self.max_queue = prefill_chunk, max_queue
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.pool = PagePool(pages)
        cache = paged.init_paged_cache(kv_config, num_layers=model_config.num_layers,
                                       slots=slots, num_kv_heads=model_config.num_kv_heads,
                                       pages=pages, max_len=max_len)
        self.cache = decode_loop_form(cache)
        self.cache_bytes = paged.memory_bytes(cache)
        self._table = np.zeros((slots, cache.max_blocks), np.int32)
        self._table_dirty = False
        self._running: list[Request | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._cancel: set[Request] = set()
        self.max_concurrent = 0
        self.steps = {"decode": 0, "prefill": 0}
        self.last_error = ""

    # ---- requests (any thread) ---------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise `RequestError` if the request can never be served."""
        n = len(request.prompt)
        if n == 0:
            raise RequestError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if n + request.max_tokens > self.max_len:
            raise RequestError(
                f"the prompt has {n} tokens and max_tokens is {request.max_tokens}: "
                f"{n + request.max_tokens} > the maximum context of {self.max_len} tokens; "
                "shorten the prompt or lower max_tokens")
        need = self.pages_needed(request)
        if need > self.pool.total:
            raise RequestError(f"the request needs {need} KV pages but the pool has "
                               f"{self.pool.total}; lower max_tokens")

    def pages_needed(self, request: Request) -> int:
        """Pages reserved for ``request``: its prompt and every token it may append."""
        return paged.blocks_needed(len(request.prompt) + request.max_tokens - 1,
                                   self.kv_config)

    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises `RequestError` (never servable) or `Overloaded`."""
        self.check(request)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(
                    f"server busy: {len(self._waiting)} requests waiting and {self.pool.used} "
                    f"of {self.pool.total} KV pages in use; retry later")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """End ``request`` (e.g. its client went away); its pages return to the pool."""
        with self._lock:
            self._cancel.add(request)
            self._wake.notify()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._waiting)
        running = sum(r is not None for r in self._running)
        return {"kv_preset": self.kv_config.name, "slots": self.slots,
                "running": running, "waiting": waiting,
                "pages_total": self.pool.total, "pages_used": self.pool.used,
                "max_concurrent": self.max_concurrent, "max_len": self.max_len,
                "kv_cache_bytes": self.cache_bytes, **{f"{k}_steps": v
                                                       for k, v in self.steps.items()}}

    # ---- the loop (engine thread) ------------------------------------------------------
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._cancel and all(
                r is None for r in self._running)

    def step(self) -> bool:
        """One scheduling round: cancellations, admissions, one prefill chunk, one decode
        step. Returns whether anything ran."""
        worked = self._cancellations()
        worked |= self._admit()
        prefilling = [r for r in self._running if r is not None and r.prefilled < len(r.prompt)]
        if prefilling:
            self._prefill(min(prefilling, key=lambda r: r.id))
            worked = True
        if any(r is not None and r.prefilled == len(r.prompt) for r in self._running):
            self._decode()
            worked = True
        return worked

    def run_until_idle(self) -> None:
        while self.step() or not self.idle():
            pass

    def run_forever(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (the server's background thread). A step that
        raises ends the requests in flight with ``("done", "error")`` (their pages
        return) and the loop goes on."""
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception as err:  # noqa: BLE001 (keep serving; report per request)
                self.last_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                self._fail_running()
                continue
            if not worked:
                with self._lock:
                    if not self._waiting and not self._cancel:
                        self._wake.wait(timeout=0.05)

    def _fail_running(self) -> None:
        for r in self._running:
            if r is not None:
                self._finish(r, "error")

    def warmup(self) -> None:
        """Compile both programs (nothing is stored: every count is zero)."""
        self._run_decode(np.zeros(self.slots, np.int32), np.zeros(self.slots, bool),
                         [None] * self.slots)
        self._run_prefill(np.zeros((1, self.prefill_chunk), np.int32), 0, 0, False, None)

    # ---- internals --------------------------------------------------------------------
    def _cancellations(self) -> bool:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            for r in list(self._waiting):
                if r in cancel:
                    self._waiting.remove(r)
                    r.finish_reason = "cancelled"
                    r.emit(("done", "cancelled"))
        for r in cancel:
            if r.slot >= 0 and self._running[r.slot] is r:
                self._finish(r, "cancelled")
        return bool(cancel)

    def _admit(self) -> bool:
        admitted = False
        while True:
            with self._lock:
                if not self._waiting or None not in self._running:
                    return admitted
                request = self._waiting[0]
                pages = self.pool.alloc(self.pages_needed(request))
                if pages is None:  # FIFO: the head waits for pages
                    return admitted
                self._waiting.popleft()
            slot = self._running.index(None)
            request.slot, request.pages = slot, pages
            self._running[slot] = request
            self._table[slot] = 0
            self._table[slot, :len(pages)] = pages
            self._table_dirty = True
            admitted = True
            self.max_concurrent = max(self.max_concurrent,
                                      sum(r is not None for r in self._running))

    def _finish(self, request: Request, reason: str) -> None:
        self._running[request.slot] = None
        self.pool.release(request.pages)
        request.pages, request.finish_reason = [], reason
        request.emit(("done", reason))

    def _sampling(self, requests: Sequence[Request | None]) -> tuple[jax.Array, ...]:
        s = [r.sampling if r is not None else SamplingConfig() for r in requests]
        steps = [len(r.generated) if r is not None else 0 for r in requests]
        return (jnp.asarray([x.seed % 2**32 for x in s], jnp.uint32),
                jnp.asarray(steps, jnp.int32),
                jnp.asarray([x.temperature for x in s], jnp.float32),
                jnp.asarray([x.top_k for x in s], jnp.int32),
                jnp.asarray([x.top_p for x in s], jnp.float32))

    def _sync_table(self) -> None:
        if self._table_dirty:
            self.cache = self.cache.replace(block_table=jnp.asarray(self._table))
            self._table_dirty = False

    def _run_decode(self, tokens: np.ndarray, active: np.ndarray,
                    requests: Sequence[Request | None]) -> np.ndarray:
        self._sync_table()
        nxt, self.cache = _DECODE(self.params, self.cache, jnp.asarray(tokens),
                                  jnp.asarray(active), self._sampling(requests),
                                  config=self.model_config, impl=self.impl)
        return np.asarray(nxt)

    def _run_prefill(self, tokens: np.ndarray, count: int, slot: int, fresh: bool,
                     request: Request | None) -> int:
        self._sync_table()
        tok, self.cache = _PREFILL(
            self.params, self.cache, jnp.asarray(tokens), jnp.asarray([count], jnp.int32),
            jnp.asarray(slot, jnp.int32), jnp.asarray(fresh), self._sampling([request]),
            config=self.model_config, impl=self.impl)
        return int(np.asarray(tok)[0])

    def _prefill(self, request: Request) -> None:
        c = self.prefill_chunk
        start = request.prefilled
        piece = request.prompt[start:start + c]
        tokens = np.zeros((1, c), np.int32)
        tokens[0, :len(piece)] = piece
        tok = self._run_prefill(tokens, len(piece), request.slot, start == 0, request)
        request.prefilled += len(piece)
        self.steps["prefill"] += 1
        if request.prefilled == len(request.prompt):
            self._accept(request, tok)

    def _decode(self) -> None:
        tokens = np.zeros(self.slots, np.int32)
        active = np.zeros(self.slots, bool)
        for s, r in enumerate(self._running):
            if r is not None and r.prefilled == len(r.prompt):
                tokens[s], active[s] = r.generated[-1], True
        nxt = self._run_decode(tokens, active, self._running)
        self.steps["decode"] += 1
        for s, r in enumerate(list(self._running)):
            if r is not None and active[s]:
                self._accept(r, int(nxt[s]))

    def _accept(self, request: Request, token: int) -> None:
        """Take a generated token; finish the request at EOS, a stop, or its length."""
        request.generated.append(token)
        request.emit(("token", token))
        if not request.ignore_eos and (token in self.eos or token in request.eos):
            self._finish(request, "eos")
        elif request.stop is not None and request.stop(request.generated):
            self._finish(request, "stop")
        elif len(request.generated) >= request.max_tokens:
            self._finish(request, "length")


def sampling_shapes(slots: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The per-slot sampling arguments of the decode step, as shapes (AOT compiles)."""
    return tuple(jax.ShapeDtypeStruct((slots,), d) for d in
                 (jnp.uint32, jnp.int32, jnp.float32, jnp.int32, jnp.float32))


def decode_step_jit() -> Any:
    """The engine's jitted decode step: ``(params, cache, tokens [S], active [S],
    sampling) -> (next tokens [S], cache)``, static ``config``, ``impl``, ``platform``
    (for ahead-of-time compiles, e.g. for a TPU from a CPU host)."""
    return _DECODE


def generate_all(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int],
                 sampling: SamplingConfig | None = None) -> list[list[int]]:
    """Submit every prompt at once, run the engine until they finish, return the
    generated ids per prompt (a convenience for tests and scripts)."""
    counts = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    requests = [engine.submit(Request(list(map(int, p)), n, sampling or SamplingConfig()))
                for p, n in zip(prompts, counts, strict=True)]
    engine.run_until_idle()
    return [r.generated for r in requests]


__all__ = ["Engine", "Event", "Overloaded", "PagePool", "Request", "RequestError",
           "TRACE_COUNTS", "decode_step_jit", "generate_all", "sampling_shapes"]
