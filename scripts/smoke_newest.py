"""Early warning for upstream breakage: the project installed with the *newest* versions setup.py's ranges allow (no
constraints.txt), then a short end-to-end smoke in that environment.

    python scripts/smoke_newest.py [--venv DIR] [--keep]

Steps, each timed: make or reuse the virtualenv (``T2I_SMOKE_VENV``, default ``$XDG_CACHE_HOME/t2i-distill/
smoke-newest``), install torch (``T2I_TORCH_SPEC``, default ``torch==2.13.0``: the one package held at the tested build,
because a newer torch from PyPI is a multi-GB CUDA download), upgrade the project and every dependency to the newest
allowed versions, then from a scratch directory (not the repo root, so the installed copy runs): import diffusers'
FLUX, transformers, Hugging Face's ``kernels`` and ours; ``t2i-distill tiny``; a 2-step sCM ``train`` with
``--jvp reference``; one ``sample``. It prints every package whose version differs from constraints.txt, and on a
failure names them as the suspects. Exit code: 0 when every step passed. scripts/test.sh runs it (CI); it is meant to
finish in about 3 minutes on 2 cores with a warm pip cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.+))?$")


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def read_lock(path: Path = LOCK, python: tuple[int, int] | None = None) -> dict[str, str]:
    """``{package: version}`` from a pip/uv constraints file, for this Python where a line has a version marker."""
    from packaging.markers import Marker

    env = None
    if python is not None:
        env = {"python_full_version": f"{python[0]}.{python[1]}.0", "python_version": f"{python[0]}.{python[1]}"}
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if not match:
            continue
        name, version, marker = match.groups()
        if marker and not Marker(marker).evaluate(env):
            continue
        pins[canonical(name)] = version
    return pins


def lock_differences(installed: dict[str, str], locked: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(package, locked version, installed version)`` for every package installed at another version than the
    lock's, or installed but not in the lock ("-"). Local version labels (``+cpu``) are ignored; the project itself
    and pip's own tools are skipped."""
    skip = {"t2i-distill", "pip", "setuptools", "wheel"}
    rows = []
    for name, version in sorted(installed.items()):
        name = canonical(name)
        if name in skip:
            continue
        want = locked.get(name, "-")
        if want.split("+")[0] != version.split("+")[0]:
            rows.append((name, want, version))
    return rows


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {row["name"]: row["version"] for row in json.loads(out)}


def _python_of(python: Path) -> tuple[int, int]:
    out = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


class Smoke:
    """Runs the steps in order, times each, stops at the first failure."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def step(self, name: str, args: list[str], cwd: Path | None = None, env: dict | None = None,
             timeout: int = 900) -> bool:
        started = time.perf_counter()
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - started
        ok = done.returncode == 0
        self.rows.append((name, seconds, "ok" if ok else f"FAILED (exit {done.returncode})"))
        print(f"[smoke-newest] {name}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s", flush=True)
        if not ok:
            print(f"$ {' '.join(args)}\n{(done.stdout + done.stderr)[-4000:]}", flush=True)
        return ok


def _write_images(root: Path) -> None:
    """Four captioned 40×32 images in an imagefolder with metadata.jsonl (the trainer's --train_data_dir)."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True)
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "red"]):
        image = Image.new("RGB", (40, 32), "white")
        ImageDraw.Draw(image).ellipse((4 + i, 4, 24 + i, 24), fill=colour)
        image.save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"one {colour} circle"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(lines))


IMPORT_CHECK = ("import kernels, transformers, t2i_kernels, t2i_distill; "
                "from diffusers import FluxTransformer2DModel; "
                "import importlib.metadata as m; "
                "assert kernels.__file__ == str(m.distribution('kernels').locate_file('kernels/__init__.py'))")


def run(venv: Path, keep: bool) -> int:
    smoke = Smoke()
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling torch and transformers at install time is most of the install; imports compile
    # only the modules they need.
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-compile"]
    started = time.perf_counter()
    ok = True
    if not python.exists():
        ok = smoke.step("make virtualenv", [sys.executable, "-m", "venv", str(venv)])
    if ok and subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0:
        ok = smoke.step("install torch", [*pip, os.environ.get("T2I_TORCH_SPEC", "torch==2.13.0")])
    # No constraints: the newest versions setup.py's ranges allow (eager: dependencies of dependencies too).
    ok = ok and smoke.step("install newest", [*pip, "--upgrade", "--upgrade-strategy", "eager", str(REPO)])
    scratch = Path(tempfile.mkdtemp(prefix="t2i-smoke-newest-"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cli = [str(venv / "bin" / "t2i-distill")]
    ok = ok and smoke.step("import", [str(python), "-c", IMPORT_CHECK], cwd=scratch, env=env)
    ok = ok and smoke.step("tiny", [*cli, "tiny", "--output_dir", "tiny"], cwd=scratch, env=env)
    if ok:
        _write_images(scratch / "images")
    ok = ok and smoke.step("train scm 2 steps", [
        *cli, "train", "scm", "--pretrained_model_name_or_path", "tiny", "--train_data_dir", "images",
        "--resolution", "32", "--train_batch_size", "2", "--max_sequence_length", "8", "--cpu", "--output_dir", "run",
        "--report_to", "none", "--seed", "0", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--max_train_steps", "2", "--checkpointing_steps", "2", "--jvp", "reference"], cwd=scratch, env=env)
    ok = ok and smoke.step("sample", [
        *cli, "sample", "--pretrained_model_name_or_path", "tiny", "--method", "scm", "--student_checkpoint",
        "run/transformer_2.safetensors", "--prompt", "one red circle", "--num_inference_steps", "1",
        "--resolution", "32", "--max_sequence_length", "8", "--device", "cpu", "--output_dir", "samples"],
        cwd=scratch, env=env)
    if ok and not list((scratch / "samples").rglob("*.png")):
        smoke.rows.append(("sample wrote a PNG", 0.0, "FAILED (no PNG under samples/)"))
        ok = False

    differences = []
    if python.exists():
        try:
            differences = lock_differences(installed_versions(python), read_lock(LOCK, _python_of(python)))
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            print(f"[smoke-newest] could not compare with {LOCK.name}: {exc}")
    total = time.perf_counter() - started
    if differences:
        print(f"[smoke-newest] {len(differences)} package(s) differ from {LOCK.name} (locked → newest):")
        for name, locked, newest in differences:
            print(f"    {name:<28} {locked:>14} → {newest}")
    else:
        print(f"[smoke-newest] the newest allowed versions equal {LOCK.name}")
    verdict = "passed" if ok else "FAILED"
    print(f"[smoke-newest] {verdict} in {total:.0f} s ({venv})")
    if not ok:
        suspects = ", ".join(f"{n} {lk} → {nw}" for n, lk, nw in differences) or "none (the lock's own versions)"
        print(f"[smoke-newest] upstream breakage? packages that differ from the lock: {suspects}. Narrow the range "
              "in setup.py (with the reason beside it) or fix the code; the README commands keep using the lock.")
    if keep or not ok:
        print(f"[smoke-newest] scratch kept for inspection: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2i-distill" / "smoke-newest"
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("T2I_SMOKE_VENV") or cache),
                        help="the virtualenv to make or reuse (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    return run(args.venv, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
