#!/usr/bin/env bash
# The test suite (what CI runs): installs what it needs, lints, then runs pytest. Extra arguments go to pytest.
# Without a GPU, Triton kernels run in the interpreter (tests/conftest.py) and `gpu` tests are skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" "dev,deepspeed"
"$PY" -m ruff check kernels t2i_distill tests bench
exec "$PY" -m pytest "$@"
