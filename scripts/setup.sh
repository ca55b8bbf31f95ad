#!/usr/bin/env bash
# Install chatglm-ft with every extra and the test tools. The CPU build of PyTorch comes first
# (on these machines `torch==2.13.0` installs from local disk; elsewhere pick your own build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.4,<2.15"
python3 -m pip install -q -e ".[dev]"
