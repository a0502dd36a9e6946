"""Know before you rent: one training step's GPU memory and FLOPs, measured on fake tensors on any machine.

:mod:`.ledger` counts bytes and FLOPs op by op; :mod:`.fake_gpu` makes fake tensors behave like a CUDA run;
:mod:`.step` runs the trainer's step on them; :mod:`.plan` applies a backend's sharding and estimates step time;
:mod:`.fit` searches for the fastest setting that fits; :mod:`.cli` is ``t2i-distill plan``.
"""

from t2i_distill.planning.plan import PlanSetting, load_config, plan
from t2i_distill.planning.step import StepSetting, run_step

__all__ = ["PlanSetting", "StepSetting", "load_config", "plan", "run_step"]
