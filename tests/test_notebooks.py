"""colab/quickstart.ipynb and colab/kv_pareto.ipynb run top to bottom on CPU with the tiny
demo checkpoint.

The notebook is executed with nbclient in a kernel started from *this* interpreter (a
kernelspec written to a temp dir, so no ``ipykernel install`` is needed and no other
Python's kernel can be picked up). Parameters are injected papermill-style: a cell
tagged ``injected-parameters`` right after the cell tagged ``parameters``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "colab" / "quickstart.ipynb"
PARETO_NOTEBOOK = ROOT / "colab" / "kv_pareto.ipynb"
PARAMETERS = {
    NOTEBOOK: ("REPO_URL", "INSTALL", "MODEL", "LOCAL_CKPT", "PROMPT", "MAX_NEW_TOKENS",
               "MESH"),
    PARETO_NOTEBOOK: ("REPO_URL", "INSTALL", "MODEL", "LOCAL_CKPT", "SWEEP", "TEXT", "OUT_DIR"),
}


def _kernel_manager(tmp_path: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")],
                            ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _inject(nb, params: dict) -> None:
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    source += "\nimport sys\nprint('kernel python:', sys.executable)"
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("path", list(PARAMETERS), ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for name in PARAMETERS[path]:
        assert f"{name} = " in params[0].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs not stripped"


def test_quickstart_notebook_runs_on_cpu(demo_checkpoint, tmp_path):
    """On 8 CPU devices, sharded ``data=2,model=4`` (the batch of 1 padded to 2; 2 KV heads
    repeated over 4): the notebook checks its greedy tokens against one device."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _inject(nb, {"INSTALL": False, "LOCAL_CKPT": str(demo_checkpoint), "MAX_NEW_TOKENS": 8,
                 "MESH": "data=2,model=4"})
    nb.cells.insert(0, nbformat.v4.new_code_cell(  # before JAX starts in the kernel
        "import os\nos.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + "
        "' --xla_force_host_platform_device_count=8'"))
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) on failure

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code_cells)
    assert f"kernel python: {sys.executable}" in text
    assert "backend cpu" in text and "continuing on CPU" in text
    assert "attention path over the quantized cache: xla" in text
    assert "[bf16] prompt" in text and "[mixkvq] prompt" in text
    assert "8 devices; mesh: data=2 x model=4 over 8 cpu devices" in text
    for preset in ("bf16", "kivi2", "mixkvq"):
        assert (f"{preset}: data=2 x model=4 over 8 cpu devices vs one device, same greedy "
                "tokens: True") in text
    assert "MixKVQ stores a cached token in 21.9% of the bf16 bytes" in text
    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the KV-memory plot was not drawn"
    errors = [o for c in code_cells for o in c.outputs if o.get("output_type") == "error"]
    assert not errors


def test_kv_pareto_notebook_runs_on_cpu(demo_checkpoint, tmp_path):
    """The tiny sweep (configs/sweeps/tiny.yaml, as tests/test_pareto.py runs it, so the
    compiled programs come from the session's compilation cache)."""
    from mixkvq_jax.demo_checkpoint import TRAINING_TEXT

    text = tmp_path / "text.txt"
    text.write_text(TRAINING_TEXT * 12)
    out = tmp_path / "out"
    nb = nbformat.read(PARETO_NOTEBOOK, as_version=4)
    _inject(nb, {"INSTALL": False, "LOCAL_CKPT": str(demo_checkpoint), "SWEEP": "tiny",
                 "TEXT": str(text), "OUT_DIR": str(out)})
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    text_out = "\n".join(_text(c) for c in code_cells)
    assert f"kernel python: {sys.executable}" in text_out
    assert "backend cpu" in text_out and "continuing on CPU" in text_out
    assert "4 points:" in text_out and "awq-w4|k2v2|per_token|ksmooth|c64" in text_out
    assert "4 point(s) evaluated, 0 already" in text_out
    assert "points are Pareto-optimal (kl vs total memory)" in text_out
    assert "% apart)" in text_out
    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the frontier plot was not shown"
    tables = [o for c in code_cells for o in c.outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 1 and "| weights | kv |" in tables[0]["data"]["text/markdown"]
    errors = [o for c in code_cells for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert (out / "pareto.csv").is_file() and (out / "pareto.png").is_file()
