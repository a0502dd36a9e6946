"""The README's Python snippets run as written (in a fresh interpreter, on the CPU with TRITON_INTERPRET=1, beside
the tiny folder the README says to make first)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs_as_written(index, tmp_path):
    from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

    write_tiny_flux_pipeline(tmp_path / "tiny-flux", seed=0)  # `t2i-distill tiny --output_dir tiny-flux`
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    import torch

    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, f"README snippet {index}:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"
