"""Serving many users from one paged quantized KV cache.

* `mixkvq_jax.serve.engine`: continuous batching (`Engine`, `Request`) over
  `mixkvq_jax.paged.PagedKVCache`.
* `mixkvq_jax.serve.server`: an OpenAI-compatible HTTP API (completions and chat
  completions, streaming included) on FastAPI + uvicorn, the engine in a background thread.
* ``python -m mixkvq_jax.serve --ckpt PATH --kv mixkvq --kv-budget-gb N``: the server.
"""

from mixkvq_jax.serve.engine import (
    Engine,
    Overloaded,
    PagePool,
    Request,
    RequestError,
    generate_all,
)

__all__ = ["Engine", "Overloaded", "PagePool", "Request", "RequestError", "generate_all"]
