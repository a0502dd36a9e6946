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
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill.benchmarks.common import TimingCase
from t2i_distill.models import FluxStudent, TrigFlowStudent
from t2i_distill.models.dual_forward import flux_forward_jvp, trigflow_forward_jvp
from t2i_distill.models.flux_patch import apply_kernels_to_flux
from t2i_distill.tiny import TINY_FLUX_CONFIG, TinyFluxShape, tiny_flux_inputs

__all__ = ["LITE_8B_WIDTH", "STEP_PAIRS", "StepConfig", "step_timing_cases"]

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


def _build(cfg: StepConfig, device: torch.device, dtype: torch.dtype):
    config = {**(TINY_FLUX_CONFIG if cfg.width == "tiny" else LITE_8B_WIDTH),
              "num_layers": cfg.double, "num_single_layers": cfg.single}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TrigFlowStudent(**config) if cfg.method == "scm" else FluxStudent(**config, dual_timestep=True)
    model = model.to(device=device)
    if dtype != torch.float32:  # diffusers logs a warning on every `.to(dtype)`, also a no-op one
        model = model.to(dtype=dtype)
    return model.eval()


def step_timing_cases(cfg: StepConfig, device: torch.device, dtype: torch.dtype,
                      providers: tuple[str, ...] = ("reference", "patched", "dual")) -> list[TimingCase]:
    """The timed passes of one student step for each provider (see the module docstring)."""
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
