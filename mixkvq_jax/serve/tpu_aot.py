"""The serving engine's decode step compiled for a real TPU from a CPU host (deviceless,
libtpu's compiler), at the slot count a KV budget gives each preset.

For each preset: `paged.plan_pool` splits the budget into slots and pages, the engine's
decode step (`engine.decode_step_jit`) is lowered on `jax.ShapeDtypeStruct` inputs placed
on a TPU device of the topology (bf16 weights, the paged cache from
``jax.eval_shape(init_paged_cache ...)``: nothing is allocated) and compiled by XLA:TPU
and Mosaic (``impl="auto"``: the paged Pallas kernel, block table by scalar prefetch).
Reported: whether it fits the chip's HBM (XLA's memory analysis), the HBM traffic of one
step estimated from the optimized HLO (`mixkvq_jax.hlo_traffic`, the cache counted as
full) and what that bounds: ms per step at the chip's bandwidth and slots / step time
in tokens/s.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from mixkvq_jax.models import ModelConfig


def compile_decode(model_config: ModelConfig, kv_config: Any, device: Any, *, slots: int,
                   pages: int, max_len: int, impl: str = "auto") -> dict[str, Any]:
    """Compile the engine's decode step for ``device``; figures of the compiled step."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from mixkvq_jax import paged
    from mixkvq_jax.hlo_traffic import estimate_traffic
    from mixkvq_jax.models import param_shapes
    from mixkvq_jax.serve.engine import decode_step_jit, sampling_shapes
    from mixkvq_jax.target import platform_of
    from mixkvq_jax.tpu_aot import tree_bytes
    from mixkvq_jax.tpu_targets import chip_of

    sharding = SingleDeviceSharding(device)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    params = jax.tree.map(place, param_shapes(model_config, jnp.bfloat16))
    cache = jax.tree.map(place, jax.eval_shape(lambda: paged.init_paged_cache(
        kv_config, num_layers=model_config.num_layers, slots=slots,
        num_kv_heads=model_config.num_kv_heads, pages=pages, max_len=max_len)))
    tokens = place(jax.ShapeDtypeStruct((slots,), jnp.int32))
    active = place(jax.ShapeDtypeStruct((slots,), bool))
    sampling = tuple(place(x) for x in sampling_shapes(slots))
    platform = platform_of(params)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        compiled = decode_step_jit().lower(params, cache, tokens, active, sampling,
                                           config=model_config, impl=impl,
                                           platform=platform).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    needed = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    cache_bytes = tree_bytes(cache)
    # The step's data-bounded loops are the window flushes (one trip per sequence whose
    # window fills): counted at one, the serving step's usual case (0-1 per step).
    traffic = estimate_traffic(compiled.as_text(), suspicious_min_bytes=max(
        1, cache_bytes // model_config.num_layers // 4), bounded_trip_count=1)
    chip = chip_of(device)
    ms = 1e3 * traffic.total_bytes / chip.hbm_bandwidth
    return {"preset": kv_config.name, "chip": chip.name, "slots": slots, "pages": pages,
            "max_len": max_len, "cache_gib": cache_bytes / 2**30,
            "weights_gib": tree_bytes(params) / 2**30, "hbm_needed_gib": needed / 2**30,
            "fits": needed <= chip.hbm_bytes, "compile_s": seconds,
            "traffic_gib": traffic.total_bytes / 2**30, "est_ms_per_step": ms,
            "est_tokens_per_s": slots / ms * 1e3,
            "cache_sized_copies": len(traffic.suspicious),
            "pallas_kernels": "mixkvq_decode_attention_tpu" in compiled.as_text()}


__all__ = ["compile_decode"]
