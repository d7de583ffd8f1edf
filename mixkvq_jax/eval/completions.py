"""Greedy completions of many prompts over one KV preset, batched by prompt length: what
the retrieval evaluations (`passkey`, `longctx`) score."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.errors import UserError
from mixkvq_jax.models import ModelConfig
from mixkvq_jax.models.transformer import Params


def check_fits_context(lengths: Sequence[int], answer_tokens: int, max_context: int,
                       what: str = "prompt length") -> None:
    """One-line error when a prompt of ``lengths`` plus its answer exceeds the model."""
    longest = max(lengths)
    if longest + answer_tokens > max_context:
        raise UserError(f"{what} {longest} + {answer_tokens} answer tokens exceeds the "
                        f"model's maximum context {max_context}; use shorter lengths")


def greedy_completions(params: Params, model_config: ModelConfig, tokenizer: Any,
                       kv_config: KVQuantConfig, prompts: Sequence[Sequence[int]], *,
                       max_new_tokens: int, prefill_chunk: int = 256, batch: int = 3,
                       impl: str = "auto", progress: bool = True,
                       desc: str = "") -> list[str]:
    """The decoded greedy continuation (``max_new_tokens`` tokens, no EOS stop) of each
    prompt, in order. Consecutive prompts of equal length share a batch (``batch`` at a
    time), so their shapes compile once."""
    from mixkvq_jax.generate import run_generation

    check_fits_context([len(p) for p in prompts], max_new_tokens, model_config.max_context)
    groups: list[list[int]] = []  # prompt indices
    for i, p in enumerate(prompts):
        if (groups and len(prompts[groups[-1][0]]) == len(p)
                and len(groups[-1]) < batch):
            groups[-1].append(i)
        else:
            groups.append([i])
    it: Any = groups
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(groups, desc=desc or kv_config.name, unit="batch", file=sys.stderr,
                  leave=False)
    texts: list[str] = [""] * len(prompts)
    for group in it:
        out = run_generation(params, model_config, kv_config, [list(prompts[i]) for i in group],
                             max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                             eos_token_ids=(), impl=impl, progress=False)
        for i, ids in zip(group, out.tokens, strict=True):
            texts[i] = tokenizer.decode(ids) if hasattr(tokenizer, "decode") else str(ids)
    return texts


__all__ = ["check_fits_context", "greedy_completions"]
