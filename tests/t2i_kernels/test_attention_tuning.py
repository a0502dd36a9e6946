"""t2i_kernels/attention_tuning.py: the prune keeps only live candidates (fitting shared memory, wgmma-sized M,
the mode's measured list), its shared-memory estimate bounds what the sm_90 compiler allocated, and head dims that
cannot fit raise a named error. Pure Python: the prune runs on the GPU's autotuner, so it is tested here directly."""

from __future__ import annotations

import pytest
import torch

from t2i_kernels import attention_tuning as tuning

BF16 = torch.empty(0, dtype=torch.bfloat16)  # the prune only reads Q's device and element size
FLUX_N = 8192  # bucket of 4608 tokens
FWD_MODES = {
    "primal": {"WRITE_TO": False, "FIXED_LSE": False},
    "fused": {"WRITE_TO": True, "FIXED_LSE": False},
    "tangent": {"WRITE_TO": True, "FIXED_LSE": True},
}


def _keep(kind, mode_flags, head_dim, n=FLUX_N, q=BF16):
    named = {"Q": q, "N_Q_BUCKET": n, "N_K_BUCKET": n, "MERGE_OK": 1}
    flags = dict(mode_flags, HEAD_DIM=head_dim, HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    return tuning.pruner(kind)(tuning.configs(), named, **flags)


def _key(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _own(mode, head_dim):
    """A mode's plain candidates plus its head dim's loop-variant candidates, as config_key tuples."""
    return {(*c, "plain") for c in tuning._CANDIDATES[mode]} | set(tuning._VARIANT_CANDIDATES.get((mode, head_dim),
                                                                                                   ()))


CASES = [("fwd", m, f) for m, f in FWD_MODES.items()] + [("dkdv", "dkdv", {}), ("dq", "dq", {})]


@pytest.mark.parametrize("kind, mode, flags", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kept_candidates_are_the_modes_own_fit_and_are_wgmma_sized(kind, mode, flags, head_dim):
    kept = _keep(kind, flags, head_dim)
    assert kept and {tuning.config_key(c) for c in kept} == _own(mode, head_dim)
    for c in kept:
        smem = tuning.shared_memory_estimate(kind, c, head_dim, 2, dict(flags, HAS_TQ=True, HAS_TK=True, HAS_TV=True))
        assert smem <= tuning.SM90_MAX_SMEM
        assert c.kwargs["BLOCK_N" if kind == "dkdv" else "BLOCK_M"] >= 64  # wgmma's M, else mma.sync


def test_no_dkdv_candidate_has_a_32_row_key_block():
    """dK/dV's matmuls have BLOCK_N rows: BLOCK_N = 32 compiled to HMMA (mma.sync) in the sm_90 report."""
    assert all(bn >= 64 for _, bn, _, _ in tuning._CANDIDATES["dkdv"] + tuning._CANDIDATES_D256["dkdv"])
    assert tuning._wgmma_rows("dkdv", tuning.make_config(128, 32, 8, 3)) == 32


# (mode, config, head dim) -> metadata.shared the sm_90 compile (triton 3.9, bf16) reported; the estimate must bound it.
MEASURED_SMEM = [
    ("fused", (128, 32, 8, 3), 128, 163840),
    ("fused", (64, 32, 4, 3), 128, 131072),
    ("fused", (128, 64, 8, 3), 128, 262144),
    ("tangent", (128, 32, 8, 3), 128, 163840),
    ("primal", (64, 32, 4, 3), 128, 65536),
    ("primal", (128, 128, 8, 2), 128, 163840),
]


@pytest.mark.parametrize("mode, cfg, head_dim, measured", MEASURED_SMEM)
def test_shared_memory_estimate_bounds_the_compilers_allocation(mode, cfg, head_dim, measured):
    flags = dict(FWD_MODES[mode], HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    estimate = tuning.shared_memory_estimate("fwd", tuning.make_config(*cfg), head_dim, 2, flags)
    assert measured <= estimate <= measured + tuning._SMEM_SLACK


def test_the_configs_that_overflowed_shared_memory_are_pruned():
    """The issue's dead candidates: fused BM128/BN64/s3 and BM64/BN128/s2 at head dim 128 (262 KB, 299 KB)."""
    flags = dict(FWD_MODES["fused"], HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    for cfg in ((128, 64, 8, 3), (64, 128, 8, 2)):
        assert not tuning._fits("fwd", tuning.make_config(*cfg), 128, 2, flags, tuning.SM90_MAX_SMEM)


def test_short_sequences_keep_the_smallest_fitting_candidate():
    # The only 64-row fused candidate at head dim 128 is a MERGE variant; without it (tangents in other layouts)
    # every candidate is 128 rows, longer than 16, and the smallest plain one is kept.
    kept = _keep("fwd", FWD_MODES["fused"], 128, n=16)
    assert [tuning.config_key(c) for c in kept] == [(64, 32, 8, 2, "merge")]
    named = {"Q": BF16, "N_Q_BUCKET": 16, "N_K_BUCKET": 16, "MERGE_OK": 0}
    flags = dict(FWD_MODES["fused"], HEAD_DIM=128, HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    kept = tuning.pruner("fwd")(tuning.configs(), named, **flags)
    assert len(kept) == 1 and _key(kept[0]) in tuning._CANDIDATES["fused"] and tuning.variant_of(kept[0]) == "plain"
    kept = _keep("fwd", FWD_MODES["primal"], 64, n=16)
    assert [_key(c) for c in kept] == [(64, 32, 4, 3)]


@pytest.mark.parametrize("kind, mode, flags", CASES, ids=[c[1] for c in CASES])
def test_head_dim_256_fits_hopper_with_its_own_tile(kind, mode, flags):
    kept = _keep(kind, flags, 256)
    assert [_key(c) for c in kept] == list(tuning._CANDIDATES_D256[kind])
    tuning.check_fits(256, BF16, flags.get("FIXED_LSE", False), flags.get("WRITE_TO", False), True, True, True, kind)


def test_head_dim_256_on_a_smaller_gpu_raises_a_named_error(monkeypatch):
    monkeypatch.setattr(tuning, "_smem_limit", lambda device: 101376)  # an sm_86-class GPU: 99 KiB per block
    with pytest.raises(ValueError, match=r"head dim 256 \(bfloat16, fwd kernel\) needs at least 200704 B .* 101376 B"):
        tuning.check_fits(256, BF16, False, True, True, True, True)
    tuning.check_fits(64, BF16, False, True, True, True, True)  # head dim 64 still fits


def test_fixup_tile_is_the_spill_free_one_and_falls_back_for_head_dim_256():
    flags = dict(FWD_MODES["fused"], HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    assert tuning.fixup_meta(128, BF16, flags) == {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    assert tuning.fixup_meta(256, BF16, flags)["BLOCK_M"] == 64


def test_every_candidate_is_in_the_autotuners_list_once():
    keys = [tuning.config_key(c) for c in tuning.configs()]
    assert len(keys) == len(set(keys))
    listed = {(*c, "plain") for group in tuning._CANDIDATES.values() for c in group}
    listed |= {(*c, "plain") for group in tuning._CANDIDATES_D256.values() for c in group}
    listed |= {c for group in tuning._VARIANT_CANDIDATES.values() for c in group}
    assert set(keys) == listed


def test_variant_candidates_are_known_switches_of_a_measured_head_dim():
    for (mode, head_dim), group in tuning._VARIANT_CANDIDATES.items():
        assert mode in FWD_MODES and head_dim in (64, 128)
        for *_, variant in group:
            assert variant in tuning.VARIANTS and variant != "plain"
        # At most two variants per mode and head dim: each costs a compile when the GPU autotunes.
        assert len(group) <= 2


@pytest.mark.parametrize("merge_ok", [True, False])
def test_merge_candidates_need_same_stride_tangents_and_that_is_in_the_autotune_key(merge_ok):
    """MERGE loads a tensor and its tangent as one tile: with other strides its candidates are pruned, and MERGE_OK
    is part of the autotune key (a MERGE winner is never reused for a call whose tangents cannot merge)."""
    from t2i_kernels.attention_launch import _FWD_MODE_KEY

    assert "MERGE_OK" in _FWD_MODE_KEY
    named = {"Q": BF16, "N_Q_BUCKET": FLUX_N, "N_K_BUCKET": FLUX_N, "MERGE_OK": int(merge_ok)}
    flags = dict(FWD_MODES["tangent"], HEAD_DIM=64, HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    kept = {tuning.variant_of(c) for c in tuning.pruner("fwd")(tuning.configs(), named, **flags)}
    assert ("merge" in kept) == merge_ok and "pipeline" in kept and "plain" in kept


def test_variant_flags_follow_the_switches():
    assert tuning.variant_flags("plain", True) == {}
    assert tuning.variant_flags("pipeline+merge", True) == {"PIPELINE": True, "MERGE": True}
    assert tuning.variant_flags("merge", False) == {}
    cfg = tuning.make_config(128, 32, 8, 3, "pipeline")
    assert cfg.kwargs == {"BLOCK_M": 128, "BLOCK_N": 32, "PIPELINE": True} and tuning.variant_of(cfg) == "pipeline"


# (mode, config, head dim) -> metadata.shared of loop variants (sm_90, triton 3.9, bf16): the estimate must bound it.
MEASURED_SMEM_VARIANTS = [
    ("primal", (128, 64, 8, 2, "pipeline"), 128, 131072),
    ("primal", (128, 64, 8, 2, "pipeline"), 64, 73728),
    ("fused", (64, 32, 8, 2, "merge"), 128, 122880),
    ("fused", (64, 32, 8, 2, "pipeline"), 64, 69632),
    ("fused", (128, 32, 8, 2, "merge"), 64, 86016),
    ("tangent", (128, 16, 8, 3, "pipeline"), 128, 126976),
    ("tangent", (128, 32, 8, 3, "merge"), 128, 204800),
    ("tangent", (128, 32, 8, 3, "pipeline"), 64, 102400),
    ("tangent", (128, 32, 8, 3, "merge"), 64, 102400),
]


@pytest.mark.parametrize("mode, cfg, head_dim, measured", MEASURED_SMEM_VARIANTS)
def test_shared_memory_estimate_bounds_the_variants_allocation(mode, cfg, head_dim, measured):
    flags = dict(FWD_MODES[mode], HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    estimate = tuning.shared_memory_estimate("fwd", tuning.make_config(*cfg), head_dim, 2, flags)
    # Never below what the compiler allocated; at most 25 % above it, so the prune does not discard a fitting tile.
    assert measured <= estimate <= measured * 5 // 4 + tuning._SMEM_SLACK
