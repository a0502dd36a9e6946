"""bench/compile_report.py: the CI rules on synthetic rows, the SASS/TTGIR/PTX parsers on hand-written listings with
known counts, and one real end-to-end sm_90 compile (a subprocess: the report must run without the interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile_report as cr

ROOT = Path(__file__).resolve().parents[2]


def _row(**over):
    row = {"ok": True, "kernel": "_k", "module": "t2i_kernels.rms_norm", "op": "rms_norm_d3072", "mode": "fwd",
           "config": "w4s3", "regs": 64, "stack": 0, "local": 0, "STL": 0, "LDL": 0, "shared": 1024, "HGMMA": 0,
           "HMMA": 0, "ttgir_dots": 0}
    row.update(over)
    return row


def test_clean_row_passes():
    assert cr.violations(_row()) == []
    assert cr.violations(_row(module="t2i_kernels.attention", ttgir_dots=6, HGMMA=12, shared=cr.SM90_MAX_SMEM)) == []


@pytest.mark.parametrize("over, fragment", [
    ({"ok": False, "error": "CompilationError: at 3:4\nmore"}, "compile failed: CompilationError: at 3:4"),
    ({"STL": 3, "LDL": 5, "stack": 48}, "register spills (stack 48, STL 3, LDL 5)"),
    ({"local": 16}, "register spills (local 16)"),
    ({"shared": cr.SM90_MAX_SMEM + 1}, f"shared memory {cr.SM90_MAX_SMEM + 1} B > sm_90 limit"),
    ({"module": "t2i_kernels.attention", "ttgir_dots": 4, "HGMMA": 6, "HMMA": 2},
     "matmul not all HGMMA (HGMMA 6, HMMA 2)"),
    ({"module": "t2i_kernels.attention", "ttgir_dots": 4, "HGMMA": 0, "HMMA": 0}, "matmul not all HGMMA (HGMMA 0"),
    ({"lane_use": 0.75}, "lane use 0.75 < 1.0 (lanes masked or replicated"),
])
def test_each_rule_fires(over, fragment):
    found = cr.violations(_row(**over))
    assert len(found) == 1 and found[0].startswith(fragment), found


def test_full_lanes_and_kernels_without_a_width_pass_the_lane_rule():
    assert cr.violations(_row(lane_use=1.0)) == []
    assert cr.violations(_row(lane_use=None)) == []  # attention rows and ops without a _d<D> suffix


def test_mma_sync_is_allowed_outside_attention_and_dotless_attention_kernels_pass():
    assert cr.violations(_row(module="t2i_kernels.rms_norm", ttgir_dots=1, HMMA=4)) == []
    assert cr.violations(_row(module="t2i_kernels.attention", ttgir_dots=0)) == []  # e.g. the Δ pre-pass


def test_report_lists_scenario_errors_and_every_row_violation():
    report = {"scenario_errors": {"attention_d256:jvp": "ValueError: does not fit\nmore"},
              "rows": [_row(), _row(kernel="_bad", STL=1, shared=cr.SM90_MAX_SMEM * 2)]}
    lines = cr.report_violations(report)
    assert lines[0] == "scenario attention_d256:jvp raised: ValueError: does not fit"
    assert len(lines) == 3 and all(line.startswith("_bad [rms_norm_d3072 fwd w4s3]: ") for line in lines[1:])


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;
        /*0030*/                   LDG.E R9, desc[UR4][R6.64] ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0060*/                   HMMA.16816.F32.BF16 R40, R12, R16, R40 ;
        /*0070*/                   STL.64 [R1], R10 ;
        /*0080*/                   LDL.64 R10, [R1] ;
        /*0090*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00b0*/               @P1 STG.E.128 desc[UR4][R2.64], R4 ;
"""


def test_sass_stats_counts_instructions_and_widths():
    s = cr.sass_stats(SASS)
    assert s["sass_instructions"] == 12
    assert (s["HGMMA"], s["HMMA"], s["STL"], s["LDL"], s["BAR"]) == (2, 1, 1, 1, 1)
    assert s["loads"] == {"ld128": 1, "ld16": 1, "ld32": 1, "async128": 1}
    assert s["stores"] == {"st128": 1}


TTGIR = """
  tt.func public @k() {
    %a = "tt.reduce"(%x) <{axis = 1 : i32}> ({
    ^bb0(%p: f32, %q: f32):
      tt.reduce.return %p : f32
    }) : (tensor<64xf32>) -> f32
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<64x64xf32>) {
      %d = ttng.warp_group_dot %q, %k, %acc {isAsync = true} : tensor<64x64xf32>
      %w:3 = ttng.warp_group_dot_wait %d, %q, %k {pendings = 1 : i32} : tensor<64x64xf32>
      %s = "tt.reduce"(%w) <{axis = 1 : i32}> ({
      ^bb0(%p: f32, %q: f32):
        tt.reduce.return %p : f32
      }) : (tensor<64x64xf32>) -> tensor<64xf32>
      scf.yield %d : tensor<64x64xf32>
    }
    %e = ttng.warp_group_dot_wait %r {pendings = 0 : i32} : tensor<64x64xf32>
    %t = "tt.reduce"(%e) <{axis = 1 : i32}> ({
    ^bb0(%p: f32, %q: f32):
      tt.reduce.return %p : f32
    }) : (tensor<64x64xf32>) -> tensor<64xf32>
    tt.return
  }
"""


def test_ttgir_stats_finds_async_depth_and_only_the_reduction_inside_the_loop():
    s = cr.ttgir_stats(TTGIR)
    assert (s["ttgir_dots"], s["wgmma_waits"], s["wgmma_max_pendings"], s["reduce_in_loop"]) == (1, 2, 1, 1)
    assert cr.ttgir_stats("")["wgmma_max_pendings"] is None


def test_ptx_stats_counts_64_bit_divisions_only():
    ptx = ("div.s64 %rd3, %rd1, %rd2;\nrem.u64 %rd4, %rd1, %rd2;\ndiv.s32 %r3, %r1, %r2;\n"
           "ld.global.v4.b32 {%r1}, [%rd1];")
    assert cr.ptx_stats(ptx) == {"div64": 2, "ld_global_v4": 1}


def test_lane_use_shows_the_masked_quarter_of_a_3072_wide_row():
    assert cr.lane_use("rms_norm_d3072", 4096) == 0.75  # one power-of-two block for the whole row
    assert cr.lane_use("gelu_tanh_d12288", 1024) == 1.0  # 12 column tiles of 1024, none partial
    assert cr.lane_use("rope_d96", 64) == 0.75  # two tiles of 64 for 96 columns
    assert cr.lane_use("no_width", 128) is None


def test_lane_use_counts_every_chunk_of_a_chunked_row():
    assert cr.lane_use("rms_norm_d3072", 1024, chunks=3) == 1.0  # 3 register chunks of 1024
    assert cr.lane_use("rms_norm_d12288", 4096, chunks=3) == 1.0
    assert cr.lane_use("layer_norm_modulate_d700", 256, chunks=3) == round(700 / 768, 3)  # ragged last chunk
    assert cr.lane_use("rms_norm_d3072", 1024, chunks=4) == 0.75  # a fourth chunk past D is masked
    assert cr.lane_use("rms_norm_d12288", 4096, chunks=2) == 0.75  # 2 of 4096 per tile: 12288 in two tiles of 8192


def test_lane_use_counts_lanes_replicated_across_threads():
    # 1 × 1024 elements on 8 warps (256 threads) fill them; on 64 warps' worth (2048 threads) half are copies.
    assert cr.lane_use("rms_norm_d3072", 1024, chunks=3, rows=1, num_warps=8) == 1.0
    assert cr.lane_use("rms_norm_d3072", 1024, chunks=3, rows=1, num_warps=64) == 0.5
    assert cr.lane_use("qk_norm_rope_d128", 128, rows=1, num_warps=8) == 0.5  # 128 elements on 256 threads
    assert cr.lane_use("qk_norm_rope_d128", 128, rows=16, num_warps=8) == 1.0


def test_real_sm90_compile_end_to_end(tmp_path):
    """The smallest op (GELU: three kernel modes) captured from its real launchers and compiled for sm_90."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--only", "gelu_tanh",
                           "--jobs", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["mode"] for r in rows} == {"WRITE_PRIMAL", "WRITE_TANGENT", "WRITE_PRIMAL+WRITE_TANGENT"}
    assert {s for r in rows for s in r["scenarios"]} == {f"gelu_tanh_d12288:{m}" for m in ("jvp", "func.jvp",
                                                                                           "backward")}
    for r in rows:
        assert r["ok"] and r["regs"] > 0 and r["violations"] == [] and r["HGMMA"] == r["HMMA"] == 0
        assert r["loads"].get("ld128", 0) > 0  # 16-byte loads of bf16 rows
    assert report["compiled"] == 3 and "0 violation(s)" in proc.stdout
    # A second run is served from the result cache (keyed by the kernels' source hash), compiling nothing.
    proc = subprocess.run(proc.args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and json.loads(out.read_text())["cached"] == 3


def test_async_wgmma_counts_dots_left_in_flight_not_those_waited_right_after():
    """The attention PIPELINE variant's S wgmma: issued, not waited, read after the next trip's pendings = 0 wait."""
    ttgir = """
      %s = ttng.warp_group_dot %q, %k, %z {inputPrecision = 0 : i32, isAsync = true} : tensor<64x64xf32>
      %p = math.exp2 %prev : tensor<64x64xf32>
      %o = ttng.warp_group_dot %p, %v, %acc {inputPrecision = 0 : i32, isAsync = true} : tensor<64x64xf32>
      %o_1:2 = ttng.warp_group_dot_wait %o, %v {pendings = 0 : i32} : tensor<64x64xf32>
      %x = ttng.warp_group_dot %q, %k, %z {inputPrecision = 0 : i32} : tensor<64x64xf32>
    """
    assert cr.ttgir_stats(ttgir)["async_wgmma"] == 1
    assert cr.ttgir_stats(TTGIR)["async_wgmma"] == 1  # its wait keeps 1 pending: the dot itself stays in flight


def test_config_names_the_attention_loop_variant():
    job = {"num_warps": 8, "num_stages": 3}
    assert cr._config({"BLOCK_M": 128, "BLOCK_N": 32}, job) == "BM128 BN32 w8s3"
    assert cr._config({"BLOCK_M": 128, "BLOCK_N": 32, "PIPELINE": True, "MERGE": True}, job) == "BM128 BN32 w8s3 +P+M"
    assert cr._config({"BLOCK_M": 128, "BLOCK_N": 32, "PIPELINE": False}, job) == "BM128 BN32 w8s3"


def test_attention_fix_up_pass_rows_are_labelled_apart_from_the_main_pass():
    from bench import compile_report as cr

    main = {"WRITE_TO": True, "FIXED_LSE": False, "GUARD": 1}
    assert cr._mode("_attn_fwd_kernel", main) == "fwd+tangent"
    assert cr._mode("_attn_fwd_kernel", {**main, "GUARD": 2}) == "fwd+tangent fix-up"
    assert cr._mode("_attn_fwd_kernel", {"FIXED_LSE": True, "GUARD": 2}) == "tangent(LSE) fix-up"
