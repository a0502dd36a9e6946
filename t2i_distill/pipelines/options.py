"""Command-line options shared by ``t2i-distill sample`` and ``t2i-distill geneval``: which sampler, which weights,
and the generation settings, turned into a loaded pipeline and the keyword arguments of its call."""

from __future__ import annotations

import argparse
import os

import torch

from t2i_distill.flag_types import nonnegative_float, nonnegative_int, positive_float, positive_int
from t2i_distill.pipelines.loading import DEFAULT_STEPS, METHODS, load_pipeline

__all__ = ["DTYPES", "add_model_arguments", "call_options", "pipeline_from_args", "resolve_device"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampler, weights and generation flags (names as the reference's ``test_*.py`` where they exist)."""
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="the teacher's diffusers FLUX folder or hub id (text encoders, VAE, scheduler)")
    parser.add_argument("--method", choices=METHODS, default="scm", help="sampler (default: %(default)s)")
    parser.add_argument("--student_checkpoint", "--resume_path", dest="student_checkpoint", default=None,
                        help="the student: transformer_<step>.safetensors, the reference's .pt ({'module': sd}), a "
                             "transformer folder or sharded safetensors; its kind must match --method. For --method "
                             "teacher: a ×1 rescaled teacher (without it, the folder's own transformer at the scale "
                             "it was trained at: ×1000 for stock FLUX)")
    parser.add_argument("--num_inference_steps", type=positive_int, default=None,
                        help=f"sampler steps (default: {', '.join(f'{m} {n}' for m, n in DEFAULT_STEPS.items())})")
    parser.add_argument("--guidance_scale", type=nonnegative_float, default=3.5,
                        help="FLUX guidance-embedding value (default: %(default)s)")
    parser.add_argument("--resolution", type=positive_int, default=512,
                        help="image side in pixels (default: %(default)s)")
    parser.add_argument("--max_sequence_length", type=positive_int, default=256,
                        help="T5 tokens (default: %(default)s)")
    parser.add_argument("--seed", type=nonnegative_int, default=42, help="base seed (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and sampling dtype (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:$LOCAL_RANK if a GPU)")
    parser.add_argument("--intermediate_timestep", type=positive_float, default=1.3,
                        help="sCM, 2 steps: the middle TrigFlow angle (default: %(default)s)")
    parser.add_argument("--quantize_timesteps", action="store_true",
                        help="MeanFlow: round the 0-1000 timesteps to the model dtype as the reference (parity only)")
    ignored = parser.add_argument_group("accepted from the reference's GenEval scripts, ignored (each warns)")
    ignored.add_argument("--ds_file", default=None,
                         help="the reference built a DeepSpeed plugin even for sampling; sampling needs none")
    ignored.add_argument("--local_rank", "--local-rank", type=int, default=None,
                         help="passed by some launchers; LOCAL_RANK from the environment picks the GPU")


def resolve_device(name: str | None) -> torch.device:
    """``name``, or ``cuda:$LOCAL_RANK`` when a GPU is present (one GPU per launched process), else CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def pipeline_from_args(args: argparse.Namespace):
    """``(pipeline, device)`` for the parsed flags."""
    import logging

    from t2i_distill.pipelines.loading import check_pipeline

    for flag, why in (("ds_file", "sampling needs no DeepSpeed"), ("local_rank", "LOCAL_RANK from the environment "
                                                                              "picks the GPU")):
        if getattr(args, flag, None) is not None:
            logging.getLogger("t2i_distill.sample").warning("--%s is accepted for the reference's scripts and "
                                                            "ignored: %s", flag, why)
    check_pipeline(args.method, args.pretrained_model_name_or_path, args.student_checkpoint)  # before any load
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(args.method, args.pretrained_model_name_or_path, student_checkpoint=args.student_checkpoint,
                         torch_dtype=dtype, device=device)
    return pipe, device


def call_options(args: argparse.Namespace) -> dict:
    """The pipeline-call keyword arguments the flags set (sampler-specific options only for their sampler)."""
    options = {
        "num_inference_steps": args.num_inference_steps or DEFAULT_STEPS[args.method],
        "guidance_scale": args.guidance_scale,
        "height": args.resolution,
        "width": args.resolution,
        "max_sequence_length": args.max_sequence_length,
    }
    if args.method == "scm":
        options["intermediate_timestep"] = args.intermediate_timestep
    if args.method == "meanflow":
        options["quantize_timesteps"] = args.quantize_timesteps
    return options
