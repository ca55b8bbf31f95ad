#!/usr/bin/env bash
# Install what is missing, nothing else: quick when everything is already there.
#   bash scripts/setup.sh            chatglm-ft from this clone with every extra and the test tools
#   bash scripts/setup.sh --runtime  only what `chatglm-ft demo` needs (chatglm-ft[train])
#   bash scripts/setup.sh --browser  also Chromium + Playwright for tests/test_web.py (the default when CI=true)
# Use a virtual environment (python3 -m venv .venv && . .venv/bin/activate) unless this machine is yours.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="dev" browser="${CI:-}"
for arg in "$@"; do
  case "$arg" in
    --runtime) extras="train" ;;
    --browser) browser=true ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# Installed = chatglm_ft resolves to this clone and every module of the chosen extras is present.
modules="torch,sentencepiece,safetensors,peft,yaml,tqdm"
[ "$extras" = dev ] && modules="$modules,jieba,rouge_chinese,nltk,fastapi,uvicorn,pytest,openai,httpx"
if ! python3 - "$modules" "$PWD/src" 2>/dev/null <<'PY'
import importlib.util, sys
from pathlib import Path
assert all(importlib.util.find_spec(name) for name in sys.argv[1].split(","))  # found, not imported: fast
package = importlib.util.find_spec("chatglm_ft")
assert package and Path(package.origin).resolve().is_relative_to(Path(sys.argv[2]).resolve())
PY
then
  echo "setup.sh: installing chatglm-ft[$extras] (PyTorch CPU build unless one is installed; about 1 GB with every extra)" >&2
  python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0" 2>/dev/null \
    || python3 -m pip install -q "torch>=2.4,<2.15"
  python3 -m pip install -q -e ".[$extras]"
fi

# ---- the page test (tests/test_web.py): a headless Chromium driven by Playwright, opt-in outside CI ----
# Debian's chromium (never `playwright install`) and a CJK font; installed system-wide, hence opt-in.
if [ "$browser" = true ] || [ "$browser" = 1 ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null; } \
        || echo "setup.sh: could not install chromium; tests/test_web.py will not run" >&2
    else
      echo "setup.sh: no apt-get (or not root): install Chromium to run tests/test_web.py" >&2
    fi
  fi
  python3 -c "import playwright" 2>/dev/null || python3 -m pip install -q "playwright>=1.40" \
    || echo "setup.sh: could not install playwright; tests/test_web.py will not run" >&2
fi
