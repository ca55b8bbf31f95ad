"""Checks shared by the P-Tuning tests of every family (test_ptuning.py, test_ptuning_glm2.py): THUDM's
prefix checkpoints and their goldens, a prefix saved again, and wrong directories refused in one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# THUDM's prefix checkpoints (conftest.ptuning_dirs): ChatGLM-6B without and with the projection, ChatGLM2/3-6B
PREFIXES = ("v1-noproj", "v1-proj", "v2", "v3")
# config.json fields a saved prefix keeps as THUDM wrote them, in every family (each adds its own)
SAVED_FIELDS = ("pre_seq_len", "prefix_projection", "model_type", "num_layers", "hidden_size", "num_attention_heads",
                "torch_dtype", "auto_map")


def golden_of(path: Path) -> dict:
    return json.loads((path / "ptuning_golden.json").read_text())


def assert_saved_as_thudm(out: Path, prefix_dir: Path, golden: dict, fields: tuple[str, ...]) -> dict:
    """The prefix of `prefix_dir`, loaded and saved again to `out`, is THUDM's: the same float32 tensors bit for
    bit under the keys its golden records, and the same values of `fields` in config.json. Returns our config."""
    original = torch.load(prefix_dir / "pytorch_model.bin", weights_only=True)
    saved = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert sorted(saved) == sorted(original) == sorted(golden["saved_keys"])
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], original[k]) for k in original)
    theirs, ours = (json.loads((d / "config.json").read_text()) for d in (prefix_dir, out))
    assert {k: ours.get(k) for k in fields} == {k: theirs.get(k) for k in fields}
    return ours


# -- wrong directories ------------------------------------------------------------------------------------
def broken_copy(src: Path, dst: Path, *, config: dict | None = None, state: dict | None = None) -> Path:
    """A copy of a prefix directory with config.json fields overridden and/or other weights."""
    shutil.copytree(src, dst)
    if config is not None:
        raw = json.loads((dst / "config.json").read_text())
        raw.update(config)
        (dst / "config.json").write_text(json.dumps(raw))
    if state is not None:
        torch.save(state, dst / "pytorch_model.bin")
    return dst


def full_save_with_prefix(base_dir: Path, dst: Path) -> Path:
    """What THUDM's finetune_hf.py saves: the whole (sharded) model, with pre_seq_len in its config.json."""
    shutil.copytree(base_dir, dst, ignore=shutil.ignore_patterns("config.json"))
    raw = json.loads((base_dir / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**raw, "pre_seq_len": 4}))
    return dst


def assert_refused_in_one_line(model, cases: dict[str, Path], base_dir: Path) -> None:
    """Each directory of `cases` (message pattern -> directory) is refused as a prefix with one line matching
    its message, and leaves nothing attached; so is the base checkpoint, which has no pre_seq_len."""
    from chatglm_ft.errors import ChatGLMError  # here, not at the top: conftest.py imports this module
    from chatglm_ft.ptuning import load_prefix, prefix_length

    for message, path in cases.items():
        with pytest.raises(ChatGLMError, match=message) as error:
            load_prefix(model, path)
        assert "\n" not in str(error.value)
    assert prefix_length(model) == 0  # nothing half-attached
    with pytest.raises(ChatGLMError, match="no pre_seq_len, so this is not a P-Tuning checkpoint"):
        load_prefix(model, base_dir)
