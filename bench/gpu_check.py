"""One prepared GPU check: bf16 parity of every kernel and of a patched lite-8B-width block at FLUX shapes, then the
headline timings against the reference, in one run.

    bash bench/prepare_gpu_wheels.sh           # on a machine with PyPI: pure-Python wheels the GPU image lacks
    python bench/gpu_check.py [--quick] [--out bench/results/<name>.json]
    python bench/gpu_check.py --cpu_smoke       # the same code path at tiny fp32 shapes under the interpreter

Designed for a lent H100/H200 with a short budget (≤ 8 minutes): it installs nothing from the network (wheels in
``bench/wheels/``, e.g. diffusers, are installed into a temporary directory when the image lacks them), prints a
short table last and writes a JSON (GPU name, versions, git SHA, date, every figure) under ``bench/results/``. Parity
failures are reported, not raised, so one run yields every number; the exit code is 1 if any check failed.

What is compared, and the FLOP/byte formulas, come from :mod:`t2i_distill.benchmarks` (rCM's FLOP convention for
attention, so figures compare with docs/anchors.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if not torch.cuda.is_available():  # --cpu_smoke: the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing


def _ensure_wheels() -> list[str]:
    """Install ``bench/wheels/*.whl`` (no deps, no index) into a temp dir on sys.path if their packages are missing."""
    import importlib.util

    wheels = sorted(glob.glob(str(HERE / "wheels" / "*.whl")))
    missing = [w for w in wheels if importlib.util.find_spec(Path(w).name.split("-")[0].lower()) is None]
    if not missing:
        return []
    target = tempfile.mkdtemp(prefix="t2i_wheels_")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target",
                    target, *missing], check=True)
    sys.path.insert(0, target)
    return [Path(w).name for w in missing]


INSTALLED_WHEELS = _ensure_wheels()

from t2i_distill.benchmarks.ops import OPS, attention_rel_tangent_error, op_parity, op_timing_cases  # noqa: E402
from t2i_distill.benchmarks.runner import parity_rows, parity_table, timing_rows, timing_table  # noqa: E402
from t2i_distill.tables import markdown_table  # noqa: E402
from t2i_distill.timing import measure  # noqa: E402
from t2i_kernels.testing import ATTENTION_BF16_TANGENT_REL_ERROR, parity_report  # noqa: E402

#: Ops whose timing includes torch.compile of the reference (the norms' ≥ 1.5× target); compiling every op would
#: cost minutes of a short GPU budget.
COMPILE_OPS = ("layer_norm_modulate", "rms_norm")
SMOKE_SHAPES = {name: spec.cpu_shapes[:1] for name, spec in OPS.items()}


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """Device-to-device copy bandwidth (read + write) measured now: the memory-bound kernels' ceiling."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    ms = measure(lambda: y.copy_(x), device, quick=quick)["p50_ms"]
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def block_parity(device: torch.device, quick: bool) -> list[dict[str, object]]:
    """A patched FLUX.1-lite-8B-width double + single block in bf16 vs the unpatched one (fp32 truth)."""
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from t2i_distill import apply_kernels_to_flux
    from t2i_distill.benchmarks.steps import LITE_8B_WIDTH
    from t2i_distill.models import FluxStudent
    from t2i_distill.tiny import TinyFluxShape, tiny_flux_inputs

    torch.manual_seed(0)
    model = FluxStudent(**LITE_8B_WIDTH, num_layers=1, num_single_layers=1).to(device).to(torch.bfloat16).eval()
    inputs = tiny_flux_inputs(model, TinyFluxShape(batch=1, text_tokens=256, latent_h=32, latent_w=32))
    x, t = inputs.pop("hidden_states"), inputs.pop("timestep")
    tx, tt = torch.randn_like(x), torch.ones_like(t)

    def jvp(m, x, t, tx, tt, rest, autocast):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            return torch.func.jvp(lambda x, t: m(hidden_states=x, timestep=t, **rest, return_dict=False)[0],
                                  (x, t), (tx, tt))

    truth_model = copy.deepcopy(model).float()
    truth_rest = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    truth = jvp(truth_model, x.float(), t.float(), tx.float(), tt.float(), truth_rest, False)
    del truth_model
    same = jvp(model, x, t, tx, tt, inputs, True)
    patched = apply_kernels_to_flux(copy.deepcopy(model))
    ours = jvp(patched, x, t, tx, tt, inputs, False)
    reports = [parity_report("flux_model", q, o, s, r.double(), dtype=torch.bfloat16, label=f"{q} (lite-8B block)")
               for q, o, s, r in zip(("out", "tangent"), ours, same, truth)]
    return parity_rows(reports, (1, 1280, 3072))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/gpu_check-<gpu>-<date>.json)")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions, no torch.compile baselines")
    parser.add_argument("--cpu_smoke", "--cpu-smoke", action="store_true",
                        help="tiny fp32 shapes under the interpreter")
    parser.add_argument("--skip_steps", "--skip-steps", action="store_true",
                        help="kernels only (no student-step benchmarks)")
    parser.add_argument("--gluon_timeout", "--gluon-timeout", type=int, default=240,
                        help="seconds for the Gluon attention's child check (bench/gluon_check.py); 0 skips it")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: run with --cpu_smoke to exercise the code path at tiny shapes", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gpu = torch.cuda.get_device_name(0) if cuda else "none (cpu smoke, interpreted)"
    import triton

    started = time.time()
    parity, timings, steps, notes = [], [], [], []
    for name, spec in OPS.items():
        for shape in (spec.gpu_shapes if cuda else SMOKE_SHAPES[name]):
            parity += parity_rows(op_parity(spec, shape, device, dtype), shape)
            if name == "attention" and cuda:
                rel = attention_rel_tangent_error(shape, device, dtype)
                parity.append({"op": name, "shape": list(shape), "quantity": "tangent ‖err‖/‖fp32‖",
                               "dtype": "bfloat16", "kernel_error": rel, "torch_error": None,
                               "bound": ATTENTION_BF16_TANGENT_REL_ERROR,
                               "mismatches": int(rel > ATTENTION_BF16_TANGENT_REL_ERROR),
                               "passed": rel <= ATTENTION_BF16_TANGENT_REL_ERROR})
            if cuda:
                torch.cuda.empty_cache()
    if cuda:
        try:
            parity += block_parity(device, args.quick)
        except Exception as exc:  # e.g. diffusers missing and no wheel prepared: report, keep the kernel figures
            notes.append(f"lite-8B block parity skipped: {type(exc).__name__}: {exc}")
    for name, spec in OPS.items():
        for shape in (spec.gpu_shapes if cuda else SMOKE_SHAPES[name]):
            cases = op_timing_cases(spec, shape, device, dtype,
                                    compile_provider=cuda and not args.quick and name in COMPILE_OPS)
            timings += timing_rows(cases, device, quick=args.quick)
    bandwidth = copy_bandwidth_gbps(device, args.quick) if cuda else None
    if not args.skip_steps:
        try:
            from t2i_distill.benchmarks.steps import StepConfig, step_timing_cases

            configs = ([StepConfig(method="scm", width="lite8b", resolution=512),
                        StepConfig(method="meanflow", width="lite8b", resolution=512),
                        StepConfig(method="scm", width="lite8b", resolution=1024, double=1, single=0)]
                       if cuda else [StepConfig(method="scm", resolution=64, text_tokens=5)])
            for cfg in configs:
                steps += timing_rows(step_timing_cases(cfg, device, dtype), device, quick=args.quick)
        except Exception as exc:
            notes.append(f"student steps skipped: {type(exc).__name__}: {exc}")

    memory = []
    if not args.skip_steps:
        try:
            memory = memory_rows(cuda)
        except Exception as exc:
            notes.append(f"plan check skipped: {type(exc).__name__}: {exc}")

    gluon_parity, gluon_timings = [], []
    if cuda and args.gluon_timeout > 0:
        gluon_parity, gluon_timings, gluon_notes = gluon_rows(args.quick, args.gluon_timeout)
        notes += gluon_notes
    headline = _headline(timings + gluon_timings, steps, bandwidth, parity)
    result = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "git_sha": _git_sha(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": str(dtype),
        "installed_wheels": INSTALLED_WHEELS, "copy_bandwidth_gbps": bandwidth, "wall_s": time.time() - started,
        "parity": parity, "timings": timings, "steps": steps, "headline": headline, "notes": notes,
        "plan_vs_cuda_memory": memory,
        "autotune": autotune_choices(),
        # The opt-in Gluon kernel (never run on a GPU before): its rows apart, so it cannot fail the main verdict.
        "gluon": {"parity": gluon_parity, "timings": gluon_timings,
                  "passed": bool(gluon_parity) and all(r["passed"] for r in gluon_parity)},
        "passed": all(r["passed"] for r in parity),
    }
    out = Path(args.out) if args.out else HERE / "results" / (
        f"gpu_check-{gpu.split(' (')[0].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))

    print(parity_table(parity + gluon_parity))
    print()
    print(timing_table(timings + gluon_timings + steps, interpreted=not cuda))
    for note in notes:
        print(f"NOTE: {note}")
    if memory:
        print("\n== plan vs measured memory per phase (GiB)")
        print(markdown_table(["jvp", "phase", "planned", "measured", "measured/planned"],
                             [[r["jvp"], r["phase"], f"{r['planned_bytes'] / 2**30:.3f}",
                               f"{r['measured_bytes'] / 2**30:.3f}", f"{r['ratio']:.3f}"] for r in memory]))
    print("\n== headline")
    print(markdown_table(["figure", "value", "target"], headline))
    print(f"\n{gpu}, torch {torch.__version__}, triton {triton.__version__}; {result['wall_s']:.0f} s; "
          f"parity {'all PASS' if result['passed'] else 'FAILURES'}; JSON: {out}")
    if not cuda:
        print("CPU smoke run: interpreted timings say nothing about GPU speed.")
    return 0 if result["passed"] else 1


def _headline(timings, steps, bandwidth, parity=()) -> list[list[str]]:
    """The few figures the issues set targets for, from this run's rows."""
    rows = []
    p50 = {(r["op"], str(r["shape"]), r["mode"], r["provider"]): r["p50_ms"] for r in timings if r.get("p50_ms")}
    for r in timings:
        if r["op"] == "attention" and r["mode"] == "fwd+jvp" and r["provider"] == "ours" and "tflops" in r:
            shape = str(r["shape"])
            math_ms = p50.get(("attention", shape, "fwd+jvp", "math sdpa (torch.func.jvp)"))
            vs_math = f", {math_ms / r['p50_ms']:.0f}x math SDPA under torch.func.jvp" if math_ms else ""
            target = "≥ 550" if r["shape"][-1] == 64 else "≥ 600"
            rows.append([f"attention_jvp {r['shape']}", f"{r['tflops']:.0f} TFLOP/s{vs_math}",
                         f"{target} TFLOP/s, ≥ 30x"])
            func_ms = p50.get(("attention", shape, "fwd+jvp", "ours (torch.func.jvp)"))
            if func_ms:
                rows.append([f"attention torch.func.jvp / fused {r['shape']}",
                             f"{100 * r['p50_ms'] / func_ms:.0f}% of the fused kernel's speed", "≥ 85%"])
            # Backward alone = (forward + backward) − forward, for ours and for SDPA (same run, same inputs).
            ours = [p50.get(("attention", shape, m, "ours")) for m in ("fwd+bwd", "fwd")]
            sdpa = [p50.get(("attention", shape, m, "sdpa")) for m in ("fwd+bwd", "fwd")]
            if all(ours) and all(sdpa) and ours[0] > ours[1] and sdpa[0] > sdpa[1]:
                rows.append([f"attention backward vs SDPA's {r['shape']}",
                             f"{(sdpa[0] - sdpa[1]) / (ours[0] - ours[1]):.2f}x SDPA's speed", "≥ 0.8x"])
        if r["op"] == "attention" and r["mode"] == "fwd+jvp" and r["provider"].startswith("ours (gluon") \
                and "tflops" in r:
            rows.append([f"attention_jvp {r['shape']}, {r['provider'][6:-1]}", f"{r['tflops']:.0f} TFLOP/s",
                         "≥ 550" if r["shape"][-1] == 64 else "≥ 600"])
    for r in parity:
        if r["op"] == "attention" and r["quantity"].startswith("tangent ‖err‖"):
            rows.append([f"attention tangent error {r['shape']}", f"{r['kernel_error']:.3g}",
                         f"≤ {r['bound']:.3g}"])
    if bandwidth:
        for r in timings:
            if r["op"] != "attention" and r["provider"] == "ours" and r["mode"] in ("fwd+jvp", "fwd+bwd") \
                    and "gbps" in r:
                target = "≥ 80%" if r["mode"] == "fwd+jvp" else "≥ 70%"
                rows.append([f"{r['op']} {r['mode']} {r['shape']}", f"{100 * r['gbps'] / bandwidth:.0f}% of copy "
                             f"({r['gbps']:.0f} GB/s)", target])
    by = {(r["op"], r["mode"], r["provider"]): r for r in steps if r.get("p50_ms")}
    for label in dict.fromkeys(r["op"] for r in steps):
        fwd = by.get((label, "fwd", "patched"))
        for provider in ("patched", "dual"):
            jvp = by.get((label, "jvp", provider))
            if fwd and jvp:
                rows.append([f"{label}: {provider} JVP / forward", f"{jvp['p50_ms'] / fwd['p50_ms']:.2f}x", "≤ 2.5x"])
            step, ref_step = by.get((label, "step", provider)), by.get((label, "step", "reference"))
            if step and ref_step:
                rows.append([f"{label}: {provider} step speed-up", f"{ref_step['p50_ms'] / step['p50_ms']:.2f}x",
                             "≥ 2.5x"])
            if fwd and jvp and fwd.get("peak_extra_gib") and jvp.get("peak_extra_gib") is not None:
                rows.append([f"{label}: {provider} JVP peak / forward peak",
                             f"{jvp['peak_extra_gib'] / fwd['peak_extra_gib']:.2f}x", "≤ 1.2x (1024 px)"])
    return rows


def gluon_rows(quick: bool, timeout_s: int, command: list[str] | None = None) -> tuple[list, list, list[str]]:
    """Parity and timing rows of the Gluon attention from ``bench/gluon_check.py`` in a child process: a kernel that
    hangs (a barrier bug) is killed after ``timeout_s`` and costs only its own rows; what it wrote is kept."""
    script = [sys.executable, str(HERE / "gluon_check.py")]
    notes: list[str] = []

    def child(args: list[str], limit: int) -> tuple[dict, bool]:
        """(what the child wrote, whether it finished in time)."""
        out = Path(tempfile.mkdtemp(prefix="t2i_gluon_")) / "gluon.json"
        finished = True
        try:
            done = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=limit)
            if done.returncode != 0:
                notes.append(f"gluon check exited {done.returncode}: {done.stderr.strip()[-400:]}")
        except subprocess.TimeoutExpired:
            notes.append(f"gluon check killed after {limit} s (a hang?); the rows it finished are kept")
            finished = False
        return (json.loads(out.read_text()) if out.is_file() else {}), finished

    if command is None:  # a small first call: a hang shows within a minute instead of eating the whole timeout
        data, finished = child([*script, "--smoke"], min(60, timeout_s))
        if not finished:
            return data.get("parity", []), [], notes + data.get("notes", [])
        command = [*script, *(["--quick"] if quick else [])]
    data, _ = child(command, timeout_s)
    return data.get("parity", []), data.get("timings", []), notes + data.get("notes", [])


def autotune_choices() -> dict[str, dict[str, str]]:
    """The config each autotuned kernel picked, per tuning key: which tile and variant won on this GPU."""
    from triton.runtime.autotuner import Autotuner

    import t2i_kernels

    chosen: dict[str, dict[str, str]] = {}
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith(t2i_kernels.__name__ + "."):
            continue
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner) and getattr(obj, "cache", None):
                chosen[f"{module.__name__}.{name}"] = {str(key): str(cfg) for key, cfg in obj.cache.items()}
    return chosen


def memory_rows(cuda: bool) -> list[dict[str, object]]:
    """``t2i-distill plan``'s per-phase peak beside ``torch.cuda.max_memory_allocated`` of the same real step: a
    lite-8B-wide FLUX with 2 double and 4 single blocks, sCM, 512 px, micro-batch 1, bf16 autocast over fp32 masters,
    for each ``--jvp`` mode (the first lent GPU checks the planner's model)."""
    from t2i_distill.planning.plan import load_config
    from t2i_distill.planning.step import StepSetting, run_step

    _, config = load_config("flux1-lite-8b")
    config = {**config, "num_layers": 2, "num_single_layers": 4} if cuda else {
        **load_config(str(HERE.parent / "t2i_distill" / "demo" / "teacher"))[1]}
    rows = []
    for jvp in ("dual", "func", "reference", "fd"):
        setting = StepSetting(method="scm", jvp=jvp, resolution=512 if cuda else 64, max_sequence_length=256 if cuda
                              else 8, mixed_precision="bf16" if cuda else "no", cuda=cuda)
        planned = run_step(config, setting).ledger.phases
        real = run_step(config, setting, fake=False, device="cuda" if cuda else "cpu").ledger.phases
        for name, record in planned.items():
            measured = real[name].cuda_peak_bytes if cuda else real[name].peak_bytes
            rows.append({"jvp": jvp, "phase": name, "planned_bytes": record.peak_bytes, "measured_bytes": measured,
                         "ratio": measured / record.peak_bytes if record.peak_bytes else None,
                         "measured_by": "torch.cuda.max_memory_allocated" if cuda else "ledger on real CPU tensors"})
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
