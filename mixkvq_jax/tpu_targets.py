"""What `mixkvq_jax.tpu_aot` compiles for and with: deviceless TPU topologies (libtpu's
compiler runs on a CPU host), the chips' HBM size and bandwidth, and named model shapes.

Topology names map to ``jax.experimental.topologies.get_topology_desc`` arguments as
MaxText's ``accelerator_to_spec_map.py`` does: single-chip v5e / v6e use the ``default``
chip config with one chip per host; v4 and v5p (``v5``) come as 2x2x1 ``megacore``
slices. Other ``<generation>:<dims>`` names are passed to libtpu as they are, and an
unknown one is a `UserError` that names the known ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from mixkvq_jax.errors import UserError
from mixkvq_jax.models import ModelConfig

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (one JAX device): HBM bytes and HBM bandwidth in bytes/s."""

    name: str
    hbm_bytes: int
    hbm_bandwidth: float


# By ``device.device_kind``; bandwidths are the published per-chip HBM figures.
CHIPS = {
    "TPU v5 lite": Chip("v5e", 16 * GiB, 819e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 1640e9),
    "TPU v4": Chip("v4", 32 * GiB, 1200e9),
    "TPU v5": Chip("v5p", 95 * GiB, 2765e9),
}

# name -> (chip_config_name, chips_per_host_bounds)
TOPOLOGIES = {
    "v5e:1x1": ("default", (1, 1, 1)),
    "v6e:1x1": ("default", (1, 1, 1)),
    "v5e:2x2": ("default", (2, 2, 1)),
    "v4:2x2x1": ("megacore", (2, 2, 1)),
    "v5:2x2x1": ("megacore", (2, 2, 1)),
}

MODELS = {
    "llama3-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, architecture="llama3-8b shape"),
    "qwen3-8b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True,
        architecture="qwen3-8b shape"),
    "smollm2": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        architecture="smollm2-135m shape"),
}


def _default_bounds(name: str) -> tuple[str, tuple[int, int, int]]:
    generation, _, dims_text = name.partition(":")
    try:
        dims = [int(d) for d in dims_text.split("x")]
    except ValueError:
        dims = [1]
    dims = (dims + [1, 1, 1])[:3]
    megacore = generation in ("v4", "v5", "v5p")
    bounds = tuple(min(d, cap) for d, cap in zip(dims, (2, 2, 1), strict=True))
    return ("megacore" if megacore else "default"), bounds  # type: ignore[return-value]


def tpu_devices(topology: str) -> list[Any]:
    """The devices of a deviceless TPU topology (e.g. ``v5e:1x1``), from libtpu."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError('compiling for TPU needs libtpu: pip install "jax[tpu]"')
    # Deviceless compiles touch no chip: let several processes (tests, a benchmark, a
    # colleague's run) load libtpu at once instead of failing on its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    config, bounds = TOPOLOGIES.get(topology) or _default_bounds(topology)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name=config,
            chips_per_host_bounds=bounds, num_slices=1, wrap=(False, False, False))
    except Exception as err:  # libtpu raises JaxRuntimeError / RuntimeError / ValueError
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        if any(k in text for k in ("external name", "topology name", "INVALID_ARGUMENT")):
            raise UserError(f"TPU topology {topology!r} is not known to the installed libtpu "
                            f"({reason}); known: {', '.join(TOPOLOGIES)}") from None
        raise UserError(f"libtpu could not describe TPU topology {topology!r}: {reason}"
                        ) from None
    return list(desc.devices)


def chip_of(device: Any) -> Chip:
    """HBM size and bandwidth of a TPU device (by its ``device_kind``)."""
    kind = str(getattr(device, "device_kind", ""))
    if kind not in CHIPS:
        raise UserError(f"no HBM figures for TPU device kind {kind!r}; known: "
                        f"{', '.join(CHIPS)}")
    return CHIPS[kind]


def model_config(name: str | None = None, ckpt: str | Path | None = None) -> ModelConfig:
    """A named model shape, or a checkpoint's config: an HF directory (``config.json``)
    or a directory written by `mixkvq_jax.checkpoint.save_params` (no weights are read)."""
    if ckpt is None:
        if name not in MODELS:
            raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} "
                            "or pass --ckpt PATH")
        return MODELS[name]
    from mixkvq_jax import checkpoint

    path = Path(ckpt)
    if checkpoint.is_orbax_checkpoint(path):
        meta = json.loads((path / checkpoint.MARKER).read_text())
        return ModelConfig.from_dict(meta["model_config"])
    if path.is_dir():
        return checkpoint.load_hf_config(path)
    raise UserError(f"{path}: pass a checkpoint directory holding config.json (HF) or one "
                    "written by mixkvq_jax.checkpoint.save_params")
