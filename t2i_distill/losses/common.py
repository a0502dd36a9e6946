"""What the sCM and MeanFlow losses share: batch checks, model unwrapping, the JVP-mode contexts, phase hooks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill.conditioning import latent_image_ids, text_ids
from t2i_distill.losses.config import check_jvp_mode

__all__ = ["LossBatch", "PhaseTimer", "check_mode_and_patch", "grad_context", "jvp_context", "no_grad_attention",
           "no_phases", "prepare_batch", "teacher_autocast", "unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / DeepSpeed / FSDP-style wrapper (their ``.module``), or the model itself."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _param(model: torch.nn.Module) -> torch.Tensor:
    try:
        return next(model.parameters())
    except StopIteration:
        raise ValueError(f"`{type(model).__name__}` has no parameters; expected a FLUX model") from None


@dataclass
class LossBatch:
    """A validated batch in the student's dtype and device, with FLUX position ids.

    ``latents`` (B, C, h, w), ``prompt_embeds`` (B, T, joint dim), ``pooled`` (B, pooled dim), ``img_ids``
    (h/2·w/2, 3) and ``txt_ids`` (T, 3) (the reference builds both in the weight dtype).
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.latents.dtype

    @property
    def device(self) -> torch.device:
        return self.latents.device

    @property
    def size(self) -> int:
        return self.latents.shape[0]


def prepare_batch(batch: object, student: torch.nn.Module) -> LossBatch:
    """Check ``batch`` against the (unwrapped) student's config and cast it to the student's dtype and device."""
    if not isinstance(batch, dict):
        raise TypeError(f"`batch`: expected a dict with latents, prompt_embeds, pooled_prompt_embeds; "
                        f"got {type(batch).__name__}")
    missing = [k for k in ("latents", "prompt_embeds", "pooled_prompt_embeds") if k not in batch]
    if missing:
        raise ValueError(f"`batch`: missing {missing}; got keys {sorted(batch)}")
    latents, embeds, pooled = batch["latents"], batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    for name, value, ndim in (("latents", latents, 4), ("prompt_embeds", embeds, 3), ("pooled_prompt_embeds",
                                                                                        pooled, 2)):
        if not isinstance(value, torch.Tensor) or value.ndim != ndim or not value.is_floating_point():
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"`batch['{name}']`: expected a {ndim}-d floating tensor, got {got}")
    b, c, h, w = latents.shape
    if embeds.shape[0] != b or pooled.shape[0] != b:
        raise ValueError(f"`batch`: batch sizes differ: latents {b}, prompt_embeds {embeds.shape[0]}, "
                         f"pooled_prompt_embeds {pooled.shape[0]}")
    config = student.config
    if 4 * c != config.in_channels:
        raise ValueError(f"`batch['latents']`: {c} channels pack to {4 * c} per token, but the student takes "
                         f"in_channels={config.in_channels} (expected {config.in_channels // 4} latent channels)")
    if h % 2 or w % 2:
        raise ValueError(f"`batch['latents']`: height and width must be even (2×2 patches), got {h}×{w}")
    if embeds.shape[2] != config.joint_attention_dim:
        raise ValueError(f"`batch['prompt_embeds']`: expected last dim joint_attention_dim="
                         f"{config.joint_attention_dim}, got {embeds.shape[2]}")
    if pooled.shape[1] != config.pooled_projection_dim:
        raise ValueError(f"`batch['pooled_prompt_embeds']`: expected last dim pooled_projection_dim="
                         f"{config.pooled_projection_dim}, got {pooled.shape[1]}")
    param = _param(student)
    move = {"device": param.device, "dtype": param.dtype}
    return LossBatch(latents=latents.to(**move), prompt_embeds=embeds.to(**move), pooled=pooled.to(**move),
                     img_ids=latent_image_ids(h, w, **move), txt_ids=text_ids(embeds.shape[1], **move))


def check_mode_and_patch(jvp_mode: object, student: torch.nn.Module) -> str:
    """``func`` runs ``torch.func.jvp`` over the student's own forward, which needs the patched (forward-AD capable)
    attention; ``reference`` must run the unpatched model, as T2I-Distill. ``dual`` works on either."""
    from t2i_distill.models.flux_patch import is_patched

    mode = check_jvp_mode(jvp_mode)
    if mode == "fd":  # plain forwards: patched (the fastest attention) or not
        return mode
    patched = is_patched(student)
    if mode == "func" and not patched:
        raise ValueError("jvp_mode='func' differentiates the kernel-patched student: call "
                         "apply_kernels_to_flux(student) first (got an unpatched student)")
    if mode == "reference" and patched:
        raise ValueError("jvp_mode='reference' runs T2I-Distill's path on the unpatched student (math attention); "
                         "got a student patched by apply_kernels_to_flux (use 'func' or 'dual')")
    return mode


def _autocast(device: torch.device, dtype: torch.dtype):
    """The reference's ``torch.autocast("cuda", weight_dtype)``: active for half-precision weights on CUDA only."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@contextmanager
def jvp_context(mode: str, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Context of a ``torch.func.jvp`` pass: ``no_grad`` + autocast (CUDA, half weights), and for ``reference`` the
    math SDPA backend (the reference's vanilla matmul-softmax-matmul attention: the only one with forward AD)."""
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_autocast(device, dtype))
        if mode == "reference":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def grad_context(mode: str, student: torch.nn.Module):
    """Context of the student's passes outside the JVP: math attention in ``reference`` (its student runs the
    vanilla matmul-softmax-matmul processor in every pass), nothing otherwise.

    Exception: a student with gradient checkpointing recomputes its blocks during ``backward()``, which runs after
    the loss returns, outside any context the loss can set; a recompute with another SDPA backend than the forward
    is an error (``CheckpointError``), so then the grad forward keeps PyTorch's default backend too.
    """
    if mode != "reference" or getattr(unwrap(student), "gradient_checkpointing", False):
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def no_grad_attention(mode: str):
    """Attention of the student's ``no_grad`` passes (MeanFlow's CFG velocities): math in ``reference``."""
    return sdpa_kernel(SDPBackend.MATH) if mode == "reference" else nullcontext()


def teacher_autocast(device: torch.device, dtype: torch.dtype):
    return _autocast(device, dtype)


class _NoPhases:
    """The default phase hook: does nothing."""

    def __call__(self, name: str):
        return nullcontext()


no_phases = _NoPhases()


class PhaseTimer:
    """Phase hook that records wall time (ms) and, on CUDA, the peak memory allocated (GiB) of each named phase.

    ``with timer("teacher"): ...``. On CUDA it synchronises at both ends of a phase (so times are device times) and
    records ``max_memory_allocated`` during the phase minus the memory allocated when it began. On the CPU PyTorch
    keeps no allocator statistics, so the peak is None. Repeated names accumulate into lists.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.times_ms: dict[str, list[float]] = {}
        self.peak_gib: dict[str, list[float | None]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.times_ms.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
            peak = (torch.cuda.max_memory_allocated(self.device) - before) / 2**30 if cuda else None
            self.peak_gib.setdefault(name, []).append(peak)
