"""Input validation that explains itself: every problem of a call, gathered into one message.

Modelled on xformers' ``not_supported_reasons`` and diffusers' ``_check_*`` helpers: a launcher creates one
:class:`InputChecks`, records every problem it finds (argument name, what was expected, what was received), and calls
:meth:`InputChecks.raise_if_any`. Problems about *kinds* of value (not a tensor, an integer dtype) raise ``TypeError``;
all others (shape, rank, device, stride, an unsupported floating dtype) raise ``ValueError``. Checks are cheap Python
and always run, also on functorch-wrapped tensors (shape, stride, dtype and device are readable on those).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["FLOAT_DTYPES", "HALF_AND_FLOAT_DTYPES", "InputChecks", "describe"]

#: Floating dtypes an elementwise kernel accepts (fp64 lets tests compare against float64 truth exactly).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Floating dtypes a tensor-core kernel (``tl.dot``) accepts.
HALF_AND_FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return "{" + ", ".join(str(d).removeprefix("torch.") for d in dtypes) + "}"


def describe(value: object) -> str:
    """A one-line description of a received value: shape, stride, dtype, device for tensors."""
    if isinstance(value, torch.Tensor):
        return (
            f"Tensor(shape={tuple(value.shape)}, stride={tuple(value.stride())}, "
            f"dtype={str(value.dtype).removeprefix('torch.')}, device={value.device})"
        )
    return f"{type(value).__name__} {value!r}"


class InputChecks:
    """Collects the problems of one call to ``op`` and raises them together."""

    def __init__(self, op: str) -> None:
        self.op = op
        self._type_problems: list[str] = []
        self._value_problems: list[str] = []

    # -- recording ---------------------------------------------------------------------------------------------
    def type_problem(self, message: str) -> None:
        self._type_problems.append(message)

    def value_problem(self, message: str) -> None:
        self._value_problems.append(message)

    @property
    def ok(self) -> bool:
        return not (self._type_problems or self._value_problems)

    # -- individual checks (each returns True when the value passed, so callers can skip dependent checks) -----
    def tensor(
        self,
        name: str,
        value: object,
        *,
        ndim: int | None = None,
        layout: str = "",
        dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ) -> bool:
        """``value`` is a tensor of rank ``ndim`` with a dtype in ``dtypes``; ``layout`` names the dims."""
        where = f" {layout}" if layout else ""
        if not isinstance(value, torch.Tensor):
            self.type_problem(f"`{name}`: expected a torch.Tensor{where}, got {describe(value)}")
            return False
        passed = True
        if not (value.is_floating_point()):
            self.type_problem(
                f"`{name}`: expected a floating dtype in {_fmt_dtypes(dtypes)}, got {describe(value)}"
            )
            passed = False
        elif value.dtype not in dtypes:
            self.value_problem(f"`{name}`: expected dtype in {_fmt_dtypes(dtypes)}, got {describe(value)}")
            passed = False
        if ndim is not None and value.dim() != ndim:
            self.value_problem(
                f"`{name}`: expected a {ndim}-d tensor{where}, got {describe(value)}"
            )
            passed = False
        return passed

    def shape(self, name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> bool:
        """``value.shape == expected``; ``meaning`` says where the expectation comes from, e.g. "(B, D) of x"."""
        if tuple(value.shape) != tuple(expected):
            self.value_problem(f"`{name}`: expected shape {tuple(expected)} = {meaning}, got {describe(value)}")
            return False
        return True

    def same_dtype(self, named: dict[str, torch.Tensor | None], why: str = "one dtype per call") -> bool:
        present = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
        dtypes = {v.dtype for v in present.values()}
        if len(dtypes) > 1:
            listing = ", ".join(f"`{k}` {str(v.dtype).removeprefix('torch.')}" for k, v in present.items())
            first = next(iter(present))
            self.value_problem(
                f"expected every tensor to have the dtype of `{first}` "
                f"({str(present[first].dtype).removeprefix('torch.')}; {why}), got {listing}"
            )
            return False
        return True

    def same_device(self, named: dict[str, torch.Tensor | None]) -> bool:
        present = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
        devices = {v.device for v in present.values()}
        if len(devices) > 1:
            listing = ", ".join(f"`{k}` {v.device}" for k, v in present.items())
            first = next(iter(present))
            self.value_problem(
                f"expected every tensor on the device of `{first}` ({present[first].device}), got {listing}"
            )
            return False
        return True

    def unit_last_stride(self, name: str, value: torch.Tensor) -> bool:
        if value.dim() > 0 and value.shape[-1] > 1 and value.stride(-1) != 1:
            self.value_problem(
                f"`{name}`: expected stride 1 along the last dim (call `.contiguous()` first), got {describe(value)}"
            )
            return False
        return True

    # -- raising -----------------------------------------------------------------------------------------------
    def raise_if_any(self) -> None:
        problems = self._type_problems + self._value_problems
        if not problems:
            return
        error = TypeError if self._type_problems else ValueError
        if len(problems) == 1:
            raise error(f"{self.op}: {problems[0]}")
        listing = "\n".join(f"  - {p}" for p in problems)
        raise error(f"{self.op}: {len(problems)} problems with the inputs:\n{listing}")
