"""``t2i-distill demo``: the whole system end to end, offline, on a laptop CPU in minutes.

1. **Data**: a synthetic captioned dataset of coloured shapes with counts (:mod:`t2i_distill.eval.shapes`), encoded
   once into an embedding cache with the teacher's own text encoders and VAE (``t2i-distill cache``'s code).
2. **Teacher**: the shipped tiny FLUX teacher (:func:`t2i_distill.demo.demo_teacher_path`, regenerated from its seed
   by ``t2i-distill demo-teacher``), trained on those shapes.
3. **Distillation**: sCM and MeanFlow students initialised from the teacher and trained by the real trainer
   (``t2i-distill train``'s :func:`~t2i_distill.training.trainer.train`: same engine, checkpoints and export as a GPU
   run). On a CPU the JVP mode is ``reference`` (PyTorch's own JVP: the Triton kernels would run in the interpreter);
   a one-step spot check prints the ``dual`` (fused-kernel) loss and gradient beside the ``reference`` one.
4. **Samples** of the teacher (28 steps) and of each student at 1, 2 and 4 steps on the mini-GenEval prompts, in
   GenEval's layout, and a grid (rows: teacher, sCM, MeanFlow; columns: prompts).
5. **Scores**: the classical mini-GenEval detector (colour, count, shape) per sampler, next to wall time per image.

Writes ``<output_dir>/report.md``, ``report.json`` and ``grid.png`` (default ``demo/``) and prints the score table.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

__all__ = ["DEMO_SETTINGS", "add_subparser", "run_demo"]

_MARKER = ".t2i-distill-demo"

#: What the demo trains and samples (small enough for ≤ 5 minutes on 2 CPU cores, set-up included).
DEMO_SETTINGS = {
    "resolution": 32,
    "max_sequence_length": 16,
    "num_images": 384,
    "train_batch_size": 16,
    "scm_steps": 120,
    "meanflow_steps": 120,
    "learning_rate": 1e-4,
    "guidance": 3.5,
    "teacher_steps": 28,
    "student_steps": (1, 2, 4),
    "images_per_prompt": 4,
    "prompts_per_task": 4,
    "seed": 0,
}


def _train_flags(method: str, teacher: Path, cache: Path, out: Path, s: dict) -> list[str]:
    flags = ["--pretrained_model_name_or_path", str(teacher), "--cached_dataset", str(cache),
             "--resolution", str(s["resolution"]), "--max_sequence_length", str(s["max_sequence_length"]),
             "--train_batch_size", str(s["train_batch_size"]), "--learning_rate", str(s["learning_rate"]),
             "--lr_warmup_steps", "0", "--max_train_steps", str(s[f"{method}_steps"]),
             "--checkpointing_steps", str(s[f"{method}_steps"]), "--output_dir", str(out), "--report_to", "none",
             "--seed", str(s["seed"]), "--jvp", "reference", "--max_grad_norm", "1.0"]
    if not torch.cuda.is_available():
        flags.append("--cpu")
    if method == "scm":
        # The demo teacher was trained with guidance in [1, 6]; sample and distil at one value. A short warmup
        # because the demo trains for a hundred steps, not the reference's 4000-step ramp.
        flags += ["--scm_cfg_scale", str(s["guidance"]), "--tangent_warmup_steps", "20"]
    else:
        flags += ["--cfg_scale", str(s["guidance"])]
    return flags


def _spot_check_dual(teacher: Path, cache: Path, s: dict) -> dict:
    """One sCM loss + gradient with ``dual`` (fused Triton kernels) vs ``reference`` on the same batch and draws."""
    from t2i_distill import apply_kernels_to_flux
    from t2i_distill.data import DataConfig, TrainData
    from t2i_distill.losses import SCMConfig, draw_scm, scm_loss
    from t2i_distill.models import load_student

    data = TrainData(DataConfig(cached_dataset=str(cache), resolution=s["resolution"]), batch_size=2, seed=1)
    batch = next(iter(data))
    config = SCMConfig(scm_cfg_scale=(s["guidance"],), tangent_warmup_steps=20)
    teacher_model, _ = load_student(teacher, kind="trigflow")
    # One student for both modes (its logvar head is freshly initialised by the loader: load it once, copy it).
    initial, _ = load_student(teacher, kind="trigflow")
    results = {}
    draws = draw_scm(batch, config, generator=torch.Generator().manual_seed(0))
    for mode in ("reference", "dual"):
        student = copy.deepcopy(initial)
        if mode == "dual":
            apply_kernels_to_flux(student)
        loss, _ = scm_loss(student, teacher_model, batch, step=10, config=config, draws=draws, jvp_mode=mode)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results[mode] = (loss.detach(), grad)
    (l_ref, g_ref), (l_dual, g_dual) = results["reference"], results["dual"]
    return {"loss_reference": float(l_ref), "loss_dual": float(l_dual),
            "loss_rel_diff": float((l_dual - l_ref).abs() / l_ref.abs().clamp_min(1e-30)),
            "grad_rel_diff": float((g_dual - g_ref).norm() / g_ref.norm().clamp_min(1e-30))}


def _sample(method: str, teacher: Path, checkpoint: Path | None, metadata: list, out: Path, steps: int, s: dict):
    from t2i_distill.eval.geneval import run_geneval
    from t2i_distill.pipelines import load_pipeline

    pipe = load_pipeline(method, teacher, student_checkpoint=checkpoint)
    stats = run_geneval(pipe, metadata, out, images_per_prompt=s["images_per_prompt"], seed=s["seed"], log=None,
                        num_inference_steps=steps, guidance_scale=s["guidance"], height=s["resolution"],
                        width=s["resolution"], max_sequence_length=s["max_sequence_length"])
    images = len(stats["generated"]) * s["images_per_prompt"]
    return {"seconds_per_image": stats["seconds"] / max(images, 1), "images": images}


def _first_images(folder: Path, count: int, scale: int = 2) -> list:
    """The first sample of each prompt, enlarged ``scale``× (nearest) so the grid of 32 px images is readable."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*/samples/0000.png"))[:count]]
    return [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]


def run_demo(output_dir: str | Path = "demo", settings: dict | None = None, teacher: str | Path | None = None,
             log=print) -> dict:
    """Run the demo into ``output_dir`` (a previous demo's folder there is replaced; any other non-empty folder is
    refused); return the report dict."""
    import t2i_distill.demo.components  # noqa: F401  (the teacher folder names FluxStudent as its transformer)
    from t2i_distill.data import DataConfig, build_cache
    from t2i_distill.demo import demo_teacher_path
    from t2i_distill.eval.grid import labelled_grid
    from t2i_distill.eval.scorer import score_geneval_folder
    from t2i_distill.eval.shapes import mini_geneval_metadata, write_shapes_dataset
    from t2i_distill.training.args import parse_args
    from t2i_distill.training.trainer import train

    s = {**DEMO_SETTINGS, **(settings or {})}
    # The demo prints its own phase lines; the trainer's and the loaders' progress bars would drown them.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not torch.cuda.is_available():
        # Tiny models on a CPU: one intra-op thread is several times faster than torch's default pool here.
        torch.set_num_threads(1)
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise FileExistsError(f"`output_dir` {str(out)!r} exists, is not empty and is not a previous demo's "
                                  "output; choose another folder (nothing was deleted)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by `t2i-distill demo`; the next demo run replaces this folder\n")
    clock, timings = time.perf_counter(), {}

    def phase(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        log(f"[demo] {name}: {timings[name]:.1f} s")

    teacher = demo_teacher_path() if teacher is None else Path(teacher)
    data_dir = write_shapes_dataset(out / "data", num_images=s["num_images"], resolution=s["resolution"],
                                    seed=s["seed"])
    cache = out / "cache"
    build_cache(DataConfig(train_data_dir=str(data_dir), resolution=s["resolution"]), cache, str(teacher),
                max_sequence_length=s["max_sequence_length"], dtype="fp32", rank=0, world_size=1)
    phase("dataset + cache")

    runs = {}
    for method in ("scm", "meanflow"):
        run_dir = out / f"train-{method}"
        summary = train(parse_args(method, _train_flags(method, teacher, cache, run_dir, s)))
        runs[method] = run_dir / f"transformer_{summary['global_step']}.safetensors"
        phase(f"train {method} ({summary['global_step']} steps)")
    spot = _spot_check_dual(teacher, cache, s)
    phase("dual spot check")
    log(f"[demo] sCM loss, dual vs reference: {spot['loss_dual']:.6g} vs {spot['loss_reference']:.6g} "
        f"(rel. diff {spot['loss_rel_diff']:.2e}; gradient rel. diff {spot['grad_rel_diff']:.2e})")

    metadata = mini_geneval_metadata(per_task=s["prompts_per_task"])
    (out / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    samplers = [("teacher", None, s["teacher_steps"])]
    samplers += [(method, runs[method], steps) for method in ("scm", "meanflow") for steps in s["student_steps"]]
    results = []
    for method, checkpoint, steps in samplers:
        folder = out / "samples" / f"{method}-{steps}step"
        timing = _sample(method, teacher, checkpoint, metadata, folder, steps, s)
        scores = score_geneval_folder(folder, folder / "results.jsonl")
        results.append({"sampler": method, "steps": steps, **timing, **scores})
    phase("sampling + scoring")

    rows, labels = [], []
    for r in results:
        if r["sampler"] == "teacher" or r["steps"] == 2:
            rows.append(_first_images(out / "samples" / f"{r['sampler']}-{r['steps']}step", len(metadata)))
            labels.append(f"{r['sampler']} {r['steps']}")
    grid = labelled_grid(rows, column_labels=[m["prompt"] for m in metadata], row_labels=labels)
    grid.save(out / "grid.png")

    report = {"settings": s, "timings_s": timings, "total_s": round(sum(timings.values()), 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
              "dual_spot_check": spot, "results": results, "grid": str(out / "grid.png")}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = _table(results)
    (out / "report.md").write_text(_markdown(report, table))
    log("\n" + table)
    log(f"\n[demo] grid: {out / 'grid.png'}\n[demo] report: {out / 'report.md'} (total {report['total_s']} s)")
    return report


def _table(results: list[dict]) -> str:
    tags = sorted({t for r in results for t in r["tasks"]})
    head = "| sampler | steps | " + " | ".join(tags) + " | overall | s/image |"
    sep = "|---|---|" + "---|" * (len(tags) + 2)
    lines = [head, sep]
    for r in results:
        cells = [f"{r['tasks'].get(t, float('nan')):.2f}" for t in tags]
        lines.append(f"| {r['sampler']} | {r['steps']} | " + " | ".join(cells)
                     + f" | {r['overall']:.2f} | {r['seconds_per_image']:.4f} |")
    return "\n".join(lines)


def _markdown(report: dict, table: str) -> str:
    spot = report["dual_spot_check"]
    return "\n".join([
        "# t2i-distill demo report", "",
        f"Machine: {report['machine']}. Total {report['total_s']} s ({report['timings_s']}).", "",
        "Mini-GenEval accuracy (classical detector: colour segmentation, connected components, shape test) per "
        "sampler, and wall time per image:", "", table, "",
        f"Dual (fused kernels) vs reference sCM loss on one batch: {spot['loss_dual']:.6g} vs "
        f"{spot['loss_reference']:.6g} (relative difference {spot['loss_rel_diff']:.2e}; gradient "
        f"{spot['grad_rel_diff']:.2e}).", "",
        "![samples](grid.png)", ""])


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the end-to-end demo: distil a tiny shapes teacher, sample, score "
                                           "(offline, minutes on a CPU)")
    p.add_argument("--output_dir", default="demo", help="where the report, grid and runs go (replaced)")
    p.add_argument("--teacher", default=None,
                   help="a teacher folder written by `t2i-distill demo-teacher` (default: the shipped one)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    run_demo(args.output_dir, teacher=args.teacher)
    return 0
