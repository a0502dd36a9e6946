"""The ``t2i-distill plan`` subcommand: flags, the printed table, ``--json`` and ``--fit``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from t2i_distill.planning.plan import GIB, GPUS, SHIPPED_CONFIGS, UTILISATION, PlanSetting, load_config, plan
from t2i_distill.planning.step import StepSetting

__all__ = ["add_subparser", "format_plan"]

JVP_MODES = ("dual", "func", "reference", "fd")
BACKENDS = ("single", "ddp", "fsdp2", "deepspeed")


def add_subparser(sub) -> None:
    from t2i_distill.flag_types import positive_float, positive_int

    p = sub.add_parser(
        "plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="GPU memory and FLOPs of one training step per rank, measured on fake tensors (no GPU, no weights)",
        description="Runs one whole training step (teacher, JVP, grad forward, backward, optimizer) of the real "
                    "trainer code on fake tensors and prints the peak memory per rank by category, the phase of the "
                    "peak, FLOPs per phase and a step-time estimate. No weights are read.")
    p.add_argument("--model", default="flux1-lite-8b",
                   help=f"a shipped config ({', '.join(SHIPPED_CONFIGS)}), a pipeline folder, a transformer folder "
                        "or a config.json (only the config is read)")
    p.add_argument("--method", default="scm", choices=["scm", "meanflow"])
    p.add_argument("--jvp", default="dual", choices=JVP_MODES)
    p.add_argument("--backend", default="single", choices=BACKENDS)
    p.add_argument("--num_processes", type=positive_int, default=1, help="GPUs (ranks) the backend shards over")
    p.add_argument("--resolution", type=positive_int, default=1024)
    p.add_argument("--train_batch_size", type=positive_int, default=1, help="micro-batch per GPU")
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--max_sequence_length", type=positive_int, default=256, help="T5 tokens")
    p.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw"],
                   help="AdamW (Prodigy keeps more state per parameter and is not planned)")
    p.add_argument("--ema_decay", type=positive_float, default=None, help="count an fp32 EMA of the trainable weights")
    p.add_argument("--lora_rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--lora_alpha", type=positive_float, default=None)
    p.add_argument("--live_encoding", action="store_true",
                   help="count the T5/CLIP text encoders and VAE on every GPU (training without --cached_dataset)")
    p.add_argument("--fit", type=positive_float, default=None, metavar="GIB",
                   help="search --jvp modes (those given with --fit_modes), backends, checkpointing, LoRA (with "
                        "--lora_rank) and the micro-batch for the fastest setting whose peak fits GIB")
    p.add_argument("--fit_modes", nargs="+", default=list(JVP_MODES), choices=JVP_MODES)
    p.add_argument("--fit_margin", type=float, default=None,
                   help="fraction of GIB kept free for the CUDA context, NCCL and fragmentation (default 0.08)")
    p.add_argument("--json", default=None, help="write the plan as JSON to this path")
    p.set_defaults(func=main)


def _setting(args) -> PlanSetting:
    step = StepSetting(method=args.method, jvp=args.jvp, resolution=args.resolution,
                       train_batch_size=args.train_batch_size, max_sequence_length=args.max_sequence_length,
                       gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
                       optimizer=args.optimizer, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    return PlanSetting(step=step, backend=args.backend, num_processes=args.num_processes,
                       gradient_accumulation_steps=args.gradient_accumulation_steps, ema_decay=args.ema_decay,
                       cached_dataset=not args.live_encoding)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def format_plan(result: dict) -> str:
    """The printed table: the peak per rank by category, each phase's own peak and FLOPs, the estimates."""
    s = result["setting"]
    lines = [f"plan: {result['model']} {s['method']} --jvp {s['jvp']} --backend {s['backend']} ×{s['num_processes']}"
             f" {s['resolution']} px, micro-batch {s['train_batch_size']} × accumulation "
             f"{s['gradient_accumulation_steps']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
             f"LoRA {s['lora_rank'] or 'off'}, weights {result['measured_with_weights']}",
             f"parameters: student {result['parameters']['student'] / 1e9:.3f} B (trainable "
             f"{result['parameters']['trainable'] / 1e9:.3f} B), teacher {result['parameters']['teacher'] / 1e9:.3f} B",
             "", f"peak per GPU: {_gib(result['peak_bytes'])} GiB, in phase '{result['peak_phase']}'", "",
             "| category | GiB at the peak |", "|---|---|"]
    lines += [f"| {k} | {_gib(v)} |" for k, v in sorted(result["peak_breakdown"].items(), key=lambda kv: -kv[1])]
    lines += ["", "| phase | its peak GiB | TFLOP |", "|---|---|---|"]
    lines += [f"| {name} | {_gib(p['peak_bytes'])} | {p['flops'] / 1e12:.2f} |" for name, p in result["phases"].items()]
    est = result["estimate"]
    lines += ["", f"step-time ESTIMATE (not a measurement): {result['flops_per_step'] / 1e12:.1f} TFLOP per GPU-step "
                  f"at {UTILISATION:.0%} of peak dense bf16, communication ignored", "",
              "| GPU | peak TFLOP/s | step s (est.) | samples/s, all GPUs (est.) |", "|---|---|---|---|"]
    lines += [f"| {gpu} | {GPUS[gpu]:.0f} | {e['step_s']:.2f} | {e['samples_per_s']:.2f} |"
              for gpu, e in est["per_gpu"].items()]
    lines += [f"\nNOTE: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def main(args) -> int:
    from t2i_distill.errors import ConfigurationError

    problems = []
    if args.backend == "single" and args.num_processes != 1:
        problems.append(f"--backend single runs one process; got --num_processes {args.num_processes}")
    if args.lora_rank < 0:
        problems.append(f"--lora_rank: expected 0 (off) or a positive rank, got {args.lora_rank}")
    if args.fit_margin is not None and not 0 <= args.fit_margin < 1:
        problems.append(f"--fit_margin: expected a fraction in [0, 1), got {args.fit_margin}")
    if args.mixed_precision == "no" and args.backend in ("fsdp2", "deepspeed"):
        problems.append(f"--backend {args.backend} is planned with --mixed_precision bf16 (what the shipped configs "
                        "use); got --mixed_precision no")
    try:
        name, config = load_config(args.model)
    except (FileNotFoundError, json.JSONDecodeError) as error:
        problems.append(str(error))
    if problems:
        raise ConfigurationError("\n".join(problems))
    start = time.perf_counter()
    setting = _setting(args)
    if args.fit is not None:
        from t2i_distill.planning.fit import DEFAULT_MARGIN, fit

        ranks = (0, args.lora_rank) if args.lora_rank else (0,)
        result = fit(config, setting, args.fit, modes=tuple(args.fit_modes), lora_ranks=ranks,
                     margin=DEFAULT_MARGIN if args.fit_margin is None else args.fit_margin, model_name=name)
        if not result["fits"]:
            print(f"nothing fits {args.fit} GiB (margin {result['margin']:.0%}): try more --num_processes, "
                  "--lora_rank or a lower --resolution")
    else:
        result = plan(config, setting, name)
    result["plan_seconds"] = time.perf_counter() - start
    if result.get("peak_bytes") is not None:
        print(format_plan(result))
    print(f"\nplanned in {result['plan_seconds']:.1f} s on this machine's CPU (fake tensors: no GPU, no weights)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"JSON written to {args.json}")
    return 0 if result.get("fits", True) else 1
