"""Plot throughput vs sequence length from a ``gpu_check`` (or demo) JSON: never run during a test of a kernel.

    python bench/plot.py bench/results/gpu_check-<gpu>-<date>.json [--out plot.png]

Left: attention TFLOP/s per provider and mode against the sequence length N. Right: the memory-bound kernels' GB/s
(forward + tangent) against the number of tokens, with the measured copy bandwidth as a line when the JSON has it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _tokens(op: str, shape: list[int]) -> int:
    """Sequence length of a row: N of attention/rope (B, H, N, D), N of (B, N, ...) activations."""
    return shape[2] if op in ("attention", "rope", "rms_norm") and len(shape) == 4 else shape[1]


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("timings") or result.get("kernel_timings") or []
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["op"] == "attention" and "tflops" in r:
            series[("attention", r["mode"], r["provider"])].append((_tokens("attention", r["shape"]), r["tflops"]))
        elif r["op"] != "attention" and r["mode"] == "fwd+jvp" and "gbps" in r:
            series[(r["op"], r["mode"], r["provider"])].append((_tokens(r["op"], r["shape"]), r["gbps"]))
    for (op, mode, provider), points in sorted(series.items()):
        points.sort()
        axis = left if op == "attention" else right
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=f"{mode} {provider}" if op == "attention" else f"{op} {provider}")
    left.set(xlabel="sequence length N", ylabel="TFLOP/s", title="attention (B·H·N²·D FLOP counts, rCM's)")
    right.set(xlabel="tokens", ylabel="GB/s", title="memory-bound kernels, forward + tangent")
    if result.get("copy_bandwidth_gbps"):
        right.axhline(result["copy_bandwidth_gbps"], color="black", linestyle="--", label="device copy")
    for axis in (left, right):
        if axis.lines:
            axis.legend(fontsize=7)
            axis.set_xscale("log", base=2)
    device = result.get("gpu") or result.get("env", {}).get("gpu", "?")
    fig.suptitle(f"{device} · {result.get('date', '')} · {result.get('git_sha', '')[:10]}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    result = json.loads(args.json.read_text())
    out = plot(result, args.out or args.json.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
