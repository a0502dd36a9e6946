"""Deterministic crash points for the fault tests: ``T2I_FAULT=<point>:<step>`` makes this process SIGKILL itself
at that point of that step's save, exactly where a node failure or an OOM killer could hit. Unset (always, outside
the tests), :func:`crash_point` is a dictionary lookup and nothing else.

Points: ``mid_export`` (an export written under its temporary name, not renamed), ``exported`` (the step's exports
complete, its checkpoint not started), ``checkpoint_written`` (the checkpoint complete in its temporary folder, not
renamed), ``checkpoint_renamed`` (the checkpoint visible, nothing after it run).
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "crash_point"]

POINTS = ("mid_export", "exported", "checkpoint_written", "checkpoint_renamed")


def crash_point(point: str, step: int) -> None:
    if os.environ.get("T2I_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
