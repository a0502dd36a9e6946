# Sourced by scripts/demo.sh and scripts/test.sh: make a Python that has this project installed, then export PY.
#
#  - Inside an active virtualenv/conda env, install into it. Otherwise use ./.venv (made on first use; it sees the
#    system site-packages only when the system Python already has torch, so a CUDA torch there is kept).
#  - torch is installed first, and only when missing: `torch==2.13.0` by default, which on the project machines is
#    a CPU wheel already on disk (override with T2I_TORCH_SPEC, e.g. a CUDA build from your index). setup.py's
#    range (>=2.11,<2.14) then accepts the installed torch, so pip never swaps it for a multi-GB CUDA download.
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

_pip() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${T2I_TORCH_SPEC:-torch==2.13.0}"
  _pip "${T2I_TORCH_SPEC:-torch==2.13.0}"
fi
_stamp="$("$PY" -c 'import sys; print(sys.prefix)')/.t2i-distill-installed-${_extras:-base}"
if [[ ! -f "$_stamp" || setup.py -nt "$_stamp" ]]; then
  echo "[setup] installing t2i-distill${_extras:+[$_extras]} (editable) into $("$PY" -c 'import sys; print(sys.prefix)')"
  _pip -e ".${_extras:+[$_extras]}"
  touch "$_stamp"
fi
echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)'), python $PY"
