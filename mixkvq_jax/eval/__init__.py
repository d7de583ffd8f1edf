"""Fidelity of KV-cache presets on a real model (issue 7).

* `metrics`: chunked evaluation through the quantized cache; perplexity, KL to the
  unquantized cache and top-1 agreement, overall and binned by position.
* `passkey`: passkey retrieval (a 5-digit key hidden at a chosen depth), exact match.
* `calibrate`: Optuna TPE search of MixKVQ tier counts under an average-key-bits budget,
  written as a preset YAML.
* `report`: table, CSV and KL-vs-bits plot.
* `text`: reading the evaluation text (Debian's ``jargon-text`` works well).

CLI: ``python -m mixkvq_jax.eval {report,calibrate,passkey} --help``.
"""

from mixkvq_jax.eval.metrics import (
    METRICS,
    PresetScores,
    Reference,
    compute_reference,
    evaluate_presets,
    parse_preset_spec,
    position_bins,
    reference_config,
    score_preset,
    summarize,
)

__all__ = [
    "METRICS", "PresetScores", "Reference", "compute_reference", "evaluate_presets",
    "parse_preset_spec", "position_bins", "reference_config", "score_preset", "summarize",
]
