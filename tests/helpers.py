"""Input factories shared by the kernel tests: odd shapes, strided layouts, and the float64 truth."""

from __future__ import annotations

import torch

#: Layouts every elementwise kernel is tested on. "transposed" builds (…, N, D) as a transpose of (…, D, N);
#: "sliced" takes every other element of a wider tensor along the last dim (last stride 2).
LAYOUTS = ("contiguous", "transposed", "sliced")


def make(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, layout: str = "contiguous",
         scale: float = 1.0) -> torch.Tensor:
    """A random normal tensor of ``shape`` laid out as ``layout`` (values do not depend on the layout)."""
    base = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    if layout == "contiguous":
        out = base
    elif layout == "transposed":
        out = base.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        wide[..., ::2] = base
        out = wide[..., ::2]
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout != "contiguous" and len(shape) > 1 and max(shape[-2:]) > 1:
        assert not out.is_contiguous()
    return out


def f64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Float64 copies (the truth is computed from the very values the low-precision run saw)."""
    return [None if t is None else t.detach().to(torch.float64) for t in tensors]


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Detached copies that require grad, keeping each tensor's strides."""
    return [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in tensors]


def rope_tables(n: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (N, D) as FLUX builds them: one random angle per pair, repeated for both members of the pair."""
    angles = torch.randn(n, d // 2, dtype=torch.float64) * 3
    return (angles.cos().repeat_interleave(2, dim=1).to(device=device, dtype=dtype),
            angles.sin().repeat_interleave(2, dim=1).to(device=device, dtype=dtype))


def assert_bf16_attention_parity(o, to, q, k, v, tq, tk, tv) -> float:
    """bf16 attention output and tangent at a FLUX shape: the tangent's relative L2 error against fp32 truth within
    the issue's bound, then the tolerance table against fp32 truth. Returns the relative error (tests print it)."""
    from t2i_kernels import reference as ref
    from t2i_kernels.testing import ATTENTION_BF16_TANGENT_REL_ERROR, assert_parity

    fp32_o, fp32_t = ref.attention_jvp(*(t.float() for t in (q, k, v, tq, tk, tv)))
    rel = ((to.float() - fp32_t).norm() / fp32_t.norm()).item()
    print(f"{tuple(q.shape)}: tangent rel err {rel:.2e} (bound {ATTENTION_BF16_TANGENT_REL_ERROR})")
    assert rel <= ATTENTION_BF16_TANGENT_REL_ERROR
    same_o, same_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    assert_parity("attention", "out", o, same_o, fp32_o.double())
    assert_parity("attention", "tangent", to, same_t, fp32_t.double())
    return rel
