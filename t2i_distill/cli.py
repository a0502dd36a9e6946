"""The ``t2i-distill`` command line.

``t2i-distill env``   versions, the GPU (or "none"), and whether kernels run compiled or interpreted.
``t2i-distill demo``  the main job, offline: distil a tiny shapes teacher with sCM and MeanFlow, sample, score.
``t2i-distill parity`` parity + benchmark report of every kernel and student step on an embedded tiny FLUX.
``t2i-distill steps`` student-step benchmarks (reference vs patched vs dual) at a chosen width, depth, resolution.
``t2i-distill train scm|meanflow``  distillation (flags: ``t2i-distill train scm --help``).
``t2i-distill rescale`` the paper's ×1 teacher from the stock ×1000 FLUX (flags: ``t2i-distill rescale --help``).
``t2i-distill plan``  a training step's GPU memory per rank and FLOPs, measured on fake tensors (``--fit GIB``).
``t2i-distill verify-checkpoint PATH``  check a checkpoint's files against its manifest (sizes, BLAKE2b hashes).
``t2i-distill tiny``  write a tiny random FLUX pipeline folder that diffusers loads offline (tests, demo, examples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_env(args: argparse.Namespace) -> int:
    from t2i_distill import env

    print(env.format_env(env.collect()))
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    import torch

    from t2i_distill.report import run_report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = run_report(device, None if args.out == "-" else Path(args.out), repeats=args.repeats)
    return 0 if result["passed"] else 1


def _cmd_steps(args: argparse.Namespace) -> int:
    import json

    import torch

    from t2i_distill.benchmarks.runner import timing_rows, timing_table
    from t2i_distill.benchmarks.steps import StepConfig, step_timing_cases

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for method in args.method:
        cfg = StepConfig(method=method, width=args.width, double=args.double, single=args.single,
                         resolution=args.resolution, batch=args.batch, text_tokens=args.text_tokens)
        rows += timing_rows(step_timing_cases(cfg, device, dtype, providers=tuple(args.providers)), device,
                            repeats=args.repeats)
    print(timing_table(rows, interpreted=device.type != "cuda"))
    if args.out != "-":
        Path(args.out).write_text(json.dumps({"device": str(device), "rows": rows}, indent=2, default=str))
        print(f"JSON written to {args.out}")
    return 0


def _cmd_verify_checkpoint(args: argparse.Namespace) -> int:
    """Verify one checkpoint folder, or every checkpoint of an output folder (and say which one a resume takes)."""
    from t2i_distill.training.checkpoint import CheckpointManager
    from t2i_distill.training.verify import verify_checkpoint

    path = Path(args.path)
    if (path / "manifest.json").exists() or path.name.startswith("checkpoint-"):
        folders = [path]
    else:
        folders = [p for _, p in CheckpointManager(path).checkpoints()]
        if not folders:
            print(f"{path}: no complete checkpoint-<step> folder", file=sys.stderr)
            return 1
    failed = 0
    for folder in folders:
        problems = verify_checkpoint(folder, hashes=not args.no_hash)
        failed += bool(problems)
        print(f"{folder}: " + ("verified" if not problems else "FAILED\n  " + "\n  ".join(problems)))
    if len(folders) > 1:
        resume = CheckpointManager(path).latest_verified()
        print(f"--resume_from_checkpoint latest would take: {resume or 'none'}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    from t2i_distill.flag_types import nonnegative_int, positive_int

    parser = argparse.ArgumentParser(prog="t2i-distill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="sCM or MeanFlow distillation: t2i-distill train scm|meanflow --help", add_help=False)
    sub.add_parser("rescale", help="make the ×1 teacher from stock ×1000 FLUX weights: t2i-distill rescale --help",
                   add_help=False)
    p_env = sub.add_parser("env", help="print versions, the GPU and the kernel execution mode")
    p_env.set_defaults(func=_cmd_env)

    p_parity = sub.add_parser("parity", help="parity + benchmark report on an embedded tiny FLUX (no downloads)")
    p_parity.add_argument("--out", default="t2i-distill-report.json",
                          help="where to write the JSON report ('-' for none; default: %(default)s)")
    p_parity.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p_parity.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions per measurement")
    p_parity.set_defaults(func=_cmd_parity)

    p_steps = sub.add_parser("steps", help="student-step benchmarks: reference vs patched vs dual forward")
    p_steps.add_argument("--method", nargs="+", default=["scm", "meanflow"], choices=["scm", "meanflow"])
    p_steps.add_argument("--width", default="tiny", choices=["tiny", "lite8b"],
                         help="tiny FLUX or FLUX.1-lite-8B block width (random weights either way)")
    p_steps.add_argument("--double", type=nonnegative_int, default=1, help="double-stream blocks (the student: 8)")
    p_steps.add_argument("--single", type=nonnegative_int, default=1, help="single-stream blocks (the student: 38)")
    p_steps.add_argument("--resolution", type=positive_int, default=64,
                         help="image side in pixels (16 px per token side)")
    p_steps.add_argument("--text_tokens", "--text-tokens", type=positive_int, default=16)
    p_steps.add_argument("--batch", type=positive_int, default=1)
    p_steps.add_argument("--providers", nargs="+", default=["reference", "patched", "dual"],
                         choices=["reference", "patched", "dual"])
    p_steps.add_argument("--repeats", type=positive_int, default=3)
    p_steps.add_argument("--device", default=None)
    p_steps.add_argument("--out", default="-", help="JSON path ('-': none)")
    p_steps.set_defaults(func=_cmd_steps)

    p_verify = sub.add_parser("verify-checkpoint", help="check a checkpoint's files against its manifest (sizes and "
                                                        "hashes), or every checkpoint of an output folder")
    p_verify.add_argument("path", help="a checkpoint-<step> folder, or an --output_dir")
    p_verify.add_argument("--no_hash", action="store_true", help="check presence and sizes only (fast)")
    p_verify.set_defaults(func=_cmd_verify_checkpoint)
    from t2i_distill.benchmarks.steps import add_training_step_option

    add_training_step_option(p_steps)  # --training-step [JVP_MODE ...]: the whole training step, per phase

    # The other commands live beside their code; each module registers its own subcommand(s).
    from t2i_distill import tiny_pipeline
    from t2i_distill.data import cache_cli
    from t2i_distill.demo import run as demo_run
    from t2i_distill.demo import teacher as demo_teacher
    from t2i_distill.eval import add_subparsers as add_eval_subparsers
    from t2i_distill.planning import cli as plan_cli

    demo_run.add_subparser(sub)        # demo: the end-to-end distillation on a shipped tiny teacher
    demo_teacher.add_subparser(sub)    # demo-teacher: regenerate that teacher from its seed
    tiny_pipeline.add_subparser(sub)   # tiny: a random tiny FLUX folder
    cache_cli.add_subparser(sub)       # cache: encode a dataset once
    plan_cli.add_subparser(sub)        # plan: a training step's GPU memory and FLOPs, on fake tensors
    add_eval_subparsers(sub)           # sample, geneval, score, shapes
    return parser


#: Commands that launch Triton kernels (the trainer's --jvp dual|func, the demo's dual spot check, the reports).
_KERNEL_COMMANDS = ("parity", "steps", "train", "rescale", "demo")
#: `env` reports what those commands will do, so it switches the interpreter on the same way (without the banner).
_REPORTING_COMMANDS = ("env", "plan")


def main(argv: list[str] | None = None) -> int:
    from t2i_distill.env import enable_interpreter_without_gpu  # imports torch only, never Triton

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in _KERNEL_COMMANDS and enable_interpreter_without_gpu():
        print("no GPU found: running the Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)\n")
    elif argv[:1] and argv[0] in _REPORTING_COMMANDS:
        enable_interpreter_without_gpu()
    if argv[:1] == ["train"]:  # the trainer owns its (long) flag list and --config handling
        from t2i_distill.training.trainer import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["rescale"]:  # the same trainer and engine, with the rescale loss
        from t2i_distill.training.trainer import main as train_main

        return train_main(argv)
    args = build_parser().parse_args(argv)
    from t2i_distill.errors import ConfigurationError

    try:
        return args.func(args)
    except ConfigurationError as error:  # a refusal, not a crash: the message names the flag; no traceback
        print(f"t2i-distill {argv[0]}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
