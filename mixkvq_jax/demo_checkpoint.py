"""Write a tiny random Llama checkpoint in HF format, with a real (small) BPE tokenizer.

    python -m mixkvq_jax.demo_checkpoint OUT_DIR [--seed 0] [--bf16] [--force]

The directory holds ``config.json`` (``LlamaForCausalLM``), ``model.safetensors``,
``tokenizer.json`` (byte-level BPE trained here on a built-in paragraph, so any text
encodes), ``tokenizer_config.json`` (with a small chat template) and
``generation_config.json``. Nothing is downloaded and neither torch nor transformers is
needed. The weights are random: **the model's output is gibberish**. It exists so the
CLI, the tests and the README run end to end without a real model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from mixkvq_jax.errors import UserError, run_cli
from mixkvq_jax.models import ModelConfig, init_params

TRAINING_TEXT = """\
Large language models keep a cache of keys and values for every token they have read, so
that each new token attends to the whole history without recomputing it. For long
contexts this cache grows larger than the model weights themselves. Quantizing it to a
few bits per number shrinks it by a factor of four to eight. Keys have outlier channels
with large magnitudes, so they are quantized per channel; values are quantized per token.
A short window of the most recent tokens stays in full precision. Mixed precision gives
the most important key channels more bits: a channel matters when its range is wide and
the queries look at it. The quick brown fox jumps over the lazy dog. Once upon a time
there was a small model that knew nothing at all, and it talked anyway, one token after
another, until someone told it to stop. The weather today is sunny with a chance of rain
in the afternoon. Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in text too.
"""

BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `TRAINING_TEXT`; ids 0/1 are
    ``<s>`` / ``</s>`` and encoding prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return tok


def demo_model_config(vocab_size: int) -> ModelConfig:
    """2 layers, hidden 256, 4 query / 2 KV heads of 64 channels, tied embeddings."""
    return ModelConfig(
        family="llama", vocab_size=vocab_size, hidden_size=256, intermediate_size=512,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=0, eos_token_ids=(1,), architecture="LlamaForCausalLM",
    )


def hf_config_dict(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """The ``config.json`` transformers writes for this Llama config."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0], "torch_dtype": dtype, "dtype": dtype,
    }


def write_demo_checkpoint(out_dir: str | Path, *, seed: int = 0, bf16: bool = False,
                          overwrite: bool = False, init_std: float = 0.08) -> Path:
    """Write the demo checkpoint to ``out_dir`` and return it.

    ``init_std`` is above the usual 0.02 on purpose: with it the tied output head gives
    logits of order 1 rather than nearly uniform ones, so greedy decoding varies.
    """
    from safetensors.numpy import save_file

    from mixkvq_jax.checkpoint import hf_state_dict_from_params

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = demo_model_config(tokenizer.get_vocab_size())
    params = init_params(config, seed=seed, dtype=jnp.float32, init_std=init_std)
    state = hf_state_dict_from_params(params, config)
    dtype = "bfloat16" if bf16 else "float32"
    if bf16:
        state = {k: v.astype(jnp.bfloat16) for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    tok_cfg = {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE,
               "model_max_length": config.max_position_embeddings,
               "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = {"bos_token_id": 0, "eos_token_id": 1}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "README.txt").write_text(
        "Random-weight demo checkpoint written by mixkvq_jax.demo_checkpoint: its output "
        "is gibberish.\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixkvq_jax.demo_checkpoint",
                                description="Write a tiny random Llama HF checkpoint "
                                            "(output is gibberish).")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="store weights as bfloat16")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    args = p.parse_args(argv)

    def run() -> int:
        out = write_demo_checkpoint(args.out, seed=args.seed, bf16=args.bf16,
                                    overwrite=args.force)
        print(f"wrote a random (gibberish-output) Llama checkpoint to {out}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
