"""How wrong is FLUX's time embedding in bf16 at ×1000, and its tangent d temb/dt? (CPU; no GPU needed.)

The paper (arXiv 2512.13006 §4.2.1) saw sCM's gradient norm grow until collapse with time inputs in 0–1000 and
rescaled the teacher to ×1; rCM keeps ×1000 and computes the time-embedding layers in float32. This measures the
numerical root: the AdaLN conditioning ``temb`` of :meth:`FluxStudent.conditioning` and its JVP along t, for

* ``bf16``: the model in bfloat16 with the reference's casts (t rounded to bf16 *before* ×scale, MLPs in bf16);
* ``bf16 + fp32 time embedding``: the model in bfloat16, ``time_embedding_fp32=True`` (t, sinusoid, MLPs in fp32);
* ``fp32``: the model in float32;

at ×1000 and ×1, each against the same weights in float64 at the same scale (the truth). Same random weights for
every variant (FLUX.1-lite-8B's embedder widths: hidden 3072, pooled 768, guidance embeds; one block of each kind,
which ``conditioning`` does not run). Reported: relative L2 error ‖x − truth‖/‖truth‖ per t, median and max over t.
The tangent is ``torch.func.jvp`` of ``conditioning`` along t (tangent ones); guidance is fixed at 3.5, so it moves
``temb`` but not the tangent. Reading the bf16 ×1000 row: 3.5 × 1000 rounds to 3504 in bf16, a constant offset that
makes most of its ``temb`` error (with guidance 4, whose ×1000 is exact in bf16, it drops from ~0.34 to ~0.06); the
tangent error comes from t·1000 rounded to bf16 (steps of 2–4 near t = 1), which the top sinusoid frequencies
(~1 rad per unit) turn into phase noise. Any bf16 model's floor (~3e-3) is its bf16 weights and output.

    python bench/time_embedding_precision.py [--tiny] [--out JSON]  # default: bench/results/...-cpu.committed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LITE8B = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128, "num_attention_heads": 24,
          "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True, "in_channels": 64}
VARIANTS = (("bf16", torch.bfloat16, False), ("bf16 + fp32 time embedding", torch.bfloat16, True),
            ("fp32", torch.float32, False))


def _model(config: dict, state: dict, scale: float, dtype: torch.dtype, fp32: bool):
    """A fresh instance with this scale/flag and the shared weights. Built on the meta device and given ``state``'s
    tensors (``assign``): one random init for all variants, not one each (at lite-8B width the blocks hold ~0.5 B
    parameters, though :meth:`conditioning` never runs them)."""
    from t2i_distill.models import FluxStudent

    with torch.device("meta"):
        model = FluxStudent(**config, time_scale=scale, time_embedding_fp32=fp32)
    model.load_state_dict(state, assign=True)
    return model.to(dtype).eval()


def _temb_and_tangent(model, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor):
    def temb(time):
        return model.conditioning(time, pooled, guidance)

    with torch.no_grad():
        return torch.func.jvp(temb, (t,), (torch.ones_like(t),))


def _relative(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 error (one row per t)."""
    x, truth = x.double(), truth.double()
    return (x - truth).norm(dim=-1) / truth.norm(dim=-1).clamp_min(1e-300)


def measure(config: dict, points: int = 257, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    from t2i_distill.models import FluxStudent

    state = FluxStudent(**config).state_dict()
    # Times a bf16 run can hold exactly (the losses cast their draws to the weights' dtype before the models, and
    # the noisy input is built from that same rounded t): the error measured is the embedding's, not the input's.
    t = torch.linspace(0.001, 0.999, points, dtype=torch.float64).to(torch.bfloat16).to(torch.float64)
    pooled = torch.randn(1, config["pooled_projection_dim"], dtype=torch.float64).expand(points, -1)
    guidance = torch.full((points,), 3.5, dtype=torch.float64)
    rows = []
    for scale in (1000.0, 1.0):
        truth = _temb_and_tangent(_model(config, state, scale, torch.float64, False), t, pooled, guidance)
        for name, dtype, fp32 in VARIANTS:
            model = _model(config, state, scale, dtype, fp32)
            value, tangent = _temb_and_tangent(model, t.to(dtype), pooled.to(dtype), guidance.to(dtype))
            errors = {"temb": _relative(value, truth[0]), "tangent": _relative(tangent, truth[1])}
            rows.append({"variant": name, "time_scale": scale,
                         **{f"{k}_rel_err_{stat}": float(getattr(v, stat)()) for k, v in errors.items()
                            for stat in ("median", "max")}})
            del model  # one model alive at a time (a float64 one at lite-8B width is ~4 GB)
    return rows


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _find(rows, variant, scale, key):
    return next(r[key] for r in rows if r["variant"] == variant and r["time_scale"] == scale)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX widths (fast; for tests)")
    parser.add_argument("--points", type=int, default=257,
                        help="t values in [0.001, 0.999], rounded to bf16 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--out",
                        default=str(REPO / "bench" / "results" / "time_embedding_precision-cpu.committed.json"),
                        help="JSON path ('-': none; default: %(default)s)")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    if args.tiny:
        from t2i_distill.tiny import TINY_FLUX_CONFIG

        config = {**TINY_FLUX_CONFIG, "guidance_embeds": True}
    else:
        config = LITE8B
    threads, verbosity = torch.get_num_threads(), diffusers_logging.get_verbosity()
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # `.to(bf16)` warns about modules to keep in fp32: FLUX has none
    start = time.perf_counter()
    try:
        rows = measure(config, points=args.points)
    finally:  # main() is also called in-process (tests): leave the process as found
        torch.set_num_threads(threads)
        diffusers_logging.set_verbosity(verbosity)
    seconds = time.perf_counter() - start
    widths = "tiny" if args.tiny else "lite-8B"
    print(f"machine: {platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}; widths: "
          f"{widths}; {args.points} t in [0.001, 0.999], guidance 3.5; relative L2 error vs float64; {seconds:.0f} s")
    print("| variant | scale | temb median | temb max | tangent median | tangent max |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | ×{r['time_scale']:g} | {r['temb_rel_err_median']:.2e} | {r['temb_rel_err_max']:.2e} "
              f"| {r['tangent_rel_err_median']:.2e} | {r['tangent_rel_err_max']:.2e} |")
    key = "tangent_rel_err_median"
    conclusion = (
        f"bf16 tangent error at ×1000 is {_find(rows, 'bf16', 1000.0, key) / _find(rows, 'bf16', 1.0, key):.0f}× "
        f"the one at ×1; float32 time embeddings cut the ×1000 tangent error "
        f"{_find(rows, 'bf16', 1000.0, key) / _find(rows, 'bf16 + fp32 time embedding', 1000.0, key):.0f}×")
    print(conclusion)
    result = {"machine": f"{platform.machine()} CPU", "torch": torch.__version__, "git_sha": _git_sha(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads,
              "widths": widths, "config": config, "points": args.points, "t_range": [0.001, 0.999],
              "guidance": 3.5, "seconds": round(seconds, 1), "rows": rows, "conclusion": conclusion}
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.out}")
    return result


if __name__ == "__main__":
    main()
