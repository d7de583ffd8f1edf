"""Serving: the paged cache, continuous batching (greedy output of concurrent requests
equals each request alone), and the OpenAI-compatible server (bad input, cancellation,
load)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixkvq_jax import cache as kvc
from mixkvq_jax import paged
from mixkvq_jax.attention import cached_attention
from mixkvq_jax.config import load_kv_config
from mixkvq_jax.generate import run_generation
from mixkvq_jax.models import ModelConfig, init_params
from mixkvq_jax.serve import Engine, PagePool, Request, generate_all
from mixkvq_jax.serve import engine as engine_mod
from tests.helpers import random_stream, small_config

PRESETS = ["bf16", "mixkvq", "kivi2"]


def _kv(name: str, head_dim: int = 32):
    extra = {"sink_tokens": 1} if name == "mixkvq" else {}
    return small_config(name, head_dim=head_dim, **extra)


# ---- the paged cache ---------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_paged_cache_stores_and_attends_like_the_contiguous_one(name):
    cfg = _kv(name)
    layers, batch, kv_heads, q_heads, d = 2, 3, 2, 4, 32
    k, v, q = random_stream(0, layers, batch, 150, kv_heads, q_heads, d)
    counts = jnp.array([150, 70, 33], jnp.int32)
    ref = kvc.init_cache(cfg, num_layers=layers, batch=batch, num_kv_heads=kv_heads,
                         max_len=160)
    pc = paged.init_paged_cache(cfg, num_layers=layers, slots=batch, num_kv_heads=kv_heads,
                                pages=20, max_len=160)
    table = np.random.default_rng(0).permutation(20)[:batch * pc.max_blocks]
    pc = pc.replace(block_table=jnp.asarray(table.reshape(batch, -1), jnp.int32))

    def run(c):  # prefill in two chunks: blocks complete in both
        for lo, hi in ((0, 90), (90, 150)):
            n = jnp.clip(counts - lo, 0, hi - lo)
            table = getattr(c, "block_table", None)
            update = lambda layer, kk, vv, qq, c=c, n=n, table=table: kvc.update_layer(
                layer, c.lengths, kk, vv, qq, n, cfg, block_table=table)
            c = kvc.advance(c, jax.vmap(update)(c.layers, k[:, :, lo:hi], v[:, :, lo:hi],
                                                q[:, :, lo:hi]), n)
        return c

    ref, pc = run(ref), run(pc)
    keys_ref, values_ref = kvc.dequantize(ref)
    keys_pc, values_pc = kvc.dequantize(paged.to_contiguous(pc))
    for b, n in enumerate(counts.tolist()):
        np.testing.assert_array_equal(keys_ref[:, b, :, :n], keys_pc[:, b, :, :n])
        np.testing.assert_array_equal(values_ref[:, b, :, :n], values_pc[:, b, :, :n])
    layer0 = lambda c: jax.tree.map(lambda x: x[0], c.layers)
    a = cached_attention(q[0, :, :1], layer0(ref), ref.lengths, cfg, impl="xla")
    p = cached_attention(q[0, :, :1], layer0(pc), pc.lengths, cfg, impl="xla",
                         block_table=pc.block_table)
    np.testing.assert_array_equal(a.out, p.out)
    np.testing.assert_array_equal(a.lse, p.lse)


def test_plan_pool_gives_quantized_presets_more_sequences():
    dims = {"num_layers": 30, "num_kv_heads": 3}  # SmolLM2-135M
    budget = 256 * 2**20
    plans = {name: paged.plan_pool(load_kv_config(name, 64), budget_bytes=budget,
                                   max_len=2048, typical_tokens=1536, **dims)
             for name in ("bf16", "kivi2", "mixkvq")}
    for name, (slots, pages) in plans.items():
        cfg = load_kv_config(name, 64)
        used = (slots * paged.slot_bytes(cfg, max_len=2048, **dims)
                + pages * paged.page_bytes(cfg, **dims))
        assert used <= budget < used + paged.page_bytes(cfg, **dims)
    assert plans["mixkvq"][0] >= 3 * plans["bf16"][0] and plans["kivi2"][0] > plans["mixkvq"][0]
    with pytest.raises(ValueError, match="raise the budget"):
        paged.plan_pool(load_kv_config("bf16", 64), budget_bytes=2**20, max_len=2048,
                        typical_tokens=1536, **dims)


def test_page_pool_hands_out_and_takes_back():
    pool = PagePool(5)
    a = pool.alloc(3)
    assert a == [0, 1, 2] and pool.used == 3 and pool.alloc(3) is None and pool.used == 3
    pool.release(a)
    assert pool.free == 5 and sorted(pool.alloc(5)) == [0, 1, 2, 3, 4]


# ---- the engine -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                      max_position_embeddings=512)
    return cfg, init_params(cfg, seed=0, init_std=0.3)


PROMPT_LENGTHS, MAX_TOKENS = (5, 40, 77, 100, 33), (30, 50, 20, 45, 64)


@pytest.mark.parametrize("name", PRESETS)
def test_concurrent_requests_equal_each_request_alone(tiny_model, name):
    cfg, params = tiny_model
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 128, n).tolist() for n in PROMPT_LENGTHS]
    # 3 slots, 24 pages of 32 tokens: 5 requests join and leave a running batch; the
    # prompts are prefilled in chunks of 32 while others decode.
    engine = Engine(params, cfg, _kv(name), slots=3, pages=24, max_len=256, prefill_chunk=32)
    engine_mod.TRACE_COUNTS.clear()
    together = generate_all(engine, prompts, MAX_TOKENS)
    assert engine.max_concurrent == 3 and engine.pool.used == 0
    alone = [generate_all(engine, [p], [n])[0] for p, n in zip(prompts, MAX_TOKENS, strict=True)]
    assert together == alone
    assert [len(t) for t in together] == list(MAX_TOKENS)
    assert len({tuple(t) for t in together}) == len(prompts)  # not one degenerate output
    # One compiled decode step and one prefill chunk, whatever joined or left.
    assert dict(engine_mod.TRACE_COUNTS) == {"decode_step": 1, "prefill_chunk": 1}
    assert engine.pool.used == 0 and engine.stats()["running"] == 0


def test_engine_bf16_equals_the_non_paged_generation(tiny_model):
    cfg, params = tiny_model
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 128, 70).tolist()
    kv = load_kv_config("bf16", 32, full_dtype="float32", residual_length=32,
                        key_group_size=16)
    engine = Engine(params, cfg, kv, slots=2, pages=8, max_len=128, prefill_chunk=32)
    got = generate_all(engine, [prompt], 40)[0]
    want = run_generation(params, cfg, kv, [prompt], max_new_tokens=40, prefill_chunk=32,
                          eos_token_ids=()).tokens[0]
    assert got == want


def test_admission_waits_for_free_pages_and_cancel_frees_them(tiny_model):
    cfg, params = tiny_model
    # Each request reserves (40 + 60 - 1) // 32 = 3 pages; 7 pages hold two at a time
    # although there are 4 slots.
    engine = Engine(params, cfg, _kv("kivi2"), slots=4, pages=7, max_len=128,
                    prefill_chunk=32, max_queue=3)
    prompts = [[i + 1] * 40 for i in range(3)]
    reqs = [engine.submit(Request(p, 60)) for p in prompts]
    with pytest.raises(engine_mod.Overloaded, match="retry later"):
        for _ in range(3):
            engine.submit(Request(prompts[0], 60))
    engine.step()
    assert engine.pool.used == 6 and engine.stats()["running"] == 2
    engine.cancel(reqs[0])
    engine.step()  # the cancelled request leaves; the third one takes its pages
    assert reqs[0].finish_reason == "cancelled" and engine.pool.used == 6
    engine.run_until_idle()
    assert engine.max_concurrent == 2 and engine.pool.used == 0
    assert all(r.finish_reason == "length" for r in reqs[1:3])
    with pytest.raises(engine_mod.RequestError, match="maximum context"):
        engine.submit(Request([1] * 100, 29))


def test_a_failing_step_ends_the_requests_in_flight_and_the_engine_goes_on(tiny_model,
                                                                           monkeypatch):
    import threading

    cfg, params = tiny_model
    engine = Engine(params, cfg, _kv("kivi2"), slots=3, pages=24, max_len=256,
                    prefill_chunk=32)
    events = []
    first = engine.submit(Request([5] * 40, 30, on_event=events.append))
    real = engine._decode
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure\nwith a second line")
        real()

    monkeypatch.setattr(engine, "_decode", flaky)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run_forever, args=(stop,))
    thread.start()
    try:
        for _ in range(2000):
            if first.finish_reason is not None:
                break
            time.sleep(0.01)
        assert first.finish_reason == "error" and events[-1] == ("done", "error")
        assert engine.last_error == "RuntimeError: injected failure"
        assert engine.pool.used == 0
        second = engine.submit(Request([5] * 40, 5))
        for _ in range(2000):
            if second.finish_reason is not None:
                break
            time.sleep(0.01)
        assert second.finish_reason == "length" and len(second.generated) == 5
    finally:
        stop.set()
        thread.join()


# ---- the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(demo_model):
    from mixkvq_jax.serve.server import create_app, serve_in_thread

    cfg, params, tok = demo_model
    kv = load_kv_config("mixkvq", 64, residual_length=32, key_group_size=16,
                        value_group_size=16, full_dtype="float32")
    engine = Engine(params, cfg, kv, slots=2, pages=12, max_len=256, prefill_chunk=32,
                    max_queue=2, eos_token_ids=())
    with serve_in_thread(create_app(engine, tok, "demo")) as url:
        yield url, engine, tok


def _wait_idle(client: httpx.Client) -> dict:
    for _ in range(600):  # the engine frees a cancelled request at its next step
        health = client.get("/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {health}")


def test_completions_and_chat_match_the_engine(server):
    url, engine, tok = server
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "demo"
        body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 12,
                "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        ids = tok.encode("Once upon a time")
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12,
                                "total_tokens": len(ids) + 12}
        assert out["choices"][0]["finish_reason"] == "length"
        text = out["choices"][0]["text"]
        # The same request as token ids, streamed: the same text, piece by piece.
        chunks = []
        with client.stream("POST", "/v1/completions",
                           json={**body, "prompt": ids, "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
        assert chunks[-1] == "[DONE]"
        events = [json.loads(c) for c in chunks[:-1]]
        assert "".join(e["choices"][0]["text"] for e in events) == text
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 5, "temperature": 0}
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        assert r.json()["usage"]["completion_tokens"] == 5
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as resp:
            lines = [x for x in resp.iter_lines() if x.startswith("data: ")]
        first = json.loads(lines[0][6:])
        assert first["object"] == "chat.completion.chunk"
        assert first["choices"][0]["delta"] == {"role": "assistant"} and lines[-1] == "data: [DONE]"
        assert _wait_idle(client)["pages_used"] == 0


def test_the_official_openai_client_works(server):
    """The `openai` Python package against this server: completions, chat, streaming,
    and its error type for a 404."""
    openai = pytest.importorskip("openai")
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6,
                                     temperature=0)
    assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ({"prompt": "hi " * 300}, 400, "maximum context"),
    ({"prompt": "hi", "max_tokens": 255}, 400, "maximum context"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "'max_tokens' must be >= 1"),
    ({"prompt": "hi", "max_tokens": "many"}, 400, "'max_tokens' must be int"),
    ({"prompt": "hi", "n": 2}, 400, "'n' must be 1"),
    ({"prompt": {"text": "hi"}}, 400, "'prompt' must be"),
    ({"prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "temperature": 7}, 400, "'temperature' must be in"),
])
def test_bad_input_is_a_clear_http_error(server, body, status, words):
    url, _, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert words in error["message"] and "\n" not in error["message"]


def test_chat_needs_messages(server):
    url, _, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=60)
    assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]


def test_client_disconnect_mid_stream_frees_its_pages(server):
    url, engine, _ = server
    with httpx.Client(base_url=url, timeout=120) as client:
        before = engine.steps["decode"]
        body = {"prompt": "once upon a time " * 8, "max_tokens": 150, "temperature": 0,
                "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            got = 0
            for line in resp.iter_lines():
                got += line.startswith("data: ")
                if got == 3:
                    break  # leave mid-stream: closing the response drops the connection
        assert got == 3
        health = _wait_idle(client)
        assert health["pages_used"] == 0
    # Cancelled, not run to its 150 tokens.
    assert 2 <= engine.steps["decode"] - before < 149


def test_load_loses_no_request_and_frees_every_page(server):
    """12 requests at once at a server with 2 slots and a queue of 2: each one is
    answered (200 with its tokens, or 429 with a message), none is lost, and the pool
    is empty afterwards."""
    url, _, _ = server

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, dict | str]:
        body = {"prompt": f"request {i} " * (3 + i), "max_tokens": 10 + i, "temperature": 0}
        if i % 2:
            text, code = [], None
            async with client.stream("POST", "/v1/completions",
                                     json={**body, "stream": True}) as resp:
                code = resp.status_code
                async for line in resp.aiter_lines():
                    text.append(line)
                if code != 200:
                    return code, json.loads("".join(text))
            return code, text[-2] if len(text) > 1 else ""
        resp = await client.post("/v1/completions", json=body)
        return resp.status_code, resp.json()

    async def fire() -> list[tuple[int, dict | str]]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    results = asyncio.run(fire())
    codes = [c for c, _ in results]
    assert len(results) == 12 and set(codes) <= {200, 429}
    # The first two always find room in the queue; 12 at once overflow it.
    assert codes.count(429) >= 1 and codes.count(200) >= 2
    for (code, payload), i in zip(results, range(12), strict=True):
        if code == 429:
            assert "retry later" in payload["error"]["message"]
        elif i % 2 == 0:
            assert payload["usage"]["completion_tokens"] == 10 + i
        else:
            assert payload == "data: [DONE]"
    with httpx.Client(base_url=url, timeout=60) as client:
        health = _wait_idle(client)
    assert health["pages_used"] == 0 and health["max_concurrent"] == 2


def test_cli_rejects_bad_settings(capsys):
    from mixkvq_jax.serve.__main__ import main

    assert main(["--kv-budget-gb", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --kv-budget-gb must be > 0, got -1.0"
