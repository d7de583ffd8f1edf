"""An OpenAI-compatible HTTP API over the continuous-batching `Engine` (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events ending in ``data: [DONE]``, as OpenAI's), ``GET /v1/models`` and
``GET /health`` (the engine's slots, queue and KV page usage).

The engine runs in one background thread (started and stopped with the app); a handler
submits a `Request` whose events come back to its event loop through an asyncio queue.
Errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``:

=====  ================================================================================
400    malformed JSON, a field of the wrong type or range (negative ``max_tokens``,
       ``n`` != 1, ...), a prompt longer than the maximum context, no chat template
404    an unknown ``model``
429    the admission queue is full (``Retry-After`` header): retry later
500    a step of the engine failed (the request's pages are freed; the engine goes on)
503    the engine is not running
=====  ================================================================================

A client that disconnects (mid-stream or while waiting) cancels its request; the engine
returns its KV pages to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HTTPRequest

from mixkvq_jax.errors import UserError
from mixkvq_jax.generate import SamplingConfig, _TextTracker
from mixkvq_jax.serve.engine import Engine, Overloaded, Request, RequestError


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- request parsing ------------------------------------------------------------------------
def _field(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        kinds = " or ".join(t.__name__ for t in types)
        raise APIError(400, f"'{name}' must be {kinds}, got {json.dumps(value)[:40]}",
                       param=name)
    return value


def _sampling(body: dict[str, Any]) -> SamplingConfig:
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    top_k = int(_field(body, "top_k", (int,), 0))
    seed = _field(body, "seed", (int,), None)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}",
                       param="temperature")
    if seed is None:
        seed = uuid.uuid4().int % 2**31 if temperature > 0 else 0
    try:
        return SamplingConfig(temperature, top_k, top_p, seed % 2**63)
    except UserError as err:
        raise APIError(400, str(err)) from None


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    return stops


async def _json_body(request: HTTPRequest) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err}); send a JSON "
                       "object") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


# ---- the app ------------------------------------------------------------------------------
class Service:
    """The engine, its thread and the tokenizer behind the HTTP handlers."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.eos = frozenset(getattr(tokenizer, "eos_token_ids", ()) or ())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.engine.run_forever, args=(self._stop,),
                                            name="mixkvq-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- prompts ---------------------------------------------------------------------
    def _check_model(self, body: dict[str, Any]) -> None:
        model = _field(body, "model", (str,), self.model_name)
        if model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves "
                           f"'{self.model_name}' (GET /v1/models)", param="model",
                           code="model_not_found")

    def _encode(self, text: str, *, special: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer; send the prompt as a list "
                           "of token ids", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=special)

    def completion_prompt(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self._encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in prompt):
            return list(prompt)
        raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt "
                       "per request)", param="prompt")

    def chat_prompt(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}",
                           param="messages")
        plain = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                    content, str):
                raise APIError(400, "each message needs a string 'role' and text 'content'",
                               param="messages")
            plain.append({"role": m["role"], "content": content})
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           param="messages")
        return self._encode(self.tokenizer.apply_chat_template(plain), special=False)

    # ---- one request -----------------------------------------------------------------
    def build(self, body: dict[str, Any], prompt: list[int], *, chat: bool
              ) -> tuple[Request, list[str], asyncio.Queue]:
        if _field(body, "n", (int,), 1) != 1:
            raise APIError(400, "'n' must be 1 (one choice per request)", param="n")
        if body.get("logprobs") not in (None, False) or body.get("echo"):
            raise APIError(400, "'logprobs' and 'echo' are not supported", param="logprobs")
        room = self.engine.max_len - len(prompt)
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        given = [(n, body[n]) for n in names if body.get(n) is not None]
        name, max_tokens = given[0] if given else ("max_tokens", None)
        if max_tokens is None:
            max_tokens = max(1, room) if chat else 16
        max_tokens = _field({name: max_tokens}, name, (int,), None)
        if max_tokens < 1:
            raise APIError(400, f"'{name}' must be >= 1, got {max_tokens}", param=name)
        if len(prompt) >= self.engine.max_len:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, the maximum context is "
                           f"{self.engine.max_len}; shorten the prompt", param="prompt",
                           code="context_length_exceeded")
        stops = _stops(body)
        sampling = _sampling(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop_fn = None
        if stops:
            tok = self.tokenizer
            stop_fn = lambda ids: any(s in tok.decode(ids) for s in stops)
        ignore_eos = bool(_field(body, "ignore_eos", (bool,), False))  # vLLM's extension
        request = Request(prompt, max_tokens, sampling, eos=self.eos, stop=stop_fn,
                          ignore_eos=ignore_eos,
                          on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            self.engine.check(request)
        except RequestError as err:
            raise APIError(400, str(err), code="context_length_exceeded") from None
        return request, stops, events

    def submit(self, request: Request) -> None:
        if not self.running:
            raise APIError(503, "the engine is not running; retry later",
                           kind="service_unavailable")
        try:
            self.engine.submit(request)
        except Overloaded as err:
            raise APIError(429, str(err), kind="rate_limit_error",
                           code="server_busy") from None
        except RequestError as err:
            raise APIError(400, str(err)) from None

    def tracker(self, stops: list[str], sink: Any = None) -> _TextTracker:
        return _TextTracker(self.tokenizer or _NoText(), stops, set(self.eos), sink)


class _NoText:
    """Stand-in tokenizer when the checkpoint has none: no text, token ids only."""

    def decode(self, ids: Any) -> str:
        return ""


class _Deltas:
    """A text sink for `_TextTracker` that collects what it writes."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        out, self.parts = "".join(self.parts), []
        return out


def _usage(prompt: list[int], generated: list[int]) -> dict[str, int]:
    return {"prompt_tokens": len(prompt), "completion_tokens": len(generated),
            "total_tokens": len(prompt) + len(generated)}


def _reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def create_app(engine: Engine, tokenizer: Any, model_name: str) -> FastAPI:
    """The FastAPI app: the engine thread starts and stops with it (its lifespan)."""
    service = Service(engine, tokenizer, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="mixkvq_jax", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return err.response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if service.running else "stopped", **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "mixkvq_jax"}]}

    async def handle(http: HTTPRequest, chat: bool) -> Any:
        body = await _json_body(http)
        service._check_model(body)
        prompt = service.chat_prompt(body) if chat else service.completion_prompt(body)
        request, stops, events = service.build(body, prompt, chat=chat)
        stream = bool(_field(body, "stream", (bool,), False))
        service.submit(request)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if stream:
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _stream(service, request, stops, events, rid, created, chat, usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        tracker = service.tracker(stops)
        try:
            while True:
                try:
                    kind_, value = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return None
                    continue
                if kind_ == "token":
                    tracker.update(request.generated[:])
                elif kind_ == "done":
                    break
        finally:
            if request.finish_reason is None:
                engine.cancel(request)
        if value == "error":
            raise APIError(500, f"generation failed: {engine.last_error}", kind="server_error")
        tracker.update(request.generated)
        finish = _reason(value if not tracker.stopped else "stop")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": tracker.text}
        else:
            choice["text"] = tracker.text
        return {"id": rid, "object": kind, "created": created, "model": model_name,
                "choices": [choice], "usage": _usage(prompt, request.generated)}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Any:
        return await handle(http, chat=True)

    return app


async def _stream(service: Service, request: Request, stops: list[str], events: asyncio.Queue,
                  rid: str, created: int, chat: bool, usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one request; cancels it if the client goes away."""
    sink = _Deltas()
    tracker = service.tracker(stops, sink)
    kind = "chat.completion.chunk" if chat else "text_completion"
    name = service.model_name

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created,
                                      "model": name, "choices": [choice]}) + "\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            kind_, value = await events.get()
            if kind_ == "token":
                tracker.update(request.generated[:])
                text = sink.take()
                if text:
                    yield chunk(text, None)
            elif kind_ == "done" and value == "error":
                error = {"message": f"generation failed: {service.engine.last_error}",
                         "type": "server_error", "param": None, "code": None}
                yield "data: " + json.dumps({"error": error}) + "\n\n"
                return
            elif kind_ == "done":
                tracker.finish()
                yield chunk(sink.take(), _reason("stop" if tracker.stopped else value))
                if usage:
                    yield "data: " + json.dumps({
                        "id": rid, "object": kind, "created": created, "model": name,
                        "choices": [], "usage": _usage(request.prompt, request.generated)}) + "\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:  # the client went away (or the stream ended): free the request's pages
        if request.finish_reason is None:
            service.engine.cancel(request)


# ---- running it --------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` on uvicorn in a background thread (``port`` 0: an ephemeral one);
    yields its base URL and shuts it down on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join()


__all__ = ["APIError", "Service", "create_app", "serve_in_thread"]
