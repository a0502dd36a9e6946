"""One training-engine interface over four backends: ``single``, ``ddp``, ``fsdp2`` and ``deepspeed``.

The trainer writes one loop for all of them::

    engine = build_engine(EngineConfig(backend="ddp", ...), model=student, optimizer_factory=..., ...)
    for batch in loader:
        with engine.autocast():
            loss = loss_fn(engine.module, engine.cast_inputs(batch))
        engine.backward(loss)
        report = engine.step()          # None on non-final micro-steps
        if report is not None: log(report.grad_norm, report.lr)

What each backend does (and why):

* ``single``: one process, the plain module. ``ddp``: ``torch.nn.parallel.DistributedDataParallel``. Gradient
  sync is switched off on non-final micro-steps through DDP's own ``require_backward_grad_sync`` flag (what
  ``no_sync()`` toggles; DDP reads it in the *forward*, so it is set when a step ends, before the next forward).
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every block (a module whose class or a base class is named in
  ``EngineConfig.fsdp_block_classes``: the kernel-patched ``KernelFlux*Block`` subclass diffusers' blocks) and on the
  root; parameters are broadcast from rank 0 first, because, unlike DDP, ``fully_shard`` does not make ranks agree.
  Non-final micro-steps call ``set_requires_gradient_sync(False)``.
* ``deepspeed``: ``deepspeed.initialize`` with the JSON resolved by :func:`resolve_deepspeed_config` and a torch
  optimizer from ``optimizer_factory`` as DeepSpeed's client optimizer (no JIT-built op). This is the same call on a
  GPU and on the CPU (gloo) where CI runs it. DeepSpeed scales the loss for accumulation and counts micro-steps
  itself, so its ``step()`` is called on every micro-step (on non-final ones it only advances that counter).

Mixed precision ``"bf16"`` (weights stay fp32 masters wherever the backend allows):

* ``single`` / ``ddp``: fp32 parameters and gradients, ``torch.autocast(bf16)`` from :meth:`Engine.autocast`.
* ``fsdp2``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: fp32 sharded masters, bf16 all-gathered
  compute weights, fp32 gradient reduction; the policy casts floating inputs itself.
* ``deepspeed``: its ``bf16`` section: the module's weights are bf16, ZeRO keeps fp32 master partitions and
  optimizer state. Floating inputs must be bf16: use :meth:`Engine.cast_inputs`.

Gradient clipping (reference bug B5: ``--max_grad_norm`` was silently ignored under DeepSpeed) takes effect under
every backend: ``torch.nn.utils.clip_grad_norm_`` for ``single``/``ddp``/``fsdp2`` (on DTensor shards the norm is the
global one), and DeepSpeed's ``gradient_clipping`` set to ``max_grad_norm`` (an explicit different JSON value is an
error). :attr:`StepReport.grad_norm` is always the *pre-clip* global norm.

Environment: ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as set by ``torchrun`` (or ``accelerate launch``); the process
group is NCCL on GPUs and gloo with ``cpu=True``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from t2i_distill.training.deepspeed_config import resolve_deepspeed_config

__all__ = ["BACKENDS", "MIXED_PRECISIONS", "Engine", "EngineConfig", "StepReport", "build_engine"]

BACKENDS = ("single", "ddp", "fsdp2", "deepspeed")
MIXED_PRECISIONS = ("no", "bf16")
#: FLUX's double- and single-stream blocks: the units ``fsdp2`` shards (and all-gathers) one at a time.
FLUX_BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


@dataclass
class EngineConfig:
    """Settings of :func:`build_engine`; validated on construction (``ValueError``/``TypeError`` naming the field).

    ``max_grad_norm`` None or 0 means no clipping (the norm is still computed and reported). ``deepspeed_config``
    (path or dict) is required by, and only allowed with, ``backend="deepspeed"``; ``micro_batch_size`` is required
    with it (checked against the JSON's ``train_micro_batch_size_per_gpu``). ``seed`` (0 is a seed; None: unseeded)
    seeds python, numpy and torch with ``seed + rank`` so ranks draw different noise (the model is broadcast from
    rank 0, so its initialisation does not depend on it). ``cpu=True``: gloo and CPU tensors (tests, CI).
    """

    backend: str = "single"
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    deepspeed_config: str | os.PathLike | dict | None = None
    micro_batch_size: int | None = None
    seed: int | None = 0
    cpu: bool = False
    find_unused_parameters: bool = False
    fsdp_block_classes: tuple[str, ...] = FLUX_BLOCK_CLASSES
    fsdp_reshard_after_forward: bool = True
    process_group_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision: expected one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, minimum=1)
        if self.max_grad_norm is not None:
            if isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, (int, float)):
                raise TypeError(f"max_grad_norm: expected a float or None, got {type(self.max_grad_norm).__name__}")
            if not (self.max_grad_norm >= 0 and np.isfinite(self.max_grad_norm)):
                raise ValueError(f"max_grad_norm: expected a finite value >= 0 (0: no clipping), got "
                                 f"{self.max_grad_norm!r}")
            self.max_grad_norm = float(self.max_grad_norm) if self.max_grad_norm > 0 else None
        if self.micro_batch_size is not None:
            _check_int("micro_batch_size", self.micro_batch_size, minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if self.backend == "deepspeed":
            if self.deepspeed_config is None:
                raise ValueError("deepspeed_config: backend 'deepspeed' needs a DeepSpeed JSON (path or dict), "
                                 "got None")
            if self.micro_batch_size is None:
                raise ValueError("micro_batch_size: backend 'deepspeed' needs the trainer's micro-batch size (checked "
                                 "against the JSON's train_micro_batch_size_per_gpu), got None")
        elif self.deepspeed_config is not None:
            raise ValueError(f"deepspeed_config: only used with backend 'deepspeed', but backend is {self.backend!r} "
                             f"and deepspeed_config is {self.deepspeed_config!r}")
        if not isinstance(self.fsdp_block_classes, tuple):
            self.fsdp_block_classes = tuple(self.fsdp_block_classes)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


@dataclass(frozen=True)
class StepReport:
    """What one optimizer update did. ``grad_norm``: the global L2 norm of the gradients *before* clipping (float,
    NaN/inf when they were not finite); ``clipped``: whether clipping scaled them down; ``lr``: the learning rate the
    update used (first param group); ``skipped``: the update was skipped because the norm was not finite (torch
    backends; DeepSpeed applies its own policy); ``step``: optimizer updates completed so far, this one included."""

    grad_norm: float
    clipped: bool
    lr: float
    skipped: bool
    step: int


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    created_group: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_distributed(config: EngineConfig) -> DistributedEnv:
    """Read torchrun's env vars and make sure a process group exists for every backend but ``single``."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if config.backend == "single":
        if world_size != 1:
            raise ValueError(f"backend: 'single' runs one process, but WORLD_SIZE is {world_size}; use 'ddp', "
                             "'fsdp2' or 'deepspeed' for multi-process training")
        return DistributedEnv(rank, world_size, local_rank)
    if dist.is_initialized():
        return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank)
    timeout = datetime.timedelta(seconds=config.process_group_timeout_s)
    backend = "gloo" if config.cpu else "nccl"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # a lone process (python train.py): a one-member group on a free local port
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, created_group=True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Engine:
    """The training engine :func:`build_engine` returns (see the module docstring). Attributes: ``config``,
    ``rank``, ``world_size``, ``local_rank``, ``device``, ``is_main``, ``module`` (what the grad forward calls),
    ``unwrapped`` (the plain student ``nn.Module``), ``optimizer`` (the torch optimizer), ``lr_scheduler`` (or None),
    ``completed_steps`` (optimizer updates so far), ``micro_step`` (index within the current accumulation window)."""

    def __init__(self, config: EngineConfig, env: DistributedEnv, device: torch.device, module: nn.Module,
                 unwrapped: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any | None,
                 ds_engine: Any | None = None) -> None:
        self.config = config
        self._env = env
        self.device = device
        self.module = module
        self.unwrapped = unwrapped
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._ds_engine = ds_engine
        self.completed_steps = 0
        self.micro_step = 0
        self._set_gradient_sync()

    # -- identity --------------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def rank(self) -> int:
        return self._env.rank

    @property
    def world_size(self) -> int:
        return self._env.world_size

    @property
    def local_rank(self) -> int:
        return self._env.local_rank

    @property
    def is_main(self) -> bool:
        return self._env.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def sync_gradients(self) -> bool:
        """True on the micro-step whose :meth:`step` updates the weights (the last of each accumulation window)."""
        return self.micro_step == self.config.gradient_accumulation_steps - 1

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unwrapped.parameters() if p.requires_grad]

    # -- mixed precision -------------------------------------------------------------------------------------------
    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype floating inputs of the grad forward should have: bf16 under DeepSpeed's bf16 (its weights are
        bf16), fp32 otherwise (autocast or FSDP2's policy casts)."""
        if self.backend == "deepspeed" and self.config.mixed_precision == "bf16":
            return torch.bfloat16
        return torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast(bf16)`` for ``single``/``ddp`` with ``mixed_precision="bf16"``, else a no-op context
        (FSDP2's policy and DeepSpeed's bf16 weights already compute in bf16)."""
        if self.config.mixed_precision == "bf16" and self.backend in ("single", "ddp"):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def cast_inputs(self, tree: Any) -> Any:
        """``tree`` (tensors in nested dict/list/tuple) moved to :attr:`device`, floating tensors cast to
        :attr:`input_dtype`; everything else unchanged."""
        if isinstance(tree, torch.Tensor):
            dtype = self.input_dtype if tree.is_floating_point() else tree.dtype
            return tree.to(device=self.device, dtype=dtype)
        if isinstance(tree, dict):
            return {key: self.cast_inputs(value) for key, value in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.cast_inputs(value) for value in tree)
        return tree

    # -- the step --------------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (a scalar) for this micro-step, scaled by 1/gradient_accumulation_steps so the
        accumulated gradient is the mean over micro-steps. Gradients are only all-reduced on the final micro-step."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss: expected a scalar tensor, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if self._ds_engine is not None:
            self._ds_engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps itself
        else:
            (loss / self.config.gradient_accumulation_steps).backward()

    def step(self) -> StepReport | None:
        """End a micro-step. On the final micro-step of the window: global pre-clip grad norm, clipping to
        ``max_grad_norm``, ``optimizer.step()``, ``lr_scheduler.step()``, ``zero_grad``; returns a
        :class:`StepReport`. On other micro-steps: returns None and touches no weights."""
        final = self.sync_gradients
        if self._ds_engine is not None:
            report = self._deepspeed_step(final)
        else:
            report = self._torch_step() if final else None
        self.micro_step = (self.micro_step + 1) % self.config.gradient_accumulation_steps
        self._set_gradient_sync()
        return report

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _torch_step(self) -> StepReport:
        max_norm = self.config.max_grad_norm
        params = self.trainable_parameters
        # inf as the threshold computes the same global norm and scales nothing, so every path reports a norm.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: the total norm is a replicated DTensor
            norm = norm.full_tensor()
        grad_norm = float(norm)
        lr = self._current_lr()
        finite = bool(np.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.completed_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        clipped = finite and max_norm is not None and grad_norm > max_norm
        return StepReport(grad_norm=grad_norm, clipped=clipped, lr=lr, skipped=not finite, step=self.completed_steps)

    def _deepspeed_step(self, final: bool) -> StepReport | None:
        lr = self._current_lr()
        if bool(self._ds_engine.is_gradient_accumulation_boundary()) != final:
            raise RuntimeError(
                f"DeepSpeed's micro-step counter disagrees with the engine's (engine micro_step {self.micro_step} of "
                f"{self.config.gradient_accumulation_steps}); call engine.backward and engine.step once per micro-step"
            )
        self._ds_engine.step()  # on non-final micro-steps this only advances DeepSpeed's own counter
        if not final:
            return None
        norm = self._ds_engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.completed_steps += 1
        max_norm = self.config.max_grad_norm
        clipped = max_norm is not None and bool(np.isfinite(grad_norm)) and grad_norm > max_norm
        return StepReport(grad_norm=grad_norm, clipped=clipped, lr=lr, skipped=False, step=self.completed_steps)

    def _set_gradient_sync(self) -> None:
        sync = self.sync_gradients
        if self.backend == "ddp":
            self.module.require_backward_grad_sync = sync
        elif self.backend == "fsdp2":
            self.module.set_requires_gradient_sync(sync)

    # -- collectives -----------------------------------------------------------------------------------------------
    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (a new tensor; ``tensor`` is unchanged)."""
        out = tensor.detach().clone()
        if self.distributed and self.world_size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            out /= self.world_size
        return out

    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (picklable objects)."""
        if not (self.distributed and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_ranks_ok(self, ok: bool) -> bool:
        """True when ``ok`` is True on every rank (a collective)."""
        if not (self.distributed and self.world_size > 1):
            return ok
        # on the engine's device: NCCL only reduces CUDA tensors
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) == 0

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """The full student state dict (name → detached CPU tensor, the module's dtype) on the main rank and ``{}``
        on the others. A collective under ``fsdp2`` (shards are gathered): call it on every rank."""
        if self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.unwrapped,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.unwrapped.state_dict().items()}

    def checkpoint_bytes_estimate(self, optimizer_states_per_param: int = 2) -> int:
        """A size estimate of one checkpoint (for ``check_writable``'s ``min_free_bytes``): every parameter in fp32
        for the model plus ``optimizer_states_per_param`` fp32 tensors per trainable parameter (AdamW: 2)."""
        numel = sum(_local_numel(p) for p in self.unwrapped.parameters()) * max(self.world_size, 1)
        trainable = sum(_local_numel(p) for p in self.trainable_parameters) * max(self.world_size, 1)
        if self.backend in ("single", "ddp", "deepspeed"):  # replicated parameters: no per-rank sum
            numel //= max(self.world_size, 1)
            trainable //= max(self.world_size, 1)
        return 4 * (numel + optimizer_states_per_param * trainable)

    def close(self) -> None:
        """Destroy the process group if this engine created it."""
        if self._env.created_group and dist.is_initialized():
            dist.destroy_process_group()
            self._env.created_group = False


def _local_numel(param: torch.Tensor) -> int:
    return (param.to_local() if hasattr(param, "to_local") else param).numel()


def _is_block(module: nn.Module, class_names: tuple[str, ...]) -> bool:
    """By class name, the class's or a base's: a subclass (the kernel-patched blocks) is still that block, and
    without its own unit FSDP2 would all-gather the whole model for every pass."""
    return any(cls.__name__ in class_names for cls in type(module).__mro__)


def _shard_fsdp2(model: nn.Module, config: EngineConfig) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if config.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    with torch.no_grad():  # fully_shard keeps each rank's values: make them rank 0's first
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    blocks = [m for m in model.modules() if _is_block(m, config.fsdp_block_classes)]
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=config.fsdp_reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=config.fsdp_reshard_after_forward)


def _init_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, config: EngineConfig, world_size: int):
    import deepspeed

    if config.cpu:
        # DeepSpeed's CPU accelerator otherwise JIT-compiles a shared-memory all-reduce op (~2 min on first use);
        # this makes it fall back to the gloo group, its path where the op is unavailable. GPUs never build it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_config = resolve_deepspeed_config(
        config.deepspeed_config, micro_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, max_grad_norm=config.max_grad_norm,
        mixed_precision=config.mixed_precision, world_size=world_size)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                              dist_init_required=False)
    return ds_engine


def build_engine(
    config: EngineConfig,
    *,
    model: nn.Module,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Engine:
    """Initialise the process group (torchrun env vars), seed, move/wrap ``model`` for ``config.backend``, and build
    the optimizer (``optimizer_factory(trainable_params)``, a torch optimizer) and the scheduler
    (``lr_scheduler_factory(optimizer)``, stepped once per optimizer update). ``model`` must hold fp32 weights (the
    masters); under ``fsdp2`` it is sharded in place. See :class:`Engine`."""
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config: expected an EngineConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(optimizer_factory):
        raise TypeError(f"optimizer_factory: expected a callable params -> optimizer, got {optimizer_factory!r}")
    bad_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if bad_dtypes:
        raise ValueError(f"model: trainable parameters must be fp32 (the master weights; mixed_precision='bf16' "
                         f"computes in bf16), got {', '.join(bad_dtypes)}")
    env = _init_distributed(config)
    if config.cpu:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ValueError("cpu: False needs a CUDA device, and none is available; pass cpu=True to train on CPU")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if config.seed is not None:
        seed_everything(config.seed + env.rank)

    model = model.to(device)
    ds_engine = None
    if config.backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        module: nn.Module = DistributedDataParallel(
            model, device_ids=None if config.cpu else [env.local_rank],
            find_unused_parameters=config.find_unused_parameters)
    elif config.backend == "fsdp2":
        _shard_fsdp2(model, config)
        module = model
    else:
        module = model
    optimizer = optimizer_factory(_trainable(model.parameters()))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer_factory: must return a torch.optim.Optimizer, returned {type(optimizer).__name__}")
    if config.backend == "deepspeed":
        ds_engine = _init_deepspeed(model, optimizer, config, env.world_size)
        module, model = ds_engine, ds_engine.module
    lr_scheduler = lr_scheduler_factory(optimizer) if lr_scheduler_factory is not None else None
    return Engine(config, env, device, module, model, optimizer, lr_scheduler, ds_engine)


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("model: has no trainable parameters (requires_grad=True); nothing to optimise")
    return trainable
