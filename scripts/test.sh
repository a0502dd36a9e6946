#!/usr/bin/env bash
# The test suite (what CI runs): installs what it needs, lints, checks the sm_90 compile report, then runs pytest.
# Extra arguments go to pytest.
# Without a GPU, Triton kernels run in the interpreter (tests/conftest.py) and `gpu` tests are skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" "dev,deepspeed"
"$PY" -m ruff check t2i_kernels t2i_distill tests bench
# The sm_90 compile report of every selectable kernel config, with this Triton and with the GPU image's 3.6.0.
# T2I_SKIP_COMPILE_REPORT=1 skips it (e.g. to rerun a few tests); CI never sets it.
[[ "${T2I_SKIP_COMPILE_REPORT:-0}" == 1 ]] || PY="$PY" bash scripts/compile_report.sh
# Two pytest workers (pytest-xdist, work stealing for the few minute-long tests): CI has 2 cores and every test runs
# one torch thread (tests/conftest.py). T2I_TEST_WORKERS=0 runs in one process (e.g. to debug a test).
exec "$PY" -m pytest -n "${T2I_TEST_WORKERS:-2}" --dist worksteal "$@"
