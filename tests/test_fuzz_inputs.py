"""Seeded byte-level fuzzing of the loaders a user's files go through.

A small valid GGUF (header, metadata, tensor infos, data) and every shipped preset YAML
are mutated (byte and bit changes, interesting integers, insertions, deletions, splices,
truncations) and fed to the public loaders, `checkpoint.load_checkpoint` and
`config.load_kv_config`. Every case must either load or raise the project's one-line
error class (`UserError` / `KVConfigError`); any other exception, a multi-line message or
a case that runs past its alarm fails the test. The seed is fixed, so a failure
reproduces: the assertion message names the case.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from test_gguf import write_tiny_gguf

from mixkvq_jax.config import PRESET_DIR, KVConfigError, load_kv_config
from mixkvq_jax.errors import UserError

# MIXKVQ_FUZZ_SCALE=10 runs ten times as many cases (seeds differ from the default run's).
SCALE = int(os.environ.get("MIXKVQ_FUZZ_SCALE", "1"))
GGUF_CASES = 2000 * SCALE
YAML_CASES = 2000 * SCALE
HF_CASES = 400 * SCALE
SWEEP_CASES = 500 * SCALE
CASE_ALARM_S = 30  # a hang guard, not a timing check: no case comes close
INTERESTING = (0, 1, 2, 3, 7, 8, 9, 31, 32, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


class CaseTimeout(Exception):
    pass


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def fire(*_: Any) -> None:
        raise CaseTimeout(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mutate(data: bytes, rng: random.Random, regions: list[tuple[int, int]]) -> tuple[bytes, str]:
    """One to three random mutations inside randomly chosen regions; (bytes, description)."""
    out = bytearray(data)
    what = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        lo, hi = rng.choice(regions)
        hi = min(hi, len(out))
        if hi <= lo:
            lo, hi = 0, len(out)
        if not out:
            out += bytes([rng.randrange(256)])
            continue
        pos = rng.randrange(lo, hi)
        kind = rng.randrange(8)
        if kind == 0:
            out[pos] = rng.randrange(256)
            what.append(f"byte@{pos}")
        elif kind == 1:
            out[pos] ^= 1 << rng.randrange(8)
            what.append(f"bit@{pos}")
        elif kind == 2:
            size = rng.choice((4, 8))
            value = rng.choice(INTERESTING) % 2 ** (8 * size)
            out[pos:pos + size] = value.to_bytes(size, "little")
            what.append(f"int{8 * size}={value}@{pos}")
        elif kind == 3:
            n = rng.randrange(1, 64)
            del out[pos:pos + n]
            what.append(f"del{n}@{pos}")
        elif kind == 4:
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
            out[pos:pos] = blob
            what.append(f"ins{len(blob)}@{pos}")
        elif kind == 5:
            src = rng.randrange(len(out))
            n = rng.randrange(1, 128)
            out[pos:pos] = out[src:src + n]
            what.append(f"splice{n}@{pos}")
        elif kind == 6:
            del out[pos:]
            what.append(f"cut@{pos}")
        else:
            out[pos] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
            what.append(f"edge@{pos}")
    return bytes(out), "+".join(what)


def run_cases(cases: Iterator[tuple[str, bytes]], path: Path,
              load: Callable[[Path], Any], allowed: tuple[type[BaseException], ...]
              ) -> collections.Counter[str]:
    """Write each case to ``path`` and load it; count outcomes, fail on anything else."""
    counts: collections.Counter[str] = collections.Counter()
    for label, blob in cases:
        path.write_bytes(blob)
        try:
            with alarm(CASE_ALARM_S):
                load(path)
        except allowed as err:
            message = str(err)
            assert message and "\n" not in message, f"{label}: not one line: {message!r}"
            counts["rejected"] += 1
        except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"{label}: {type(err).__name__}: {err}")
        else:
            counts["loaded"] += 1
    return counts


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[tuple[int, int]]]:
    """A small valid GGUF and its regions: header, metadata, tensor infos, data."""
    from test_gguf import SPECIALS  # the tiny vocabulary's specials

    base = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    tokens = [*SPECIALS, *base, "Ġ", "Ġt", "he", "Ġthe"]
    vocab = {"tokens": tokens, "merges": ["Ġ t", "h e", "Ġt he"],
             "types": [3 if t in SPECIALS else 1 for t in tokens]}
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    write_tiny_gguf(path, vocab, qtypes=(QT.F32, QT.F16, QT.Q8_0, QT.Q4_1))
    data = path.read_bytes()
    name = b"token_embd.weight"
    infos_start = data.find(struct.pack("<Q", len(name)) + name)
    data_start = GGUFReader(path).data_offset
    assert 24 < infos_start < data_start < len(data)
    regions = [(0, 24), (24, infos_start), (infos_start, data_start), (data_start, len(data))]
    return data, regions


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mutated scales dequantize to NaN
def test_fuzz_gguf(small_gguf: tuple[bytes, list[tuple[int, int]]], tmp_path: Path) -> None:
    from mixkvq_jax.checkpoint import load_checkpoint

    data, regions = small_gguf
    load_checkpoint(_write(tmp_path / "valid.gguf", data))  # the seed itself loads
    rng = random.Random(20260218 + SCALE)

    def cases() -> Iterator[tuple[str, bytes]]:
        for i in range(GGUF_CASES):
            # Half the cases target one region (the header and tensor infos are small).
            chosen = [regions[i % 4]] if i % 2 else regions
            blob, what = mutate(data, rng, chosen)
            yield f"gguf case {i} ({what})", blob

    counts = run_cases(cases(), tmp_path / "case.gguf", load_checkpoint, (UserError,))
    _report("gguf", counts)
    assert sum(counts.values()) == GGUF_CASES
    assert counts["rejected"] > GGUF_CASES // 4  # the mutations do reach the checks


def test_fuzz_preset_yaml(tmp_path: Path) -> None:
    seeds = sorted(PRESET_DIR.glob("*.yaml"))
    assert len(seeds) >= 10
    texts = [p.read_bytes() for p in seeds]
    tokens = [b":", b"-", b"[", b"]", b"{", b"}", b"&a", b"*a", b"!!python/object:os.system",
              b"\x00", b"\xff\xfe", b"nan", b".inf", b"-.inf", b"1e999", b"-1", b"rest", b"true",
              b"~", b"999999999999999999999", b"0.5", b"\t", b"\n  ", b"'", b'"', b"%YAML 9",
              b"---\n", b"? ", b"!!binary", b"2001-13-45", b"key:", b"bits: 3"]
    rng = random.Random(20260219 + SCALE)

    def cases() -> Iterator[tuple[str, bytes]]:
        for i in range(YAML_CASES):
            k = rng.randrange(len(texts))
            text = texts[k]
            if i % 3 == 0:
                blob, what = mutate(text, rng, [(0, len(text))])
            else:  # token-level: insert or replace with YAML-significant bytes
                out, what = bytearray(text), ""
                for _ in range(rng.choice((1, 2, 3))):
                    pos = rng.randrange(len(out) + 1)
                    tok = rng.choice(tokens)
                    cut = rng.choice((0, 0, 1, len(tok), rng.randrange(1, 12)))
                    out[pos:pos + cut] = tok
                    what += f"{tok!r}@{pos}/{cut} "
                blob = bytes(out)
            yield f"yaml case {i} ({seeds[k].name}: {what.strip()})", blob

    def load(path: Path) -> None:
        for head_dim in (64, 128):
            load_kv_config(path, head_dim)

    counts = run_cases(cases(), tmp_path / "case.yaml", load, (KVConfigError,))
    _report("preset yaml", counts)
    assert sum(counts.values()) == YAML_CASES
    assert counts["rejected"] > YAML_CASES // 4 and counts["loaded"] > 0


def test_fuzz_sweep_yaml(tmp_path: Path) -> None:
    """The KV Pareto sweep YAMLs through `pareto.load_sweep` (no model is loaded)."""
    from mixkvq_jax.pareto import SWEEP_DIR, load_sweep

    texts = [p.read_bytes() for p in sorted(SWEEP_DIR.glob("*.yaml"))]
    rng = random.Random(20260221 + SCALE)

    def cases() -> Iterator[tuple[str, bytes]]:
        for i in range(SWEEP_CASES):
            text = texts[i % len(texts)]
            blob, what = mutate(text, rng, [(0, len(text))])
            yield f"sweep case {i} ({what})", blob

    counts = run_cases(cases(), tmp_path / "case.yaml", load_sweep, (UserError, KVConfigError))
    _report("sweep yaml", counts)
    assert sum(counts.values()) == SWEEP_CASES
    assert counts["rejected"] > SWEEP_CASES // 4


def test_fuzz_hf_checkpoint(demo_checkpoint: Path, tmp_path: Path) -> None:
    """The same for an HF directory: config.json, the safetensors header and data, and
    the tokenizer files, one file mutated per case."""
    import shutil

    from mixkvq_jax.checkpoint import load_checkpoint

    work = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint, work)
    files = {p.name: p.read_bytes() for p in sorted(work.iterdir()) if p.is_file()}
    weights = files["model.safetensors"]
    header_end = 8 + int.from_bytes(weights[:8], "little")
    targets = {"config.json": [(0, len(files["config.json"]))],
               "model.safetensors": [(0, 8), (8, header_end), (header_end, len(weights))],
               "tokenizer.json": [(0, len(files["tokenizer.json"]))],
               "tokenizer_config.json": [(0, len(files["tokenizer_config.json"]))],
               "generation_config.json": [(0, len(files["generation_config.json"]))]}
    order = ["model.safetensors", "config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json"]
    rng = random.Random(20260220 + SCALE)
    target = {"name": ""}

    def cases() -> Iterator[tuple[str, bytes]]:
        for i in range(HF_CASES):
            name = order[i % len(order)]
            blob, what = mutate(files[name], rng, targets[name])
            target["name"] = name
            yield f"hf case {i} ({name}: {what})", blob

    def load(path: Path) -> None:
        name = target["name"]
        (work / name).write_bytes(path.read_bytes())
        try:
            load_checkpoint(work)
        finally:
            (work / name).write_bytes(files[name])

    counts = run_cases(cases(), tmp_path / "case.bin", load, (UserError,))
    _report("hf checkpoint", counts)
    assert sum(counts.values()) == HF_CASES
    assert counts["rejected"] > HF_CASES // 4


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _report(what: str, counts: collections.Counter[str]) -> None:
    print(f"\n[fuzz] {what}: {sum(counts.values())} cases, {counts['loaded']} loaded, "
          f"{counts['rejected']} rejected with a one-line error, 0 other")
