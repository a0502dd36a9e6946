"""Optimizer and learning-rate scheduler factories for :func:`t2i_distill.training.build_engine`.

The reference trains with ``torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)`` and a constant
learning rate (reference-spec Appendix A); Prodigy (``prodigyopt``) is offered when it is installed. Schedulers are
diffusers' (``diffusers.optimization.get_scheduler``), stepped once per optimizer update by the engine.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "optimizer_factory", "lr_scheduler_factory"]

OPTIMIZERS = ("adamw", "prodigy")


def optimizer_factory(name: str = "adamw", *, lr: float = 1e-6, betas: tuple[float, float] = (0.9, 0.999),
                      eps: float = 1e-8, weight_decay: float = 1e-4,
                      **kwargs: Any) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """A ``params -> optimizer`` callable: ``"adamw"`` (torch, needs no compiled op, so DeepSpeed uses it as its
    client optimizer on CPUs and GPUs alike) or ``"prodigy"`` (``prodigyopt.Prodigy``; ``ImportError`` naming the
    package when missing). ``kwargs`` go to the optimizer."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: expected a float > 0, got {lr!r}")
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise ImportError("optimizer 'prodigy' needs the `prodigyopt` package: pip install prodigyopt") from error

        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return Prodigy(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
    else:
        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
    return make


def lr_scheduler_factory(name: str = "constant", *, warmup_steps: int = 0, total_steps: int | None = None,
                         **kwargs: Any) -> Callable[[torch.optim.Optimizer], Any]:
    """An ``optimizer -> scheduler`` callable over ``diffusers.optimization.get_scheduler`` (names as diffusers':
    constant, constant_with_warmup, linear, cosine, ...). Steps count optimizer updates, not micro-steps."""
    from diffusers.optimization import SchedulerType, get_scheduler

    names = [kind.value for kind in SchedulerType]
    if name not in names:
        raise ValueError(f"lr_scheduler: expected one of {names}, got {name!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
    if name not in ("constant", "constant_with_warmup") and total_steps is None:
        raise ValueError(f"total_steps: lr_scheduler {name!r} needs the total number of optimizer updates, got None")

    def make(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=total_steps, **kwargs)
    return make
