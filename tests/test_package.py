"""Packaging and layering: what `import kernels` pulls in, the `kernels` name clash, the README/CI contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kernels_layer_imports_no_flux_or_training_code():
    out = _python(
        "import sys, kernels; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'accelerate', 'deepspeed', 't2i_distill') "
        "if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_our_kernels_package_is_not_mistaken_for_huggingface_kernels():
    """diffusers and transformers probe for HF's `kernels` package by import name; ours must not pass that probe."""
    out = _python(
        "from diffusers.utils import is_kernels_available as d; "
        "from transformers.utils.import_utils import is_kernels_available as t; print(d(), t())"
    )
    assert out.strip() == "False False"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme


def test_setup_pins_a_torch_range_that_keeps_the_installed_build():
    text = (REPO / "setup.py").read_text()
    assert '"torch>=2.11,<2.14"' in text
    import torch
    from packaging.specifiers import SpecifierSet

    installed = torch.__version__.split("+")[0]
    assert installed in SpecifierSet(">=2.11,<2.14"), f"installed torch {installed} is outside setup.py's range"


def test_the_wheel_ships_every_module_of_both_packages(tmp_path):
    """A non-editable install must contain kernels/ and t2i_distill/ with all their subpackages."""
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("t2i_distill-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for pkg in ("kernels", "t2i_distill") for p in (REPO / pkg).rglob("*.py")}
    assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert not any(name.startswith(("tests/", "bench/")) for name in shipped)
