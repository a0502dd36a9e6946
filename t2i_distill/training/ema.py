"""Exponential moving average of the student's trainable parameters, in fp32.

``shadow ← decay · shadow + (1 − decay) · θ`` after each optimizer update (:meth:`EMA.update`). The shadow is fp32
whatever the parameters' dtype, because at decay 0.999+ a bf16 accumulator would round most updates away.

Under ``fsdp2`` the parameters are DTensor shards: the shadow then holds this rank's *local* shard of each
parameter (save it with ``CheckpointManager.save(..., per_rank_extra={"ema": ema.state_dict()})``), and
:meth:`EMA.copy_to` writes the shard back, after which ``Engine.state_dict_for_export`` gathers the averaged model.
Under the other backends every rank holds the whole shadow.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["EMA"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class EMA:
    """fp32 EMA of ``model``'s trainable parameters (names as ``model.named_parameters()``), ``0 <= decay < 1``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a float in [0, 1), got {decay!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.decay = float(decay)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: _local(param).detach().to(torch.float32, copy=True) for name, param in _trainable(model).items()
            }
        if not self.shadow:
            raise ValueError("model: has no trainable parameters to average")

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = _trainable(model)
        if params.keys() != self.shadow.keys():
            missing, unexpected = sorted(self.shadow.keys() - params.keys()), sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"model: its trainable parameters differ from the EMA's: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current parameters (call after each optimizer update)."""
        for name, param in self._params(model).items():
            shadow = self.shadow[name]
            # lerp_(θ, w) = shadow + w (θ − shadow) = decay · shadow + (1 − decay) · θ with w = 1 − decay
            shadow.lerp_(_local(param).detach().to(device=shadow.device, dtype=torch.float32), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s trainable parameters with the shadow (cast to their dtype)."""
        for name, param in self._params(model).items():
            local = _local(param)
            local.copy_(self.shadow[name].to(device=local.device, dtype=local.dtype))

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Inside the block ``model`` holds the EMA weights (e.g. for validation); the trained ones come back after."""
        backup = {name: _local(param).detach().clone() for name, param in self._params(model).items()}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._params(model).items():
                    _local(param).copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "num_updates", "shadow": {name: fp32 CPU tensor}}`` (loadable with ``weights_only=True``)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; names and shapes must match (``ValueError`` listing them)."""
        if not isinstance(state, dict) or not {"decay", "num_updates", "shadow"} <= state.keys():
            raise ValueError(f"state: expected a dict with 'decay', 'num_updates' and 'shadow', got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise ValueError(f"state: shadow names differ: missing {sorted(self.shadow.keys() - shadow.keys())[:5]}, "
                             f"unexpected {sorted(shadow.keys() - self.shadow.keys())[:5]}")
        bad = [f"{name}: {tuple(shadow[name].shape)} vs {tuple(mine.shape)}" for name, mine in self.shadow.items()
               if shadow[name].shape != mine.shape]
        if bad:
            raise ValueError(f"state: shadow shapes differ (saved vs model): {bad[:5]}")
        for name, mine in self.shadow.items():
            mine.copy_(shadow[name].to(torch.float32))
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
