#!/usr/bin/env bash
# The test command of the README: setup, then the whole suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q -p no:cacheprovider tests "$@"
