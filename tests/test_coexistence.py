"""Hugging Face's `kernels` and this project in one environment.

transformers (≥ 5.25) requires HF's `kernels` distribution and imports it whenever diffusers' FLUX is imported; our
Triton layer used to be importable as `kernels` too, which shadowed theirs from the repo root (diffusers crashed) and
was shadowed by theirs elsewhere. Each case below runs in a fresh interpreter, from the repo root and from another
directory, against the editable install and against a built wheel: diffusers' FluxTransformer2DModel and
transformers import, `import kernels` is HF's own file, `t2i_kernels` runs one kernel, and the `t2i-distill` console
script works.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: What each interpreter prints: where every package came from, and one kernel's error against its reference.
PROBE = """
import importlib.metadata, json
import kernels
import transformers
from diffusers import FluxTransformer2DModel
import torch
import t2i_distill
import t2i_kernels

x = torch.randn(2, 5, 24)
err = (t2i_kernels.gelu_tanh(x) - t2i_kernels.reference.gelu_tanh(x)).abs().max().item()
hf_file = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
print(json.dumps({"kernels": kernels.__file__, "hf_kernels": str(hf_file), "t2i_kernels": t2i_kernels.__file__,
                  "t2i_distill": t2i_distill.__file__, "flux": FluxTransformer2DModel.__name__,
                  "transformers": transformers.__version__, "gelu_err": err}))
"""


def _require_hf_kernels() -> str:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` is not installed; the dev extra requires it (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (no dependencies) into a folder of its own."""
    build, site = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(build)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = build.glob("t2i_distill-*.whl")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return site


def _environment(site: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"  # no GPU here: the one kernel runs in Triton's interpreter
    if site is not None:
        env["PYTHONPATH"] = str(site)  # ahead of site-packages, so the wheel's copy wins over the editable one
    return env


def _run(args: list[str], cwd: Path, site: Path | None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=_environment(site), timeout=600)
    assert done.returncode == 0, f"{args} in {cwd} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.mark.parametrize("install", ["editable", "wheel"])
@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_diffusers_transformers_and_our_layer_share_one_environment(install, where, request, tmp_path):
    _require_hf_kernels()
    site = request.getfixturevalue("wheel_site") if install == "wheel" else None
    cwd = REPO if where == "repo root" else tmp_path
    info = json.loads(_run([sys.executable, "-c", PROBE], cwd, site).stdout.strip().splitlines()[-1])

    assert Path(info["kernels"]).resolve() == Path(info["hf_kernels"]).resolve(), "`import kernels` is not HF's"
    assert info["flux"] == "FluxTransformer2DModel"
    assert info["gelu_err"] < 1e-5
    # From the repo root, Python puts the working directory first, so the checkout's sources win (as for any
    # package); elsewhere the install in use must be the one imported.
    expected_root = REPO if (install == "editable" or where == "repo root") else site
    for name in ("t2i_kernels", "t2i_distill"):
        assert Path(info[name]).resolve().is_relative_to(expected_root.resolve()), (name, info[name])


@pytest.mark.parametrize("install", ["editable", "wheel"])
@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_console_script_runs_beside_hf_kernels(install, where, request, tmp_path):
    hf_version = _require_hf_kernels()
    site = request.getfixturevalue("wheel_site") if install == "wheel" else None
    script = (site / "bin" if site else Path(sys.executable).parent) / "t2i-distill"
    assert script.is_file(), f"no console script at {script}"
    out = _run([str(script), "env"], REPO if where == "repo root" else tmp_path, site).stdout
    assert f"kernels (HF) {hf_version}" in out
    origin = next(line for line in out.splitlines() if line.strip().startswith("from "))
    # A console script's sys.path starts at its own folder, not the working directory: the install it belongs to.
    assert Path(origin.split("from ", 1)[1].strip()).is_relative_to(REPO if site is None else site), origin
