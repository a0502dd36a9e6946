#!/usr/bin/env bash
# Download the pure-Python wheels the GPU image lacks (reference: docs/environment.md) into bench/wheels/, so that
# bench/gpu_check.py can install them offline on the device. The folder is git-ignored: pass it to the device run
# (e.g. the device tool's `carry: ["bench/wheels"]`). Versions are the tested ones from constraints.txt.
#
# The image's own torch (2.11), triton (3.6) and transformers are used as they are; the image has no Hugging Face
# `kernels`, and needs none: our Triton layer is `t2i_kernels`, which cannot collide with it either way.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PY:-python3}"
locked() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" ../constraints.txt | head -1; }
specs=()
for name in diffusers importlib-metadata zipp; do
  version="$(locked "$name")"
  [[ -n "$version" ]] || { echo "prepare_gpu_wheels.sh: $name is not in constraints.txt" >&2; exit 1; }
  specs+=("$name==$version")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d wheels "${specs[@]}"
ls -1 wheels
