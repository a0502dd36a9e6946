"""``t2i-distill plan --fit GIB``: the fastest setting whose per-rank peak fits a GPU.

Searched: ``--jvp`` modes, backends (``single`` on one GPU; ``ddp``, ``fsdp2``, ``deepspeed`` on several), gradient
checkpointing off/on, LoRA off/on (when a rank is given) and the micro-batch. Per (mode, checkpointing, LoRA, weight
dtype) the step is measured at micro-batch 1 and 2; every phase's bytes are affine in the batch, so the largest
micro-batch that fits follows from the two runs, and that micro-batch is then measured (the answer is a measured plan,
never an extrapolation). "Fastest" is the fewest FLOPs per sample (the estimate's samples/s per GPU at the stated
utilisation, :mod:`t2i_distill.planning.plan`), ties broken by the larger micro-batch, then the smaller peak.
Candidates are measured in order of their extrapolated FLOPs per sample until none left can beat the best one.
"""

from __future__ import annotations

from dataclasses import replace

from t2i_distill.planning.plan import GIB, PlanSetting, apply_backend, measured_setting, plan
from t2i_distill.planning.step import run_step

__all__ = ["DEFAULT_MARGIN", "fit", "usable_bytes"]

#: Kept free of the GPU's memory: the CUDA context, NCCL buffers and the caching allocator's fragmentation, which
#: the ledger does not model (an assumption: 8 %).
DEFAULT_MARGIN = 0.08
MAX_MICRO_BATCH = 64


def usable_bytes(gib: float, margin: float = DEFAULT_MARGIN) -> int:
    return int(gib * GIB * (1 - margin))


def _peak(result, setting: PlanSetting) -> int:
    return max(sum(c.values()) for c in apply_backend(result, setting).values())


def _flops(result) -> int:
    return sum(record.flops for name, record in result.ledger.phases.items() if name != "optimizer")


def _largest_batch(config: dict, setting: PlanSetting, limit: int, cache: dict) -> tuple[int, float]:
    """The largest micro-batch whose extrapolated peak fits ``limit`` (0: not even 1 fits), and the step's
    extrapolated FLOPs per sample at that batch (for ranking candidates before they are measured)."""
    peaks, flops = [], []
    for batch in (1, 2):
        step = measured_setting(replace(setting, step=replace(setting.step, train_batch_size=batch)))
        if step not in cache:
            cache[step] = run_step(config, step)
        peaks.append(_peak(cache[step], replace(setting, step=step)))
        flops.append(_flops(cache[step]))
    fixed, per_sample = 2 * peaks[0] - peaks[1], max(peaks[1] - peaks[0], 1)
    if peaks[0] > limit:
        return 0, 0.0
    batch = max(1, min(MAX_MICRO_BATCH, (limit - fixed) // per_sample))
    flops_fixed, flops_per = 2 * flops[0] - flops[1], flops[1] - flops[0]
    return batch, (flops_fixed + flops_per * batch) / batch


def fit(config: dict, base: PlanSetting, gib: float, *, modes: tuple[str, ...], lora_ranks: tuple[int, ...] = (0,),
        margin: float = DEFAULT_MARGIN, model_name: str = "", log=print, cache: dict | None = None) -> dict:
    """The fastest fitting plan (a :func:`~t2i_distill.planning.plan.plan` dict with a ``fit`` section), or
    ``{"fits": False, ...}``. ``cache`` (measured step setting → result) may be shared between calls."""
    limit = usable_bytes(gib, margin)
    backends = ("single",) if base.num_processes == 1 else ("ddp", "fsdp2", "deepspeed")
    cache = {} if cache is None else cache
    candidates = []
    for mode in modes:
        for lora in lora_ranks:
            for checkpointing in (False, True):
                for backend in backends:
                    step = replace(base.step, jvp=mode, gradient_checkpointing=checkpointing, lora_rank=lora)
                    setting = replace(base, step=step, backend=backend)
                    batch, flops_per_sample = _largest_batch(config, setting, limit, cache)
                    log(f"  {mode:9s} lora {lora:3d} checkpointing {checkpointing!s:5s} {backend:9s}: "
                        f"largest micro-batch {batch or 'none'}")
                    if batch:
                        candidates.append((flops_per_sample, -batch, len(candidates),
                                           replace(setting, step=replace(step, train_batch_size=batch))))
    # Measure in order of extrapolated speed (fewest FLOPs per sample first) until no unmeasured candidate can beat
    # the best measured one.
    best, measured = None, 0
    for flops_per_sample, _, _, setting in sorted(candidates):
        if best is not None and flops_per_sample > best[0][0]:
            break
        result = plan(config, setting, model_name, cache)
        measured += 1
        while result["peak_bytes"] > limit and setting.step.train_batch_size > 1:  # the affine model was optimistic
            setting = replace(setting, step=replace(setting.step, train_batch_size=setting.step.train_batch_size - 1))
            result = plan(config, setting, model_name, cache)
        if result["peak_bytes"] > limit:
            continue
        key = (result["flops_per_step"] / (setting.step.train_batch_size * setting.gradient_accumulation_steps),
               -setting.step.train_batch_size, result["peak_bytes"])
        if best is None or key < best[0]:
            best = (key, result)
    if best is None:
        return {"fits": False, "limit_bytes": limit, "gib": gib, "margin": margin}
    return {**best[1], "fits": True, "fit": {"gib": gib, "margin": margin, "limit_bytes": limit,
                                             "candidates": len(candidates), "measured": measured}}
