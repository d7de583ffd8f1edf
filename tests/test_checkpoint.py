"""HF checkpoint loading (single, sharded, bf16, state-dict API), errors, Orbax, tokenizer."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixkvq_jax import models
from mixkvq_jax.checkpoint import (
    CheckpointError,
    SafetensorsDict,
    Tokenizer,
    hf_state_dict_from_params,
    is_orbax_checkpoint,
    load_checkpoint,
    load_hf_config,
    model_config_from_hf_dict,
    params_from_hf_state_dict,
    read_safetensors_raw,
    save_params,
)
from mixkvq_jax.errors import UserError

torch = pytest.importorskip("torch")
ModelConfigError, RopeScaling = models.ModelConfigError, models.RopeScaling


def _assert_trees_equal(a: object, b: object) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hf_names_transposed_and_stacked(hf_checkpoint):
    ck = hf_checkpoint("qwen2")
    cfg, params, tok = load_checkpoint(ck.path, "float32")
    assert tok is None  # no tokenizer.json in this directory
    assert cfg.family == "qwen2" and cfg.attention_bias and not cfg.attention_out_bias
    sd = ck.model.state_dict()
    q = params["layers"]["attn"]["q_proj"]
    np.testing.assert_array_equal(q["kernel"][1], sd["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(q["bias"][0], sd["model.layers.0.self_attn.q_proj.bias"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    assert "bias" not in params["layers"]["attn"]["o_proj"]


def test_sharded_equals_single_file(hf_checkpoint, build_hf_checkpoint, tmp_path):
    sharded = build_hf_checkpoint("qwen2", tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded.path / "model.safetensors.index.json").is_file()
    assert len(list(sharded.path.glob("*.safetensors"))) > 1
    _, p_sharded, _ = load_checkpoint(sharded.path)
    _, p_single, _ = load_checkpoint(hf_checkpoint("qwen2").path)
    _assert_trees_equal(p_sharded, p_single)


def test_bf16_safetensors(build_hf_checkpoint, tmp_path):
    ck = build_hf_checkpoint("llama_tied", tmp_path / "bf16", dtype=torch.bfloat16)
    cfg, params, _ = load_checkpoint(ck.path, "float32")
    assert cfg.tie_word_embeddings and "lm_head" not in params
    ref = ck.model.state_dict()["model.layers.0.mlp.up_proj.weight"].float().numpy()
    np.testing.assert_array_equal(params["layers"]["mlp"]["up_proj"]["kernel"][0], ref.T)
    # The raw reader (for safetensors builds without numpy bfloat16) gives the same bits.
    name = "model.layers.0.mlp.up_proj.weight"
    file = next(ck.path.glob("*.safetensors"))
    raw = read_safetensors_raw(file, name)
    assert raw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(raw.astype(np.float32), ref)
    _, params16, _ = load_checkpoint(ck.path, "bf16")
    assert params16["embed"]["embedding"].dtype == jnp.bfloat16


def test_state_dict_api_round_trip(hf_checkpoint):
    """The entry points a GGUF reader uses: HF-named numpy dict + config.json dict."""
    ck = hf_checkpoint("qwen3")
    cfg_dict = json.loads((ck.path / "config.json").read_text())
    cfg = model_config_from_hf_dict(cfg_dict)
    assert cfg == load_hf_config(ck.path)
    assert cfg.qk_norm and cfg.head_dim == 32 and cfg.hidden_size == 64
    state = {k: np.asarray(v) for k, v in SafetensorsDict(ck.path).items()}
    params = params_from_hf_state_dict(state, cfg, jnp.float32)
    _, loaded, _ = load_checkpoint(ck.path)
    _assert_trees_equal(params, loaded)
    back = hf_state_dict_from_params(params, cfg)
    assert set(back) == set(state)
    for name in back:
        np.testing.assert_array_equal(back[name], state[name])


def test_missing_and_misshapen_tensors_are_named(hf_checkpoint, tmp_path):
    from safetensors.numpy import save_file

    ck = hf_checkpoint("llama3")
    cfg = load_hf_config(ck.path)
    state = dict(SafetensorsDict(ck.path).items())
    broken = tmp_path / "missing"
    shutil.copytree(ck.path, broken)
    dropped = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(dropped, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(broken)
    bad = dict(state, **{"model.norm.weight": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \[3\]"):
        params_from_hf_state_dict(bad, cfg)


def test_config_errors(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(tmp_path)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM.*"
                                              "Qwen3ForCausalLM"):
        load_checkpoint(gpt2)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_checkpoint("llama3").path / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(no_weights)


def test_rope_config_formats():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 16,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    v4 = model_config_from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": {
        "type": "linear", "factor": 2.0}})
    assert v4.rope_theta == 5e5 and v4.rope_scaling == RopeScaling("linear", factor=2.0)
    v5 = model_config_from_hf_dict({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert v5.rope_scaling.rope_type == "llama3" and v5.rope_scaling.factor == 32.0
    assert v5.head_dim == 8 and v5.num_kv_heads == 2
    with pytest.raises(ModelConfigError, match="yarn"):
        model_config_from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    with pytest.raises(ModelConfigError, match="hidden_act"):
        model_config_from_hf_dict({**base, "hidden_act": "gelu"})
    mistral = model_config_from_hf_dict({**base, "architectures": ["MistralForCausalLM"],
                                         "sliding_window": 64})
    assert mistral.max_context == 64


def test_orbax_round_trip(demo_model, tmp_path):
    from mixkvq_jax.generate import generate

    cfg, params, tokenizer = demo_model
    out = save_params(tmp_path / "orbax", params, cfg, tokenizer=tokenizer)
    assert is_orbax_checkpoint(out)
    cfg2, params2, tok2 = load_checkpoint(out, "float32")
    assert cfg2 == cfg
    _assert_trees_equal(params2, params)
    assert tok2 is not None and tok2.encode("hello there") == tokenizer.encode("hello there")
    # kivi2 and this prompt give the shapes test_generate's CLI test runs (shared compile).
    prompt = tokenizer.encode("The quick brown fox")
    a = generate(params, cfg, "kivi2", [prompt], max_new_tokens=8)
    b = generate(params2, cfg2, "kivi2", [prompt], max_new_tokens=8)
    assert a == b and 1 <= len(a[0]) <= 8
    _, params16, _ = load_checkpoint(out, "bf16")
    assert params16["norm"]["scale"].dtype == jnp.bfloat16
    with pytest.raises(CheckpointError, match="not empty"):
        save_params(out, params, cfg)


def test_tokenizer_and_chat_template(demo_checkpoint, tmp_path):
    tok = Tokenizer.from_dir(demo_checkpoint)
    ids = tok.encode("The quick brown fox")
    assert ids[0] == 0  # BOS added by the post-processor
    assert tok.decode(ids) == "The quick brown fox"
    assert tok.eos_token_ids == (1,)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode("x y z") == tok.encode("x y z")
    assert again.chat_template == tok.chat_template
    plain = Tokenizer(tok.tokenizer)
    with pytest.raises(UserError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_demo_checkpoint_is_a_valid_hf_checkpoint(demo_checkpoint):
    transformers = pytest.importorskip("transformers")
    cfg = load_hf_config(demo_checkpoint)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.head_dim == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_checkpoint)
    _, params, tok = load_checkpoint(demo_checkpoint)
    from mixkvq_jax.models import forward_full

    ids = tok.encode("The weather today")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(forward_full(params, jnp.asarray([ids]), config=cfg)[0])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
