"""One intra-op thread for the loss tests: their tensors are tiny, and on a shared 2-core machine PyTorch's thread
pool spinning against other processes made each tiny GEMM ~60 ms (measured) instead of well under 1 ms."""

from __future__ import annotations



