#!/usr/bin/env bash
# CI gate: compile every selectable kernel config for sm_90 with the project's Triton and with triton 3.6.0 (the GPU
# image's), and fail when one fails to compile, spills, exceeds shared memory, or an attention matmul is not HGMMA.
#
#   bash scripts/compile_report.sh [extra compile_report.py args, e.g. --only attention]
#
# Environment: PY (default: python on PATH; needs torch and triton), T2I_TRITON36_VENV (where the 3.6.0 environment
# lives, reused across runs), T2I_COMPILE_REPORT_DIR (JSON output folder), T2I_COMPILE_REPORT_CACHE (result cache by
# kernel source hash; reused across runs so an unchanged kernel is never recompiled).
#
# The 3.6.0 environment is a venv without pip whose .pth puts the project venv's site-packages *after* its own, so
# torch, numpy and the rest are shared (nothing big is installed) and only `triton==3.6.0` (--no-deps) shadows the
# project's triton. Measured on a 2-core CPU machine, no GPU: created in ~1 s, the triton wheel installs in ~20 s.
# Report wall time there (68 compiles per Triton version): ~30 s per version when every result is cached (capture
# only); from scratch, with the machine shared (load ~13) and 1 job, attention took 250-460 s per head dim and the
# row kernels ~700 s per version. Keep the cache (T2I_COMPILE_REPORT_CACHE) between CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
OUT_DIR="${T2I_COMPILE_REPORT_DIR:-build/compile_report}"
CACHE="${T2I_COMPILE_REPORT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/t2i-distill/compile-report}"
VENV36="${T2I_TRITON36_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/t2i-distill/triton-3.6.0-venv}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET  # the report compiles for sm_90; the interpreter would make every kernel a Python function

site_packages="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VENV36/bin/python" -c 'import triton, torch, sys; sys.exit(triton.__version__ != "3.6.0")' 2>/dev/null; then
    echo "== building the triton 3.6.0 environment in $VENV36"
    rm -rf "$VENV36"
    "$PY" -m venv --without-pip "$VENV36"
    venv_site="$("$VENV36/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$site_packages" > "$venv_site/_t2i_project_site.pth"
    "$PY" -m pip --python "$VENV36/bin/python" install --quiet --no-deps "triton==3.6.0"
fi

status=0
for python in "$PY" "$VENV36/bin/python"; do
    version="$("$python" -c 'import triton; print(triton.__version__)')"
    echo "== compile report, triton $version"
    start=$(date +%s)
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$python" bench/compile_report.py --jobs "${T2I_COMPILE_JOBS:-2}" \
        --cache-dir "$CACHE" --out "$OUT_DIR/compile_report_$version.json" "$@" || status=1
    echo "== triton $version: $(( $(date +%s) - start )) s"
done
exit $status
