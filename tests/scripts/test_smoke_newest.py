"""scripts/smoke_newest.py's lock reading and comparison, and constraints.txt itself: consistent with setup.py, and
what the test environment actually runs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("smoke_newest", REPO / "scripts" / "smoke_newest.py")
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)


def test_read_lock_evaluates_markers_for_the_given_python(tmp_path):
    lock = tmp_path / "c.txt"
    lock.write_text("# header\nfoo==1.0\n    # via bar\nnumpy==2.4.6 ; python_full_version < '3.12'\n"
                    "numpy==2.5.5 ; python_full_version >= '3.12'\nPy_Yaml==6.0.3\n-e .\n")
    assert smoke.read_lock(lock, (3, 11)) == {"foo": "1.0", "numpy": "2.4.6", "py-yaml": "6.0.3"}
    assert smoke.read_lock(lock, (3, 12))["numpy"] == "2.5.5"


def test_lock_differences_names_changed_and_unlocked_packages():
    locked = {"torch": "2.13.0", "transformers": "5.24.0", "numpy": "2.4.6"}
    installed = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.4.6", "kernels": "0.19.1",
                 "t2i-distill": "0.1.0", "pip": "25.0"}
    assert smoke.lock_differences(installed, locked) == [("kernels", "-", "0.19.1"),
                                                         ("transformers", "5.24.0", "5.25.0")]


def test_the_lock_pins_every_requirement_of_setup_py_within_its_range():
    from packaging.requirements import Requirement

    setup_globals: dict = {}
    source = (REPO / "setup.py").read_text().split("setup(\n")[0]  # the requirement lists, not the setup() call
    setup_globals["__file__"] = str(REPO / "setup.py")
    exec(compile(source, "setup.py", "exec"), setup_globals)
    locked = smoke.read_lock(smoke.LOCK, sys.version_info[:2])
    requirements = setup_globals["INSTALL_REQUIRES"] + setup_globals["EXTRAS_REQUIRE"]["dev"] \
        + setup_globals["EXTRAS_REQUIRE"]["deepspeed"]
    problems = []
    for text in requirements:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate():
            continue
        version = locked.get(smoke.canonical(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req}: locked {version}")
    assert problems == []
    header = smoke.LOCK.read_text().splitlines()[:2]
    assert header[1].strip() == "#    bash scripts/lock.sh", "the lock must say how it is regenerated"


def test_this_environment_runs_the_locked_versions():
    """What scripts/setup_env.sh installed is the lock (the tested set), not whatever pip resolved today."""
    import torch

    if os.environ.get("T2I_NO_LOCK") == "1" or torch.version.cuda is not None:
        pytest.skip("installed without the lock, or with a torch other than the locked CPU build")
    # Only what is installed (site-packages), not vendored copies another import put on sys.path (setuptools' _vendor).
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    installed = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions(path=site)}
    locked = smoke.read_lock(smoke.LOCK, sys.version_info[:2])
    differences = [row for row in smoke.lock_differences(installed, locked) if row[1] != "-"]
    assert differences == [], "installed versions differ from constraints.txt: run `bash scripts/test.sh` again"
