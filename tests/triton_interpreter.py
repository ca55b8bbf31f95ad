"""Running a Triton kernel check on the CPU: a script in a fresh interpreter with TRITON_INTERPRET=1
(set before triton is imported, so the kernels of the package run in Triton's interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys


def interpret(script: str, *args: str) -> str:
    """The script's stdout; fails the test with its stderr when it exits non-zero."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
