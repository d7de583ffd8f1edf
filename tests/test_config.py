"""config.py: presets, validation and byte accounting."""

import jax
import pytest

from mixkvq_jax.config import KVConfigError, KVQuantConfig, available_presets, load_kv_config

PRESETS = ["bf16", "fp32", "int8", "kivi4", "kivi2", "mixkvq",
           "k8v8", "k8v4", "k8v2", "k4v4", "k4v2", "k2v2"]


def test_all_presets_ship_and_load():
    assert set(PRESETS) <= set(available_presets())
    for name in PRESETS:
        for head_dim in (64, 128):
            cfg = load_kv_config(name, head_dim)
            assert sum(cfg.key_channel_counts) == head_dim
            hash(cfg)  # usable as a jit static argument


def test_mixkvq_preset_bits_and_bytes():
    cfg = load_kv_config("mixkvq", 64)
    assert cfg.key_channel_counts == (2, 0, 10, 52)
    assert 2.6 <= cfg.average_key_bits <= 2.82
    assert cfg.average_value_bits == 2
    assert cfg.compression_vs_bf16 < 0.22
    # 22 B codes + 62 channels x 2 params x 2 B / 32 tokens + 64 B perm / 128 tokens
    # + 16 B value codes + 2 groups x 2 params x 2 B, plus the row padding of the
    # stored layout: key codes + permutation words 592 -> 640 words (48 x 4 B), key
    # params 496 -> 512 bf16 (16 x 2 B), per 128-token block
    assert cfg.block_bytes()["row_padding"] == 48 * 4 + 16 * 2
    assert cfg.bytes_per_token == pytest.approx(22 + 7.75 + 0.5 + 16 + 8 + 224 / 128)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotated_preset_fills_mixkvq_bytes_with_wider_key_tiers(head_dim):
    """mixkvq_rot2p9 spends the row padding of the stored layout on INT4 channels: 2.94
    average key bits in exactly mixkvq's bytes (21.9% of bf16), values rotated."""
    cfg, base = load_kv_config("mixkvq_rot2p9", head_dim), load_kv_config("mixkvq", head_dim)
    assert cfg.rotates_values and cfg.sink_tokens == 1
    assert cfg.average_key_bits == pytest.approx(2.9375)
    assert cfg.bytes_per_token == base.bytes_per_token and cfg.compression_vs_bf16 <= 0.22


def test_sink_tokens_yaml_bytes_and_description(tmp_path):
    assert load_kv_config("mixkvq", 64).sink_tokens == 1
    assert load_kv_config("kivi2", 64).sink_tokens == 0  # the KIVI baseline stays as published
    path = tmp_path / "k2s4.yaml"
    path.write_text("key: {bits: 2}\nvalue: {bits: 2}\nsink_tokens: 4\n")
    cfg = load_kv_config(path, 64)
    plain = load_kv_config(path, 64, sink_tokens=0)
    # Steady-state bytes per token are unchanged; each sequence and head holds S
    # full-precision keys and values more.
    assert cfg.bytes_per_token == plain.bytes_per_token
    assert cfg.fixed_bytes()["sink_keys_values"] == 2 * 4 * 64 * 2
    dims = dict(num_layers=2, batch=3, num_kv_heads=2, max_len=256)
    assert cfg.cache_bytes(**dims) - plain.cache_bytes(**dims) == 2 * 3 * 2 * 2 * 4 * 64 * 2
    assert "4 sink tokens full" in cfg.describe()


def test_uniform_presets_bytes():
    kivi2 = load_kv_config("kivi2", 128)
    assert kivi2.bytes_per_token == 32 + 16 + 32 + 16
    assert not kivi2.stores_permutation
    assert load_kv_config("bf16", 128).compression_vs_bf16 == 1.0
    assert load_kv_config("fp32", 128).compression_vs_bf16 == 2.0
    order = [load_kv_config(n, 64).bytes_per_token for n in ("kivi2", "kivi4", "int8", "bf16")]
    assert order == sorted(order)


def test_overrides_and_jit_static():
    cfg = load_kv_config("kivi2", 64, full_dtype="float32", residual_length=64)
    assert cfg.residual_length == 64 and cfg.full_dtype == "float32"
    f = jax.jit(lambda x, c: x * c.value_bits, static_argnums=1)
    assert int(f(1, cfg)) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key_channels_full=60), "sum to 60, but head_dim is 64"),
        (dict(key_channels_full=64, residual_length=100), "not a multiple of key_group_size"),
        (dict(key_channels_full=64, value_bits=3), "value_bits=3 is unsupported"),
        (dict(key_channels_full=64, salience="magic"), "salience='magic'"),
        (dict(key_channels_full=64, full_dtype="int8"), "full_dtype='int8'"),
        (dict(key_channels_full=0, key_channels_int4=64, key_granularity="per_head"),
         "key_granularity='per_head' is unknown; use one of per_block, per_token, "
         "per_channel, per_tensor"),
        (dict(key_channels_full=0, key_channels_int4=64, value_bits=2,
              value_granularity="per_sequence"),
         "value_granularity='per_sequence' is unknown; use one of per_block"),
        (dict(key_channels_full=0, key_channels_int4=64, key_smoothing="yes"),
         "key_smoothing='yes'; use true"),
        (dict(key_channels_full=0, key_channels_int4=64, sink_tokens=128),
         r"sink_tokens=128; use an int from 0 to residual_length - 1 = 127"),
        (dict(key_channels_full=0, key_channels_int4=64, sink_tokens=-1), "sink_tokens=-1"),
        (dict(key_channels_full=0, key_channels_int4=64, sink_tokens=True), "sink_tokens=True"),
    ],
)
def test_invalid_configs(kwargs, message):
    with pytest.raises(KVConfigError, match=message):
        KVQuantConfig(name="bad", head_dim=64, **kwargs)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(KVConfigError, match="unknown KV preset 'kivi3'.*kivi2"):
        load_kv_config("kivi3", 64)


def test_yaml_typo_names_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("key: {bits: 2, grop_size: 32}\nvalue: {bits: 2}\n")
    with pytest.raises(KVConfigError, match="unknown key key.*grop_size"):
        load_kv_config(path, 64)
    path.write_text("key: {full: 0.1, int4: rest}\nvalue: {bits: 4}\nresidual_length: 64\n")
    cfg = load_kv_config(path, 64)
    assert cfg.key_channel_counts == (6, 0, 58, 0) and cfg.name == "mine"


def test_granularity_and_smoothing_overrides_and_yaml(tmp_path):
    cfg = load_kv_config("k4v2", 128, key_granularity="per_token", key_smoothing=True)
    assert (cfg.key_granularity, cfg.value_granularity, cfg.key_smoothing) == (
        "per_token", "per_block", True)
    assert cfg.uses_kv_pareto_options and cfg.has_first_chunk_statistics
    assert "per_token/per_block, K-smoothing" in cfg.describe()
    hash(cfg)
    assert not load_kv_config("k4v2", 128).uses_kv_pareto_options
    path = tmp_path / "k4v2_tensor.yaml"
    path.write_text("key: {bits: 4}\nvalue: {bits: 2}\nkey_granularity: per_channel\n"
                    "value_granularity: per_tensor\nkey_smoothing: true\n")
    cfg = load_kv_config(path, 64)
    assert (cfg.key_granularity, cfg.value_granularity, cfg.key_smoothing) == (
        "per_channel", "per_tensor", True)
    assert (cfg.fixed_key_params, cfg.fixed_value_params) == (64, 1)
    with pytest.raises(KVConfigError, match="key_granularity='rows' is unknown"):
        load_kv_config("k4v2", 64, key_granularity="rows")


def test_granularity_has_no_effect_on_unquantized_parts():
    bf16 = load_kv_config("bf16", 64, key_granularity="per_token",
                          value_granularity="per_channel", key_smoothing=True)
    assert bf16.effective_key_granularity == bf16.effective_value_granularity == "per_block"
    assert not bf16.uses_kv_pareto_options and not bf16.has_first_chunk_statistics
    assert bf16.bytes_per_token == load_kv_config("bf16", 64).bytes_per_token
    k8v16 = load_kv_config("k8v8", 64, value_bits=16, value_granularity="per_tensor")
    assert k8v16.effective_value_granularity == "per_block" and k8v16.fixed_value_params == 0


@pytest.mark.parametrize("overrides", [dict(key_granularity="per_token"),
                                       dict(value_granularity="per_channel"),
                                       dict(key_smoothing=True)])
def test_pareto_options_reject_mixed_precision_keys(overrides):
    with pytest.raises(KVConfigError, match="need a single key tier.*keep per_block"):
        load_kv_config("mixkvq", 64, **overrides)
