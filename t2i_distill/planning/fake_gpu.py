"""A GPU made of fake tensors: models and batches with shapes and dtypes but no memory, on any machine.

Why fake *CPU* tensors that emulate CUDA, not fake CUDA tensors: ``FakeTensorMode`` can create tensors on ``cuda:0``
where torch has no CUDA, but indexing them (``x[:, None]``, ``x[..., 1] = y``) takes a CUDA device guard in C++, which
a CPU-only torch does not have, and FLUX's code indexes everywhere. So the step runs on fake CPU tensors, and what a
CUDA run does differently is reproduced where it changes bytes or FLOPs:

* Autocast. The trainer's ``torch.autocast(bf16)`` on CUDA casts matmuls, linears, convolutions and SDPA to bf16 (as
  CPU autocast does) and runs a list of ops in fp32 (``layer_norm``, ``softmax``, ``pow``, ``exp``, ``sum``...: CUDA's
  "ops that autocast to float32"), which CPU autocast does not. :func:`emulate_cuda` runs CPU autocast for the first
  part and the ledger (:class:`~t2i_distill.planning.ledger.MemoryLedger` with ``cuda_autocast=True``) casts the
  inputs of :data:`CUDA_FP32_OPS` to fp32 while autocast is on, for the second. The loss's CUDA-only autocast
  contexts (the teacher's and the JVP's, for bf16 weights) are switched on as on CUDA.
* Attention. The kernel-patched student's grad forward takes SDPA on CUDA (``training_attention="auto"``); on fake
  CPU tensors SDPA runs PyTorch's CPU flash kernel, whose saved tensors (output + logsumexp) are those of the CUDA
  flash/cuDNN kernels.
* The kernels' refusal of bf16 under the Triton interpreter (its numerics are wrong there) is lifted: nothing runs.
* The caching allocator rounds every block up to 512 bytes (the ledger applies it).

Fragmentation and the allocator's cached-but-free blocks are not modelled (figures are ``max_memory_allocated``'s).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = ["CUDA_FP32_OPS", "emulate_cuda", "fake_tensors", "materialise"]

#: CUDA autocast's "ops that autocast to float32" as they reach the dispatcher's Python key (after decomposition:
#: ``layer_norm`` arrives as ``native_layer_norm``, ``softmax`` as ``_softmax``).
CUDA_FP32_OPS = frozenset({
    "native_layer_norm", "native_group_norm", "_softmax", "_log_softmax", "pow", "exp", "expm1", "log", "log10",
    "log2", "log1p", "reciprocal", "rsqrt", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "sum",
    "prod", "cumsum", "cumprod", "norm", "linalg_vector_norm", "mse_loss", "smooth_l1_loss", "l1_loss", "nll_loss",
    "kl_div", "dist", "cdist", "renorm",
})


@contextmanager
def fake_tensors():
    """``FakeTensorMode``: every tensor created inside is a fake CPU tensor (shape, dtype, no data)."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        yield torch.device("cpu")


def _cuda_like_autocast(device: torch.device, dtype: torch.dtype):
    """``losses.common._autocast`` as on CUDA: bf16/fp16 weights run their JVP and teacher passes under autocast."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cpu", dtype=dtype)
    return nullcontext()


@contextmanager
def emulate_cuda(student: torch.nn.Module | None = None):
    """The CUDA code paths of the loss and the patched student, on fake CPU tensors (see the module docstring)."""
    from t2i_distill.losses import common
    from t2i_kernels import attention_launch

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(common, "_autocast", _cuda_like_autocast))
        # The interpreter's bf16 refusal guards CPU *numerics*; fake tensors compute nothing.
        stack.enter_context(mock.patch.object(attention_launch, "is_interpreted", lambda kernel: False))
        if student is not None:
            for processor in student.attn_processors.values():
                if getattr(processor, "training_attention", None) == "auto":
                    processor.training_attention = "sdpa"
        yield


def _fake_like(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype,
                       device=device)


def materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Replace ``module``'s (meta) parameters and buffers in place by fake tensors on ``device`` (floating ones cast to
    ``dtype`` when given); call inside :func:`fake_tensors`. Returns ``module``."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(_fake_like(param, device, dtype),
                                                           requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = _fake_like(buffer, device, dtype)
    return module
