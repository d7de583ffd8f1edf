"""The examples and the API docs run as written: examples/finetune_step.py, every
``python`` block of docs/api.md (as one script, 4 virtual CPU devices), and the lazy
top-level exports of ``mixkvq_jax``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_example(name: str):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example(capsys):
    example = _load_example("finetune_step")
    out = example.main(["--steps", "5", "--max-new-tokens", "8"])
    losses = out["losses"]
    assert len(losses) == 5 and all(map(lambda x: x == x, losses))  # no NaN
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert 1 <= len(out["tokens"]) <= 8
    assert out["stats"].preset == "mixkvq" and out["stats"].kv_ratio_vs_bf16 < 0.22
    printed = capsys.readouterr().out
    assert "step 0: loss" in printed and "step 4: loss" in printed and "[mixkvq]" in printed


def _doc_script() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 7, "docs/api.md lost its code blocks"
    return "\n\n".join(blocks) + "\nprint('DOCS-OK')\n"


def test_api_docs_snippets_run(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    script = tmp_path / "api_docs.py"
    script.write_text(_doc_script())
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "DOCS-OK" in proc.stdout
    assert "P(None, 'data', 'model')" in proc.stdout  # the sharded cache section ran


def test_top_level_exports_are_lazy():
    code = (
        "import sys, mixkvq_jax as m\n"
        "assert 'jax' not in sys.modules, 'import mixkvq_jax imported jax'\n"
        "from mixkvq_jax.generate import run_generation\n"
        "assert m.run_generation is run_generation\n"
        "missing = [n for n in m.__all__ if not hasattr(m, n)]\n"
        "assert not missing, missing\n"
        "assert set(m.__all__) <= set(dir(m))\n"
        "from mixkvq_jax.cache import QuantizedKVCache\n"
        "assert m.QuantizedKVCache is QuantizedKVCache\n"
        "try:\n    m.no_such_name\nexcept AttributeError as e:\n    print('OK', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK module 'mixkvq_jax' has no attribute 'no_such_name'" in proc.stdout
