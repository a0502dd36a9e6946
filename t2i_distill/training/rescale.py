"""``t2i-distill rescale``'s own parts: the ×1 student's initialisation, the rescale gap, and the outputs.

**Frequency-map initialisation.** FLUX's sinusoid (diffusers ``Timesteps(256, flip_sin_to_cos=True,
downscale_freq_shift=0)``) has features ``[cos(x·f_i), sin(x·f_i)]`` for i = 0..127 with f_i = 10000^(−i/128). The
teacher sees x = 1000·t, the student x = t. Since 1000 = 10000^(96/128), 1000·f_i = f_(i−96): the teacher's 32 lowest
frequencies (i = 96..127) are *exactly* the student's 32 highest ones (j = 0..31). Moving the first linear layer's
columns i → i − 96 (both halves) makes those 64 features contribute to the ×1 student's embedding exactly what they
contribute to the teacher's; the student's remaining columns (frequencies ≤ 0.1 at t ≤ 1, nearly constant) start at
zero, because the teacher's 96 higher frequencies (up to 1000 rad per unit t) have no ×1 counterpart. The same map
is applied to the guidance embedder. ``--embedder_init copy`` keeps the plain copy (the paper's "identical-structure"
start) for comparison.

**Rescale gap.** Relative L2 ‖student − teacher‖ / ‖teacher‖ of the velocities on fixed evaluation draws (fixed
records, noise, times and guidance; never used for the loss), per time bucket, at the start, at every
``--validation_steps`` and at the end; logged to the trackers and appended to ``<output_dir>/rescale_gap.json``.

**Outputs** (main rank, at the end): ``<output_dir>/rescaled/``, a diffusers FLUX pipeline folder whose transformer is
the ×1 student (its ``config.json`` says ``time_scale: 1.0``; the other components are symlinks to the stock folder),
which ``t2i-distill train``/``sample`` take as ``--pretrained_model_name_or_path`` without any checkpoint flag; and
``<output_dir>/rescaled_transformer.pt`` (``{"module": state_dict}``), the reference's ``--rescaled_checkpoint_path``
format, which T2I-Distill's own scripts load unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch

__all__ = ["EMBEDDER_INITS", "RescaleGap", "frequency_map_init", "write_rescaled_outputs"]

logger = logging.getLogger("t2i_distill.rescale")

EMBEDDER_INITS = ("frequency_map", "copy")
_EMBEDDERS = ("time_text_embed.timestep_embedder", "time_text_embed.guidance_embedder")


def frequency_shift(teacher_scale: float, student_scale: float, half: int = 128, max_period: float = 10000.0) -> int:
    """k with ``teacher_scale·f_i = student_scale·f_(i−k)``; an error when the ratio is not a whole frequency step."""
    k = half * math.log(teacher_scale / student_scale) / math.log(max_period)
    if abs(k - round(k)) > 1e-6 or not 0 < round(k) < half:
        raise ValueError(f"time scales ×{teacher_scale:g} → ×{student_scale:g}: the ratio is not a whole number of "
                         f"sinusoid frequency steps (k = {k:.4f}); use --embedder_init copy")
    return int(round(k))


@torch.no_grad()
def frequency_map_init(model: torch.nn.Module, teacher_scale: float = 1000.0, student_scale: float = 1.0) -> list[str]:
    """Remap the time (and guidance) embedders' first-layer columns of ``model`` (a copy of the ×``teacher_scale``
    weights) for ×``student_scale`` inputs, in place (module docstring). Returns the layers changed."""
    changed = []
    for name in _EMBEDDERS:
        try:
            layer = model.get_submodule(name).linear_1
        except AttributeError:
            continue
        weight = layer.weight
        half = weight.shape[1] // 2
        k = frequency_shift(teacher_scale, student_scale, half=half)
        keep = half - k
        new = torch.zeros_like(weight)
        new[:, :keep] = weight[:, k:half]                   # cos features
        new[:, half:half + keep] = weight[:, half + k:]     # sin features
        weight.copy_(new)
        changed.append(f"{name}.linear_1")
    return changed


class RescaleGap:
    """The rescale gap on fixed draws: ``measure(student, teacher)`` → ``{"overall": r, "buckets": {label: r}}``."""

    def __init__(self, batches: list[dict], buckets: int = 4, seed: int = 1234, guidance: float = 3.5):
        if not batches:
            raise ValueError("RescaleGap: expected at least one evaluation batch")
        if buckets < 1:
            raise ValueError(f"--rescale_gap_buckets must be >= 1, got {buckets}")
        generator = torch.Generator().manual_seed(seed)
        self.edges = [i / buckets for i in range(buckets + 1)]
        self.items = []  # (batch, draws, bucket index)
        from t2i_distill.losses.rescale import RescaleDraws

        for batch in batches:
            latents = batch["latents"]
            b = latents.shape[0]
            for index in range(buckets):
                low, high = self.edges[index], self.edges[index + 1]
                t = low + (high - low) * torch.rand(b, generator=generator)
                noise = torch.randn(latents.shape, generator=generator)
                self.items.append((batch, RescaleDraws(noise=noise, t=t, guidance=torch.full((b,), guidance)), index))

    def labels(self) -> list[str]:
        return [f"{self.edges[i]:.2f}-{self.edges[i + 1]:.2f}" for i in range(len(self.edges) - 1)]

    @torch.no_grad()
    def measure(self, outputs, student, autocast=None) -> dict:
        """``outputs(batch, draws)`` → (student velocity, teacher velocity), e.g. a partial of
        :func:`t2i_distill.losses.rescale.rescale_outputs`; ``student`` is put in eval mode meanwhile."""
        from contextlib import nullcontext

        num = [0.0] * (len(self.edges) - 1)
        den = [0.0] * (len(self.edges) - 1)
        was_training = student.training
        student.eval()
        try:
            for batch, draws, index in self.items:
                with autocast() if autocast is not None else nullcontext():
                    prediction, target = outputs(batch, draws)
                num[index] += float(((prediction.float() - target.float()) ** 2).sum())
                den[index] += float((target.float() ** 2).sum())
        finally:
            student.train(was_training)
        buckets = {label: math.sqrt(n / max(d, 1e-30)) for label, n, d in zip(self.labels(), num, den)}
        return {"overall": math.sqrt(sum(num) / max(sum(den), 1e-30)), "buckets": buckets}


def record_gap(output_dir: str | os.PathLike, step: int, gap: dict, when: str) -> None:
    """Append ``{"step", "when", "overall", "buckets"}`` to ``<output_dir>/rescale_gap.json`` (atomic rewrite)."""
    path = Path(output_dir) / "rescale_gap.json"
    entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    entries.append({"step": step, "when": when, **gap})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    shown = ", ".join(f"t {label}: {value:.4f}" for label, value in gap["buckets"].items())
    logger.info("rescale gap (%s, step %d): overall %.4f; %s", when, step, gap["overall"], shown)


def _pipeline_root(pretrained_model_name_or_path: str, revision: str | None, cache_dir: str | None) -> Path:
    """The local folder of a FLUX pipeline (a local path, or the hub snapshot diffusers already downloaded)."""
    local = Path(pretrained_model_name_or_path)
    if local.is_dir():
        return local.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=True))


def write_rescaled_outputs(state_dict: dict[str, torch.Tensor], config: dict, output_dir: str | os.PathLike,
                           pretrained_model_name_or_path: str, step: int, revision: str | None = None,
                           cache_dir: str | None = None) -> dict[str, str]:
    """Write ``<output_dir>/rescaled/`` (a pipeline folder around the ×1 transformer) and
    ``<output_dir>/rescaled_transformer.pt``; each written under a temporary name and renamed. Returns the paths."""
    from t2i_distill.models.checkpoint_files import metadata_for
    from t2i_distill.training.checkpoint import _safetensors_save, export_student

    out = Path(output_dir)
    stock = _pipeline_root(pretrained_model_name_or_path, revision, cache_dir)
    tmp = out / ".tmp-rescaled"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "transformer").mkdir(parents=True)
    transformer_config = {k: v for k, v in config.items() if not k.startswith("_")}
    transformer_config.update({"_class_name": "FluxStudent", "time_scale": 1.0, "time_embedding_fp32": False,
                               "dual_timestep": False})
    (tmp / "transformer" / "config.json").write_text(json.dumps(transformer_config, indent=2), encoding="utf-8")
    meta = {"format": "pt", "step": str(step), **metadata_for("flow", 1.0)}
    _safetensors_save(state_dict, tmp / "transformer" / "diffusion_pytorch_model.safetensors", metadata=meta)
    index = json.loads((stock / "model_index.json").read_text(encoding="utf-8"))
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    for component in index:
        if component.startswith("_") or component == "transformer" or not (stock / component).exists():
            continue
        os.symlink(stock / component, tmp / component, target_is_directory=True)
    (tmp / "t2i_distill_rescale.json").write_text(json.dumps(
        {"base_model": str(pretrained_model_name_or_path), "base_folder": str(stock), "step": step,
         "teacher_time_scale": 1000.0, "time_scale": 1.0}, indent=2), encoding="utf-8")
    final = out / "rescaled"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # The reference's format, written like every export (temporary name, fsync, rename; kind and scale recorded).
    (pt,) = export_student(state_dict, out / "rescaled_transformer.pt", step, formats=("pt",),
                           metadata=metadata_for("flow", 1.0))
    return {"folder": str(final), "pt": str(pt)}
