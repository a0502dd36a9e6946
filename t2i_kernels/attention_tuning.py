"""Autotune candidates and their prune for the attention kernels of :mod:`t2i_kernels.attention` (GPU launches only).

Rules, per kernel (``fwd``, ``dkdv``, ``dq``) and forward mode (primal, fused primal + tangent, tangent from the
saved LSE and O):

* a mode's own candidate list (:data:`_CANDIDATES`): the configs the sm_90 compile report
  (``bench/compile_report.py``) measured spill-free at FLUX shapes, head dims 64 and 128, triton 3.6 and 3.9;
* operand buffers within the GPU's shared memory per block (:func:`shared_memory_estimate`; Hopper's limit when
  there is no GPU, which is how the compile report sizes launches);
* ≥ 64 rows in the matmuls' M dimension (:func:`_wgmma_rows`), below which Triton emits mma.sync instead of wgmma;
* no tile longer than the sequence (a short sequence keeps the smallest fitting candidate).

So no kept candidate is dead: each one compiles, fits and runs wgmma, and CI checks it.
"""

from __future__ import annotations

import torch

from t2i_kernels._runtime import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages). A short list, not a grid: every candidate costs a compile per kernel
# mode on first use, and a lent GPU's minutes are few. The prune below keeps, per kernel and mode, only candidates
# that can run well on Hopper: operand buffers within the shared-memory limit, and ≥ 64 rows in every matmul's M
# dimension (wgmma's minimum; with fewer, Triton falls back to mma.sync). `bench/compile_report.py` compiles every kept
# candidate for sm_90 at FLUX shapes and fails CI on a spill, a shared-memory overflow or an mma.sync.
#
# Per kernel and mode, the candidates the sm_90 compile report measured spill-free at head dims 64 and 128 (triton
# 3.6 and 3.9). Why so few for the tangent modes: two fp32 (rows × D) accumulators plus the S/tS/P tiles leave
# little of the 255 registers per thread; only BLOCK_N = 32 with 8 warps (address registers shared by 256 threads)
# stays spill-free at D = 128 with both accumulators.
_CANDIDATES = {
    "primal": ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 32, 4, 3)),
    "fused": ((128, 32, 8, 3), (128, 32, 8, 2)),  # primal + tangent: acc_o and acc_t
    "tangent": ((128, 32, 8, 3), (64, 32, 4, 3)),  # from the saved LSE and O: acc_t only
    "dkdv": ((64, 64, 8, 3), (64, 64, 8, 2)),  # BLOCK_N is the matmuls' M here: ≥ 64 for wgmma
    "dq": ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)),
}
#: Loop-variant candidates per (mode, head dim), (BLOCK_M, BLOCK_N, num_warps, num_stages, variant): the ones the
#: sm_90 compile report measured clean (no spill, shared memory within the limit, all HGMMA) under triton 3.6 and
#: 3.9 *and* showing the overlap the variant exists for (a wgmma left in flight across the softmax, or fewer wgmma
#: waits). Whether that overlap beats the plain loop is what the autotuner's timing decides on a GPU; the
#: measurements and the rejected variants are in bench/results/attention_variants_sm90.md.
_VARIANT_CANDIDATES: dict[tuple[str, int], tuple] = {
    ("primal", 128): ((128, 64, 8, 2, "pipeline"),),
    ("primal", 64): ((128, 64, 8, 2, "pipeline"),),
    ("fused", 128): ((64, 32, 8, 2, "merge"),),  # every PIPELINE tile spills at 128 (both accumulators + P, tS)
    ("fused", 64): ((64, 32, 8, 2, "pipeline"), (128, 32, 8, 2, "merge")),
    ("tangent", 128): ((128, 16, 8, 3, "pipeline"), (128, 32, 8, 3, "merge")),
    ("tangent", 64): ((128, 32, 8, 3, "pipeline"), (128, 32, 8, 3, "merge")),
}
#: Head dim 256 (not a FLUX shape): per kernel, the one tile that fits Hopper's shared memory in every mode. Its
#: accumulators exceed the register file (64×256 fp32 per warpgroup is 128 registers per thread, two of them with a
#: tangent), so it runs correctly but spills; the compile report covers head dims 64 and 128 only.
_CANDIDATES_D256 = {"fwd": ((64, 32, 4, 2),), "dkdv": ((64, 64, 4, 2),), "dq": ((64, 64, 4, 2),)}
#: The fix-up pass (rows whose fp16 operands overflowed, rare) is not autotuned: one config, spill-free in every
#: mode at head dims ≤ 128, else the head-dim-256 tile.
_FIXUP_CANDIDATES = ((128, 32, 8, 3),) + _CANDIDATES_D256["fwd"]


#: Loop variants of the forward kernel (its constexpr switches, see :mod:`t2i_kernels.attention_forward_kernels`):
#: "plain"; "pipeline", the next tile's S/tS wgmmas in flight across this tile's softmax; "merge", tS and the
#: tangent accumulator as one dot each (K-dim 2·D and 2·BLOCK_N; needs tK, tV with the strides of K, V);
#: "pipeline+merge".
VARIANTS = {
    "plain": {},
    "pipeline": {"PIPELINE": True},
    "merge": {"MERGE": True},
    "pipeline+merge": {"PIPELINE": True, "MERGE": True},
}


def merge_applicable(k, v, tk, tv) -> bool:
    """The MERGE variant loads a tensor and its tangent as one tile (an element offset apart): same strides."""
    return all(t is None or t.stride() == base.stride() for base, t in ((k, tk), (v, tv)))


def variant_flags(name: str, merge_ok: bool) -> dict:
    """The constexpr flags of a variant; MERGE is dropped where the tangents' strides do not allow it."""
    flags = dict(VARIANTS[name])
    if not merge_ok:
        flags.pop("MERGE", None)
    return flags


#: cudaDevAttrMaxSharedMemoryPerBlockOptin of H100/H200; the limit the prune sizes for when there is no GPU (the
#: compile report) and the figure the report checks against.
SM90_MAX_SMEM = 232448
#: Shared memory the compiler adds to the operand buffers (layout conversions, barriers): measured ≤ 4 KiB in the
#: sm_90 compile report.
_SMEM_SLACK = 4096


def make_config(bm: int, bn: int, warps: int, stages: int, variant: str = "plain"):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **VARIANTS[variant]}, num_warps=warps, num_stages=stages)


def variant_of(config) -> str:
    flags = {k: v for k, v in config.kwargs.items() if k not in ("BLOCK_M", "BLOCK_N")}
    return next(name for name, f in VARIANTS.items() if f == flags)


def config_key(config) -> tuple:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages, variant)``."""
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], config.num_warps, config.num_stages, variant_of(config)


def _all_candidates() -> list[tuple]:
    plain = [(*c, "plain") for group in (*_CANDIDATES.values(), *_CANDIDATES_D256.values()) for c in group]
    return list(dict.fromkeys(plain + [c for group in _VARIANT_CANDIDATES.values() for c in group]))


def configs() -> list:
    """Every candidate once (the autotuner's list; the prune picks a kernel's, mode's and head dim's own)."""
    return [make_config(*c) for c in _all_candidates()]


def _mode_of(kind: str, flags: dict) -> str:
    if kind != "fwd":
        return kind
    if not flags.get("WRITE_TO", False):
        return "primal"
    return "tangent" if flags.get("FIXED_LSE", False) else "fused"


def _candidates_for(kind: str, flags: dict, head_dim: int) -> set:
    mode = _mode_of(kind, flags)
    group = _CANDIDATES_D256[kind] if head_dim > 128 else _CANDIDATES[mode]
    return {(*c, "plain") for c in group} | set(_VARIANT_CANDIDATES.get((mode, head_dim), ()))




def _smem_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return SM90_MAX_SMEM


def _operand_rows(kind: str, flags: dict) -> tuple[int, str, int, str]:
    """``(streamed tiles, their row block, resident tiles, their row block)`` of (rows, HEAD_DIM) operands: the
    streamed ones are multi-buffered num_stages times, the resident ones (the program's own rows) are not."""
    if kind == "fwd":
        tangent = flags.get("WRITE_TO", False)
        need_v = not flags.get("FIXED_LSE", False) or flags.get("HAS_TQ", True) or flags.get("HAS_TK", True)
        streamed = 1 + int(need_v) + int(tangent and flags.get("HAS_TK", True)) + int(tangent and flags.get("HAS_TV",
                                                                                                         True))
        return streamed, "BLOCK_N", 1 + int(tangent and flags.get("HAS_TQ", True)), "BLOCK_M"
    if kind == "dkdv":  # loops over query blocks (q, dO), owns a key block (k, v)
        return 2, "BLOCK_M", 2, "BLOCK_N"
    return 2, "BLOCK_N", 2, "BLOCK_M"  # dq: loops over key blocks (k, v), owns a query block (q, dO)


def shared_memory_estimate(kind: str, config, head_dim: int, element_size: int, flags: dict) -> int:
    """Bytes of shared memory a config's operand buffers need (what the sm_90 compile report measures, ± slack)."""
    streamed, s_rows, resident, r_rows = _operand_rows(kind, flags)
    kw = config.kwargs
    row_bytes = head_dim * element_size
    tangent = kind == "fwd" and flags.get("WRITE_TO", False)
    if kind == "fwd" and kw.get("MERGE") and tangent:
        # [K | tK] and [V ; tV] are loaded as pairs next to the single tiles (K is still needed alone for S, V for
        # acc_o): measured 2 more (rows, D) buffers per stage from the tangent kernel, 3 from the fused one.
        streamed += 2 + int(not flags.get("FIXED_LSE", False))
    extra = 0
    if kind == "fwd" and kw.get("PIPELINE"):
        # P (and P⊙tS) cross the loop's back edge as wgmma A operands held in shared memory, and V (and tV) get a
        # staging buffer: the measured growth is within these tiles.
        extra = (1 + int(tangent)) * (kw["BLOCK_M"] * kw["BLOCK_N"] + kw["BLOCK_N"] * head_dim) * element_size
    return (config.num_stages * streamed * kw[s_rows] * row_bytes + resident * kw[r_rows] * row_bytes + extra
            + _SMEM_SLACK)


def _wgmma_rows(kind: str, config) -> int:
    """The matmuls' M dimension (rows of the program's own block): wgmma needs ≥ 64, else Triton emits mma.sync.
    (With 8 warps and M = 64 Triton splits N between the two warpgroups and still uses wgmma.)"""
    return config.kwargs["BLOCK_N" if kind == "dkdv" else "BLOCK_M"]


def _fits(kind: str, config, head_dim: int, element_size: int, flags: dict, limit: int) -> bool:
    return (shared_memory_estimate(kind, config, head_dim, element_size, flags) <= limit
            and _wgmma_rows(kind, config) >= 64)


def pruner(kind: str):
    def keep(configs, named_args, **kwargs):
        """Candidates that fit (shared memory, wgmma rows) and are no longer than the sequence."""
        flags = {**named_args, **kwargs}
        q = named_args["Q"]
        head_dim, n_q, n_k = flags["HEAD_DIM"], named_args["N_Q_BUCKET"], named_args["N_K_BUCKET"]
        limit = _smem_limit(q.device)
        mine = _candidates_for(kind, flags, head_dim)
        merge_ok = bool(named_args.get("MERGE_OK", 0))  # in the autotune key: a MERGE winner is never reused
        fitting = [c for c in configs if config_key(c) in mine and (merge_ok or not c.kwargs.get("MERGE"))
                   and _fits(kind, c, head_dim, q.element_size(), flags, limit)]
        kept = [c for c in fitting if c.kwargs["BLOCK_M"] <= max(64, n_q) and c.kwargs["BLOCK_N"] <= max(64, n_k)]
        # Short sequences can rule out every tile by length; the smallest fitting plain one is then still the best.
        plain = [c for c in fitting if variant_of(c) == "plain"]
        return kept or sorted(plain, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]

    return keep


def fixup_meta(head_dim: int, q: torch.Tensor, flags: dict) -> dict:
    """Launch parameters of the fix-up pass: the first of :data:`_FIXUP_CANDIDATES` that fits (see check_fits)."""
    limit = _smem_limit(q.device)
    for bm, bn, warps, stages in _FIXUP_CANDIDATES:
        if _fits("fwd", make_config(bm, bn, warps, stages), head_dim, q.element_size(), flags, limit):
            return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    raise ValueError(f"attention: no fix-up tile fits head dim {head_dim} in {limit} B of shared memory")


def check_fits(head_dim: int, q: torch.Tensor, fixed: bool, write_to: bool, has_tq: bool, has_tk: bool,
               has_tv: bool, kind: str = "fwd") -> None:
    """A clear ValueError when no candidate fits this head dim and mode (e.g. head dim 256 with a tangent on a GPU
    with less shared memory than Hopper), instead of an autotuner with nothing to run. GPU launches only: the
    interpreter runs one fixed config and has no shared-memory limit."""
    flags = {"WRITE_TO": write_to, "FIXED_LSE": fixed, "HAS_TQ": has_tq, "HAS_TK": has_tk, "HAS_TV": has_tv}
    limit = _smem_limit(q.device)
    configs = [make_config(*c) for c in sorted(_candidates_for(kind, flags, head_dim))]
    if any(_fits(kind, c, head_dim, q.element_size(), flags, limit) for c in configs):
        return
    need = min(shared_memory_estimate(kind, c, head_dim, q.element_size(), flags) for c in configs)
    raise ValueError(
        f"attention: head dim {head_dim} ({str(q.dtype).removeprefix('torch.')}, {kind} kernel) needs at least "
        f"{need} B of shared memory per block, this GPU allows {limit} B; supported head dims that fit everywhere: "
        "32, 64, 128"
    )
