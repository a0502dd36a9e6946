#!/usr/bin/env bash
# Regenerate constraints.txt: the tested set of versions that the README commands (scripts/setup_env.sh) install.
#
#   bash scripts/lock.sh                               # re-resolve, keeping every pin that still satisfies setup.py
#   bash scripts/lock.sh --upgrade-package transformers   # move one package to its newest allowed version
#   bash scripts/lock.sh --upgrade                     # move everything to the newest versions setup.py allows
#
# Upgrading a dependency is a deliberate commit: regenerate, run `bash scripts/test.sh`, commit both files. The
# resolution covers the base install plus the `dev` and `deepspeed` extras (what scripts/test.sh installs; the demo
# installs a subset), for Python >= 3.11 on every platform (uv's universal mode writes markers where versions fork).
# Uses `uv` from PATH, or installs it into a throwaway virtualenv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UV="${UV:-uv}"
if ! command -v "$UV" >/dev/null 2>&1; then
  _uv_env="$(mktemp -d)/uv"
  python3 -m venv "$_uv_env"
  "$_uv_env/bin/python" -m pip install --quiet --disable-pip-version-check uv
  UV="$_uv_env/bin/uv"
fi
"$UV" pip compile setup.py --extra dev --extra deepspeed --universal --python-version 3.11 \
  --override scripts/lock-overrides.txt --custom-compile-command "bash scripts/lock.sh" \
  --output-file constraints.txt "$@"
