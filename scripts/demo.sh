#!/usr/bin/env bash
# The main job on an embedded default, no downloads: parity + benchmark report on a tiny FLUX.
# Installs what it needs (see scripts/setup_env.sh); extra arguments go to `t2i-distill demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" ""
exec "$PY" -m t2i_distill.cli demo "$@"
