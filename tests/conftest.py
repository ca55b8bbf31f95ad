"""Shared fixtures. Everything comes from tests/fixtures/ (built once into tests/artifacts/shared/ by
tests/fixtures/make_fixtures.py): the suite never needs data outside the repository."""
from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch
from ptuning_checks import PREFIXES, golden_of  # tests/ptuning_checks.py

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_fixtures", REPO / "tests" / "fixtures" / "make_fixtures.py")
fixture_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_build)


def shared_dir() -> Path:
    """The fixture tree (golden/, models/, data/), rebuilt when a committed fixture changes."""
    return fixture_build.build()


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def golden_dir(shared) -> Path:
    return shared / "golden" / "chatglm-6b-tiny"


@pytest.fixture(scope="session")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden2_dir(shared) -> Path:
    """ChatGLM2-6B tiny checkpoint in the original format (golden.json beside it)."""
    return shared / "golden" / "chatglm2-6b-tiny"


@pytest.fixture(scope="session")
def golden3_dir(shared) -> Path:
    """ChatGLM3-6B tiny checkpoint in the original format (golden.json beside it)."""
    return shared / "golden" / "chatglm3-6b-tiny"


@pytest.fixture(scope="session")
def golden2(golden2_dir) -> dict:
    return json.loads((golden2_dir / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden3(golden3_dir) -> dict:
    return json.loads((golden3_dir / "golden.json").read_text())


@pytest.fixture(scope="module", params=["chatglm2", "chatglm3"])
def family(request) -> str:
    """ChatGLM2-6B and ChatGLM3-6B in turn, for tests that check both tiny checkpoints the same way."""
    return request.param


@pytest.fixture(scope="module")
def ckpt_dir(request, family) -> Path:
    return request.getfixturevalue("golden2_dir" if family == "chatglm2" else "golden3_dir")


@pytest.fixture(scope="module")
def gold(request, family) -> dict:
    return request.getfixturevalue("golden2" if family == "chatglm2" else "golden3")


@pytest.fixture(scope="session")
def ptuning_dirs(shared) -> dict[str, Path]:
    """P-Tuning v2 prefix checkpoints in THUDM's layout: v1-noproj, v1-proj, v2, v3 (ptuning_golden.json beside)."""
    return {name: shared / "golden" / f"ptuning-{name}" for name in PREFIXES}


@pytest.fixture(scope="session")
def ptuning_bases(golden_dir, golden2_dir, golden3_dir) -> dict[str, Path]:
    """The base checkpoint of each prefix checkpoint of `ptuning_dirs`."""
    return {"v1-noproj": golden_dir, "v1-proj": golden_dir, "v2": golden2_dir, "v3": golden3_dir}


@pytest.fixture(scope="module")
def prefixed(ptuning_bases, ptuning_dirs) -> dict:
    """Prefix checkpoint name -> (its base model with THUDM's prefix, tokenizer, ptuning_golden.json); float32
    on the CPU like the goldens. One set per test module, whose tests may set up caches on them."""
    from chatglm_ft import load

    out = {}
    for name in PREFIXES:
        model, tokenizer = load(ptuning_bases[name], dtype="float32", device="cpu", ptuning=ptuning_dirs[name])
        out[name] = (model, tokenizer, golden_of(ptuning_dirs[name]))
    return out


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """The tokenized-data cache (data.py, under $XDG_CACHE_HOME) in the test's own directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny(golden_dir):
    """The golden tiny model in float32 on CPU, with its tokenizer (shared: do not mutate)."""
    from chatglm_ft import load

    return load(golden_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def no_compile_outlives_its_test(request):
    """A GPU test's engine may stop while its background compile still runs (`Engine.stop` cannot cut it
    short). Wait for it here: a compile thread left running would launch kernels and synchronize while the
    next test captures CUDA graphs, and fail that test instead of its own."""
    yield
    if "gpu" not in request.keywords:
        return
    for thread in threading.enumerate():
        if thread.name == "chatglm-compile":
            thread.join(900)
            assert not thread.is_alive(), "a background decode compile did not end within 15 minutes"
