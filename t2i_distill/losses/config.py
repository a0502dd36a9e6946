"""Configuration of the sCM and MeanFlow losses: every constant of reference-spec Appendix A, validated.

Defaults are the reference's **command-line defaults** (``train_sCM.py`` / ``train_meanflow.py`` ``parse_args``); where
the reference's launch scripts pass other values, the field's comment names them. The flags that fix reference bugs
default to the fix and take the reference's behaviour as an explicit value, so an A/B run against the reference is one
flag away:

* sCM ``time_sampler_sigma``: ``"sigma_data"`` (fix of B9) or ``"reference"`` (the hard-coded 0.5);
* MeanFlow ``cfg_velocity_at``: ``"t"`` (MeanFlow paper, the guided velocity u(z_t, t, t)) or ``"r_t"`` (B1);
* MeanFlow ``tangent``: ``"teacher"`` (the JVP tangent is the teacher velocity, as the target) or ``"data"`` (B2).

``JVP_MODES`` are the three ways of computing the tangent (see :mod:`t2i_distill.losses`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

__all__ = ["JVP_MODES", "MeanFlowConfig", "SCMConfig", "check_jvp_mode"]

#: ``dual``: one explicit dual pass with grad; ``func``: ``torch.func.jvp`` over the kernel-patched student, then the
#: grad forward; ``reference``: ``torch.func.jvp`` with math attention (+ bf16 autocast on CUDA), as T2I-Distill;
#: ``fd``: a forward finite difference (f(x + ε·ẋ, t + ε·ṫ) − f(x, t)) / ε, rCM's "semi-continuous time" and
#: FastGen's ``use_jvp_finite_diff``: one extra no-grad forward, no forward AD at all (the baseline to beat).
JVP_MODES = ("dual", "func", "reference", "fd")

#: ε of ``fd``: near the float32 optimum (truncation O(ε), rounding O(1e-7/ε)); rCM uses Δt = 1e-4.
DEFAULT_FD_EPSILON = 1e-3


def check_jvp_mode(jvp_mode: object) -> str:
    if jvp_mode not in JVP_MODES:
        raise ValueError(f"`jvp_mode`: expected one of {JVP_MODES}, got {jvp_mode!r}")
    return jvp_mode  # type: ignore[return-value]


def _real(name: str, value: object, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be a finite real number (not a bool) within [low, high] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}`: expected a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"`{name}`: expected a value {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"`{name}`: expected a value {'<' if high_open else '<='} {high}, got {value!r}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}`: expected one of {choices}, got {value!r}")


def _scales(name: str, value: object) -> tuple[float, ...]:
    """A non-empty sequence of finite guidance values, returned as a tuple of floats."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"`{name}`: expected a non-empty sequence of guidance values, got {value!r}")
    values = tuple(value)  # type: ignore[arg-type]
    if not values:
        raise ValueError(f"`{name}`: expected a non-empty sequence of guidance values, got {value!r}")
    for v in values:
        _real(name, v)
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class SCMConfig:
    """sCM loss constants (reference-spec §2.2, Appendix A), at the reference's CLI defaults.

    Attributes:
        sigma_data: data std σ_d (``--sigma_data``); latents are multiplied by it, noise is σ_d·ε.
        logit_mean: P_mean of the log-normal σ sampler (``--logit_mean``; the launch script passes 0.2).
        logit_std: P_std (``--logit_std``; the script passes 1.6).
        scm_cfg_scale: guidance-embedding values, one drawn uniformly per sample (``--scm_cfg_scale``).
        tangent_warmup_steps: W of the tangent warmup r = min(1, step / W) (``--tangent_warmup_steps``); 0 = no
            warmup (r = 1 from the first step; the reference would divide by zero).
        tangent_norm_constant: c of the tangent normalisation g / (‖g‖ + c) (hard-coded 0.1 in the reference).
        scm_lambda: multiplier of the loss (``--scm_lambda``).
        time_sampler_sigma: the σ in t = arctan(σ / ·) of the time sampler: ``"sigma_data"`` (default, fix of B9)
            or ``"reference"`` (the reference's hard-coded 0.5). They differ only when ``sigma_data != 0.5``.
        fd_epsilon: ε of ``jvp_mode="fd"`` (``--fd_epsilon``).
    """

    sigma_data: float = 0.5
    logit_mean: float = 0.0
    logit_std: float = 1.0
    scm_cfg_scale: tuple[float, ...] = (4.0, 4.5, 5.0)
    tangent_warmup_steps: int = 4000
    tangent_norm_constant: float = 0.1
    scm_lambda: float = 1.0
    time_sampler_sigma: str = "sigma_data"
    fd_epsilon: float = DEFAULT_FD_EPSILON

    def __post_init__(self) -> None:
        _real("fd_epsilon", self.fd_epsilon, low=0.0, low_open=True)
        _real("sigma_data", self.sigma_data, low=0.0, low_open=True)
        _real("logit_mean", self.logit_mean)
        _real("logit_std", self.logit_std, low=0.0, low_open=True)
        object.__setattr__(self, "scm_cfg_scale", _scales("scm_cfg_scale", self.scm_cfg_scale))
        if isinstance(self.tangent_warmup_steps, bool) or not isinstance(self.tangent_warmup_steps, int) \
                or self.tangent_warmup_steps < 0:
            raise ValueError(f"`tangent_warmup_steps`: expected an int >= 0, got {self.tangent_warmup_steps!r}")
        _real("tangent_norm_constant", self.tangent_norm_constant, low=0.0, low_open=True)
        _real("scm_lambda", self.scm_lambda)
        _choice("time_sampler_sigma", self.time_sampler_sigma, ("sigma_data", "reference"))

    @property
    def sampler_sigma(self) -> float:
        """The divisor of the time sampler: σ_d, or the reference's 0.5."""
        return self.sigma_data if self.time_sampler_sigma == "sigma_data" else 0.5

    def tangent_warmup(self, step: int) -> float:
        """r = min(1, step / W) (1 when W = 0)."""
        if self.tangent_warmup_steps == 0:
            return 1.0
        return min(1, step / self.tangent_warmup_steps)


@dataclass(frozen=True)
class MeanFlowConfig:
    """MeanFlow loss constants (reference-spec §2.3, Appendix A), at the reference's CLI defaults.

    Attributes:
        path_type: interpolant, ``"linear"`` (α = 1 − t, σ = t) or ``"cosine"`` (α = cos πt/2, σ = sin πt/2).
        time_sampler: ``"logit_normal"`` (sigmoid of N(time_mu, time_sigma²)) or ``"uniform"`` for the (r, t) pair.
        time_mu, time_sigma: logit-normal parameters.
        ratio_r_not_equal_t: the fraction of samples whose r stays **different** from t: each sample gets r := t
            with probability 1 − ratio. The reference's default 0.75 therefore means 75 % r ≠ t and 25 % r = t;
            its code comment says the opposite (B3), and the MeanFlow paper's own default is 25 % r ≠ t.
        weighting: ``"adaptive"`` (w = 1 / (‖e‖² + adaptive_eps)^adaptive_p, detached) or ``"uniform"``.
        adaptive_p, adaptive_eps: power and constant of the adaptive weight (eps hard-coded 1e-3 in the reference).
        cfg_prob: prompt-dropout probability (``--cfg_prob``): dropped samples get the " " prompt's embeddings.
        cfg_scale: guidance-embedding values, one drawn uniformly per sample (``--cfg_scale``).
        use_cfg_meanflow: CFG-MeanFlow target ṽ = ω·v_T + κ·u_cond + (1 − ω − κ)·u_uncond on samples with
            t ∈ [cfg_min_t, cfg_max_t] and a kept prompt (``--use_cfg_meanflow``; the script passes True).
        cfg_omega, cfg_kappa: ω and κ (the script passes 1.0 and 0.5).
        cfg_min_t, cfg_max_t: the (inclusive) time window of CFG-MeanFlow.
        cfg_velocity_at: where u_cond / u_uncond are evaluated: ``"t"`` (default, the paper: the instantaneous
            velocity u(z_t, t, t), second time input 0) or ``"r_t"`` (the reference, B1: u(z_t, r, t), t − r).
        tangent: the JVP tangent of z on samples outside CFG: ``"teacher"`` (default: v_T, the velocity the target
            uses) or ``"data"`` (the reference, B2: ε − x0, resp. α'·x0 + σ'·ε). CFG samples always use ṽ.
    """

    path_type: str = "linear"
    time_sampler: str = "logit_normal"
    time_mu: float = -0.4
    time_sigma: float = 1.0
    ratio_r_not_equal_t: float = 0.75
    weighting: str = "adaptive"
    adaptive_p: float = 1.0
    adaptive_eps: float = 1e-3
    cfg_prob: float = 0.1
    cfg_scale: tuple[float, ...] = (4.0, 4.5, 5.0)
    use_cfg_meanflow: bool = False
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0
    cfg_min_t: float = 0.0
    cfg_max_t: float = 1.0
    cfg_velocity_at: str = "t"
    tangent: str = "teacher"
    fd_epsilon: float = DEFAULT_FD_EPSILON

    def __post_init__(self) -> None:
        _real("fd_epsilon", self.fd_epsilon, low=0.0, low_open=True)
        _choice("path_type", self.path_type, ("linear", "cosine"))
        _choice("time_sampler", self.time_sampler, ("logit_normal", "uniform"))
        _real("time_mu", self.time_mu)
        _real("time_sigma", self.time_sigma, low=0.0, low_open=True)
        _real("ratio_r_not_equal_t", self.ratio_r_not_equal_t, low=0.0, high=1.0)
        _choice("weighting", self.weighting, ("adaptive", "uniform"))
        _real("adaptive_p", self.adaptive_p)
        _real("adaptive_eps", self.adaptive_eps, low=0.0, low_open=True)
        _real("cfg_prob", self.cfg_prob, low=0.0, high=1.0)
        object.__setattr__(self, "cfg_scale", _scales("cfg_scale", self.cfg_scale))
        if not isinstance(self.use_cfg_meanflow, bool):
            raise ValueError(f"`use_cfg_meanflow`: expected a bool, got {self.use_cfg_meanflow!r}")
        _real("cfg_omega", self.cfg_omega)
        _real("cfg_kappa", self.cfg_kappa)
        _real("cfg_min_t", self.cfg_min_t, low=0.0, high=1.0)
        _real("cfg_max_t", self.cfg_max_t, low=0.0, high=1.0)
        if self.cfg_min_t > self.cfg_max_t:
            raise ValueError(f"`cfg_min_t` ({self.cfg_min_t}) must not exceed `cfg_max_t` ({self.cfg_max_t})")
        _choice("cfg_velocity_at", self.cfg_velocity_at, ("t", "r_t"))
        _choice("tangent", self.tangent, ("teacher", "data"))


def config_fields(config: SCMConfig | MeanFlowConfig) -> dict[str, object]:
    """The config as a plain dict (for logs and JSON)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
