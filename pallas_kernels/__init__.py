"""Pallas kernels over the packed low-bit KV cache (installed as ``mixkvq_jax.pallas_kernels``).

* `decode_attention`: decode attention (one query token per sequence) over the quantized
  blocks, for TPU (Mosaic) and GPU (Triton); `mixkvq_jax.attention.cached_attention`
  dispatches to it with ``impl="pallas"`` / ``"pallas_interpret"``.
* `quantize_pack`: the fused quantize-and-pack of complete blocks (the residual-window
  flush), bit-equal to `mixkvq_jax.cache.quantize_blocks`.

Submodules are imported on use, so importing the package stays cheap.
"""
