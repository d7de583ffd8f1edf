"""MixKVQ calibration: search the key tier sizes under an average-key-bits budget.

The paper (arXiv 2512.19206) searches its salience thresholds per model with Optuna's
TPE sampler under an average-bit constraint. Here the thresholds are the static channel
*counts* per head of the ``full`` / ``int8`` (optional) / ``int4`` / ``int2`` tiers; the
objective is the fidelity of the model's next-token distributions to the unquantized
cache on calibration text (default: mean KL, see `metrics`).

Search space (every sample meets the budget, so no trial is wasted on an infeasible
point): with ``E = floor((budget - 2) * head_dim)`` bits to spend above all-INT2,

* ``full`` in ``[0, min(head_dim, E // 14)]`` (a BF16 channel costs 14 bits over INT2);
* with ``allow_int8``, ``int8_share`` in [0, 1]: that share of what is left after the
  full tier (6 bits per INT8 channel);
* ``int4`` takes the rest of the budget (2 bits per channel), ``int2`` the remaining
  channels.

So the budget is always spent (more bits never hurt the objective in expectation) and
``config.average_key_bits <= budget`` holds by construction. Every other field (value
bits, group sizes, residual length, salience mode, sink tokens) comes from the base
preset (``mixkvq``). Same seed -> same trials: the sampler is ``TPESampler(seed=seed)`` and the
objective is deterministic (points already evaluated are looked up, not re-run).

CLI::

    python -m mixkvq_jax.eval calibrate --budget 2.7 --trials 16 --seed 0 \\
        --text /usr/share/doc/jargon-text/jargon.txt.gz --tokens 1536 --offset 100000

writes ``configs/kv/mixkvq_cal2p7.yaml`` (load it with ``load_kv_config("mixkvq_cal2p7",
64)`` or ``--kv mixkvq_cal2p7``) and the search log CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixkvq_jax.config import KVConfigError, KVQuantConfig, load_kv_config
from mixkvq_jax.errors import UserError
from mixkvq_jax.eval.metrics import (
    Reference,
    check_metrics,
    compute_reference,
    score_preset,
)
from mixkvq_jax.models import ModelConfig
from mixkvq_jax.models.transformer import Params

MIN_KEY_BITS = 2.0  # every channel INT2: the cheapest assignment
EXTRA_BITS = {"full": 14, "int8": 6, "int4": 2}  # bits per channel above INT2 (bf16 full)
LOG_FIELDS = ("trial", "full", "int8", "int4", "int2", "avg_key_bits", "objective", "kl",
              "ppl", "top1", "cached", "seconds", "params")


def _full_extra_bits(base: KVQuantConfig) -> int:
    return base.full_bits - 2


def check_budget(budget: float, head_dim: int, *, full_bits: int = 16) -> int:
    """Bits above all-INT2 that ``budget`` (average key bits) leaves per head.

    Raises a one-line `UserError` when no assignment meets the budget.
    """
    if not math.isfinite(budget):
        raise UserError(f"--budget must be a finite number of bits, got {budget}")
    if budget < MIN_KEY_BITS:
        raise UserError(
            f"no tier assignment meets an average key budget of {budget:g} bits: the "
            f"cheapest (every key channel INT2) needs {MIN_KEY_BITS:g}; use --budget >= 2"
        )
    return min(int(math.floor((budget - MIN_KEY_BITS) * head_dim + 1e-9)),
               (full_bits - 2) * head_dim)


def budget_label(budget: float) -> str:
    """2.7 -> '2p7', 3.0 -> '3p0', 2.75 -> '2p75'."""
    text = f"{budget:g}"
    if "." not in text:
        text += ".0"
    return text.replace(".", "p")


def tiers_from_params(full: int, int8_share: float, excess: int, head_dim: int,
                      *, full_extra: int = 14) -> tuple[int, int, int, int]:
    """(full, int8, int4, int2) channel counts spending ``excess`` bits over INT2."""
    full = max(0, min(full, head_dim, excess // full_extra))
    left = excess - full_extra * full
    int8 = int(round(int8_share * min(head_dim - full, left // 6)))
    left -= 6 * int8
    int4 = min(head_dim - full - int8, left // 2)
    return full, int8, int4, head_dim - full - int8 - int4


def tier_config(base: KVQuantConfig, counts: Sequence[int], name: str) -> KVQuantConfig:
    full, int8, int4, int2 = counts
    return dataclasses.replace(base, name=name, key_channels_full=full, key_channels_int8=int8,
                               key_channels_int4=int4, key_channels_int2=int2)


@dataclasses.dataclass
class CalibrationResult:
    """The best tier assignment found and the search log.

    Attributes:
      config: the best `KVQuantConfig` (named ``name``).
      budget: the average-key-bits budget.
      metric: the objective metric (``kl``, ``ppl`` or ``top1``).
      objective: the best objective value (``kl``, ``log ppl`` or ``1 - top1``).
      trials: one dict per trial (fields `LOG_FIELDS`).
      seed: the sampler seed.
      calibration_tokens: positions scored per trial.
      seconds: wall time of the whole search (reference included).
    """

    config: KVQuantConfig
    budget: float
    metric: str
    objective: float
    trials: list[dict[str, Any]]
    seed: int
    calibration_tokens: int
    seconds: float

    @property
    def distinct_evaluations(self) -> int:
        return sum(1 for t in self.trials if not t["cached"])


def _objective(metric: str, nll: np.ndarray, kl: np.ndarray, agree: np.ndarray) -> float:
    if metric == "kl":
        return float(np.mean(kl))
    if metric == "ppl":
        return float(np.mean(nll))  # log perplexity
    return float(1.0 - np.mean(agree))


def calibrate(params: Params, model_config: ModelConfig, tokens: np.ndarray, *,
              budget: float, trials: int, seed: int = 0, chunk: int = 128,
              base: str | KVQuantConfig = "mixkvq", allow_int8: bool = False,
              metric: str = "kl", name: str | None = None, impl: str = "auto",
              reference: Reference | None = None, progress: bool = True) -> CalibrationResult:
    """Search tier counts minimizing ``metric`` vs the unquantized cache on ``tokens``.

    Args:
      tokens: int [N + 1] calibration ids (N scored positions).
      budget: maximum ``average_key_bits`` of the result.
      trials: Optuna trials (points already evaluated are looked up, not re-run).
      seed: `optuna.samplers.TPESampler` seed.
      base: preset (name, path or config) giving every non-tier field.
      allow_int8: also search an INT8 tier.
      metric: ``kl`` (mean KL), ``ppl`` (log perplexity) or ``top1`` (1 - agreement).
      name: the result's preset name (default ``mixkvq_cal<budget>``).
      reference: a precomputed `Reference` on ``tokens`` (else computed here).
    """
    (metric,) = check_metrics([metric])
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    head_dim = model_config.head_dim
    if isinstance(base, str):
        try:
            base = load_kv_config(base, head_dim)
        except KVConfigError as err:
            raise UserError(str(err)) from None
    full_extra = _full_extra_bits(base)
    excess = check_budget(budget, head_dim, full_bits=base.full_bits)
    name = name or f"mixkvq_cal{budget_label(budget)}"

    try:
        import optuna
    except ImportError:
        raise UserError("calibration needs Optuna: pip install 'mixkvq-jax[eval]'") from None

    t_start = time.perf_counter()
    if reference is None:
        reference = compute_reference(params, model_config, tokens, chunk=chunk, impl=impl,
                                      progress=progress)
    full_max = min(head_dim, excess // full_extra)
    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    log: list[dict[str, Any]] = []

    def run_trial(trial: optuna.Trial) -> float:
        full = trial.suggest_int("full", 0, full_max)
        share = trial.suggest_float("int8_share", 0.0, 1.0) if allow_int8 else 0.0
        counts = tiers_from_params(full, share, excess, head_dim, full_extra=full_extra)
        t0 = time.perf_counter()
        cached = counts in seen
        if not cached:
            cfg = tier_config(base, counts, name)
            scores = score_preset(params, model_config, cfg, reference, impl=impl,
                                  progress=False)
            seen[counts] = {
                "avg_key_bits": round(cfg.average_key_bits, 4),
                "objective": _objective(metric, scores.nll, scores.kl, scores.agree),
                "kl": float(np.mean(scores.kl)),
                "ppl": float(math.exp(np.mean(scores.nll))),
                "top1": float(np.mean(scores.agree)),
            }
        row = {"trial": trial.number, **dict(zip(("full", "int8", "int4", "int2"), counts,
                                                 strict=True)),
               **seen[counts], "cached": cached,
               "seconds": round(time.perf_counter() - t0, 2),
               "params": " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in trial.params.items())}
        log.append(row)
        trial.set_user_attr("counts", list(counts))
        return row["objective"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed,
                                         n_startup_trials=max(2, min(10, trials // 3)))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    trial_iter: Any = range(trials)
    if progress:
        from tqdm.auto import tqdm

        trial_iter = tqdm(trial_iter, desc=f"calibrate {name}", unit="trial", file=sys.stderr,
                          leave=False)
    for _ in trial_iter:
        study.optimize(run_trial, n_trials=1)
    best_row = min(log, key=lambda r: (r["objective"], r["trial"]))
    counts = tuple(best_row[k] for k in ("full", "int8", "int4", "int2"))
    best = tier_config(base, counts, name)
    assert best.average_key_bits <= budget + 1e-9, (best.average_key_bits, budget)
    return CalibrationResult(best, budget, metric, best_row["objective"], log, seed,
                             reference.num_positions, time.perf_counter() - t_start)


# ---- outputs --------------------------------------------------------------------------------
def _fraction(count: int, head_dim: int) -> float | int:
    return 0 if count == 0 else count / head_dim


def preset_yaml(result: CalibrationResult, *, source: str = "") -> str:
    """The preset YAML text (configs/kv schema; tiers as fractions of head_dim)."""
    cfg = result.config
    full, int8, int4, int2 = cfg.key_channel_counts
    d = cfg.head_dim
    best = next(t for t in result.trials if t["objective"] == result.objective)
    key: dict[str, Any] = {"full": _fraction(full, d)}
    if int8:
        key["int8"] = _fraction(int8, d)
    key["int4"] = _fraction(int4, d)
    key["int2"] = "rest"
    key["group_size"] = cfg.key_group_size
    key_text = ", ".join(f"{k}: {v}" for k, v in key.items())
    desc = (
        f"MixKVQ tiers calibrated under an average key budget of {result.budget:g} bits "
        f"(Optuna TPE, seed {result.seed}, {len(result.trials)} trials, "
        f"{result.distinct_evaluations} distinct; objective {result.metric} vs the "
        f"unquantized cache on {result.calibration_tokens} calibration tokens"
        f"{' of ' + source if source else ''}): at head_dim {d} keys full/int8/int4/int2 = "
        f"{full}/{int8}/{int4}/{int2} ({cfg.average_key_bits:.4g} average key bits; "
        f"calibration KL {best['kl']:.5g}). Values {cfg.value_bits}-bit"
        f"{' (Hadamard-rotated)' if cfg.rotates_values else ''}, G={cfg.key_group_size}, "
        f"R={cfg.residual_length}"
        + (f", first {cfg.sink_tokens} token(s) kept in {cfg.full_dtype} (attention sinks)."
           if cfg.sink_tokens else ".")
    )
    lines = [
        "# Written by `python -m mixkvq_jax.eval calibrate`; regenerate rather than edit.",
        "description: >-",
        *(f"  {chunk}" for chunk in _wrap(desc, 86)),
        f"key: {{{key_text}}}",
        f"value: {{bits: {cfg.value_bits}, group_size: {cfg.value_group_size}"
        f"{', rotation: ' + cfg.value_rotation if cfg.rotates_values else ''}}}",
        f"residual_length: {cfg.residual_length}",
        f"salience: {cfg.salience}",
        f"salience_base_bits: {cfg.salience_base_bits}",
        f"full_dtype: {cfg.full_dtype}",
        f"scale_dtype: {cfg.scale_dtype}",
        *([f"sink_tokens: {cfg.sink_tokens}"] if cfg.sink_tokens else []),
    ]
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def write_outputs(result: CalibrationResult, yaml_path: str | Path, log_path: str | Path | None,
                  *, source: str = "") -> KVQuantConfig:
    """Write the preset YAML (and the trial log CSV); return the preset as loaded back."""
    yaml_path = Path(yaml_path)
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(preset_yaml(result, source=source))
    loaded = load_kv_config(yaml_path, result.config.head_dim)
    if dataclasses.replace(loaded, name=result.config.name) != result.config:
        raise RuntimeError(f"{yaml_path} loads as {loaded}, expected {result.config}")
    if log_path is not None:
        write_log(result.trials, log_path)
    return loaded


def write_log(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(LOG_FIELDS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
