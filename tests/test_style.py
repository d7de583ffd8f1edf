"""The code base stays ruff-clean (pyproject.toml holds the rules)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_clean():
    result = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_versions_printed(capsys):
    import flax
    import jax

    with capsys.disabled():
        print(f"\n[versions] jax {jax.__version__}, flax {flax.__version__}, "
              f"backend {jax.default_backend()}")


def test_every_subpackage_is_packaged():
    """A non-editable install ships only the packages pyproject lists: list them all."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    dirs = setup["package-dir"]
    for package, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *sub)) in listed, f"{package}.{'.'.join(sub)} not listed"
