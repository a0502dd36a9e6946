# Sourced by scripts/demo.sh and scripts/test.sh: make a Python that has this project installed, then export PY.
#
#  - Inside an active virtualenv/conda env, install into it. Otherwise use ./.venv (made on first use; it sees the
#    system site-packages only when the system Python already has torch, so a CUDA torch there is kept).
#  - Versions come from constraints.txt, the tested set (regenerate it with `bash scripts/lock.sh`); setup.py keeps
#    ranges for library users. T2I_NO_LOCK=1 installs from the ranges alone instead.
#  - torch is installed first, and only when missing: `torch==2.13.0` by default, which on the project machines is
#    a CPU wheel already on disk (override with T2I_TORCH_SPEC, e.g. a CUDA build from your index). setup.py's
#    range (>=2.11,<2.14) then accepts the installed torch, so pip never swaps it for a multi-GB CUDA download.
#    A torch other than the locked CPU build (yours, or T2I_TORCH_SPEC's) is kept together with its triton and CUDA
#    wheels: those lines of the lock are left out, everything else still follows it.
#  - $1: the extras to install ("" for none).
set -euo pipefail

_extras="${1:-}"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_root"

if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
  PY="$(command -v python)"
else
  _venv="${T2I_VENV:-$_root/.venv}"
  if [[ ! -x "$_venv/bin/python" ]]; then
    _base="${T2I_PYTHON:-python3}"
    if "$_base" -c "import torch" >/dev/null 2>&1; then
      echo "[setup] system Python has torch $("$_base" -c 'import torch; print(torch.__version__)'); keeping it"
      "$_base" -m venv --system-site-packages "$_venv"
    else
      "$_base" -m venv "$_venv"
    fi
  fi
  PY="$_venv/bin/python"
fi
export PY
_prefix="$("$PY" -c 'import sys; print(sys.prefix)')"

_lock="$_root/constraints.txt"
_constraints=()
if [[ "${T2I_NO_LOCK:-0}" != 1 ]]; then
  _constraints=(-c "$_lock")
fi
_pip() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${T2I_TORCH_SPEC:-torch==2.13.0}"
  if [[ -n "${T2I_TORCH_SPEC:-}" ]]; then _pip "$T2I_TORCH_SPEC"; else _pip torch==2.13.0 "${_constraints[@]}"; fi
fi

# The locked torch stack applies only to the locked CPU build of torch; any other torch keeps its own triton.
_locked_torch="$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$_lock")"
if [[ ${#_constraints[@]} -gt 0 ]] && ! "$PY" -c "
import sys, torch
sys.exit(0 if torch.version.cuda is None and torch.__version__.split('+')[0] == '$_locked_torch' else 1)"; then
  _filtered="$_prefix/t2i-distill-constraints-no-torch.txt"
  grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' "$_lock" > "$_filtered"
  echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)') is not the locked CPU build $_locked_torch:" \
       "keeping it and its triton; everything else follows constraints.txt"
  _constraints=(-c "$_filtered")
fi

_stamp="$_prefix/.t2i-distill-installed-${_extras:-base}"
if [[ ! -f "$_stamp" || setup.py -nt "$_stamp" || "$_lock" -nt "$_stamp" ]]; then
  echo "[setup] installing t2i-distill${_extras:+[$_extras]} (editable) into $_prefix" \
       "${_constraints[*]:+with ${_constraints[1]##*/}}"
  _pip -e ".${_extras:+[$_extras]}" "${_constraints[@]}"
  touch "$_stamp"
fi
echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)'), python $PY"
