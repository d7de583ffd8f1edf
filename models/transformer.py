"""`CausalLM`: the decoder-only model (Flax NNX), and a functional API over plain params.

Structure: token embedding -> ``num_layers`` `DecoderLayer` s -> final RMSNorm -> output
head (the transposed embedding when ``tie_word_embeddings``). The layers are created
*stacked* (`nnx.vmap` over a split RNG: every layer parameter has a leading ``[L]``
axis) and run with `jax.lax.scan`, so compile time does not grow with depth.

The KV cache (`mixkvq_jax.cache.QuantizedKVCache`) is passed in and returned, never
stored in a module. During the scan the stacked cache rides in the *carry* and each
layer's slice is read with ``dynamic_index`` and written back with
``dynamic_update_index``; with the cache donated to the jitted step, XLA updates it in
place (scanning ``cache.layers`` as ``xs`` and stacking ``ys`` would hold two copies).

Params are a plain nested dict (`nnx.to_pure_dict` of the model state)::

    {"embed": {"embedding": [V, E]},
     "layers": {"attn_norm": {"scale": [L, E]},
                "attn": {"q_proj": {"kernel": [L, E, Hq*D], "bias": [L, Hq*D]?},
                         "k_proj": ..., "v_proj": ..., "o_proj": {"kernel": [L, Hq*D, E]},
                         "q_norm": {"scale": [L, D]}?, "k_norm": ...?},
                "mlp_norm": {"scale": [L, E]},
                "mlp": {"gate_proj": {"kernel": [L, E, F]}, "up_proj": ..., "down_proj": ...}},
     "norm": {"scale": [E]},
     "lm_head": {"kernel": [E, V]}?}          # absent when embeddings are tied

The functional entry points (`forward`, `forward_full`) rebuild the module from such a
dict with `nnx.merge` inside the traced function (free at run time), so they can be
jitted with the params as an ordinary pytree argument (Orbax-savable, shardable).
A kernel leaf may be replaced by an object with a ``matmul`` method (AWQ int4) whose
leaves carry the same leading ``[L]`` axis.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig, rope_inv_freq
from .layers import (
    AttendFn,
    DecoderLayer,
    Embed,
    Linear,
    RMSNorm,
    causal_attention,
    rope_tables,
)

Params = dict[str, Any]


class CausalLM(nnx.Module):
    """A Llama/Mistral/Qwen2/Qwen3 causal language model over a KV cache.

    Args:
      config: the architecture.
      dtype: parameter and activation dtype (float32 or bfloat16); norms, RoPE tables,
        softmax and logits are computed in float32.
      rngs: NNX RNG streams for random init (``params``).
      init_std: standard deviation of the normal init of kernels and embeddings.
    """

    def __init__(self, config: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 init_std: float = 0.02) -> None:
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs,
                           init_std=init_std)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype=dtype, rngs=layer_rngs, init_std=init_std)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                        rngs=rngs, init_std=init_std)
        )

    # ---- pieces ------------------------------------------------------------------------
    def _run_layers(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend: AttendFn,
                    caches: Any, platform: str | None = None) -> tuple[jax.Array, Any]:
        """Scan the stacked layers. x [B, T, E]; caches: stacked layer caches or None;
        ``platform``: the target platform (see `mixkvq_jax.target`)."""
        graphdef, state = nnx.split(self.layers)

        def body(carry: tuple[jax.Array, Any], xs: tuple[Any, jax.Array]) -> tuple[Any, None]:
            h, stacked = carry
            layer_state, i = xs
            layer = nnx.merge(graphdef, layer_state)
            # The layer reads and updates its slice of the stacked cache in place
            # (index i): no per-layer copy of the cache goes in or out of the layer.
            h, stacked = layer(h, rope, functools.partial(attend, index=i), stacked)
            return (h, stacked), None

        # On CPU the stack rides the scan with its 16-bit floats as bits (`cache.to_bits`):
        # XLA:CPU would update a 16-bit float stack by converting all of it, every layer.
        from mixkvq_jax.cache import scan_carries_bits, to_bits

        bits = caches is not None and scan_carries_bits(platform)
        if bits:
            dtypes = jax.tree.map(lambda a: a.dtype, caches)
            caches = jax.tree.map(to_bits, caches)

        indices = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x, caches), _ = jax.lax.scan(body, (x, caches), (state, indices))
        if bits:
            caches = jax.tree.map(
                lambda a, t: a if a.dtype == t else jax.lax.bitcast_convert_type(a, t),
                caches, dtypes)
        return x, caches

    def logits(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        """Final norm + output head, float32.

        x [B, T, E] -> [B, T, V]; with ``index`` int [B], only token ``index[b]`` of each
        sequence: [B, V] (prefill needs the last prompt token only).
        """
        if index is not None:
            x = jnp.take_along_axis(x, index.astype(jnp.int32)[:, None, None], axis=1)
        x = self.norm(x)
        out = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        out = out.astype(jnp.float32)
        return out[:, 0] if index is not None else out

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin float32 [B, T, D] for positions [B, T]."""
        return rope_tables(positions, jnp.asarray(_inv_freq(self.config)))

    # ---- entry points ------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, cache: Any, counts: jax.Array | None = None, *,
                 impl: str = "auto", logit_index: jax.Array | None = None,
                 platform: str | None = None) -> tuple[jax.Array, Any]:
        """Run a chunk of tokens through the model, attending over and appending to the cache.

        Args:
          tokens: int32 [B, C], right-padded: ``counts[b]`` valid tokens per sequence.
            C is the prefill chunk size, or 1 for a decode step.
          cache: `QuantizedKVCache` (or a paged `mixkvq_jax.paged.PagedKVCache`); token i
            of sequence b gets position
            ``cache.lengths[b] + i``.
          counts: int32 [B] valid tokens (default: all C). Padding tokens are neither
            attended to nor stored.
          impl: attention implementation (``auto``, ``xla``, ``pallas``,
            ``pallas_interpret``).
          logit_index: optional int32 [B]: return only the logits of that chunk token.
          platform: the platform the program is compiled for (``cpu``, ``gpu``, ``tpu``;
            default: this process's backend). ``impl="auto"``, the Pallas kernel body
            and the CPU-only bits form of the layer scan follow it, so compiling for a
            TPU from a CPU host takes the TPU paths (`mixkvq_jax.target.platform_of`
            gives it for placed arrays).

        Returns:
          (logits float32 [B, C, V] (or [B, V] with ``logit_index``), updated cache with
          ``lengths + counts``).
        """
        from mixkvq_jax.attention import attend_and_update
        from mixkvq_jax.cache import advance

        b, c = tokens.shape
        counts = jnp.full((b,), c, jnp.int32) if counts is None else counts.astype(jnp.int32)
        lengths = cache.lengths
        rope = self.rope(lengths[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :])
        kv_config = cache.config
        scale = 1.0 / math.sqrt(self.config.head_dim)
        # A cache with more KV heads than the model holds each one repeated (a mesh whose
        # model axis is wider than the KV heads: `models.sharding.cache_kv_heads`).
        repeat, rest = divmod(cache.num_kv_heads, self.config.num_kv_heads)
        if rest or repeat < 1 or self.config.num_heads % cache.num_kv_heads:
            raise ValueError(
                f"the cache has {cache.num_kv_heads} KV heads; the model needs a multiple of "
                f"its num_kv_heads={self.config.num_kv_heads} that divides num_heads="
                f"{self.config.num_heads}")
        # A paged cache (`mixkvq_jax.paged.PagedKVCache`) has a block table; its blocks
        # live in a shared pool of pages.
        block_table = getattr(cache, "block_table", None)

        def attend(q: jax.Array, k: jax.Array, v: jax.Array, layers: Any, *,
                   index: jax.Array | None) -> tuple[jax.Array, Any]:
            if repeat > 1:
                k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
            return attend_and_update(q, k, v, layers, lengths, counts, kv_config, scale=scale,
                                     impl=impl, index=index, platform=platform,
                                     kv_repeat=repeat, block_table=block_table)

        x, layers = self._run_layers(self.embed(tokens), rope, attend, cache.layers, platform)
        return self.logits(x, logit_index), advance(cache, layers, counts)

    def forward_full(self, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Cache-free causal forward (training, scoring): tokens [B, T] -> logits f32 [B, T, V].

        ``lengths`` (optional int [B]) masks right padding out of the attention.
        """
        b, t = tokens.shape
        rope = self.rope(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        scale = 1.0 / math.sqrt(self.config.head_dim)

        def attend(q: jax.Array, k: jax.Array, v: jax.Array, _: Any, *,
                   index: jax.Array | None) -> tuple[jax.Array, None]:
            return causal_attention(q, k, v, scale=scale, lengths=lengths), None

        x, _ = self._run_layers(self.embed(tokens), rope, attend, None)
        return self.logits(x)


@functools.lru_cache(maxsize=64)
def _inv_freq(config: ModelConfig) -> Any:
    return rope_inv_freq(config)


@functools.lru_cache(maxsize=32)
def _graph(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph definition and abstract state (shapes only, nothing allocated)."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "init_std"))
def _init_params(key: jax.Array, *, config: ModelConfig, dtype: Any, init_std: float) -> Params:
    model = CausalLM(config, dtype=dtype, rngs=nnx.Rngs(params=key), init_std=init_std)
    return nnx.to_pure_dict(nnx.state(model))


def init_params(config: ModelConfig, *, seed: int = 0, dtype: Any = jnp.float32,
                init_std: float = 0.02) -> Params:
    """Random params (normal(0, init_std) kernels/embeddings, unit norms, zero biases),
    built in one jitted program (eager NNX init would dispatch op by op)."""
    return _init_params(jax.random.key(seed), config=config, dtype=jnp.dtype(dtype),
                        init_std=float(init_std))


def param_shapes(config: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The params tree as `jax.ShapeDtypeStruct` leaves (no allocation)."""
    return jax.eval_shape(lambda: init_params(config, dtype=dtype))


def module_from_params(params: Params, config: ModelConfig) -> CausalLM:
    """Bind a plain params dict to a `CausalLM` (no copy; usable inside jit)."""
    graphdef, abstract = _graph(config)
    state = jax.tree.map(lambda x: x, abstract)  # fresh Variables; the cached ones stay abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def forward(params: Params, tokens: jax.Array, cache: Any, counts: jax.Array | None = None, *,
            config: ModelConfig, impl: str = "auto",
            logit_index: jax.Array | None = None,
            platform: str | None = None) -> tuple[jax.Array, Any]:
    """Functional `CausalLM.__call__`: (logits [B, C, V] or [B, V], updated cache).

    Jit it with ``static_argnames=("config", "impl", "platform")`` and donate the cache.
    """
    return module_from_params(params, config)(tokens, cache, counts, impl=impl,
                                              logit_index=logit_index, platform=platform)


def forward_full(params: Params, tokens: jax.Array, lengths: jax.Array | None = None, *,
                 config: ModelConfig) -> jax.Array:
    """Functional `CausalLM.forward_full`: tokens [B, T] -> logits float32 [B, T, V]."""
    return module_from_params(params, config).forward_full(tokens, lengths)


def cast_params(params: Params, dtype: Any) -> Params:
    """Cast every floating-point array leaf to ``dtype`` (other leaves unchanged)."""
    def cast(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x
    return jax.tree.map(cast, params)
