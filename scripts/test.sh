#!/usr/bin/env bash
# The README's test command: set up what is missing, then the whole suite (GPU tests skip without CUDA;
# the page test skips unless Chromium is installed: `bash scripts/setup.sh --browser`, automatic under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q -p no:cacheprovider tests "$@"
