"""Step benchmarks: the FLUX student's passes in an sCM or MeanFlow training step, reference vs patched vs dual.

A model of configurable width and depth (``1 double + 0 single`` is "one double block", the real student is 8 + 38)
is built with random weights; for each provider the passes of one student step are timed and their peak memory
recorded:

* ``fwd``: a primal forward without grad (SDPA attention): the unit the JVP cost is measured in;
* ``jvp``: the tangent pass. reference = ``torch.func.jvp`` under ``no_grad`` + bf16 autocast with math attention,
  as T2I-Distill runs it; patched = the same call on ``apply_kernels_to_flux(model)``;
* ``fwd+bwd``: the forward with grad and its backward (reference: math attention, as its student's vanilla
  processor; patched: kernels, attention per ``training_attention``);
* ``step``: ``jvp`` then ``fwd+bwd`` (the reference's student step); for ``dual`` it is one pass of the explicit dual
  forward with grad (prediction with its graph + detached tangent) and its backward.

sCM differentiates the TrigFlow student along (x̂, t) with tangents (cos t·sin t·F_T, cos t·sin t); MeanFlow the
dual-timestep student along (z, t, t − r) with (v, 1, 1). Only the tangent directions matter for timing, so they are
random with the right shapes. The loss is a stand-in with the same dependency structure (the prediction with grad,
the tangent detached).

The **whole training step** (:func:`training_step`, :func:`training_step_rows`, ``t2i-distill steps
--training-step``) is the real thing: teacher + student, the real :func:`t2i_distill.losses.scm_loss` /
:func:`~t2i_distill.losses.meanflow_loss` in each JVP mode (``reference``, ``func``, ``dual``), backward and an AdamW
step, timed per phase by the losses' phase hooks (:class:`t2i_distill.losses.PhaseTimer`), with the peak memory of
each phase on CUDA.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill.benchmarks.common import TimingCase
from t2i_distill.tiny import TINY_FLUX_CONFIG, TinyFluxShape, tiny_flux_inputs

# diffusers and the kernels are imported where used: ``t2i-distill`` builds this module's option into its parser,
# and the kernels must not be imported before the CLI has chosen compiled or interpreted Triton.

__all__ = ["LITE_8B_WIDTH", "PEAK_MEMORY_NOTE", "STEP_PAIRS", "TRAINING_PHASES", "StepConfig",
           "add_training_step_option", "step_timing_cases", "training_phases", "training_step", "training_step_cases",
           "training_step_rows"]

#: The (mode, provider) pairs of :func:`step_timing_cases` with all providers.
STEP_PAIRS = [(m, p) for p in ("reference", "patched") for m in ("fwd", "jvp", "fwd+bwd", "step")] + [
    ("jvp", "dual"), ("step", "dual")]

#: FLUX.1-lite-8B's block width (reference-spec §3.4): 24 heads × 128, T5 4096, CLIP 768, 64 latent channels.
LITE_8B_WIDTH = {"attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                 "pooled_projection_dim": 768, "in_channels": 64, "axes_dims_rope": (16, 56, 56),
                 "guidance_embeds": True, "patch_size": 1}


@dataclass(frozen=True)
class StepConfig:
    method: str = "scm"  # scm | meanflow
    width: str = "tiny"  # tiny | lite8b
    double: int = 1
    single: int = 1
    resolution: int = 512  # pixels: (resolution/16)² image tokens
    batch: int = 1
    text_tokens: int = 256

    @property
    def label(self) -> str:
        return f"{self.method} {self.width} {self.double}+{self.single} {self.resolution}px b{self.batch}"

    def shape(self) -> TinyFluxShape:
        side = self.resolution // 16
        return TinyFluxShape(batch=self.batch, text_tokens=self.text_tokens, latent_h=side, latent_w=side)


def _build(cfg: StepConfig, device: torch.device, dtype: torch.dtype, teacher: bool = False, seed: int = 0):
    """The method's student (sCM: TrigFlowStudent; MeanFlow: dual-timestep FluxStudent) or, with ``teacher``, its
    teacher (sCM: TrigFlowStudent; MeanFlow: FluxStudent), random weights, eval mode."""
    from t2i_distill.models import FluxStudent, TrigFlowStudent

    config = {**(TINY_FLUX_CONFIG if cfg.width == "tiny" else LITE_8B_WIDTH),
              "num_layers": cfg.double, "num_single_layers": cfg.single}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.method == "scm":
            model = TrigFlowStudent(**config)
        else:
            model = FluxStudent(**config, dual_timestep=not teacher)
    model = model.to(device=device)
    if dtype != torch.float32:  # diffusers logs a warning on every `.to(dtype)`, also a no-op one
        model = model.to(dtype=dtype)
    return model.eval()


def step_timing_cases(cfg: StepConfig, device: torch.device, dtype: torch.dtype,
                      providers: tuple[str, ...] = ("reference", "patched", "dual")) -> list[TimingCase]:
    """The timed passes of one student step for each provider (see the module docstring)."""
    from t2i_distill.models.dual_forward import flux_forward_jvp, trigflow_forward_jvp
    from t2i_distill.models.flux_patch import apply_kernels_to_flux

    if cfg.method not in ("scm", "meanflow"):
        raise ValueError(f"`method`: expected 'scm' or 'meanflow', got {cfg.method!r}")
    model = _build(cfg, device, dtype)
    inputs = tiny_flux_inputs(model, cfg.shape())
    x = inputs.pop("hidden_states")
    timestep = inputs.pop("timestep")
    gen = torch.Generator().manual_seed(1)
    tx = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    tt = torch.ones_like(timestep)
    extra: dict[str, torch.Tensor] = {}
    if cfg.method == "meanflow":
        extra = {"timestep2": timestep * 0.5}
    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if on_gpu else nullcontext

    def forward(m, x, t, t2=None):
        kwargs = {"timestep2": t2} if t2 is not None else {}
        out = m(hidden_states=x, timestep=t, **inputs, **kwargs)
        return out if cfg.method == "scm" else out.sample

    def jvp_call(m):
        primals, tangents = (x, timestep), (tx, tt)
        if cfg.method == "meanflow":
            primals, tangents = primals + (extra["timestep2"],), tangents + (torch.ones_like(timestep),)
        return torch.func.jvp(lambda *p: forward(m, *p), primals, tangents)

    def dual_call(m):
        if cfg.method == "scm":
            return trigflow_forward_jvp(m, x, tx, timestep=timestep, t_timestep=tt, **inputs)
        return flux_forward_jvp(m, x, tx, timestep=timestep, t_timestep=tt, t_timestep2=torch.ones_like(timestep),
                                **inputs, **extra)

    def loss(prediction, tangent):  # same dependency structure as sCM/MeanFlow: tangent detached, target-like
        return (prediction.float() * tangent.detach().float()).mean()

    def train_pass(m, math_attention: bool) -> Callable[[], None]:
        def run() -> None:
            m.zero_grad(set_to_none=True)
            with sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext():
                prediction = forward(m, x, timestep, extra.get("timestep2"))
            loss(prediction, prediction).backward()
        return run

    label = cfg.label
    shape = (cfg.batch, cfg.shape().joint_tokens)
    cases: list[TimingCase] = []
    reference = model
    if "reference" in providers:
        def ref_jvp():
            with torch.no_grad(), autocast(), sdpa_kernel(SDPBackend.MATH):
                return jvp_call(reference)

        ref_train = train_pass(reference, math_attention=True)

        def ref_step():
            _, tangent = ref_jvp()
            reference.zero_grad(set_to_none=True)
            with sdpa_kernel(SDPBackend.MATH):
                prediction = forward(reference, x, timestep, extra.get("timestep2"))
            loss(prediction, tangent).backward()

        def ref_fwd():
            with torch.no_grad():
                return forward(reference, x, timestep, extra.get("timestep2"))

        cases += [TimingCase(label, "fwd", "reference", shape, ref_fwd),
                  TimingCase(label, "jvp", "reference", shape, ref_jvp),
                  TimingCase(label, "fwd+bwd", "reference", shape, ref_train),
                  TimingCase(label, "step", "reference", shape, ref_step)]
    if "patched" in providers or "dual" in providers:
        patched = apply_kernels_to_flux(copy.deepcopy(model))
    if "patched" in providers:
        def patched_jvp():
            with torch.no_grad(), autocast():
                return jvp_call(patched)

        def patched_step():
            _, tangent = patched_jvp()
            patched.zero_grad(set_to_none=True)
            loss(forward(patched, x, timestep, extra.get("timestep2")), tangent).backward()

        def patched_fwd():
            with torch.no_grad():
                return forward(patched, x, timestep, extra.get("timestep2"))

        cases += [TimingCase(label, "fwd", "patched", shape, patched_fwd),
                  TimingCase(label, "jvp", "patched", shape, patched_jvp),
                  TimingCase(label, "fwd+bwd", "patched", shape, train_pass(patched, math_attention=False)),
                  TimingCase(label, "step", "patched", shape, patched_step)]
    if "dual" in providers:
        def dual_jvp():
            with torch.no_grad():
                return dual_call(patched)

        def dual_step():
            patched.zero_grad(set_to_none=True)
            prediction, tangent = dual_call(patched)
            loss(prediction, tangent).backward()

        cases += [TimingCase(label, "jvp", "dual", shape, dual_jvp),
                  TimingCase(label, "step", "dual", shape, dual_step)]
    return cases


def config_dict(cfg: StepConfig) -> dict[str, object]:
    return asdict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# The whole training step: teacher + JVP + student + backward + optimizer, per JVP mode of t2i_distill.losses
# ----------------------------------------------------------------------------------------------------------------
#: Phases of one training step, in order, per method and JVP mode (``dual`` = JVP and student in one pass).
TRAINING_PHASES = {
    ("scm", "dual"): ("teacher", "dual", "loss", "backward", "optimizer"),
    ("scm", "other"): ("teacher", "jvp", "student", "loss", "backward", "optimizer"),
    ("meanflow", "dual"): ("teacher", "cfg", "dual", "loss", "backward", "optimizer"),
    ("meanflow", "other"): ("student", "teacher", "cfg", "jvp", "loss", "backward", "optimizer"),
}

#: What the peak-memory column means on each device.
PEAK_MEMORY_NOTE = ("peak memory: CUDA max_memory_allocated during the phase minus the memory allocated when it "
                    "began; not measured on the CPU (PyTorch keeps no CPU allocator statistics)")


def training_phases(method: str, jvp_mode: str) -> tuple[str, ...]:
    return TRAINING_PHASES[(method, "dual" if jvp_mode == "dual" else "other")]


def training_step(cfg: StepConfig, device: torch.device, dtype: torch.dtype, jvp_mode: str):
    """A callable ``step(phases)`` running one real training step of ``cfg.method`` with ``jvp_mode``.

    Teacher (frozen) and student have random weights at ``cfg``'s width and depth; the student trains with AdamW.
    ``func`` and ``dual`` run on the kernel-patched student, ``reference`` on the unpatched one (as the losses
    require). sCM runs at a step past the tangent warmup (r = 1); MeanFlow with the launch script's CFG-MeanFlow
    settings (ω = 1, κ = 0.5), so the CFG forward and both JVP subsets are part of the step. The draws are fixed
    (seeded) so every repetition does the same work.
    """
    from t2i_distill.losses import MeanFlowConfig, SCMConfig, draw_meanflow, draw_scm, meanflow_loss, scm_loss
    from t2i_distill.losses.common import no_phases
    from t2i_distill.losses.config import check_jvp_mode
    from t2i_distill.models.flux_patch import apply_kernels_to_flux

    check_jvp_mode(jvp_mode)
    if cfg.method not in ("scm", "meanflow"):
        raise ValueError(f"`method`: expected 'scm' or 'meanflow', got {cfg.method!r}")
    student = _build(cfg, device, dtype).train()
    teacher = _build(cfg, device, dtype, teacher=True, seed=1).requires_grad_(False)
    if jvp_mode != "reference":
        student = apply_kernels_to_flux(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    config = student.config
    side = 2 * cfg.shape().latent_h  # unpacked latent side: R/8
    gen = torch.Generator().manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    batch = {"latents": randn(cfg.batch, config.in_channels // 4, side, side),
             "prompt_embeds": randn(cfg.batch, cfg.text_tokens, config.joint_attention_dim),
             "pooled_prompt_embeds": randn(cfg.batch, config.pooled_projection_dim)}
    if cfg.method == "scm":
        loss_config = SCMConfig(logit_mean=0.2, logit_std=1.6)  # the launch script's sampler
        draws = draw_scm(batch, loss_config, generator=torch.Generator().manual_seed(1), dtype=dtype)

        def loss_fn(phases):
            return scm_loss(student, teacher, batch, step=loss_config.tangent_warmup_steps, config=loss_config,
                            draws=draws, jvp_mode=jvp_mode, phases=phases)
    else:
        loss_config = MeanFlowConfig(use_cfg_meanflow=True, cfg_kappa=0.5)
        draws = draw_meanflow(batch, loss_config, generator=torch.Generator().manual_seed(1), dtype=dtype)
        draws.dropout_mask[:] = False
        draws.equal_mask[:] = False
        draws.equal_mask[::2] = True  # the reference's 25 % r = t, deterministically: every other sample
        null = (randn(1, cfg.text_tokens, config.joint_attention_dim), randn(1, config.pooled_projection_dim))

        def loss_fn(phases):
            return meanflow_loss(student, teacher, batch, config=loss_config, null_condition=null, draws=draws,
                                 jvp_mode=jvp_mode, phases=phases)

    def step(phases=no_phases) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(phases)
        with phases("backward"):
            loss.backward()
        with phases("optimizer"):
            optimizer.step()
        return float(loss.detach())

    return step


def training_step_cases(cfg: StepConfig, device: torch.device, dtype: torch.dtype,
                        modes: tuple[str, ...] = ("reference", "func", "dual")) -> list[TimingCase]:
    """One timed case per JVP mode: the whole training step (mode ``"train-step"``, provider = the JVP mode)."""
    shape = (cfg.batch, cfg.shape().joint_tokens)
    return [TimingCase(cfg.label, "train-step", mode, shape, training_step(cfg, device, dtype, mode)) for mode in modes]


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def training_step_rows(cfg: StepConfig, device: torch.device, dtype: torch.dtype,
                       modes: tuple[str, ...] = ("reference", "func", "dual"), repeats: int = 3) -> list[dict]:
    """Per-phase time (p50/p20/p80 ms over ``repeats`` steps after one warm-up step) and peak memory of the whole
    training step for each JVP mode, plus a ``total`` row per mode; rows in :func:`runner.timing_table`'s format."""
    import statistics

    from t2i_distill.losses import PhaseTimer

    if repeats < 1:
        raise ValueError(f"`repeats`: expected >= 1, got {repeats}")
    shape = [cfg.batch, cfg.shape().joint_tokens]
    rows: list[dict] = []
    for mode in modes:
        base = {"op": cfg.label, "shape": shape, "provider": mode}
        try:
            step = training_step(cfg, device, dtype, mode)
            step()  # warm-up: first-call allocations, kernel compilation
            timer = PhaseTimer(device)
            totals = []
            for _ in range(repeats):
                before = {k: sum(v) for k, v in timer.times_ms.items()}
                step(timer)
                totals.append(sum(sum(v) for v in timer.times_ms.values()) - sum(before.values()))
        except Exception as exc:  # e.g. out of memory at this size: one row with the error, the other modes still run
            rows.append({**base, "mode": "total", "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        for phase in training_phases(cfg.method, mode):
            times = timer.times_ms.get(phase, [])
            if not times:
                continue
            peaks = [p for p in timer.peak_gib.get(phase, []) if p is not None]
            rows.append({**base, "mode": phase, "p50_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2),
                         "p80_ms": _quantile(times, 0.8), "peak_extra_gib": max(peaks) if peaks else None,
                         "error": None})
        rows.append({**base, "mode": "total", "p50_ms": statistics.median(totals), "p20_ms": _quantile(totals, 0.2),
                     "p80_ms": _quantile(totals, 0.8), "peak_extra_gib": None, "error": None})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- `t2i-distill steps --training-step [MODE ...]` -------------------------------------------------------------
def add_training_step_option(parser) -> None:
    """Add ``--training-step`` to the ``steps`` sub-parser: with it, the command benchmarks the whole training step
    per phase (for the JVP modes named, all three when none is) instead of the student passes."""
    from t2i_distill.losses.config import JVP_MODES

    parser.add_argument("--training_step", "--training-step", nargs="*", choices=JVP_MODES, default=None,
                        metavar="JVP_MODE",
                        help="benchmark the whole sCM/MeanFlow training step (teacher + JVP + student + backward + "
                             f"optimizer) per phase for these JVP modes {JVP_MODES} (none given: all)")
    student_passes = parser.get_default("func")

    def dispatch(args) -> int:
        if args.training_step is None:
            return student_passes(args)
        return _cmd_training_step(args)

    parser.set_defaults(func=dispatch)


def _cmd_training_step(args) -> int:
    import json
    from pathlib import Path

    from t2i_distill.env import enable_interpreter_without_gpu
    from t2i_distill.losses.config import JVP_MODES

    if enable_interpreter_without_gpu():
        print("no GPU found: running the Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)\n")
    from t2i_distill.benchmarks.runner import timing_table

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = tuple(args.training_step) or JVP_MODES
    rows = []
    for method in args.method:
        cfg = StepConfig(method=method, width=args.width, double=args.double, single=args.single,
                         resolution=args.resolution, batch=args.batch, text_tokens=args.text_tokens)
        rows += training_step_rows(cfg, device, dtype, modes=modes, repeats=args.repeats)
    print(timing_table(rows, interpreted=device.type != "cuda"))
    print(f"\n{PEAK_MEMORY_NOTE}")
    if device.type != "cuda":
        print("func and dual run the Triton kernels in the CPU interpreter here: their times (and ratios) say "
              "nothing about GPU speed; the reference rows show where a step's time goes independent of kernels")
    if args.out != "-":
        Path(args.out).write_text(json.dumps({"device": str(device), "training_step": True, "rows": rows},
                                             indent=2, default=str))
        print(f"JSON written to {args.out}")
    return 0
