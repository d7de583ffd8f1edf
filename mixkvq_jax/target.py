"""The platform a program is compiled *for*, which need not be the host's.

Code paths that differ per backend (the Pallas kernel body, the CPU bits form of the
layer scan) follow the target platform, never `jax.default_backend()` alone: compiling
for a TPU topology from a CPU host (`mixkvq_jax.tpu_aot`) must take the TPU paths. The
platform is a static argument (``platform=``) of the models and the attention dispatch;
callers that hold arrays get it with `platform_of`.
"""

from __future__ import annotations

from typing import Any

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def canonical_platform(platform: str | None = None) -> str:
    """``cpu``, ``gpu`` or ``tpu`` for a platform name (``cuda``/``rocm`` are ``gpu``);
    ``None``: the default backend of this process."""
    name = jax.default_backend() if platform is None else platform
    name = _ALIASES.get(name, name)
    if name not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is unknown; use one of {', '.join(PLATFORMS)}")
    return name


def platform_of(tree: Any) -> str | None:
    """The platform of the devices the arrays in ``tree`` are placed on (`jax.Array` or
    `jax.ShapeDtypeStruct` with a sharding); ``None`` when no leaf says."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        devices = getattr(sharding, "device_set", None)
        if devices:
            return canonical_platform(next(iter(devices)).platform)
    return None
