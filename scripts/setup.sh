#!/usr/bin/env bash
# Install chatglm-ft with every extra and the test tools. The CPU build of PyTorch comes first
# (on these machines `torch==2.13.0` installs from local disk; elsewhere pick your own build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.4,<2.15"
python3 -m pip install -q -e ".[dev]"

# ---- serving tests (tests/test_web.py): a headless Chromium driven by Playwright ----------------
# Debian's chromium (never `playwright install`), a CJK font so screenshots of Chinese text are
# legible, and the playwright Python package. Guarded: without apt-get or root the browser is left
# out and tests/test_web.py fails under CI=true (skips elsewhere); the rest of the setup still runs.
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null; } \
      || echo "setup.sh: could not install chromium; tests/test_web.py will not run" >&2
  else
    echo "setup.sh: no apt-get (or not root): install Chromium to run tests/test_web.py" >&2
  fi
fi
python3 -m pip install -q "playwright>=1.40" || echo "setup.sh: could not install playwright; tests/test_web.py will not run" >&2
