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
    # + 16 B value codes + 2 groups x 2 params x 2 B
    assert cfg.bytes_per_token == pytest.approx(22 + 7.75 + 0.5 + 16 + 8)


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
