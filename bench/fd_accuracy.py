"""How accurate is ``--jvp fd`` (the finite-difference tangent of rCM and FastGen) against the exact forward-AD
tangent, as ε varies? (CPU, float32, the tiny FLUX; speed is the training-step benchmark's, `t2i-distill steps
--training_step fd func dual` on a GPU.)

For sCM and MeanFlow, one loss + backward per mode on the same seeded models, batch and draws: ``func`` (exact, over
the kernel-patched student) and ``fd`` at ε in {1e-1, …, 1e-5}, each against the ``reference`` mode. Reported: the
relative error of the loss and the largest relative error over the parameter gradients. A forward difference has a
truncation error O(ε) and a float32 rounding error O(1e-7/ε): the table shows both ends and the default (1e-3).

    TRITON_INTERPRET=1 python bench/fd_accuracy.py [--out bench/results/fd_accuracy-cpu.committed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TRITON_INTERPRET", "1" if not torch.cuda.is_available() else "0")
if os.environ["TRITON_INTERPRET"] == "0":
    del os.environ["TRITON_INTERPRET"]

EPSILONS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def _models(cls, seed: int, **overrides):
    from t2i_distill.tiny import TINY_FLUX_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**{**TINY_FLUX_CONFIG, **overrides})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)  # every term non-trivial
    return model.train()


def _batch(seed: int = 0) -> dict:
    from t2i_distill.tiny import TINY_FLUX_CONFIG

    gen = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(2, 4, 4, 4, generator=gen),
            "prompt_embeds": torch.randn(2, 3, TINY_FLUX_CONFIG["joint_attention_dim"], generator=gen),
            "pooled_prompt_embeds": torch.randn(2, TINY_FLUX_CONFIG["pooled_projection_dim"], generator=gen)}


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def measure() -> list[dict]:
    from t2i_distill import apply_kernels_to_flux
    from t2i_distill.losses import MeanFlowConfig, MeanFlowDraws, SCMConfig, SCMDraws, meanflow_loss, scm_loss
    from t2i_distill.models import FluxStudent, TrigFlowStudent

    gen = torch.Generator().manual_seed(1)
    scm_draws = SCMDraws(noise=torch.randn(2, 4, 4, 4, generator=gen), guidance=torch.tensor([4.0, 5.0]),
                         time_normal=torch.tensor([-0.5, 0.5]))
    mf_draws = MeanFlowDraws(noise=torch.randn(2, 4, 4, 4, generator=gen), guidance=torch.tensor([4.0, 4.5]),
                             r=torch.tensor([0.2, 0.4]), t=torch.tensor([0.6, 0.95]),
                             equal_mask=torch.tensor([False, False]), dropout_mask=torch.tensor([False, False]))
    from t2i_distill.tiny import TINY_FLUX_CONFIG

    null = (torch.randn(1, 3, TINY_FLUX_CONFIG["joint_attention_dim"], generator=gen),
            torch.randn(1, TINY_FLUX_CONFIG["pooled_projection_dim"], generator=gen))
    rows = []
    for method in ("scm", "meanflow"):
        if method == "scm":
            student, teacher = _models(TrigFlowStudent, 0), _models(TrigFlowStudent, 1).requires_grad_(False)

            def run(model, mode, eps=1e-3):
                model.zero_grad(set_to_none=True)
                loss, _ = scm_loss(model, teacher, _batch(), step=2000, config=SCMConfig(fd_epsilon=eps),
                                   draws=scm_draws, jvp_mode=mode)
                loss.backward()
                return loss.detach(), _grads(model)
        else:
            student = _models(FluxStudent, 0, dual_timestep=True)
            teacher = _models(FluxStudent, 1).requires_grad_(False)

            def run(model, mode, eps=1e-3):
                model.zero_grad(set_to_none=True)
                loss, _ = meanflow_loss(model, teacher, _batch(), config=MeanFlowConfig(fd_epsilon=eps,
                                                                                        weighting="uniform"),
                                        null_condition=null, draws=mf_draws, jvp_mode=mode)
                loss.backward()
                return loss.detach(), _grads(model)

        reference = run(copy.deepcopy(student), "reference")
        cases = [("func", None, apply_kernels_to_flux(copy.deepcopy(student)))]
        cases += [("fd", eps, copy.deepcopy(student)) for eps in EPSILONS]
        for mode, eps, model in cases:
            loss, grads = run(model, mode, 1e-3 if eps is None else eps)
            rows.append({"method": method, "mode": mode, "epsilon": eps, "loss_rel_err": _rel(loss, reference[0]),
                         "max_grad_rel_err": max(_rel(grads[k], reference[1][k]) for k in reference[1])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fd_accuracy-cpu.committed.json"),
                        help="JSON path ('-': none; default: %(default)s)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = measure()
    finally:
        torch.set_num_threads(threads)
    print(f"machine: {platform.machine()} CPU, torch {torch.__version__}; tiny FLUX, float32; relative error vs the "
          "reference mode (torch.func.jvp, math attention)")
    print("| method | mode | ε | loss rel. error | max gradient rel. error |")
    print("|---|---|---|---|---|")
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g}"
        print(f"| {r['method']} | {r['mode']} | {eps} | {r['loss_rel_err']:.2e} | {r['max_grad_rel_err']:.2e} |")
    result = {"machine": f"{platform.machine()} CPU", "torch": torch.__version__, "dtype": "float32", "rows": rows}
    if args.out != "-":
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.out}")
    return result


if __name__ == "__main__":
    main()
