"""Checkpoints that cannot tear (reference bugs B6, B7), resume, and the student export for the pipelines.

Layout (accelerate's ``checkpoint-<step>`` convention), one folder per save under ``output_dir``::

    checkpoint-<step>/
        manifest.json               written LAST: step, backend, world size, every file; its presence = complete
        engine.json                 engine counters (optimizer updates, accumulation window)
        model.safetensors           single / ddp: the student (main rank)
        optimizer.pt, scheduler.pt  single / ddp: optimizer state; scheduler (main rank; scheduler for all backends)
        dcp/                        fsdp2: torch.distributed.checkpoint of model + optimizer shards (every rank)
        deepspeed/                  deepspeed: DeepSpeed's own save_checkpoint (module + ZeRO partitions per rank)
        rng_state_<rank>.pt         python, numpy, torch (CPU and current CUDA device) RNG of each rank
        extra.pt                    the trainer's ``extra`` (sampler position, EMA, counters; main rank)
        extra_rank<rank>.pt         ``per_rank_extra`` (e.g. an EMA of FSDP2 shards; every rank)

Atomicity: every rank writes into ``.tmp-checkpoint-<step>``; the ranks agree (all-reduce) that every write
succeeded; then the main rank writes ``manifest.json``, fsyncs, and renames the folder to ``checkpoint-<step>`` (a
rename within one directory is atomic on POSIX). A failure on any rank removes the temporary folder and raises on
every rank; a crash leaves only a ``.tmp-`` folder, which :meth:`CheckpointManager.latest` ignores and the next save
removes. Pruning (``total_limit``) runs only after the new checkpoint is complete. ``output_dir`` must be one shared
file system for all ranks (as for accelerate's ``save_state``).

Files are read back with ``torch.load(weights_only=True)`` (no arbitrary unpickling) except DeepSpeed's own files,
which DeepSpeed loads itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i_distill.training.engine import Engine
from t2i_distill.training.faults import crash_point

__all__ = ["CheckpointManager", "OutputDirError", "check_writable", "export_student"]

MANIFEST = "manifest.json"
_FORMAT_VERSION = 2  # 2: every file's size and BLAKE2b hash (``file_records``), and the trainer's identity
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
EXPORT_FORMATS = ("safetensors", "pt")


class OutputDirError(OSError):
    """The output directory cannot hold checkpoints (not writable, or too little free space)."""


def check_writable(output_dir: str | os.PathLike, min_free_bytes: int = 0) -> Path:
    """Create ``output_dir`` if needed and prove it is writable (write, fsync and delete a probe file) with at least
    ``min_free_bytes`` free; call before training starts. Returns the directory; raises :class:`OutputDirError`
    naming the directory, what was needed and what was found."""
    if isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int) or min_free_bytes < 0:
        raise ValueError(f"min_free_bytes: expected an int >= 0, got {min_free_bytes!r}")
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"t2i-distill write probe")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"output_dir {str(path)!r} is not writable: {type(error).__name__}: {error}") from error
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise OutputDirError(f"output_dir {str(path)!r} has {free / 2**30:.2f} GiB free, but at least "
                             f"{min_free_bytes / 2**30:.2f} GiB are needed for checkpoints")
    return path


# -- small durable writers --------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writing:
    """A write that fails on a full disk raises ``OSError(ENOSPC)`` naming the file and the free space (torch's zip
    writer reports it only as "unexpected pos ..."); other failures pass through unchanged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, Exception):
            return False
        import errno

        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = None
        full = getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < (1 << 20))
        if full:
            raise OSError(errno.ENOSPC, f"the disk is full: writing {str(self.path)!r} failed with "
                                        f"{'?' if free is None else free} bytes free on its file system "
                                        f"({type(error).__name__}: {error}); free space and resume") from error
        return False  # not a full disk: the original error, unchanged


def _torch_save(obj: Any, path: Path) -> None:
    with _Writing(path):
        torch.save(obj, path)
        _fsync_file(path)


def _json_save(obj: Any, path: Path) -> None:
    with _Writing(path), open(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _safetensors_save(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses views and shared storage: give it one contiguous copy per tensor.
    with _Writing(path):
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}, str(path),
                  metadata=metadata)
        _fsync_file(path)


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


# -- RNG --------------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # as plain lists: weights_only loading refuses numpy arrays
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- the manager ------------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves, finds, loads and prunes ``output_dir/checkpoint-<step>/`` folders (see the module docstring).

    ``total_limit``: keep at most this many complete checkpoints (None: all), removing the oldest by step."""

    def __init__(self, output_dir: str | os.PathLike, total_limit: int | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        if total_limit is not None and (isinstance(total_limit, bool) or not isinstance(total_limit, int)
                                        or total_limit < 1):
            raise ValueError(f"total_limit: expected None or an int >= 1, got {total_limit!r}")
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        #: What the manifest records about the run (e.g. ``{"method": "scm"}``) and a resume must match.
        self.identity = dict(identity or {})

    # -- finding -------------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (those with a manifest) as (step, path), oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in self.output_dir.iterdir():
            match = _CHECKPOINT_RE.match(path.name)
            if match and path.is_dir() and (path / MANIFEST).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def latest_verified(self, log=None) -> Path | None:
        """The newest checkpoint that passes :func:`~t2i_distill.training.verify.verify_checkpoint`; each newer one
        that fails is reported through ``log`` (a callable taking one message) naming the file and why."""
        from t2i_distill.training.verify import verify_checkpoint

        for _, path in reversed(self.checkpoints()):
            problems = verify_checkpoint(path)
            if not problems:
                return path
            if log is not None:
                log(f"checkpoint {path} fails verification, falling back to an older one: {'; '.join(problems)}")
        return None

    def resolve(self, spec: str | os.PathLike) -> Path:
        """``"latest"`` → :meth:`latest` (``FileNotFoundError`` when there is none); a path → that checkpoint, which
        must be complete (``ValueError`` otherwise)."""
        from t2i_distill.training.verify import CheckpointVerificationError, verify_checkpoint

        if isinstance(spec, str) and spec == "latest":
            latest = self.latest_verified()
            if latest is None:
                raise FileNotFoundError(f"resume_from_checkpoint='latest': no complete checkpoint-<step> folder in "
                                        f"{str(self.output_dir)!r}")
            return latest
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: {str(path)!r} is not a directory")
        if not (path / MANIFEST).is_file():
            raise ValueError(f"resume_from_checkpoint: {str(path)!r} has no {MANIFEST}: it is not a complete "
                             "checkpoint (a save was interrupted, or it is not a checkpoint folder)")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointVerificationError(f"--resume_from_checkpoint {str(path)!r} fails verification: "
                                              + "; ".join(problems))
        return path

    # -- saving --------------------------------------------------------------------------------------------------
    def save(self, step: int, engine: Engine, extra: dict[str, Any] | None = None,
             per_rank_extra: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoint-<step>`` synchronously and atomically; a collective (call on every rank, after the
        final micro-step of an accumulation window). ``extra`` must be identical on all ranks (the main rank's is
        written); ``per_rank_extra`` is written for each rank. Both must hold only tensors, numbers, strings, bools,
        None and lists/tuples/dicts of them (they are read back with ``weights_only=True``). Returns the path."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        if engine.micro_step != 0:
            raise ValueError(f"engine: save only after the final micro-step of an accumulation window (micro_step "
                             f"is {engine.micro_step} of {engine.config.gradient_accumulation_steps}); the "
                             "accumulated gradients are not part of a checkpoint")
        extra, per_rank_extra = dict(extra or {}), dict(per_rank_extra or {})
        clash = sorted(set(extra) & set(per_rank_extra))
        if clash:
            raise ValueError(f"per_rank_extra: keys {clash} are also in extra; use distinct keys")
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f"{_TMP_PREFIX}{step}"
        error: BaseException | None = None
        if engine.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as caught:
                error = caught
        if not engine.all_ranks_ok(error is None):
            raise RuntimeError(f"checkpoint {str(final)!r}: could not create {str(tmp)!r}") from error
        try:
            self._write_parts(tmp, step, engine, extra, per_rank_extra)
        except Exception as caught:  # noqa: BLE001 (every rank must learn of a failure, whatever it is)
            error = caught
        if not engine.all_ranks_ok(error is None):
            if engine.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            engine.barrier()
            raise RuntimeError(f"checkpoint {str(final)!r} was not saved (a rank failed while writing; the previous "
                               f"checkpoints are untouched){': ' + repr(error) if error else ''}") from error
        if engine.is_main:
            try:
                self._commit(tmp, final, step, engine)
            except Exception as caught:  # noqa: BLE001
                error = caught
                shutil.rmtree(tmp, ignore_errors=True)
        if not engine.all_ranks_ok(error is None):
            raise RuntimeError(f"checkpoint {str(final)!r}: committing failed") from error
        if engine.is_main:
            self._prune(keep=final)
        engine.barrier()
        return final

    def _write_parts(self, tmp: Path, step: int, engine: Engine, extra: dict, per_rank_extra: dict) -> None:
        backend = engine.backend
        if backend in ("single", "ddp"):
            if engine.is_main:
                _safetensors_save(engine.unwrapped.state_dict(), tmp / "model.safetensors")
                _torch_save(engine.optimizer.state_dict(), tmp / "optimizer.pt")
        elif backend == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(engine.unwrapped, engine.optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        else:  # deepspeed: its own per-rank files (module on rank 0, a ZeRO partition per rank)
            engine._ds_engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        if engine.is_main:
            if engine.lr_scheduler is not None:
                _torch_save(engine.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            _json_save({"completed_steps": engine.completed_steps, "micro_step": engine.micro_step,
                        "step": step}, tmp / "engine.json")
            _torch_save(extra, tmp / "extra.pt")
        _torch_save(_rng_state(), tmp / f"rng_state_{engine.rank}.pt")
        _torch_save(per_rank_extra, tmp / f"extra_rank{engine.rank}.pt")

    def _commit(self, tmp: Path, final: Path, step: int, engine: Engine) -> None:
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        missing = [f"rng_state_{rank}.pt" for rank in range(engine.world_size) if f"rng_state_{rank}.pt" not in files]
        if missing:
            raise RuntimeError(f"checkpoint {str(tmp)!r} is missing {missing} (is output_dir shared by all ranks?)")
        from t2i_distill.training.verify import manifest_entries

        _json_save({"format_version": _FORMAT_VERSION, "step": step, "backend": engine.backend,
                    "world_size": engine.world_size, "mixed_precision": engine.config.mixed_precision,
                    "gradient_accumulation_steps": engine.config.gradient_accumulation_steps,
                    "has_scheduler": engine.lr_scheduler is not None, "files": files,
                    "file_records": manifest_entries(tmp, files), **self.identity}, tmp / MANIFEST)
        _fsync_dir(tmp)
        crash_point("checkpoint_written", step)
        previous = None
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside, swap, then delete it
            previous = final.with_name(f".old-{final.name}")
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(final, previous)
        os.rename(tmp, final)
        _fsync_dir(self.output_dir)
        crash_point("checkpoint_renamed", step)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        for stale in self.output_dir.glob(f"{_TMP_PREFIX}*"):  # left by crashed saves
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if self.total_limit is None:
            return
        found = [path for _, path in self.checkpoints() if path != keep]
        excess = len(found) + 1 - self.total_limit
        for path in found[:max(excess, 0)]:
            shutil.rmtree(path)

    # -- loading -------------------------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike, engine: Engine, verify: bool = True) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, engine counters and this rank's RNG from ``path`` (a checkpoint
        folder or "latest"); a collective. Returns ``extra`` merged with this rank's ``per_rank_extra``. The
        checkpoint's backend, world size and accumulation steps must match the engine's (``ValueError``)."""
        path = self.resolve(path) if verify else Path(path)
        manifest = json.loads((path / MANIFEST).read_text())
        for key, want in self.identity.items():
            have = manifest.get(key)
            if have is not None and have != want:
                raise ValueError(f"checkpoint {str(path)!r} was written by a {key} {have!r} run; this run's {key} is "
                                 f"{want!r}: resume it with the same {key}, or start another --output_dir")
        for key, have in (("backend", engine.backend), ("world_size", engine.world_size),
                          ("gradient_accumulation_steps", engine.config.gradient_accumulation_steps)):
            if manifest[key] != have:
                raise ValueError(f"checkpoint {str(path)!r} was saved with {key}={manifest[key]!r}, but this engine "
                                 f"has {key}={have!r}; resume with the same setting")
        if manifest["has_scheduler"] != (engine.lr_scheduler is not None):
            raise ValueError(f"checkpoint {str(path)!r}: has_scheduler={manifest['has_scheduler']} but the engine "
                             f"{'has' if engine.lr_scheduler is not None else 'has no'} lr scheduler")
        backend = engine.backend
        if backend in ("single", "ddp"):
            from safetensors.torch import load_file

            engine.unwrapped.load_state_dict(load_file(str(path / "model.safetensors"), device=str(engine.device)))
            engine.optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
        elif backend == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(engine.unwrapped, engine.optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            set_state_dict(engine.unwrapped, engine.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
        else:
            loaded, _ = engine._ds_engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                          load_lr_scheduler_states=False)
            if loaded is None:
                raise ValueError(f"checkpoint {str(path)!r}: DeepSpeed found no loadable state under 'deepspeed/'")
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
        counters = json.loads((path / "engine.json").read_text())
        engine.completed_steps = int(counters["completed_steps"])
        engine.micro_step = int(counters["micro_step"])
        engine._set_gradient_sync()
        rng_file = path / f"rng_state_{engine.rank}.pt"
        _set_rng_state(_torch_load(rng_file))
        extra = _torch_load(path / "extra.pt")
        rank_file = path / f"extra_rank{engine.rank}.pt"
        if rank_file.is_file():
            extra.update(_torch_load(rank_file))
        engine.barrier()
        return extra


# -- export -----------------------------------------------------------------------------------------------------
def export_student(state_dict: dict[str, torch.Tensor], path_or_dir: str | os.PathLike, step: int,
                   formats: tuple[str, ...] = ("safetensors",), metadata: dict[str, str] | None = None) -> list[Path]:
    """Write the student alone for the pipelines: ``transformer_<step>.safetensors`` and/or the reference's
    ``transformer_<step>.pt`` holding ``{"module": state_dict}``, each written to a temporary name and renamed.

    ``path_or_dir``: a directory (created if needed), or a file path ending in ``.safetensors``/``.pt`` whose stem
    is used instead of ``transformer_<step>``. Both load with :func:`t2i_distill.models.load_state_dict_file`.
    ``metadata`` (str → str, e.g. :func:`t2i_distill.models.checkpoint_files.metadata_for`'s kind and time scale) goes
    into the safetensors header and, as ``{"t2i_distill": {...}}`` beside ``"module"``, into the ``.pt``.
    Returns the written paths. Call on the main rank with :meth:`Engine.state_dict_for_export`'s result."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"state_dict: expected a non-empty dict of tensors, got "
                         f"{type(state_dict).__name__}{' (empty)' if isinstance(state_dict, dict) else ''}")
    bad = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict: values must be tensors; not tensors: {bad[:10]}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    formats = tuple(formats)
    if not formats or any(fmt not in EXPORT_FORMATS for fmt in formats) or len(set(formats)) != len(formats):
        raise ValueError(f"formats: expected distinct entries of {EXPORT_FORMATS}, got {formats!r}")
    target = Path(path_or_dir)
    if target.suffix in (".safetensors", ".pt"):
        directory, stem = target.parent, target.stem
    else:
        directory, stem = target, f"transformer_{step}"
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        out = directory / f"{stem}.{fmt}"
        tmp = directory / f".tmp-{stem}.{fmt}"
        if fmt == "safetensors":
            _safetensors_save(state_dict, tmp, metadata={"format": "pt", "step": str(step), **(metadata or {})})
        else:
            recorded = {k.removeprefix("t2i_distill."): v for k, v in (metadata or {}).items()}
            extra = {"t2i_distill": recorded} if recorded else {}  # the reference reads only "module"
            _torch_save({"module": {k: v.detach().to("cpu") for k, v in state_dict.items()}, **extra}, tmp)
        crash_point("mid_export", step)
        os.replace(tmp, out)
        written.append(out)
    _fsync_dir(directory)
    return written
