"""The in-repository fixtures rebuild the original golden checkpoints bit for bit."""
from __future__ import annotations

import json

import torch

from conftest import REPO, fixture_build

DIGESTS = json.loads((REPO / "tests" / "fixtures" / "golden" / "weights.sha256.json").read_text())


def test_rebuilt_weights_equal_the_original_files_tensor_for_tensor(shared):
    assert len(DIGESTS) == 10  # 3 checkpoints x 2 shards + 4 prefix files
    for relative, expected in DIGESTS.items():
        stored = torch.load(shared / "golden" / relative, map_location="cpu", weights_only=True)
        assert {name: fixture_build.tensor_digest(t) for name, t in stored.items()} == expected, relative


def test_the_build_is_cached_and_a_prefix_rebuilds_exactly(shared, tmp_path):
    assert fixture_build.build() == shared and (shared / "fingerprint").read_text() == fixture_build.fingerprint()
    before = (shared / "golden" / "chatglm-6b-tiny" / "pytorch_model-00001-of-00002.bin").stat().st_mtime_ns
    assert fixture_build.build() == shared  # unchanged sources: nothing rebuilt
    assert (shared / "golden" / "chatglm-6b-tiny" / "pytorch_model-00001-of-00002.bin").stat().st_mtime_ns == before
    (tmp_path / "golden" / "chatglm-6b-tiny").mkdir(parents=True)
    fixture_build.build_prefix("ptuning-v2", tmp_path / "golden" / "ptuning-v2")
    saved = torch.load(tmp_path / "golden" / "ptuning-v2" / "pytorch_model.bin", weights_only=True)
    assert {k: fixture_build.tensor_digest(v) for k, v in saved.items()} == DIGESTS["ptuning-v2/pytorch_model.bin"]


def test_every_golden_dir_is_a_loadable_checkpoint_layout(shared):
    for name in ("chatglm-6b-tiny", "chatglm2-6b-tiny", "chatglm3-6b-tiny"):
        folder = shared / "golden" / name
        index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
        assert set(index["weight_map"].values()) == set(fixture_build.SHARDS)
        assert all((folder / shard).exists() for shard in fixture_build.SHARDS)
        assert (folder / fixture_build.TOKENIZER[name][1]).exists() and (folder / "golden.json").exists()


def test_the_suite_needs_nothing_outside_the_repository(shared):
    assert shared.resolve().is_relative_to(REPO.resolve())
    for test_file in (REPO / "tests").glob("*.py"):
        text = test_file.read_text(encoding="utf-8")
        for outside in ("CHATGLM_FT_SHARED", "../shared", "/work/shared", "parents[2]"):
            assert outside not in text or test_file.name in ("test_fixtures.py", "test_readme.py"), (test_file.name, outside)
    ci = (REPO / ".ci" / "run").read_text()
    # CI runs exactly the README's test command, without the data folder that development machines may have
    assert "unset CHATGLM_FT_SHARED" in ci and ci.rstrip().endswith("bash scripts/test.sh")
    assert "bash scripts/test.sh" in (REPO / "README.md").read_text(encoding="utf-8")
