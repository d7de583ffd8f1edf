"""Passkey retrieval: a random 5-digit number hidden in repetitive filler, asked for at
the end; greedy-decoded answer, exact match per KV preset.

Prompt layout (token counts exact; pieces are tokenized separately and concatenated)::

    INTRO  FILLER ... FILLER  KEY_SENTENCE  FILLER ... FILLER  QUESTION

The key sentence starts at a filler-unit boundary, at the requested *depth*: the
fraction of the filler that precedes it (0 = right after the intro, 1 = right before the
question). The filler is cut to make the prompt exactly ``length`` tokens.

Library::

    sample = make_passkey_prompt(tokenizer, length=1024, depth=0.5, passkey="48213")
    results = run_passkey(params, model_config, tokenizer, kv_config, lengths=[512, 1024],
                          depths=[0.1, 0.5, 0.9], samples=1, seed=0)
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Any

from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.errors import UserError
from mixkvq_jax.eval.completions import greedy_completions
from mixkvq_jax.eval.text import tokenize
from mixkvq_jax.models import ModelConfig
from mixkvq_jax.models.transformer import Params

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
KEY_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    """One prompt.

    Attributes:
      tokens: the prompt ids (``len(tokens) == length``).
      passkey: the 5-digit answer.
      depth: the requested depth; ``actual_depth`` the achieved one (filler before the
        key / all filler), within one filler unit of it.
      key_start, key_end: token span of the key sentence in ``tokens``.
      length: prompt tokens.
    """

    tokens: tuple[int, ...]
    passkey: str
    depth: float
    actual_depth: float
    key_start: int
    key_end: int
    length: int


def make_passkey_prompt(tokenizer: Any, *, length: int, depth: float, passkey: str,
                        bos_id: int | None = None) -> PasskeySample:
    """A passkey prompt of exactly ``length`` tokens with the key at ``depth``.

    ``tokenizer``: an object with ``encode(text, add_special_tokens=False)`` or a callable
    text -> ids. ``bos_id`` is prepended when given (counted in ``length``).
    """
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"passkey depth must be in [0, 1], got {depth}")
    if not re.fullmatch(r"\d{5}", passkey):
        raise UserError(f"passkey must be 5 digits, got {passkey!r}")
    head = ([bos_id] if bos_id is not None else []) + tokenize(tokenizer, INTRO)
    key = tokenize(tokenizer, KEY_TEMPLATE.format(key=passkey))
    question = tokenize(tokenizer, QUESTION)
    unit = tokenize(tokenizer, FILLER)
    n_filler = length - len(head) - len(key) - len(question)
    if n_filler < len(unit):
        raise UserError(f"passkey length {length} is too short: intro, key and question "
                        f"already take {length - n_filler} tokens; use at least "
                        f"{length - n_filler + len(unit)}")
    n_units = -(-n_filler // len(unit))
    filler = (unit * n_units)[:n_filler]
    # Insert at a unit boundary: the nearest to depth * n_filler that keeps whole units.
    cut = int(round(depth * n_filler / len(unit))) * len(unit)
    cut = min(cut, (n_filler // len(unit)) * len(unit))
    tokens = head + filler[:cut] + key + filler[cut:] + question
    assert len(tokens) == length, (len(tokens), length)
    start = len(head) + cut
    return PasskeySample(tuple(tokens), passkey, depth, cut / n_filler, start,
                         start + len(key), length)


def extract_answer(text: str) -> str | None:
    """The first run of 5 digits in ``text`` (None when there is none)."""
    match = re.search(r"(?<!\d)(\d{5})(?!\d)", text)
    return match.group(1) if match else None


def random_passkey(rng: random.Random) -> str:
    return f"{rng.randint(10000, 99999)}"


@dataclasses.dataclass
class PasskeyResult:
    """One decoded prompt."""

    preset: str
    length: int
    depth: float
    passkey: str
    answer: str | None
    completion: str

    @property
    def correct(self) -> bool:
        return self.answer == self.passkey


def build_samples(tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                  samples: int, seed: int, bos_id: int | None = None
                  ) -> list[PasskeySample]:
    """Prompts for every (length, depth, sample); keys from ``random.Random(seed)``, the
    same for every preset."""
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                out.append(make_passkey_prompt(tokenizer, length=length, depth=depth,
                                               passkey=random_passkey(rng), bos_id=bos_id))
    return out


def run_passkey(params: Params, model_config: ModelConfig, tokenizer: Any,
                kv_config: KVQuantConfig, prompts: Sequence[PasskeySample], *,
                prefill_chunk: int = 256, batch: int = 3, impl: str = "auto",
                progress: bool = True) -> list[PasskeyResult]:
    """Greedy-decode ``ANSWER_TOKENS`` tokens for each prompt over ``kv_config``.

    Prompts of equal length are batched (``batch`` at a time).
    """
    texts = greedy_completions(params, model_config, tokenizer, kv_config,
                               [p.tokens for p in prompts], max_new_tokens=ANSWER_TOKENS,
                               prefill_chunk=prefill_chunk, batch=batch, impl=impl,
                               progress=progress, desc=f"passkey {kv_config.name}")
    return [PasskeyResult(kv_config.name, p.length, p.depth, p.passkey, extract_answer(text),
                          text) for p, text in zip(prompts, texts, strict=True)]


def accuracy_table(results: Sequence[PasskeyResult]) -> list[dict[str, Any]]:
    """Rows (preset, length, depth, correct, total, accuracy)."""
    cells: dict[tuple[str, int, float], list[bool]] = {}
    for r in results:
        cells.setdefault((r.preset, r.length, r.depth), []).append(r.correct)
    return [{"preset": k[0], "length": k[1], "depth": k[2], "correct": sum(v), "total": len(v),
             "accuracy": sum(v) / len(v)} for k, v in cells.items()]


def format_table(results: Sequence[PasskeyResult], lengths: Sequence[int]) -> str:
    """Markdown: one row per preset, ``correct/total`` per length (``-`` = not run)."""
    presets = list(dict.fromkeys(r.preset for r in results))
    head = ["preset", *(str(n) for n in lengths)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset in presets:
        cells = [preset]
        for n in lengths:
            got = [r.correct for r in results if r.preset == preset and r.length == n]
            cells.append(f"{sum(got)}/{len(got)}" if got else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
