#!/usr/bin/env bash
# Download the pure-Python wheels the GPU image lacks (reference: docs/environment.md) into bench/wheels/, so that
# bench/gpu_check.py can install them offline on the device. The folder is git-ignored: pass it to the device run
# (e.g. the device tool's `carry: ["bench/wheels"]`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PY:-python3}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d wheels "diffusers>=0.42,<0.43" importlib_metadata zipp
ls -1 wheels
