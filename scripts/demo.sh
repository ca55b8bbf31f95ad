#!/usr/bin/env bash
# The README's first command: install chatglm-ft if it is missing, then `chatglm-ft demo` (options pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --runtime
exec python3 -m chatglm_ft demo "$@"
