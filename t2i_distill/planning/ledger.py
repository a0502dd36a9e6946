"""Byte and FLOP accounting of one training step, op by op, as a ``TorchDispatchMode``.

Why our own mode and not ``torch.distributed._tools.mem_tracker.MemTracker``: MemTracker hooks every module's inputs
and outputs and asks each for its storage, and inside ``torch.func.jvp`` those are functorch ``TensorWrapper``s,
which have none ("Cannot access storage of TensorWrapper"), so the ``func`` and ``reference`` modes cannot be
tracked by it. At the dispatch level below functorch every op sees plain (fake) tensors, whatever transform is
running above, so this mode counts the same bytes in every ``--jvp`` mode. It follows MemTracker's method: every
storage an op returns is registered once, by identity, with a weakref whose callback subtracts its bytes when the
storage dies; the running total's peak is recorded with its breakdown by category and the phase it happened in.

Categories: a storage is labelled when it is first seen (``parameters``, ``teacher`` and ``buffers`` before the step;
``activations`` in forward phases; ``temporaries`` in the backward; ``optimizer`` in the optimizer step: its states and
the step's own temporaries, e.g. the multi-tensor AdamW's full-size ``sqrt(v)``) and moved to
``gradients`` when autograd accumulates it into a ``.grad`` (a post-accumulate-grad hook, as MemTracker does).
CUDA's caching allocator rounds every block up to 512 bytes; that rounding is applied, as MemTracker does, when the
ledger accounts for CUDA (``cuda=True``). Fragmentation and the allocator's cached-but-free blocks are not
modelled: the figures are ``torch.cuda.max_memory_allocated``'s, not ``max_memory_reserved``'s.

FLOPs come from ``torch.utils.flop_counter``'s registry (what ``FlopCounterMode`` counts: matmuls, convolutions and
SDPA) plus formulas for this project's Triton custom ops (:data:`KERNEL_FLOPS`), per phase.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry

from t2i_distill.planning.fake_gpu import CUDA_FP32_OPS

__all__ = ["CATEGORIES", "KERNEL_FLOPS", "MemoryLedger", "PhaseRecord"]

CATEGORIES = ("parameters", "teacher", "buffers", "gradients", "optimizer", "activations", "temporaries")
_CUDA_BLOCK = 512  # the caching allocator's minimum block (MemTracker's _PYTORCH_MIN_ALLOCATE)


def _attention_flops(q: torch.Tensor, k: torch.Tensor, passes: float) -> int:
    """``passes`` × the two (B·H·Lq·Lk·D) GEMMs of attention, 2 FLOPs per multiply-add."""
    b, h, lq, d = q.shape
    return int(passes * 4 * b * h * lq * k.shape[2] * d)


#: FLOPs of the Triton custom ops (``torch.ops.t2i_kernels.*``) that dominate: the attention launches, in units of
#: one forward (QKᵀ and PV: 2 GEMMs of B·H·Lq·Lk·D). The fused JVP forward runs 6 GEMMs per tile (primal 2, tangent
#: 4), the tangent-only pass 5 (O is read, not recomputed), the backward 5 (P recomputed, dV, dP, dQ, dK); see
#: ``t2i_kernels/attention.py``. Normalisation, RoPE, GELU and gating kernels are elementwise and counted as 0, as
#: FlopCounterMode counts elementwise ops.
KERNEL_FLOPS = {
    "attention_fwd": lambda q, k, *rest, **kw: _attention_flops(q, k, 1.0),
    "attention_fwd_jvp": lambda q, k, *rest, **kw: _attention_flops(q, k, 3.0),
    "attention_tangent": lambda q, k, *rest, **kw: _attention_flops(q, k, 2.5),
    "attention_bwd": lambda grad_o, q, k, *rest, **kw: _attention_flops(q, k, 2.5),
}
#: PyTorch's CPU flash SDPA, which fake CPU tensors take where a GPU takes its flash/cuDNN kernel (those are in
#: FlopCounterMode's registry; these two are not).
ATEN_FLOPS = {
    "_scaled_dot_product_flash_attention_for_cpu": lambda q, k, *rest, **kw: _attention_flops(q, k, 1.0),
    "_scaled_dot_product_flash_attention_for_cpu_backward": lambda grad_o, q, k, *rest, **kw:
        _attention_flops(q, k, 2.5),
}


@dataclass
class PhaseRecord:
    """One phase of the step: its own peak (bytes, with the breakdown at that moment) and its FLOPs."""

    name: str
    peak_bytes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    flops: int = 0
    end_bytes: int = 0
    largest_allocation: int = 0  # the biggest single storage created in the phase (e.g. an attention score matrix)
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated over the phase, on a real GPU run


class _Storage:
    __slots__ = ("bytes", "category")

    def __init__(self, nbytes: int, category: str):
        self.bytes, self.category = nbytes, category


class MemoryLedger(TorchDispatchMode):
    """Live bytes by category, their peak (with the phase it occurred in) and FLOPs by phase.

    Use::

        ledger = MemoryLedger()
        ledger.register(student.parameters(), "parameters")
        with ledger:
            with ledger.phase("teacher"):
                ...
        ledger.peak_bytes, ledger.peak_phase, ledger.peak_breakdown, ledger.phases
    """

    def __init__(self, cuda: bool = False):
        """``cuda``: account as the CUDA caching allocator does (512-byte blocks) and emulate CUDA autocast's fp32
        ops while CPU autocast is on (:mod:`t2i_distill.planning.fake_gpu`)."""
        super().__init__()
        self.cuda = cuda
        self._live: dict[int, tuple[weakref.ref, _Storage]] = {}
        self.current: dict[str, int] = defaultdict(int)
        self.peak_bytes = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_phase = ""
        self.phases: dict[str, PhaseRecord] = {}
        self._phase = "setup"
        self._hooks = []
        self.measure_cuda = False  # a real CUDA run: also record the allocator's own peak per phase

    # -- registration ----------------------------------------------------------------------------------------------
    def _storage_bytes(self, tensor: torch.Tensor) -> tuple[object, int] | None:
        if not isinstance(tensor, torch.Tensor) or (tensor.device.type == "meta" and not _is_fake(tensor)):
            return None
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if self.cuda:
            nbytes = math.ceil(nbytes / _CUDA_BLOCK) * _CUDA_BLOCK
        return storage, nbytes

    def track(self, tensor: torch.Tensor, category: str, relabel: bool = True) -> None:
        if hasattr(tensor, "to_local"):  # a DTensor: this rank's shard is what it allocates
            tensor = tensor.to_local()
        """Count ``tensor``'s storage under ``category``; one counted already is moved to ``category`` when
        ``relabel`` (a view an op returns, e.g. a weight's transpose, keeps its storage's category)."""
        found = self._storage_bytes(tensor)
        if found is None:
            return
        storage, nbytes = found
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is storage:
            record = entry[1]
            if relabel and record.category != category:
                self.current[record.category] -= record.bytes
                self.current[category] += record.bytes
                record.category = category
            return
        record = _Storage(nbytes, category)

        def release(_ref, key=key, record=record):
            self.current[record.category] -= record.bytes
            live = self._live.get(key)
            if live is not None and live[1] is record:
                del self._live[key]

        self._live[key] = (weakref.ref(storage, release), record)
        self.current[category] += nbytes
        phase = self.phases.get(self._phase)
        if phase is not None and nbytes > phase.largest_allocation:
            phase.largest_allocation = nbytes
        self._update_peak()

    def register(self, tensors, category: str) -> None:
        for tensor in tensors:
            self.track(tensor, category)

    def watch_gradients(self, parameters) -> None:
        """Label each parameter's ``.grad`` as ``gradients`` when autograd accumulates into it (FSDP2 assigns its
        reduce-scattered shard to ``.grad`` itself: :meth:`label_gradients` after the backward catches those)."""
        for param in parameters:
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(
                    lambda p: self.track(p.grad, "gradients")))

    def label_gradients(self, parameters) -> None:
        for param in parameters:
            if param.grad is not None:
                self.track(param.grad, "gradients")

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # -- phases ----------------------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        record = self.phases.setdefault(name, PhaseRecord(name))
        self._phase_peak(record)
        if self.measure_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            yield record
        finally:
            record.end_bytes = self.total
            if self.measure_cuda:
                torch.cuda.synchronize()
                record.cuda_peak_bytes = max(record.cuda_peak_bytes or 0, torch.cuda.max_memory_allocated())
            self._phase = previous

    @property
    def total(self) -> int:
        return sum(self.current.values())

    def _category_now(self) -> str:
        if self._phase == "backward":
            return "temporaries"
        if self._phase == "optimizer":
            return "optimizer"
        return "activations"

    def _phase_peak(self, record: PhaseRecord) -> None:
        total = self.total
        if total > record.peak_bytes:
            record.peak_bytes = total
            record.peak_breakdown = {k: v for k, v in self.current.items() if v}

    def _update_peak(self) -> None:
        total = self.total
        record = self.phases.get(self._phase)
        if record is not None:
            self._phase_peak(record)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_phase = total, self._phase
            self.peak_breakdown = {k: v for k, v in self.current.items() if v}

    # -- resizes (FSDP2 frees and re-allocates its unsharded parameters with storage.resize_) --------------------
    def __enter__(self):
        # ``UntypedStorage.resize_`` does not pass through the dispatcher; MemTracker patches it the same way.
        self._original_resize = torch.UntypedStorage.resize_
        ledger, original = self, self._original_resize

        def resize_(storage, size):
            result = original(storage, size)
            ledger._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def _resized(self, storage) -> None:
        entry = self._live.get(id(storage))
        if entry is None or entry[0]() is not storage:
            return
        record = entry[1]
        nbytes = storage.nbytes()
        if self.cuda and nbytes:
            nbytes = math.ceil(nbytes / _CUDA_BLOCK) * _CUDA_BLOCK
        self.current[record.category] += nbytes - record.bytes
        record.bytes = nbytes
        self._update_peak()

    # -- dispatch --------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):  # let DTensor (FSDP2's parameters) run its local ops through this mode
            return NotImplemented
        kwargs = kwargs or {}
        if self.cuda and func._overloadpacket.__name__ in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map_only(torch.Tensor, self._to_fp32, (args, kwargs))
        out = func(*args, **kwargs)
        self._count_flops(func, args, kwargs, out)
        category = self._category_now()
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor, category, relabel=False)
        return out

    def _to_fp32(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype not in (torch.bfloat16, torch.float16):
            return tensor
        cast = tensor.to(torch.float32)  # the cast CUDA autocast makes: a real allocation
        self.track(cast, self._category_now())
        return cast

    def _count_flops(self, func, args, kwargs, out) -> None:
        packet = func._overloadpacket
        flops = 0
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        else:
            rule = (KERNEL_FLOPS if func.namespace == "t2i_kernels" else ATEN_FLOPS).get(packet.__name__)
            if rule is not None:
                flops = rule(*args, **kwargs)
        if flops:
            record = self.phases.setdefault(self._phase, PhaseRecord(self._phase))
            record.flops += int(flops)


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)
