"""The demo teacher: a tiny FLUX pipeline trained here, on synthetic coloured shapes, that draws what it is asked.

``t2i-distill demo-teacher --output_dir DIR [--seed 0] [--steps N]`` (or :func:`train_demo_teacher`):

1. draws the synthetic dataset (``DemoTeacherConfig.num_images`` images, 32 px, captions "two red circles");
2. trains a tiny ``AutoencoderKL`` (16 latent channels, 4× downsampling: 32 px → an 8×8 latent → 4×4 = 16 FLUX
   tokens) and sets FLUX's ``shift_factor``/``scaling_factor`` from the data (latent mean and 1/std);
3. trains a ×1 FLUX teacher (:class:`t2i_distill.models.FluxStudent`, ``time_scale=1``, guidance embeds on) by
   rectified-flow matching on the packed latents, text from the tiny CLIP/T5 of
   :func:`t2i_distill.tiny_pipeline.build_tiny_flux_pipeline` at ``max_sequence_length`` 16;
4. writes a diffusers FLUX folder (``model_index.json``, vae, text encoders + tokenizers, scheduler, transformer) and
   ``demo_teacher.json`` (seed, steps, wall time, quality, sha256 of every file) and ``samples.png`` beside it.

The transformer is recorded as ``["t2i_distill.demo.components", "FluxStudent"]`` in ``model_index.json``.
diffusers 0.42 resolves a non-diffusers library only from ``sys.modules``: ``FluxPipeline.from_pretrained(folder)``
therefore raises a ``ValueError`` unless :mod:`t2i_distill.demo.components` was imported, and with it loaded it
builds the ×1 ``FluxStudent`` (never stock ×1000 FLUX). :func:`load_demo_pipeline` does the import. Loading the
transformer folder *directly* as ``FluxTransformer2DModel`` would ignore ``time_scale`` (diffusers warns) and be
wrong: use :func:`t2i_distill.models.load_student`.

Sampling conventions to reuse (also in ``demo_teacher.json``): ``height = width = 32``, ``max_sequence_length=16``,
any guidance in [1, 6] (the teacher was trained with g ~ U(1, 6) and ignores it), empty prompt " " for unconditional.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2i_distill.tiny_pipeline import TINY_PIPELINE_TRANSFORMER

__all__ = [
    "DEMO_SCHEDULER",
    "DEMO_TRANSFORMER",
    "DEMO_VAE",
    "DemoTeacherConfig",
    "add_subparser",
    "demo_teacher_path",
    "draw_dataset",
    "folder_checksums",
    "load_demo_pipeline",
    "train_demo_teacher",
]

#: The ×1 FLUX teacher: 2 double + 2 single blocks, 2 heads × 32 (hidden 64); text dims = the tiny encoders' 32.
DEMO_TRANSFORMER: dict[str, object] = {
    **TINY_PIPELINE_TRANSFORMER,
    "num_layers": 2,
    "num_single_layers": 2,
    "time_scale": 1.0,
}

#: The tiny VAE: 3 blocks (4× downsampling), 16 latent channels as FLUX, no mid-block attention (cost on CPU).
DEMO_VAE: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (8, 16, 32),
    "sample_size": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}

#: FLUX-dev's FlowMatchEulerDiscreteScheduler config with the sequence-length anchors moved to this token grid
#: (16 tokens ↦ μ = base_shift 0.5, as FLUX's 256-token, 256 px images; 256 tokens ↦ max_shift 1.15).
DEMO_SCHEDULER: dict[str, object] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 16,
    "max_image_seq_len": 256,
}

_METADATA = "demo_teacher.json"
_SAMPLES = "samples.png"


@dataclass(frozen=True)
class DemoTeacherConfig:
    """Everything a regeneration depends on besides the seed (recorded in ``demo_teacher.json``)."""

    resolution: int = 32
    num_images: int = 2048
    vae_steps: int = 400
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    flow_steps: int = 1000
    flow_batch_size: int = 64
    flow_lr: float = 1e-3
    ema_decay: float = 0.995
    max_sequence_length: int = 16
    prompt_dropout: float = 0.1
    guidance_range: tuple[float, float] = (1.0, 6.0)
    quality_samples: int = 48
    quality_steps: int = 28
    quality_guidance: float = 3.5

    def __post_init__(self):
        for name in ("resolution", "num_images", "vae_steps", "vae_batch_size", "flow_steps", "flow_batch_size",
                     "max_sequence_length", "quality_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}`: expected a positive int, got {value!r}")
        if self.resolution % 8:
            raise ValueError(f"`resolution`: expected a multiple of 8 (4× VAE, 2×2 patches), got {self.resolution}")
        if not isinstance(self.quality_samples, int) or self.quality_samples < 0:
            raise ValueError(f"`quality_samples`: expected an int ≥ 0, got {self.quality_samples!r}")


def demo_teacher_path() -> Path:
    """The shipped demo teacher folder (``t2i_distill/demo/teacher``); ``FileNotFoundError`` if it is missing."""
    path = Path(__file__).resolve().parent / "teacher"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the demo teacher folder {str(path)!r} is missing (an install without package data?); regenerate it "
            "with `t2i-distill demo-teacher --output_dir DIR` and pass DIR instead"
        )
    return path


def load_demo_pipeline(path: str | os.PathLike | None = None, **kwargs):
    """``FluxPipeline.from_pretrained`` of the demo teacher (default: the shipped folder), transformer ×1.

    Imports :mod:`t2i_distill.demo.components` first so diffusers can resolve the ``FluxStudent`` that
    ``model_index.json`` names; ``kwargs`` go to ``from_pretrained``.
    """
    from diffusers import FluxPipeline

    import t2i_distill.demo.components  # noqa: F401  (makes FluxStudent resolvable by diffusers' loader)

    return FluxPipeline.from_pretrained(os.fspath(demo_teacher_path() if path is None else path), **kwargs)


def draw_dataset(num_images: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Images 0…N−1 of the synthetic shapes set as fp32 (N, 3, R, R) in [-1, 1], and their captions.

    Image ``i`` is scene ``i mod 48`` drawn with layout seed ``seed·1000003 + i``: the same images as
    :func:`t2i_distill.eval.shapes.write_shapes_dataset` writes for ``seed`` (tested).
    """
    from t2i_distill.eval.shapes import draw_scene, scene_for_index

    scenes = [scene_for_index(i) for i in range(num_images)]
    pixels = np.stack([np.asarray(draw_scene(scene, resolution, seed * 1_000_003 + i)[0], dtype=np.uint8)
                       for i, scene in enumerate(scenes)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    return images, [scene.caption for scene in scenes]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of a teacher folder (relative path → hex), except ``demo_teacher.json`` and the PNG."""
    root = Path(folder)
    return {
        path.relative_to(root).as_posix(): _sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in (_METADATA, _SAMPLES)
    }


def _point_model_index_at_components(folder: Path) -> None:
    """Record the transformer under :mod:`t2i_distill.demo.components` (diffusers saved its defining module, which
    its loader cannot use: see that module)."""
    from t2i_distill.demo.components import TRANSFORMER_ENTRY

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = TRANSFORMER_ENTRY
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _build_models(config: DemoTeacherConfig, seed: int):
    from diffusers import AutoencoderKL

    from t2i_distill.models import FluxStudent
    from t2i_distill.tiny_pipeline import build_tiny_flux_pipeline

    tiny = build_tiny_flux_pipeline(seed)  # tokenizers + text encoders (their weights drawn from `seed`)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**{**DEMO_VAE, "sample_size": config.resolution})
        transformer = FluxStudent(**DEMO_TRANSFORMER)
    return tiny, vae, transformer


def train_demo_teacher(output_dir: str | os.PathLike, seed: int = 0, *, steps: int | None = None,
                       config: DemoTeacherConfig | None = None, log_every: int = 100) -> Path:
    """Regenerate the demo teacher folder from ``seed`` into ``output_dir`` (new or empty) and return its path.

    Args:
        output_dir: the folder to write (``FileExistsError`` if it exists and is not empty).
        seed: every random draw (data, weights, noise) derives from it.
        steps: flow-teacher steps, overriding ``config.flow_steps`` (the VAE keeps ``config.vae_steps``).
        config: sizes, steps and rates (:class:`DemoTeacherConfig` defaults: the shipped teacher).
        log_every: log the running loss every this many steps (0: never).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from t2i_distill.conditioning import TextEncoders
    from t2i_distill.demo.training import FlowTrainingData, latent_statistics, train_autoencoder, train_flow_teacher

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed`: expected an int, got {type(seed).__name__}")
    config = config or DemoTeacherConfig()
    if steps is not None:
        config = dataclasses.replace(config, flow_steps=steps)
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"`output_dir` {str(out)!r} exists and is not an empty folder; choose a new path")
    started = time.perf_counter()

    images, captions = draw_dataset(config.num_images, config.resolution, seed)
    tiny, vae, transformer = _build_models(config, seed)
    generator = torch.Generator().manual_seed(seed)

    vae_losses = train_autoencoder(vae, images, steps=config.vae_steps, batch_size=config.vae_batch_size,
                                   lr=config.vae_lr, kl_weight=config.vae_kl_weight, generator=generator,
                                   log_every=log_every)
    mean, std = latent_statistics(vae, images)
    # FLUX's convention x0 = (z − shift)·scale with shift/scale the data's latent mean and 1/std, rounded for config.
    shift_factor = round(mean.mean().item(), 4)
    scaling_factor = round(1.0 / (mean - shift_factor).std().item(), 4)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)

    prompts = sorted(set(captions))
    encoders = TextEncoders(tiny.tokenizer, tiny.text_encoder, tiny.tokenizer_2, tiny.text_encoder_2)
    text = encoders.encode([*prompts, " "], max_sequence_length=config.max_sequence_length)
    row = {prompt: i for i, prompt in enumerate(prompts)}
    data = FlowTrainingData(mean, std, torch.tensor([row[c] for c in captions]), text, shift_factor, scaling_factor)
    flow_losses = train_flow_teacher(
        transformer, data, steps=config.flow_steps, batch_size=config.flow_batch_size, lr=config.flow_lr,
        ema_decay=config.ema_decay, prompt_dropout=config.prompt_dropout, guidance_range=config.guidance_range,
        generator=generator, log_every=log_every,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEMO_SCHEDULER), vae=vae, text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer, text_encoder_2=tiny.text_encoder_2, tokenizer_2=tiny.tokenizer_2,
        transformer=transformer,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    _point_model_index_at_components(out)
    train_seconds = time.perf_counter() - started

    quality = None
    if config.quality_samples:
        from t2i_distill.demo.sampling import sample_grid

        quality = sample_grid(pipe, config, seed, out / _SAMPLES)
    metadata = {
        "seed": seed,
        "config": dataclasses.asdict(config),
        "vae_final_loss": float(np.mean(vae_losses[-20:])),
        "flow_final_loss": float(np.mean(flow_losses[-50:])),
        "shift_factor": shift_factor,
        "scaling_factor": scaling_factor,
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quality": quality,
        "sampling": {"height": config.resolution, "width": config.resolution,
                     "max_sequence_length": config.max_sequence_length, "guidance_range": list(config.guidance_range),
                     "empty_prompt": " "},
        "files": folder_checksums(out),
    }
    (out / _METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


# -- command line -----------------------------------------------------------------------------------------------
def add_subparser(subparsers) -> None:
    from t2i_distill.flag_types import nonnegative_int, positive_int

    p = subparsers.add_parser("demo-teacher", help="regenerate the demo's tiny trained FLUX teacher from its seed")
    p.add_argument("--output_dir", required=True, help="new (or empty) folder to write")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of data, weights and noise (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"flow-teacher training steps (default: {DemoTeacherConfig.flow_steps}, the shipped teacher's)")
    p.set_defaults(func=_cmd_demo_teacher)


def _cmd_demo_teacher(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = train_demo_teacher(args.output_dir, seed=args.seed, steps=args.steps)
    metadata = json.loads((path / _METADATA).read_text())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote the demo teacher (seed {args.seed}, {size / 2**20:.1f} MiB, {metadata['total_wall_seconds']} s) "
          f"to {path}; quality: {metadata['quality']}")
    return 0
