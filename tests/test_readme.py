"""The README's snippets run as written. Every ```bash / ```python block runs here (with /tmp/ moved to a
temporary folder and `chatglm-ft` taken from this clone) unless its info string says `no-test (why)`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(bash|python)([^\n]*)\n(.*?)^```", README, re.M | re.S)


def runnable():
    return [code for _, info, code in BLOCKS if not info.strip().startswith("no-test")]


def test_every_snippet_runs_or_says_why_not():
    assert len(BLOCKS) >= 10
    for language, info, code in BLOCKS:
        info = info.strip()
        assert not info or re.fullmatch(r"no-test \(.+\)", info), f"```{language} {info}: say why it does not run"
    assert len(runnable()) >= 1


def test_no_words_a_reader_cannot_know():
    for word in ("the seed", "the issue", "SPEC.md", "../shared", "THUDM/chatglm-6b-dir", "~/models", "--model DIR"):
        assert word not in README, word
    models = {m.rstrip("`") for m in re.findall(r"--model (\S+)", README)}
    assert {m for m in models if "chatglm-6b" in m and not m.startswith("demo-out")} <= {"/path/to/chatglm-6b"}, models


def test_quick_start_is_two_commands():
    quick = README.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line for line in quick.splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert [c.split("#")[0].strip() for c in commands] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


@pytest.mark.parametrize("index", range(len([b for b in BLOCKS if not b[1].strip().startswith("no-test")])))
def test_snippet_runs(index, tmp_path):
    code = runnable()[index].replace("/tmp/", f"{tmp_path}/")
    language = next(lang for lang, info, c in BLOCKS if c == runnable()[index])
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "chatglm-ft").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m chatglm_ft "$@"\n')
    (shim / "chatglm-ft").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PYTHONPATH": str(REPO / "src"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if "--output-dir /tmp/tiny-lora" in runnable()[index]:  # the tiny training really trains
        losses = [loss for _, loss in json.loads((tmp_path / "tiny-lora" / "train_results.json").read_text())["losses"]]
        assert min(losses[-4:]) < losses[0] - 0.5, losses
