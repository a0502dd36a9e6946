"""Compile report: every Triton kernel, mode and config a real launch can select at FLUX shapes, compiled for Hopper
(sm_90) on a machine without a GPU, with the resources and instruction mix that decide whether it can run fast.

    python bench/compile_report.py [--out compile_report.json] [--jobs 2] [--only REGEX] [--head-dims 128,64]
    t2i-distill compile-report ...                     # the same, once the lead wires add_subparser into the CLI
    bash scripts/compile_report.sh                     # CI: the project's Triton and triton 3.6.0 (the GPU image's)

How. The public APIs (``attention_jvp``, ``torch.func.jvp(attention)``, backward, the norm/RoPE/GELU ops and their
``*_jvp``) are driven with empty CPU tensors in FLUX layouts (bf16; B = 1, 24 heads, 4096 image + 512 text tokens;
head dim 128 and 64; rows of D = 128, 3072, 12288) while every ``@triton.jit`` kernel and autotuner object in the
``t2i_kernels`` modules is swapped for a recorder. So each recorded launch carries exactly the arguments the launcher
would pass (pointer dtypes, strides, constexpr flags, num_warps). Each distinct launch is compiled with Triton's own
binder (the path of ``JITFunction.run``) and ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``: an autotuned
kernel once per config its own ``early_config_prune`` keeps (the autotuner may pick any of them), a plain kernel
with the launcher's num_warps. Compiles run in forked children (``--jobs`` at a time; a crash costs one row) and
their results are cached by (Triton version, the kernel's source hash incl. its callees, specialisation, options),
so an unchanged kernel is never recompiled.

What is measured, per compile: registers, stack and local-memory (STL/LDL) spills from ``cuobjdump`` of the cubin,
shared memory vs the sm_90 per-block limit, HGMMA (wgmma) vs HMMA (mma.sync) counts in SASS, the deepest
``warp_group_dot_wait {pendings = n}`` (n > 0: a wgmma is still in flight while other work runs), global load
widths, 64-bit integer divisions in PTX, reductions inside loops in TTGIR, and the lane use of row kernels (the
share of a program's lanes holding distinct data, from the launch's BLOCK_D, CHUNKS, rows and num_warps; see
:func:`lane_use`). The rules that fail the report (exit code 1) are in :func:`violations`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import multiprocessing as mp
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SM90_MAX_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200 (227 KiB)
H100_SMS = 132
B, H, N_TXT, N_IMG = 1, 24, 512, 4096  # FLUX at 1024 px
N = N_TXT + N_IMG
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i-distill" / "compile-report"
#: Bump when :func:`analyse` changes what it records: the result cache is keyed by it (version 1 adds nothing).
ANALYSIS_VERSION = 1
# Kernels whose matmuls must be wgmma (HGMMA) on Hopper: an mma.sync fallback caps them far below the tensor cores.
# Module-name prefixes: t2i_kernels.attention, t2i_kernels.attention_backward_kernels, ...
HGMMA_MODULES = ("t2i_kernels.attention",)


# ----------------------------------------------------------------------------------------------------------------
# Rules (pure functions of a row; tested on synthetic rows)
# ----------------------------------------------------------------------------------------------------------------
def violations(row: dict) -> list[str]:
    """Why a compiled row cannot ship: failed compile, spills, shared memory over the sm_90 limit, an attention
    matmul that is not HGMMA, or a row kernel leaving lanes without data at its width (every width the report drives
    is one FLUX runs: D = 64, 128, 3072, 12288). An empty list means the row passes."""
    if not row.get("ok"):
        return [f"compile failed: {(row.get('error') or 'no result').splitlines()[0][:200]}"]
    found = []
    spilled = {k: row.get(k, 0) for k in ("stack", "local", "STL", "LDL") if row.get(k, 0)}
    if spilled:
        found.append("register spills (" + ", ".join(f"{k} {v}" for k, v in spilled.items()) + ")")
    if row.get("shared", 0) > SM90_MAX_SMEM:
        found.append(f"shared memory {row['shared']} B > sm_90 limit {SM90_MAX_SMEM} B")
    if str(row.get("module", "")).startswith(HGMMA_MODULES) and row.get("ttgir_dots", 0) > 0:
        if row.get("HMMA", 0) > 0 or row.get("HGMMA", 0) == 0:
            found.append(f"matmul not all HGMMA (HGMMA {row.get('HGMMA', 0)}, HMMA {row.get('HMMA', 0)})")
    if row.get("lane_use") is not None and row["lane_use"] < 1.0:
        found.append(f"lane use {row['lane_use']} < 1.0 (lanes masked or replicated at this width)")
    return found


def report_violations(report: dict) -> list[str]:
    """Every rule violation of a report, one line each: rows, and launchers that raised at FLUX shapes."""
    lines = [f"scenario {name} raised: {err.splitlines()[0][:200]}" for name, err in report["scenario_errors"].items()]
    for row in report["rows"]:
        lines += [f"{row['kernel']} [{row['op']} {row['mode']} {row['config']}]: {v}" for v in violations(row)]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Analysis of one compiled kernel (SASS, PTX, TTGIR text; no GPU needed)
# ----------------------------------------------------------------------------------------------------------------
_SASS_OP = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def sass_stats(sass: str) -> dict:
    """Instruction mix of a ``cuobjdump -sass`` listing: MMA kinds, spills, global load/store widths (bits)."""
    ops = [m.group(1) for m in map(_SASS_OP.match, sass.splitlines()) if m]
    out = {"sass_instructions": len(ops)}
    for name in ("HGMMA", "HMMA", "STL", "LDL", "UTMALDG", "BAR"):
        out[name] = sum(1 for o in ops if o.split(".")[0] == name)
    loads: dict[str, int] = {}
    stores: dict[str, int] = {}
    for o in ops:
        parts = o.split(".")
        if parts[0] in ("LDG", "STG", "LDGSTS"):
            bits = next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 32)
            bucket = stores if parts[0] == "STG" else loads
            key = f"{'async' if parts[0] == 'LDGSTS' else 'ld'}{bits}" if bucket is loads else f"st{bits}"
            bucket[key] = bucket.get(key, 0) + 1
    out["loads"], out["stores"] = loads, stores
    return out


def ttgir_stats(ttgir: str) -> dict:
    """Dots, the deepest async-wgmma wait, and reductions nested in ``scf.for`` loops (a cross-warp reduction per
    loop iteration costs a shared-memory round trip and a barrier every tile)."""
    pend = [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings\s*=\s*(\d+)", ttgir)]
    depth, loop_depths, reduce_in_loop = 0, [], 0
    for line in ttgir.splitlines():
        if re.search(r"\bscf\.for\b", line):
            loop_depths.append(depth)
        if re.search(r"\btt\.reduce\b(?!\.)", line) and loop_depths:  # not tt.reduce.return
            reduce_in_loop += 1
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()
    return {
        "ttgir_dots": len(re.findall(r"\b(?:tt\.dot|ttng\.warp_group_dot)\b(?!_)", ttgir)),
        "wgmma_waits": len(pend),
        "wgmma_max_pendings": max(pend) if pend else None,
        "reduce_in_loop": reduce_in_loop,
        "tma_ops": len(re.findall(r"async_tma_copy|descriptor_load|tma_load", ttgir)),
        "async_wgmma": _async_wgmma(ttgir),
    }


def _async_wgmma(ttgir: str) -> int:
    """Async wgmmas not followed by a ``pendings = 0`` wait on their result: still in flight while later work runs.
    Triton can leave one in flight without any wait of pendings > 0 (its rule 3b: the result is threaded through
    the next trip's ``pendings = 0`` wait), so ``wgmma_max_pendings`` alone misses that overlap."""
    lines = ttgir.splitlines()
    count = 0
    for i, line in enumerate(lines):
        m = re.match(r"\s*(%[\w#]+) = ttng\.warp_group_dot .*isAsync = true", line)
        wait = rf"warp_group_dot_wait {re.escape(m.group(1))}\b.*pendings = 0\b" if m else None
        waited = m and i + 1 < len(lines) and re.search(wait, lines[i + 1])
        count += bool(m) and not waited
    return count


def ptx_stats(ptx: str) -> dict:
    """64-bit integer divisions (a ~70-instruction subroutine each on NVIDIA GPUs) and vector loads in PTX."""
    return {"div64": len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)),
            "ld_global_v4": len(re.findall(r"ld\.global[^\n;]*\.v4\.", ptx))}


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def analyse(kernel) -> dict:
    """Resources and instruction mix of a ``CompiledKernel``."""
    out = {"shared": int(kernel.metadata.shared), "num_warps": int(kernel.metadata.num_warps)}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    if m:
        out["regs"], out["stack"], out["static_shared"], out["local"] = map(int, m.groups())
    out.update(sass_stats(sass))
    out.update(ttgir_stats(kernel.asm.get("ttgir", "")))
    out.update(ptx_stats(kernel.asm.get("ptx", "")))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Capturing the launches of the real launchers
# ----------------------------------------------------------------------------------------------------------------
class _Launch:
    def __init__(self, module, jit_fn, tuner, args, kwargs, scenario):
        self.module, self.jit_fn, self.tuner = module, jit_fn, tuner
        self.args, self.kwargs, self.scenario = args, kwargs, scenario
        self.name = jit_fn.fn.__name__


def _jit_of(obj):
    while not hasattr(obj, "_pack_args"):
        obj = obj.fn
    return obj


class _Recorder:
    """Stands in for a kernel: ``rec[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, module, original, sink, scenario):
        self.module, self.original, self.sink, self.scenario = module, original, sink, scenario

    def __getitem__(self, grid):
        from triton.runtime.autotuner import Autotuner

        def record(*args, **kwargs):
            tuner = self.original if isinstance(self.original, Autotuner) else None
            self.sink.append(_Launch(self.module, _jit_of(self.original), tuner, args, kwargs, self.scenario[0]))

        return record


def _kernel_objects(mod):
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    for name, obj in list(vars(mod).items()):  # imported ones too: a launcher calls whatever its module holds
        if isinstance(obj, (JITFunction, Autotuner)):
            yield name, obj


@contextlib.contextmanager
def recording(modules, sink, scenario):
    """Swap every kernel object of ``modules`` for a recorder; launch checks accept CPU tensors; reduction splits
    are sized for an H100's 132 SMs (what a real launch would compute). Everything is restored on exit."""
    import torch

    import t2i_kernels._utils as utils

    saved = []

    def patch(mod, name, value):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    split = utils.reduction_split
    patch(utils, "_sm_count", lambda index: H100_SMS)
    for mod in modules:
        if hasattr(mod, "check_launchable"):
            patch(mod, "check_launchable", lambda *a, **k: None)
        if hasattr(mod, "reduction_split"):
            patch(mod, "reduction_split", lambda n, g, device: split(n, g, torch.device("cuda", 0)))
        for name, obj in _kernel_objects(mod):
            patch(mod, name, _Recorder(mod.__name__, obj, sink, scenario))
    try:
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def _op_scenarios(op, fn, jvp_fn, primals, tangents, grad_shape, interleaved=False):
    """The explicit ``*_jvp``, ``torch.func.jvp`` of the Function, and backward of one op at one shape.

    ``primals(grad)`` builds the inputs; ``tangents()`` the tangents of its first ``len(tangents())`` inputs (the
    rest, e.g. weights and RoPE tables, are closed over). ``jvp_fn`` takes ``(p0, t0, p1, t1, ..., rest)`` when
    ``interleaved``, else ``(p0, ..., t0, ..., rest)``.
    """
    import torch

    def jvp():
        ps, ts = primals(False), tangents()
        k = len(ts)
        args = [a for pair in zip(ps[:k], ts) for a in pair] if interleaved else [*ps[:k], *ts]
        with torch.no_grad():
            jvp_fn(*args, *ps[k:])

    def func_jvp():
        ps, ts = primals(False), tangents()
        k = len(ts)
        with torch.no_grad():
            torch.func.jvp(lambda *xs: fn(*xs, *ps[k:]), tuple(ps[:k]), tuple(ts))

    def backward():
        out = fn(*primals(True))
        out.backward(grad_shape() if callable(grad_shape) else torch.empty(grad_shape, dtype=out.dtype))

    return [(op, "jvp", jvp), (op, "func.jvp", func_jvp), (op, "backward", backward)]


def _gluon_jvp(*qkv_tqkv, ws=False):
    from t2i_kernels.attention_gluon import HAS_GLUON, attention_jvp_gluon

    if HAS_GLUON:  # a triton without Gluon has nothing to compile here
        # No fallback: the captured launch never runs, so its overflow flags are uninitialised memory.
        attention_jvp_gluon(*qkv_tqkv, overflow_fallback=False, warp_specialize=ws)


def flux_scenarios(head_dims=(128, 64)):
    """``(op, mode, callable)`` driving every public launcher with empty CPU tensors in FLUX layouts (bf16)."""
    import torch

    import t2i_kernels

    f32 = torch.float32

    def e(*shape, dtype=torch.bfloat16, grad=False):
        return torch.empty(shape, dtype=dtype).requires_grad_(grad)

    out = []
    for d in head_dims:
        def qkv(grad=False, d=d):  # q, k (B, H, L, D) from qk_norm_rope; v (B, L, H·D) viewed as (B, H, L, D)
            v = e(B, N, H * d, grad=grad)
            return e(B, H, N, d, grad=grad), e(B, H, N, d, grad=grad), v.unflatten(-1, (H, d)).transpose(1, 2)

        out += _op_scenarios(f"attention_d{d}", t2i_kernels.attention, t2i_kernels.attention_jvp, qkv, qkv,
                             lambda d=d: e(B, N, H, d).transpose(1, 2))  # dL/dO in FLUX's (B, L, H, D) memory
        # The opt-in Gluon sm_90 kernel (t2i_kernels.attention_gluon): its launcher directly, fused primal + tangent.
        out.append((f"attention_gluon_d{d}", "jvp", lambda qkv=qkv: _gluon_jvp(*qkv(), *qkv())))
        out.append((f"attention_gluon_ws_d{d}", "jvp", lambda qkv=qkv: _gluon_jvp(*qkv(), *qkv(), ws=True)))

        def qknr(grad, d=d):  # x: the projection output (B, L_img, H·D); tables sliced at the text offset
            return e(B, N_IMG, H * d, grad=grad), e(d, grad=grad), e(N, d, dtype=f32)[N_TXT:], \
                e(N, d, dtype=f32)[N_TXT:]

        out += _op_scenarios(f"qk_norm_rope_d{d}", t2i_kernels.qk_norm_rope, t2i_kernels.qk_norm_rope_jvp, qknr,
                             lambda d=d: (e(B, N_IMG, H * d),), (B, H, N_IMG, d))
    out += _op_scenarios("rope_d128", t2i_kernels.rope, t2i_kernels.rope_jvp,
                         lambda g: (e(B, H, N, 128, grad=g), e(N, 128, dtype=f32), e(N, 128, dtype=f32)),
                         lambda: (e(B, H, N, 128),), (B, H, N, 128))
    # FLUX's RMSNorms: the qk-norm rows (D = 128) and hidden-width rows (D = 3072); 12288 (the MLP width) is the
    # widest row rms_norm fuses (three register chunks of 4096; layer_norm_modulate stops at 8192).
    for d, shape in ((128, (B, H, N, 128)), (3072, (B, N, 3072)), (12288, (B, N, 12288))):
        out += _op_scenarios(f"rms_norm_d{d}", t2i_kernels.rms_norm, t2i_kernels.rms_norm_jvp,
                             lambda g, d=d, s=shape: (e(*s, grad=g), e(d, grad=g)), lambda s=shape: (e(*s),), shape)
    for d in (3072, 128):
        def lnm(grad, d=d):  # scale/shift: chunks of the AdaLN linear output (B, 6·D), row stride 6·D
            emb = e(B, 6 * d, grad=grad)
            return e(B, N, d, grad=grad), emb[:, d:2 * d], emb[:, :d]

        out += _op_scenarios(f"layer_norm_modulate_d{d}", t2i_kernels.layer_norm_modulate,
                             t2i_kernels.layer_norm_modulate_jvp, lnm, lambda lnm=lnm: lnm(False), (B, N, d), True)
    out += _op_scenarios("gelu_tanh_d12288", t2i_kernels.gelu_tanh, t2i_kernels.gelu_tanh_jvp,
                         lambda g: (e(B, N, 12288, grad=g),), lambda: (e(B, N, 12288),), (B, N, 12288))

    def gres(grad):  # gate: a chunk of the AdaLN output (B, 6·3072)
        return e(B, N_IMG, 3072, grad=grad), e(B, 6 * 3072, grad=grad)[:, 6144:9216], e(B, N_IMG, 3072, grad=grad)

    out += _op_scenarios("gated_residual_d3072", t2i_kernels.gated_residual, t2i_kernels.gated_residual_jvp, gres,
                         lambda: gres(False), (B, N_IMG, 3072), True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Jobs: one per distinct (kernel, specialisation, options); autotuned kernels once per kept config
# ----------------------------------------------------------------------------------------------------------------
def _bind(launch, extra, backend):
    """Triton's own binder: ``(options, signature, constexprs, attrs, cache key)`` for one launch + config."""
    import triton
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.jit_fn
    kwargs = dict(launch.kwargs, **extra)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # options that differ across Triton versions
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    parts = (triton.__version__, fn.cache_key, specialization, sorted(options.__dict__.items(), key=str))
    if ANALYSIS_VERSION > 1:  # cached results are only valid for the analysis that produced them
        parts += (ANALYSIS_VERSION,)
    key = hashlib.sha256(repr(parts).encode()).hexdigest()
    flags = {fn.arg_names[p[0]]: v for p, v in constexprs.items() if fn.arg_names[p[0]] in kwargs}
    return options, signature, constexprs, attrs, key, flags


def build_jobs(launches):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    jobs, seen = [], {}
    for ln in launches:
        if ln.tuner is not None:
            named = dict(zip(ln.tuner.arg_names, ln.args))
            prune = ln.tuner.early_config_prune
            kept = prune(ln.tuner.configs, named, **ln.kwargs) if prune else ln.tuner.configs
            variants = [dict(c.all_kwargs()) for c in kept]
            pruned_away = len(ln.tuner.configs) - len(kept)
        else:
            variants, pruned_away = [{}], 0
        for extra in variants:
            bound = _bind(ln, extra, backend)
            if bound[4] in seen:
                seen[bound[4]]["scenarios"].append(ln.scenario)
                continue
            job = {"launch": ln, "bound": bound, "scenarios": [ln.scenario], "pruned_away": pruned_away,
                   "num_warps": extra.get("num_warps", ln.kwargs.get("num_warps", 4)),
                   "num_stages": extra.get("num_stages", ln.kwargs.get("num_stages", 3))}
            seen[bound[4]] = job
            jobs.append(job)
    return jobs


def _compile(job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs, _, _ = job["bound"]
    fn = job["launch"].jit_fn
    if getattr(fn, "is_gluon", lambda: False)():  # @gluon.jit kernels are lowered from Gluon IR, not TTIR
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    t0 = time.time()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32), options=options.__dict__)
    return {"ok": True, "compile_s": round(time.time() - t0, 1), **analyse(kernel)}


_JOBS: list = []


def _child(index, conn):
    try:
        result = _compile(_JOBS[index])
    except BaseException as exc:  # noqa: BLE001 - a failed compile is a row of the report, not a crash
        lines = [ln for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        result = {"ok": False, "error": "\n".join(lines[:20])}
    conn.send(json.dumps(result))
    conn.close()


def run_jobs(jobs, n_parallel: int, timeout: float, cache_dir: Path | None) -> list[dict]:
    """Compile every job (cached results first), ``n_parallel`` forked children at a time."""
    global _JOBS
    _JOBS = jobs
    results: list[dict | None] = [None] * len(jobs)
    pending = []
    for i, job in enumerate(jobs):
        cached = cache_dir / f"{job['bound'][4]}.json" if cache_dir else None
        if cached and cached.exists():
            results[i] = dict(json.loads(cached.read_text()), cached=True)
        else:
            pending.append(i)
    ctx = mp.get_context("fork")
    running: dict[int, tuple] = {}
    while pending or running:
        while pending and len(running) < n_parallel:
            i = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(i, child))
            proc.start()
            child.close()
            running[i] = (proc, parent, time.time())
        time.sleep(0.1)
        for i, (proc, parent, t0) in list(running.items()):
            if parent.poll():
                results[i] = json.loads(parent.recv())
            elif not proc.is_alive():
                results[i] = {"ok": False, "error": f"compiler process died (exit code {proc.exitcode})"}
            elif time.time() - t0 > timeout:
                proc.kill()
                results[i] = {"ok": False, "error": f"compile timed out after {timeout:.0f} s"}
            else:
                continue
            proc.join()
            del running[i]
            if cache_dir and results[i].get("ok"):
                cache_dir.mkdir(parents=True, exist_ok=True)
                (cache_dir / f"{jobs[i]['bound'][4]}.json").write_text(json.dumps(results[i]))
            sys.stderr.write(f"\r  compiled {sum(r is not None for r in results)}/{len(jobs)}")
    sys.stderr.write("\n")
    return results  # type: ignore[return-value]


def _mode(name: str, flags: dict) -> str:
    if name.startswith("_attn_jvp_gluon"):
        return "fwd+tangent" + (" ws" if flags.get("WARP_SPECIALIZE") else "")
    if name.startswith("_attn_fwd"):
        mode = "tangent(LSE)" if flags.get("FIXED_LSE") else ("fwd+tangent" if flags.get("WRITE_TO") else "primal")
        # The fix-up pass (GUARD 2: flagged rows, input-dtype operands) can share a tile with a main-pass candidate.
        return mode + (" fix-up" if flags.get("GUARD") == 2 else "")
    on = [k for k, v in flags.items() if v is True and not k.startswith(("BLOCK", "EVEN"))]
    return "+".join(on) or "-"


def _config(flags: dict, job: dict) -> str:
    tiles = [f"{short}{flags[k]}" for k, short in (("BLOCK_M", "BM"), ("BLOCK_N", "BN"), ("BLOCK_ROWS", "R"),
                                                  ("BLOCK_D", "D")) if k in flags]
    if int(flags.get("CHUNKS", 1)) > 1:  # a row held as CHUNKS register tiles of BLOCK_D lanes: D1024x3
        tiles[-1] += f"x{flags['CHUNKS']}"
    if "STAGES" in flags:  # Gluon kernels pipeline by hand: their ring depth, not Triton's num_stages
        return " ".join(tiles + [f"w{job['num_warps']} ring{flags['STAGES']}"])
    variant = "".join(tag for k, tag in (("PIPELINE", "+P"), ("MERGE", "+M")) if flags.get(k) is True)  # attention
    return " ".join(tiles + [f"w{job['num_warps']}s{job['num_stages']}"]) + (f" {variant}" if variant else "")


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def build_report(head_dims=(128, 64), only: str | None = None, jobs: int = 2, timeout: float = 1200,
                 cache_dir: Path | None = DEFAULT_CACHE) -> dict:
    """Capture, compile and analyse; returns the report dict (``rows``, ``scenario_errors``, versions, timings)."""
    import torch
    import triton

    import t2i_kernels
    from t2i_kernels._runtime import is_interpreted
    from t2i_kernels.attention import _attn_fwd_kernel

    if is_interpreted(_attn_fwd_kernel):
        raise RuntimeError("compile report: the kernels were imported under TRITON_INTERPRET=1; unset it (the "
                           "report compiles for sm_90, it never runs a kernel)")
    t_start = time.time()
    modules = [importlib.import_module(f"t2i_kernels.{m.name}") for m in pkgutil.iter_modules(t2i_kernels.__path__)]
    launches: list[_Launch] = []
    scenario = [""]
    errors = {}
    with recording(modules, launches, scenario):
        for op, mode, fn in flux_scenarios(head_dims):
            if only and not re.search(only, op):
                continue
            scenario[0] = f"{op}:{mode}"
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a launcher that fails at FLUX shapes is a reported violation
                errors[scenario[0]] = f"{type(exc).__name__}: {exc}"
    job_list = build_jobs(launches)
    t_compile = time.time()
    results = run_jobs(job_list, jobs, timeout, cache_dir)
    rows = []
    for job, res in zip(job_list, results):
        ln = job["launch"]
        flags = job["bound"][5]
        row = {"kernel": ln.name, "module": ln.module, "op": job["scenarios"][0].split(":")[0],
               "scenarios": job["scenarios"], "mode": _mode(ln.name, flags), "config": _config(flags, job),
               "flags": {k: str(v) for k, v in flags.items()}, "configs_pruned_away": job["pruned_away"], **res}
        if "BLOCK_D" in flags and "attention" not in row["op"]:
            rows_per_tile = int(flags.get("BLOCK_ROWS", flags.get("BLOCK_N", 1)))
            row["lane_use"] = lane_use(row["op"], int(flags["BLOCK_D"]), int(flags.get("CHUNKS", 1)), rows_per_tile,
                                       job["num_warps"])
        row["violations"] = violations(row)
        rows.append(row)
    return {"triton": triton.__version__, "torch": torch.__version__, "target": "cuda sm_90, warp 32",
            "shapes": f"B={B} H={H} N={N} (text {N_TXT} + image {N_IMG}), head dims {list(head_dims)}, bf16",
            "capture_s": round(t_compile - t_start, 1), "compile_s": round(time.time() - t_compile, 1),
            "compiled": sum(1 for r in results if not r.get("cached")), "cached": sum(1 for r in results
                                                                                    if r.get("cached")),
            "rows": rows, "scenario_errors": errors}


def lane_use(op: str, block_d: int, chunks: int = 1, rows: int = 1, num_warps: int = 0) -> float | None:
    """Fraction of a row kernel's lanes that hold distinct data at the op's width (``<name>_d<D>``); 1.0 is no waste.

    A program holds ``rows`` × ``chunks`` × ``block_d`` lanes (``BLOCK_ROWS``/``BLOCK_N``, ``CHUNKS``, ``BLOCK_D``
    from the launch); D is covered by ``ceil(D / (chunks·block_d))`` such tiles (one for a whole-row kernel, several
    for an elementwise kernel tiling D over the grid), so D = 3072 in one block of 4096 lanes leaves a quarter masked
    (0.75) and 3 chunks of 1024 none. A chunk tile with fewer elements than the program's ``32·num_warps`` threads is
    replicated across them (Triton's layouts cover every thread), so only that share of the lanes holds distinct data.
    """
    width = re.search(r"_d(\d+)$", op)
    if not width:
        return None
    d = int(width.group(1))
    lanes = block_d * chunks
    use = d / (lanes * -(-d // lanes))
    if num_warps:
        use *= min(1.0, rows * block_d / (32 * num_warps))
    return round(use, 3)


def _loads(row) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted((row.get("loads") or {}).items()))


def format_table(report: dict) -> str:
    head = (f"{'kernel':30} {'op':24} {'mode':22} {'config':22} {'regs':>4} {'spill':>5} {'smem':>7} "
            f"{'HGMMA':>5} {'HMMA':>4} {'pend':>4} {'div64':>5} {'red/loop':>8} {'lanes':>5}  loads  verdict")
    lines = [f"triton {report['triton']} -> {report['target']}; {report['shapes']}", head, "-" * len(head)]
    for r in report["rows"]:
        verdict = "ok" if not r["violations"] else "FAIL: " + "; ".join(r["violations"])
        if not r.get("ok"):
            lines.append(f"{r['kernel'][:30]:30} {r['op'][:24]:24} {r['mode'][:22]:22} {r['config'][:22]:22} {verdict}")
            continue
        spill = r.get("STL", 0) + r.get("LDL", 0) + r.get("stack", 0)
        pend = "-" if r.get("wgmma_max_pendings") is None else r["wgmma_max_pendings"]
        lines.append(
            f"{r['kernel'][:30]:30} {r['op'][:24]:24} {r['mode'][:22]:22} {r['config'][:22]:22} "
            f"{r.get('regs', '?'):>4} {spill:>5} {r['shared']:>7} {r.get('HGMMA', 0):>5} {r.get('HMMA', 0):>4} "
            f"{pend:>4} {r.get('div64', 0):>5} {r.get('reduce_in_loop', 0):>8} {r.get('lane_use', '-'):>5}  "
            f"{_loads(r)}  {verdict}")
    bad = report_violations(report)
    lines.append(f"\n{len(report['rows'])} compiles ({report['compiled']} compiled, {report['cached']} cached) in "
                 f"{report['compile_s']} s; {len(bad)} violation(s)")
    lines += [f"  VIOLATION {v}" for v in bad]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="JSON path (default: compile_report_<triton version>.json)")
    parser.add_argument("--only", default=None, help="regex on the op name, e.g. 'attention_d128|rms'")
    parser.add_argument("--head_dims", "--head-dims", default="128,64",
                        help="attention/qk-norm head dims (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per compile (default: %(default)s)")
    parser.add_argument("--cache_dir", "--cache-dir", default=str(DEFAULT_CACHE),
                        help="result cache by kernel source hash; 'none' disables (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Handler: write the JSON, print the table, return 1 when any rule is violated."""
    cache = None if args.cache_dir == "none" else Path(args.cache_dir)
    head_dims = tuple(int(x) for x in args.head_dims.split(",") if x)
    with tempfile.TemporaryDirectory(prefix="t2i_compile_report_") as scratch:
        # Triton's own kernel cache: a scratch dir unless the caller chose one (our result cache is `cache`).
        os.environ.setdefault("TRITON_CACHE_DIR", scratch)
        report = build_report(head_dims, args.only, args.jobs, args.timeout, cache)
    import triton

    path = Path(args.out or f"compile_report_{triton.__version__}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(format_table(report))
    print(f"JSON: {path}")
    return 1 if report_violations(report) else 0


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """``t2i-distill compile-report``: the lead wires this into ``t2i_distill/cli.py``."""
    parser = subparsers.add_parser("compile-report", help="compile every selectable kernel config for sm_90 and "
                                   "check registers, spills, shared memory and HGMMA (no GPU needed)")
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the report compiles; triton reads this when kernels are imported
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
