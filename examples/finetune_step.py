"""Fine-tune for a few AdamW steps with full-precision attention, then generate from the
fine-tuned params over a quantized (MixKVQ) KV cache.

    python examples/finetune_step.py [--ckpt DIR] [--steps 8] [--lr 3e-3] [--kv mixkvq]

Without ``--ckpt`` it writes the tiny random demo Llama (`write_demo_checkpoint`) to a
temporary directory and fits it to a few windows of the paragraph its tokenizer was
trained on (the loss falls within a few steps; the text stays gibberish). Training uses
`forward_full` (the cache-free causal forward: exact attention, differentiable);
generation uses `run_generation` with the quantized cache. The same params tree serves
both: nothing is converted in between.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixkvq_jax.checkpoint import load_checkpoint
from mixkvq_jax.demo_checkpoint import TRAINING_TEXT, write_demo_checkpoint
from mixkvq_jax.generate import run_generation
from mixkvq_jax.models import ModelConfig, forward_full


def next_token_loss(params: Any, tokens: jax.Array, *, config: ModelConfig) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    logits = forward_full(params, tokens[:, :-1], config=config)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(optimizer: optax.GradientTransformation, config: ModelConfig) -> Any:
    """A jitted ``(params, opt_state, tokens) -> (params, opt_state, loss)``."""

    def train_step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(next_token_loss)(params, tokens, config=config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


def training_batch(ids: list[int], batch: int, seq_len: int) -> jax.Array:
    """``batch`` windows of ``seq_len + 1`` tokens spread over ``ids`` (tiled if short)."""
    need = seq_len + 1
    ids = list(ids) * (-(-2 * need // max(len(ids), 1)))
    starts = np.linspace(0, len(ids) - need, batch).astype(int)
    return jnp.asarray(np.stack([ids[s:s + need] for s in starts]), jnp.int32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="HF / Orbax / GGUF checkpoint (default: a tiny demo model)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv", default="mixkvq", help="KV preset for generation")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or write_demo_checkpoint(Path(tmp) / "tiny")
        config, params, tokenizer = load_checkpoint(ckpt, "float32")
    if tokenizer is None:
        raise SystemExit(f"{ckpt} has no tokenizer.json")
    tokens = training_batch(tokenizer.encode(TRAINING_TEXT), args.batch, args.seq_len)

    optimizer = optax.adamw(args.lr, weight_decay=0.01)
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer, config)
    losses = []
    for step in range(args.steps):
        params, opt_state, loss = train_step(params, opt_state, tokens)
        losses.append(float(loss))
        print(f"step {step}: loss {losses[-1]:.4f}", flush=True)

    result = run_generation(params, config, args.kv, [tokenizer.encode(args.prompt)],
                            max_new_tokens=args.max_new_tokens)
    text = tokenizer.decode(result.tokens[0])
    print(f"{args.prompt!r} -> {text!r}")
    print(result.stats.line())
    return {"losses": losses, "tokens": result.tokens[0], "text": text,
            "stats": result.stats}


if __name__ == "__main__":
    main()
