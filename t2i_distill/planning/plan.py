"""``t2i-distill plan``: the GPU memory and FLOPs of one training step, per rank, measured on fake tensors.

One step of the trainer runs on fake tensors (:func:`~t2i_distill.planning.step.run_step`) under the ledger; the
backend's sharding is then applied to the categories it changes, by these rules (P: student parameters, T: trainable
parameters, N: processes; bytes):

==========  ==========================================  ===============================  =========================
backend     parameters                                  gradients                        optimizer (AdamW) / EMA
==========  ==========================================  ===============================  =========================
single      measured (fp32 masters; autocast's bf16     measured (fp32)                  measured / 4·T
            weight copies are activations)
ddp         as single                                   as single, + DDP's bucket        as single
                                                        buffers 4·T (allocated when
                                                        DDP wraps the model)
fsdp2       measured: the engine's ``fully_shard``      measured (reduce-scattered       8·T/N, 12·T/N in the
            (every block, then the root), N ranks       fp32 shards)                     step / 4·T/N
deepspeed   2·P bf16 module + 4·T/N fp32 masters        bf16 partition 2·T/N + the       8·T/N, 12·T/N in the
(ZeRO-2)                                                reduce bucket (2 bytes × its     step / 4·T
                                                        size), + 4·T/N fp32 at the step
==========  ==========================================  ===============================  =========================

Optimizer states are counted in their steady state: they live through every phase of every step after the first
(AdamW: 8 bytes per trainable parameter); during the optimizer step, with the multi-tensor step's full-size
temporaries (measured for single/ddp, 4·T/N more by rule for the sharded backends).

FSDP2 is not derived: the step runs with the engine's own ``fully_shard`` calls over a process group of N ranks in
this one process (torch's "fake" backend: collectives move no data), so its all-gathered bf16 blocks, prefetching,
resharding and reduce-scatter buffers are counted as they are allocated. DeepSpeed is derived: the step is measured
with bf16 module weights and no autocast (what ZeRO-2 computes with), then the rules above replace its parameters,
gradients and optimizer states. With gradient accumulation the gradients live through the next micro-step's
passes too. The text encoders and VAE (bf16) are added when the data is encoded live (no ``--cached_dataset``).
Step time is an **estimate**: FLOPs / (peak dense bf16 TFLOP/s × an assumed utilisation), communication ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from t2i_distill.planning.step import StepResult, StepSetting, run_step

__all__ = ["GPUS", "PlanSetting", "SHIPPED_CONFIGS", "UTILISATION", "apply_backend", "load_config", "plan"]

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = {"flux1-lite-8b": CONFIG_DIR / "flux1-lite-8b.json", "flux1-dev": CONFIG_DIR / "flux1-dev.json"}
#: Peak dense bf16 tensor-core TFLOP/s (vendor data sheets, SXM parts) for the step-time estimate.
GPUS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0}
#: The fraction of peak the estimate assumes: a stated assumption, not a measurement.
UTILISATION = 0.40
#: Live encoding's bf16 weights on every rank: T5-v1.1-XXL encoder, CLIP ViT-L/14 text model, FLUX VAE (parameters).
LIVE_ENCODER_PARAMS = 4_762_310_656 + 123_060_480 + 83_819_683
GIB = 2**30


@dataclass(frozen=True)
class PlanSetting:
    """The training flags that decide memory and FLOPs (``t2i-distill train``'s flags of the same names)."""

    step: StepSetting
    backend: str = "single"
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    ema_decay: float | None = None
    cached_dataset: bool = True
    reduce_bucket_size: int = 500_000_000  # the shipped DeepSpeed JSONs' zero_optimization.reduce_bucket_size


def load_config(model: str) -> tuple[str, dict]:
    """``(name, transformer config)`` of a shipped name, a pipeline folder, its ``transformer/`` or a config.json."""
    if model in SHIPPED_CONFIGS:
        path = SHIPPED_CONFIGS[model]
    else:
        path = Path(model)
        for candidate in (path / "transformer" / "config.json", path / "config.json", path):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"--model {model!r}: expected one of {sorted(SHIPPED_CONFIGS)}, a pipeline folder "
                                    "with transformer/config.json, a transformer folder or a config.json")
    config = json.loads(Path(path).read_text())
    return model, {k: v for k, v in config.items() if not k.startswith("_")}


def measured_setting(setting: PlanSetting) -> StepSetting:
    """The step that is run for ``setting``: FSDP2 itself (fully_shard over fake ranks), DeepSpeed's bf16 module."""
    if setting.backend == "fsdp2":
        return replace(setting.step, weights_dtype="fp32", fsdp2_world=setting.num_processes)
    bf16_module = setting.backend == "deepspeed" and setting.step.mixed_precision == "bf16"
    return replace(setting.step, weights_dtype="bf16" if bf16_module else "fp32", fsdp2_world=0)


def apply_backend(result: StepResult, setting: PlanSetting) -> dict[str, dict[str, int]]:
    """Per phase, the per-rank bytes by category under ``setting``'s backend (rules in the module docstring)."""
    n, backend = setting.num_processes, setting.backend
    p, t = result.student_params, result.trainable_params
    phases = {}
    for name in result.phase_order:
        cats = dict(result.ledger.phases[name].peak_breakdown)
        has_grads = name in ("backward", "optimizer") or setting.gradient_accumulation_steps > 1
        # Steady state: from the second step on the optimizer's states live through every phase; in the optimizer
        # phase they are there with the step's temporaries (the multi-tensor AdamW's full-size sqrt(v) list).
        states = result.optimizer_state_bytes
        if backend in ("fsdp2", "deepspeed"):
            states = 8 * t // n
        cats["optimizer"] = (cats.get("optimizer", 0) if backend in ("single", "ddp") else 12 * t // n) \
            if name == "optimizer" else states
        if backend == "fsdp2":  # measured as it is: fully_shard's shards, gathers and reduce-scatters
            if has_grads and setting.gradient_accumulation_steps > 1:
                cats["gradients"] = max(cats.get("gradients", 0), 4 * t // n)
        elif backend == "deepspeed":
            cats["parameters"] = 2 * p + 4 * t // n
            bucket = 2 * min(setting.reduce_bucket_size, t) if name == "backward" else 0
            cats["gradients"] = (2 * t // n if has_grads else 0) + bucket + (4 * t // n if name == "optimizer" else 0)
        elif backend == "ddp":
            cats["ddp_buckets"] = 4 * t
        if has_grads and setting.gradient_accumulation_steps > 1 and backend in ("single", "ddp"):
            cats["gradients"] = max(cats.get("gradients", 0), 4 * t)
        if setting.ema_decay:
            cats["ema"] = 4 * t // (n if backend == "fsdp2" else 1)
        if not setting.cached_dataset:
            cats["text_encoders_vae"] = 2 * LIVE_ENCODER_PARAMS
        phases[name] = {k: v for k, v in cats.items() if v}
    return phases


def plan(config: dict, setting: PlanSetting, model_name: str = "", cache: dict | None = None) -> dict:
    """Run the step and return the plan: per-rank peak (bytes, category breakdown, phase), per-phase peaks and
    FLOPs, and step-time estimates per GPU. JSON-serialisable. ``cache`` maps measured step settings to results."""
    if setting.backend == "single" and setting.num_processes != 1:
        raise ValueError(f"--backend single runs one process; got --num_processes {setting.num_processes}")
    measured = measured_setting(setting)
    cache = {} if cache is None else cache
    if measured not in cache:
        cache[measured] = run_step(config, measured)
    result = cache[measured]
    phases = apply_backend(result, setting)
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    ga = setting.gradient_accumulation_steps
    micro_flops = sum(record.flops for name, record in result.ledger.phases.items() if name != "optimizer")
    step_flops = micro_flops * ga
    samples = setting.step.train_batch_size * ga * setting.num_processes
    estimates = {}
    for gpu, tflops in GPUS.items():
        seconds = step_flops / (tflops * 1e12 * UTILISATION)
        estimates[gpu] = {"step_s": seconds, "samples_per_s": samples / seconds if seconds else None}
    return {
        "model": model_name, "setting": {**asdict(setting.step), "backend": setting.backend,
                                         "num_processes": setting.num_processes,
                                         "gradient_accumulation_steps": ga, "ema_decay": setting.ema_decay,
                                         "cached_dataset": setting.cached_dataset},
        "measured_with_weights": "bf16" if measured.weights_dtype == "bf16" else (
            "fp32 + bf16 autocast" if measured.mixed_precision == "bf16" else "fp32"),
        "parameters": {"student": result.student_params, "trainable": result.trainable_params,
                       "teacher": result.teacher_params},
        "peak_bytes": sum(phases[peak_phase].values()), "peak_phase": peak_phase,
        "peak_breakdown": phases[peak_phase],
        "phases": {name: {"peak_bytes": sum(cats.values()), "breakdown": cats,
                          "flops": result.ledger.phases[name].flops} for name, cats in phases.items()},
        "flops_per_micro_step": micro_flops, "flops_per_step": step_flops, "notes": list(result.notes),
        "estimate": {"utilisation": UTILISATION, "peak_tflops": GPUS, "per_gpu": estimates,
                     "note": "estimate from FLOPs at the stated utilisation, communication ignored; not a measurement"},
    }
