"""Long-context retrieval: does the model still find a fact far back in a long prompt
over a quantized cache?

Two tasks, each scored by exact match of a number in the greedy answer:

* ``passkey``: a 5-digit key in repetitive filler (`mixkvq_jax.eval.passkey`).
* ``needle``: a fact sentence ("The special magic number for <word> is <7 digits>.")
  placed at a sentence boundary at the requested depth of real text, and a question
  about it at the end (the single-needle task of RULER). The haystack is a run of whole
  sentences starting at a random sentence of the text, cut to the exact length.

Every (task, length) gets ``samples`` prompts whose depths cycle through ``depths``,
from one seeded PRNG, identical for every preset. Accuracy comes with a Wilson 95%
interval, so 30 prompts per cell can tell a 100% preset from a 70% one but not from a
93% one.

Library::

    text = haystack_text(None)              # the Jargon File or Debian's licenses
    prompts = build_prompts(tok, text, tasks=("passkey", "needle"), lengths=[1024, 2048],
                            depths=[0.1, 0.5, 0.9], samples=30, seed=0)
    rows = run_prompts(params, model_config, tok, kv_config, prompts)
    table = summarize(rows)                 # accuracy and interval per task/length/preset
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixkvq_jax.config import KVQuantConfig
from mixkvq_jax.errors import UserError
from mixkvq_jax.eval import passkey as pk
from mixkvq_jax.eval import text as text_mod
from mixkvq_jax.eval.completions import greedy_completions
from mixkvq_jax.models import ModelConfig
from mixkvq_jax.models.transformer import Params

TASKS = ("passkey", "needle")
ANSWER_TOKENS = 12  # a 7-digit number takes up to 7 tokens, after " " and a few words
NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure "
                "to memorize them. I will quiz you about the numbers afterwards.\n")
NEEDLE_TEMPLATE = " The special magic number for {key} is {value}."
NEEDLE_QUESTION = ("\n\nWhat is the special magic number for {key} mentioned in the text "
                   "above? The special magic number for {key} is")
NEEDLE_KEYS = tuple(
    "apple harbor violin glacier lantern meadow falcon copper orchid canyon velvet tundra "
    "compass marble thunder saffron beacon willow quartz ember pepper lagoon cobalt hazel "
    "summit pebble nectar cedar ivory maple sparrow topaz breeze walnut coral juniper "
    "prairie cinder garnet mosaic".split())
# Debian installs these with base-files: real English prose present on every Debian
# machine (~200 kB together), the haystack when no --text is given and no Jargon File.
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "Apache-2.0", "MPL-2.0",
                 "Artistic")
MIN_HAYSTACK_TOKENS = 16


def haystack_text(path: str | Path | None) -> tuple[str, str]:
    """(text, description) of the needle haystack: ``path``; else the Jargon File when
    installed; else Debian's license texts; else a one-line error naming the fix."""
    if path is None and text_mod.default_text_path() is None:
        files = [LICENSE_DIR / name for name in LICENSE_FILES if (LICENSE_DIR / name).is_file()]
        if files:
            text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
            return text_mod.normalize_whitespace(text), f"{LICENSE_DIR} ({len(files)} texts)"
        raise UserError("no --text given, the Jargon File is not installed and there are no "
                        f"license texts in {LICENSE_DIR}; pass --text FILE (UTF-8, .gz ok)")
    resolved = text_mod.resolve_text_path(path)
    return text_mod.read_text(resolved), resolved.name


@dataclasses.dataclass(frozen=True)
class RetrievalPrompt:
    """One prompt: ``tokens`` (exactly ``length``), the ``answer`` digits, the requested
    ``depth`` and the achieved one (tokens before the fact / all filler tokens)."""

    task: str
    tokens: tuple[int, ...]
    answer: str
    length: int
    depth: float
    actual_depth: float


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after ``.``, ``!``, ``?`` or a blank line)."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


def tokenize_sentences(tokenizer: Any, text: str, *, max_chars: int = 600_000
                       ) -> list[list[int]]:
    """Each sentence of the first ``max_chars`` of ``text`` tokenized on its own, with a
    leading space (how it reads after the previous sentence)."""
    return [text_mod.tokenize(tokenizer, " " + s) for s in split_sentences(text[:max_chars])]


def make_needle_prompt(tokenizer: Any, sentences: Sequence[Sequence[int]], *, length: int,
                       depth: float, key: str, value: str, start: int,
                       bos_id: int | None = None) -> RetrievalPrompt:
    """A needle prompt of exactly ``length`` tokens: intro, haystack sentences from
    sentence ``start`` on (cut to fit), the fact at the sentence boundary nearest
    ``depth`` of the haystack, the question."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"needle depth must be in [0, 1], got {depth}")
    head = ([bos_id] if bos_id is not None else []) + text_mod.tokenize(tokenizer, NEEDLE_INTRO)
    needle = text_mod.tokenize(tokenizer, NEEDLE_TEMPLATE.format(key=key, value=value))
    question = text_mod.tokenize(tokenizer, NEEDLE_QUESTION.format(key=key))
    n_hay = length - len(head) - len(needle) - len(question)
    if n_hay < MIN_HAYSTACK_TOKENS:
        raise UserError(f"needle length {length} is too short: intro, fact and question "
                        f"already take {length - n_hay} tokens; use at least "
                        f"{length - n_hay + MIN_HAYSTACK_TOKENS}")
    total = sum(len(s) for s in sentences)
    if total < n_hay:
        raise UserError(f"the haystack text has {total} tokens, fewer than the {n_hay} a "
                        f"{length}-token prompt needs; pass a longer --text")
    hay: list[int] = []
    bounds = [0]  # token offsets where a sentence starts
    i = start
    while len(hay) < n_hay:
        hay += sentences[i % len(sentences)]
        bounds.append(min(len(hay), n_hay))
        i += 1
    hay = hay[:n_hay]
    cut = min(bounds, key=lambda b: (abs(b - depth * n_hay), b))
    tokens = head + hay[:cut] + needle + hay[cut:] + question
    assert len(tokens) == length, (len(tokens), length)
    return RetrievalPrompt("needle", tuple(tokens), value, length, depth, cut / n_hay)


def _from_passkey(sample: pk.PasskeySample) -> RetrievalPrompt:
    return RetrievalPrompt("passkey", sample.tokens, sample.passkey, sample.length,
                           sample.depth, sample.actual_depth)


def check_tasks(tasks: Sequence[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"unknown long-context task(s) {', '.join(unknown) or '(none)'}; "
                        f"choose from {', '.join(TASKS)}")
    return list(tasks)


def build_prompts(tokenizer: Any, text: str, *, tasks: Sequence[str], lengths: Sequence[int],
                  depths: Sequence[float], samples: int, seed: int,
                  bos_id: int | None = None) -> list[RetrievalPrompt]:
    """``samples`` prompts per (task, length), depths cycling through ``depths``; keys,
    numbers and haystack starts from ``random.Random(seed)``."""
    check_tasks(tasks)
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise UserError(f"depths must lie in [0, 1], got {', '.join(map(str, depths)) or 'none'}")
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    rng = random.Random(seed)
    sentences = tokenize_sentences(tokenizer, text) if "needle" in tasks else []
    if "needle" in tasks and not sentences:
        raise UserError("the haystack text has no sentences; pass a longer --text")
    out = []
    for task in tasks:
        for length in lengths:
            for i in range(samples):
                depth = depths[i % len(depths)]
                if task == "passkey":
                    out.append(_from_passkey(pk.make_passkey_prompt(
                        tokenizer, length=length, depth=depth,
                        passkey=pk.random_passkey(rng), bos_id=bos_id)))
                else:
                    out.append(make_needle_prompt(
                        tokenizer, sentences, length=length, depth=depth,
                        key=rng.choice(NEEDLE_KEYS), value=str(rng.randint(1_000_000, 9_999_999)),
                        start=rng.randrange(len(sentences)), bos_id=bos_id))
    return out


def extract_number(text: str, digits: int) -> str | None:
    """The first run of exactly ``digits`` digits in ``text`` (None when there is none)."""
    match = re.search(rf"(?<!\d)(\d{{{digits}}})(?!\d)", text)
    return match.group(1) if match else None


def run_prompts(params: Params, model_config: ModelConfig, tokenizer: Any,
                kv_config: KVQuantConfig, prompts: Sequence[RetrievalPrompt], *,
                prefill_chunk: int = 256, batch: int = 6, impl: str = "auto",
                progress: bool = True) -> list[dict[str, Any]]:
    """One row per prompt: task, length, depth, preset, expected, answer, correct,
    completion."""
    texts = greedy_completions(params, model_config, tokenizer, kv_config,
                               [p.tokens for p in prompts], max_new_tokens=ANSWER_TOKENS,
                               prefill_chunk=prefill_chunk, batch=batch, impl=impl,
                               progress=progress, desc=f"longctx {kv_config.name}")
    rows = []
    for p, text in zip(prompts, texts, strict=True):
        answer = extract_number(text, len(p.answer))
        rows.append({"task": p.task, "length": p.length, "depth": p.depth,
                     "actual_depth": round(p.actual_depth, 4), "preset": kv_config.name,
                     "expected": p.answer, "answer": answer or "",
                     "correct": answer == p.answer, "completion": text})
    return rows


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(rows: Sequence[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Per (task, length, preset): correct, total, accuracy, its 95% interval and the
    accuracy relative to the ``reference`` preset's in the same cell."""
    cells: dict[tuple[str, int, str], list[bool]] = {}
    for r in rows:
        cells.setdefault((r["task"], int(r["length"]), r["preset"]), []).append(
            r["correct"] in (True, "True", "true", 1))
    out = []
    for (task, length, preset), hits in cells.items():
        k, n = sum(hits), len(hits)
        lo, hi = wilson_interval(k, n)
        ref = cells.get((task, length, reference))
        ref_acc = sum(ref) / len(ref) if ref else float("nan")
        out.append({"task": task, "length": length, "preset": preset, "correct": k, "total": n,
                    "accuracy": k / n, "ci_low": lo, "ci_high": hi,
                    "vs_reference": (k / n) / ref_acc if ref_acc else float("nan")})
    return out


def markdown_table(summary: Sequence[dict[str, Any]], presets: Sequence[str]) -> str:
    """One row per (task, length), one column per preset: ``k/n acc% [lo-hi]`` and,
    for presets other than the first (the reference), the ratio to it."""
    head = ["task", "length", *presets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((s["task"], s["length"]) for s in summary))
    by = {(s["task"], s["length"], s["preset"]): s for s in summary}
    for task, length in keys:
        cells = [task, str(length)]
        for j, preset in enumerate(presets):
            s = by.get((task, length, preset))
            if s is None:
                cells.append("-")
                continue
            cell = (f"{s['correct']}/{s['total']} {100 * s['accuracy']:.0f}% "
                    f"[{100 * s['ci_low']:.0f}-{100 * s['ci_high']:.0f}]")
            if j and not math.isnan(s["vs_reference"]):
                cell += f" ({s['vs_reference']:.2f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(summary: Sequence[dict[str, Any]], presets: Sequence[str],
                  path: str | Path, title: str = "") -> None:
    """Accuracy vs prompt length per preset (95% intervals as error bars), one panel per
    task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install matplotlib") from None
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, preset in enumerate(presets):
            pts = sorted((s for s in summary if s["task"] == task and s["preset"] == preset),
                         key=lambda s: s["length"])
            if not pts:
                continue
            xs = [s["length"] * (1 + 0.03 * (i - len(presets) / 2)) for s in pts]
            ys = [s["accuracy"] for s in pts]
            err = [[max(0.0, y - s["ci_low"]) for y, s in zip(ys, pts, strict=True)],
                   [max(0.0, s["ci_high"] - y) for y, s in zip(ys, pts, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, marker="os^vDP*X"[i % 8], capsize=3, label=preset)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("exact-match accuracy (95% Wilson interval)")
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


__all__ = ["ANSWER_TOKENS", "TASKS", "RetrievalPrompt", "build_prompts", "check_tasks",
           "extract_number", "haystack_text", "make_needle_prompt", "markdown_table",
           "plot_accuracy", "run_prompts", "split_sentences", "summarize",
           "tokenize_sentences", "wilson_interval"]
