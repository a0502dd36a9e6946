"""Gluon sm_90 JVP attention (t2i_kernels/attention_gluon.py): compiles for Hopper on the CPU (no spills, shared memory
fits, HGMMA with a wgmma left in flight), clear errors off sm_90 and on bad inputs, the T2I_ATTENTION_BACKEND switch;
GPU-marked parity tests vs float64 truth at ragged shapes in bf16 and fp16, which no GPU has run yet."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import t2i_kernels
import t2i_kernels.attention_gluon as ag
from t2i_kernels import reference as ref
from t2i_kernels.testing import assert_parity
from tests.conftest import HAS_CUDA
from tests.helpers import assert_bf16_attention_parity, f64

OP = "attention"
# The launchers' module (input checks, is_interpreted); `t2i_kernels.attention` is also the function.
ATTENTION_MODULE = importlib.import_module("t2i_kernels.attention_launch")
needs_gluon = pytest.mark.skipif(not ag.HAS_GLUON, reason="this triton has no triton.experimental.gluon")
ON_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
sm90_only = pytest.mark.skipif(
    not ON_SM90, reason="Gluon cannot run in the interpreter; needs an sm_90 GPU"
)


def _qkv(b, h, nq, nk, d, device, dtype, layout="bnhd", scale=1.0):
    """q, k, v, tq, tk, tv drawn on the CPU; "bnhd" is FLUX's (B, N, H, D) memory viewed as (B, H, N, D)."""

    def one(n):
        x = torch.randn(b, n, h, d) * scale if layout == "bnhd" else torch.randn(b, h, n, d) * scale
        x = x.to(device=device, dtype=dtype)
        return x.transpose(1, 2) if layout == "bnhd" else x

    return one(nq), one(nk), one(nk), one(nq), one(nk), one(nk)


# ---- CPU: the kernel compiles for sm_90 with the installed triton ---------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def _compile_row(d: int, dtype_name: str, ws: bool) -> dict:
    """Capture the launcher's launch from empty CPU tensors (FLUX layout) and compile it for sm_90 with the compile
    report's binder and analysis (registers, spills, shared memory, HGMMA, wgmma pendings), plus the overlap seen in
    SASS. Runs in a child process without TRITON_INTERPRET: under the interpreter Gluon's own library functions
    (gl.max, gl.sum) are interpreted objects that the Gluon compiler rejects."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench import compile_report as cr

    dtype = getattr(torch, dtype_name)
    b, h, n = 1, 24, 1000
    q, k = torch.empty(b, h, n, d, dtype=dtype), torch.empty(b, h, n, d, dtype=dtype)
    v = torch.empty(b, n, h * d, dtype=dtype).unflatten(-1, (h, d)).transpose(1, 2)
    sink: list = []
    with cr.recording([ag], sink, ["gluon"]):
        ag.attention_jvp_gluon(q, k, v, q, k, v, overflow_fallback=False, warp_specialize=ws)
    assert [ln.name for ln in sink] == ["_attn_jvp_gluon_kernel"]
    (job,) = cr.build_jobs(sink)
    options, signature, constexprs, attrs, _, flags = job["bound"]
    kernel = triton.compile(GluonASTSource(job["launch"].jit_fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32), options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([cr._tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    return dict(cr.analyse(kernel), ok=True, module=ag.__name__, BLOCK_N=int(flags["BLOCK_N"]),
                ex2_under_pv=_ex2_under_pv(sass))


def _ex2_under_pv(sass: str) -> int:
    """MUFU.EX2 (the softmax's exponentials) between the loop's ``WARPGROUP.DEPBAR.LE gsb0, 0x3`` (the Q·Kᵀ side
    retired) and the next ``0x0`` (the P·V side retired): the exponentials that run while P·V is in flight."""
    count, inside = 0, False
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE gsb0, 0x3" in line:
            count, inside = 0, True
        elif inside and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            return count
        elif inside and "MUFU.EX2" in line:
            count += 1
    return -1  # no pendings-3 wait in the SASS at all


def _run_uninterpreted(code: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


# bf16 at head dim 128 is FLUX's path (head dim 64 bf16 is in the report test below); the rest is `slow`.
CASES = [pytest.param(d, dtype, ws, marks=[] if (d, dtype) == (128, "bfloat16") else [pytest.mark.slow])
         for d in ag.SUPPORTED_HEAD_DIMS for dtype in ("bfloat16", "float16") for ws in (False, True)]


@needs_gluon
@pytest.mark.parametrize("d, dtype, ws", CASES)
def test_compiles_for_sm90_without_spills(d, dtype, ws):
    from bench.compile_report import SM90_MAX_SMEM, violations

    out = _run_uninterpreted("import json; from tests.t2i_kernels.test_attention_gluon import _compile_row; "
                             f"print('ROW', json.dumps(_compile_row({d}, {dtype!r}, {ws})))")
    row = json.loads(out.split("ROW ", 1)[1])
    print({key: row.get(key) for key in ("regs", "stack", "STL", "LDL", "shared", "HGMMA", "HMMA",
                                         "wgmma_max_pendings", "UTMALDG")})
    assert violations(row) == []  # compiled, no spills, shared memory fits, every matmul is HGMMA
    assert row["stack"] == row["local"] == row["STL"] == row["LDL"] == 0
    assert 0 < row["shared"] <= SM90_MAX_SMEM
    assert row["HGMMA"] > 0 and row["HMMA"] == 0
    assert row["wgmma_max_pendings"] == 3  # tile j-1's three P·V-side wgmmas stay in flight under tile j's softmax
    assert row["UTMALDG"] > 0  # K/V tiles arrive by TMA
    assert row["num_warps"] == (12 if ws else 8)  # warp-specialised: + one 4-warp group holding the load warp
    # The overlap itself, from SASS: exponentials between the two wgmma waits (BLOCK_N / 2 of P per thread, + 2 of
    # the rescale). The default variant overlaps all of them at head dim 128 and some at 64 (ptxas' choice); the
    # warp-specialised one may overlap none (see the module docstring), so only its waits are checked.
    assert row["ex2_under_pv"] >= 0
    if not ws:
        assert row["ex2_under_pv"] >= (row["BLOCK_N"] // 2 if d == 128 else 1)


@needs_gluon
def test_compile_report_compiles_the_gluon_kernel(tmp_path):
    """CI's report (bench/compile_report.py) has a row for the Gluon kernel at FLUX shapes, and it passes."""
    out = tmp_path / "report.json"
    _run_uninterpreted("import sys; from bench.compile_report import main; "
                       f"sys.exit(main(['--only', 'attention_gluon', '--head-dims', '64', '--jobs', '1', "
                       f"'--cache-dir', {str(tmp_path / 'cache')!r}, '--out', {str(out)!r}]))")
    report = json.loads(out.read_text())
    assert report["scenario_errors"] == {}
    rows = {row["op"]: row for row in report["rows"]}
    assert sorted(rows) == ["attention_gluon_d64", "attention_gluon_ws_d64"]
    for row in rows.values():
        assert row["kernel"] == "_attn_jvp_gluon_kernel" and row["ok"] and row["violations"] == []


# ---- CPU: clear errors -----------------------------------------------------------------------------------------
@needs_gluon
def test_cpu_tensors_are_rejected_with_a_reason():
    q, k, v, tq, tk, tv = _qkv(1, 2, 16, 16, 64, torch.device("cpu"), torch.float32)
    with pytest.raises(ag.GluonUnavailableError, match="sm_90.*`cpu`.*interpreter"):
        ag.attention_jvp_gluon(q, k, v, tq, tk, tv)


@pytest.mark.skipif(not HAS_CUDA or ON_SM90, reason="needs a CUDA GPU that is not sm_90")
def test_other_gpus_are_rejected_with_a_reason():
    q, k, v, tq, tk, tv = _qkv(1, 2, 16, 16, 64, torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ag.GluonUnavailableError, match="written for sm_90"):
        ag.attention_jvp_gluon(q, k, v, tq, tk, tv)


@needs_gluon
def test_unsupported_inputs_are_all_listed(monkeypatch):
    monkeypatch.setattr(ag, "check_launchable", lambda *args: None)  # reach the input checks with CPU tensors
    monkeypatch.setattr(ATTENTION_MODULE, "is_interpreted", lambda kernel: False)
    q, k, v, tq, tk, tv = _qkv(1, 2, 16, 16, 32, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError) as info:
        ag.attention_jvp_gluon(q, k, v, tq, tk, tv)
    for fragment in ("float16 or bfloat16", "got float32", "head dims (64, 128), got 32"):
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"
    # A row stride of 65 bf16 elements (130 bytes) cannot be a TMA stride.
    wide = torch.zeros(1, 2, 16, 65, dtype=torch.bfloat16)[..., :64]
    k64, v64 = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="`q`: TMA needs a 16-byte aligned base and strides"):
        ag.attention_jvp_gluon(wide, k64, v64, None, None, None)
    with pytest.raises(ValueError, match=r"`block_n` must be one of \[32, 64\] at head dim 64, got 128"):
        ag.attention_jvp_gluon(k64, k64, v64, None, None, None, block_n=128)
    with pytest.raises(ValueError, match="expected head dim"):  # t2i_kernels.attention's own checks run first
        ag.attention_jvp_gluon(q[..., :3], k, v, tq, tk, tv)


@needs_gluon
def test_backend_switch_routes_the_fused_launcher_to_gluon(monkeypatch):
    q, k, v, tq, tk, tv = _qkv(1, 2, 16, 16, 64, torch.device("cpu"), torch.float32)
    monkeypatch.setenv("T2I_ATTENTION_BACKEND", "gluon")
    with pytest.raises(ag.GluonUnavailableError, match="sm_90"):
        t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)
    # The switch is opt-in: without it the same call runs the Triton kernel.
    monkeypatch.delenv("T2I_ATTENTION_BACKEND")
    if not HAS_CUDA:
        o, to = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)
        assert torch.isfinite(o).all() and torch.isfinite(to).all()


# ---- GPU (sm_90): parity vs float64 truth ----------------------------------------------------------------------
# (B, H, Nq, Nk, D): partial single tiles, Nq ≠ Nk both ways, several query and key tiles, both head dims.
SHAPES = [(1, 3, 17, 17, 64), (2, 2, 100, 37, 128), (1, 2, 37, 257, 64), (2, 1, 257, 100, 128),
          (1, 2, 1000, 1000, 128), (2, 3, 333, 777, 64)]


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("layout", ["bnhd", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ws", [False, True], ids=["plain", "warp_specialized"])
def test_parity_with_float64_truth(ws, shape, dtype, layout, poisoned_empty):
    b, h, nq, nk, d = shape
    q, k, v, tq, tk, tv = _qkv(b, h, nq, nk, d, torch.device("cuda"), dtype, layout)
    o, to, lse = ag.attention_jvp_gluon(q, k, v, tq, tk, tv, warp_specialize=ws)
    assert o.shape == to.shape == (b, h, nq, d) and lse.shape == (b, h, nq) and lse.dtype == torch.float32
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, tk, tv))
    same_o, same_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    scale = 1.0 / math.sqrt(d)
    truth_lse = torch.logsumexp(f64(q)[0] @ f64(k)[0].transpose(-1, -2) * scale, dim=-1)
    same_lse = torch.logsumexp((q @ k.transpose(-1, -2)).float() * scale, dim=-1)
    assert_parity(OP, "out", o, same_o, truth_o)
    assert_parity(OP, "tangent", to, same_t, truth_t)
    assert_parity(OP, "lse", lse, same_lse, truth_lse)


@pytest.mark.gpu
@sm90_only
def test_missing_tangents_count_as_zero_and_scale_is_honoured():
    q, k, v, tq, tk, tv = _qkv(1, 2, 100, 90, 128, torch.device("cuda"), torch.bfloat16)
    o, to, _ = ag.attention_jvp_gluon(q, k, v, tq, None, tv, scale=0.3)
    zero = torch.zeros_like(k)
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, zero, tv), scale=0.3)
    same_o, same_t = ref.attention_jvp(q, k, v, tq, zero, tv, scale=0.3)
    assert_parity(OP, "out", o, same_o, truth_o)
    assert_parity(OP, "tangent", to, same_t, truth_t)


@pytest.mark.gpu
@sm90_only
def test_fp16_operand_overflow_falls_back_to_the_triton_kernel():
    q, k, v, tq, tk, tv = _qkv(1, 2, 70, 90, 64, torch.device("cuda"), torch.bfloat16)
    v[0, 0, 5, 3] = 1e6  # beyond fp16's 65504: the fp16 P·V operand overflows for head (0, 0)
    o, to, lse = ag.attention_jvp_gluon(q, k, v, tq, tk, tv)
    assert torch.isfinite(o).all() and torch.isfinite(to).all()
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, tk, tv))
    same_o, same_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    assert_parity(OP, "out", o, same_o, truth_o)
    assert_parity(OP, "tangent", to, same_t, truth_t)
    _, to_raw, _ = ag.attention_jvp_gluon(q, k, v, tq, tk, tv, overflow_fallback=False)
    assert not torch.isfinite(to_raw[0, 0]).all() and torch.isfinite(to_raw[0, 1]).all()


FLUX_SHAPES = [(2, 24, 1536, 128), (1, 24, 4608, 128), (1, 24, 4608, 64)]


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("shape", FLUX_SHAPES, ids=str)
@pytest.mark.parametrize("ws", [False, True], ids=["plain", "warp_specialized"])
def test_bf16_flux_shapes_match_the_triton_kernel_bound(ws, shape, monkeypatch):
    b, h, n, d = shape
    q, k, v, tq, tk, tv = _qkv(b, h, n, n, d, torch.device("cuda"), torch.bfloat16)
    o, to, lse = ag.attention_jvp_gluon(q, k, v, tq, tk, tv, warp_specialize=ws)
    assert_bf16_attention_parity(o, to, q, k, v, tq, tk, tv)
    if ws:
        return
    # The environment switch sends t2i_kernels.attention_jvp through the same kernel: identical results.
    monkeypatch.setenv("T2I_ATTENTION_BACKEND", "gluon")
    s_o, s_to, s_lse = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv, return_lse=True)
    assert torch.equal(s_o, o) and torch.equal(s_to, to) and torch.equal(s_lse, lse)
