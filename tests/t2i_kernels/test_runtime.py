"""Set-up errors say what to do: CPU tensors without the interpreter, and no Triton at all."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from t2i_kernels import _runtime
from t2i_kernels.gated_residual import _gated_residual_fwd_kernel
from tests.conftest import HAS_CUDA

REPO = Path(__file__).resolve().parents[2]

CALL_KERNEL = """
import torch, t2i_kernels
x = torch.randn(2, 3, 4)
try:
    t2i_kernels.gated_residual(x, torch.randn(2, 4), torch.randn(2, 3, 4))
except t2i_kernels.KernelUnavailableError as e:
    print("ERROR:", e)
else:
    print("RAN")
"""


def _run(code: str, **env: str) -> str:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cpu_tensors_without_interpreter_explain_the_fix():
    out = _run(CALL_KERNEL, TRITON_INTERPRET="0")
    assert "ERROR:" in out
    assert "TRITON_INTERPRET=1" in out and "cpu" in out and "CUDA" in out


def test_interpreter_requested_too_late_is_diagnosed():
    late = "import torch, t2i_kernels, os\nos.environ['TRITON_INTERPRET'] = '1'"
    code = CALL_KERNEL.replace("import torch, t2i_kernels", late)
    out = _run(code, TRITON_INTERPRET="0")
    assert "set it before importing" in out


def test_without_triton_import_works_and_kernels_say_how_to_install():
    hide_triton = """
    import sys, importlib.abc
    class HideTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("No module named 'triton' (hidden by the test)")
    sys.meta_path.insert(0, HideTriton())
    """
    code = textwrap.dedent(hide_triton) + textwrap.dedent(CALL_KERNEL) + textwrap.dedent("""
    from t2i_kernels import reference
    print("HAS_TRITON", t2i_kernels.HAS_TRITON, reference.gated_residual(x, torch.ones(2, 4), x).shape)
    """)
    out = _run(code)
    assert "HAS_TRITON False torch.Size([2, 3, 4])" in out
    assert "ERROR:" in out and "pip install 'triton>=3.6'" in out


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU machine the kernels are compiled")
def test_test_session_runs_kernels_interpreted():
    assert _runtime.kernel_mode(_gated_residual_fwd_kernel) == "interpreted"
