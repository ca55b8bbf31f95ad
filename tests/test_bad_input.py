"""Broken or hostile input gives one `error:` line naming the file or value and the fix, never a traceback:
checkpoint indexes, adapters, config sizes, training data, a full disk, YAML numbers, missing extras,
sampling edge values; and written weight files are readable like every other file."""
import argparse
import copy
import errno
import json
import os
import shutil
import stat
import sys

import pytest
import torch
from cli_in_process import one_line_error, run_cli  # tests/cli_in_process.py

from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.errors import ChatGLMError


def generate(capsys, model, *extra):
    return run_cli(capsys, "generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2", "--temperature",
                   "0", "--device", "cpu", *extra)


@pytest.fixture
def model_copy(golden_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(golden_dir, model)
    return model


# -- checkpoints --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, needle", [
    ("config.json", "not a weight file"),
    ("../../../../etc/passwd", "not a weight file"),
    ("../../../../etc/shadow.bin", "outside the checkpoint folder"),
    ("/etc/x.safetensors", "outside the checkpoint folder"),
])
def test_index_entries_must_be_weight_files_in_the_folder(capsys, model_copy, entry, needle):
    index_file = model_copy / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = entry
    index_file.write_text(json.dumps(index))
    code, _, err = generate(capsys, model_copy)
    one_line_error(code, err, str(index_file), needle)


def test_unsafe_pickle_is_refused_without_torchs_hint(capsys, model_copy):
    shard = model_copy / "pytorch_model-00001-of-00002.bin"
    torch.save({"weights": argparse.Namespace(payload="any Python object")}, shard)  # a Python object, not tensors: loading it could run code
    code, _, err = generate(capsys, model_copy)
    line = one_line_error(code, err, str(shard), "could run code")
    assert "weights_only" not in line


@pytest.mark.parametrize("key, value", [
    ("hidden_size", -64), ("num_layers", 0), ("vocab_size", "130528"), ("inner_hidden_size", None),
    ("max_sequence_length", 1e12), ("num_attention_heads", True), ("max_sequence_length", 2048.5),
])
def test_config_sizes_are_checked_at_load(capsys, model_copy, key, value):
    config_file = model_copy / "config.json"
    raw = json.loads(config_file.read_text())
    raw[key] = value
    config_file.write_text(json.dumps(raw))
    code, _, err = generate(capsys, model_copy)
    line = one_line_error(code, err, str(config_file), key)
    if key == "max_sequence_length":
        assert "1,048,576" in line  # the limit it exceeds


def test_config_token_ids_must_fit_the_vocabulary():
    raw = json.loads(json.dumps(ChatGLMConfig.tiny().to_dict()))
    raw["eos_token_id"] = raw["vocab_size"]
    with pytest.raises(ChatGLMError, match="eos_token_id"):
        ChatGLMConfig.from_dict(raw)


# -- adapters -------------------------------------------------------------------------------------------------
@pytest.fixture
def adapter(golden_dir, tiny, tmp_path):
    from chatglm_ft.lora import apply_lora, save_adapter

    peft_model = apply_lora(copy.deepcopy(tiny[0]))
    return save_adapter(peft_model, tmp_path / "adapter", base_model=golden_dir)


def test_truncated_adapter_weights(capsys, golden_dir, adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    code, _, err = generate(capsys, golden_dir, "--adapter", adapter)
    one_line_error(code, err, str(adapter), "cannot read the adapter weights")


def test_unloadable_adapter_bin(capsys, golden_dir, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.x.lora_A.weight": argparse.Namespace(payload="any Python object")}, adapter / "adapter_model.bin")
    code, _, err = generate(capsys, golden_dir, "--adapter", adapter)
    line = one_line_error(code, err, str(adapter), "cannot read the adapter weights")
    assert "weights_only" not in line


@pytest.mark.parametrize("key, value", [("r", "eight"), ("lora_alpha", None), ("lora_dropout", 2),
                                        ("target_modules", 5), ("fan_in_fan_out", "no")])
def test_adapter_config_with_wrong_types(capsys, golden_dir, adapter, key, value):
    config_file = adapter / "adapter_config.json"
    raw = json.loads(config_file.read_text())
    raw[key] = value
    config_file.write_text(json.dumps(raw))
    code, _, err = generate(capsys, golden_dir, "--adapter", adapter)
    one_line_error(code, err, str(config_file), key)


# -- sampling values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1e-300", "nan", "inf", "-1", "1e-6"])
def test_generate_refuses_unusable_temperatures(capsys, golden_dir, value):
    code, _, err = run_cli(capsys, "generate", "--model", golden_dir, "--prompt", "hi", "--temperature", value,
                           "--device", "cpu", "--max-new-tokens", "2")
    one_line_error(code, err, "temperature must be 0 (greedy) or between 1e-05 and 100")


def test_check_temperature_bounds():
    from chatglm_ft.generation_config import GenerationConfig, check_temperature

    assert check_temperature(0) == 0 and check_temperature(1e-5) == 1e-5 and check_temperature(100) == 100
    for bad in (1e-300, float("nan"), float("inf"), -0.5, 101, True):
        with pytest.raises(ChatGLMError):
            check_temperature(bad)
    assert GenerationConfig(do_sample=True, temperature=0).validate().do_sample is False
    with pytest.raises(ChatGLMError, match="repetition_penalty"):
        GenerationConfig(repetition_penalty=float("nan")).validate()


# -- training data and settings --------------------------------------------------------------------------------
def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


GOOD_ROW = {"instruction": "say hi", "input": "", "output": "hi"}


def test_training_rows_nested_too_deep_or_with_lone_surrogates(tmp_path):
    from chatglm_ft.records import load_records

    deep = '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}'
    jsonl = write(tmp_path / "rows.jsonl", "\n".join([json.dumps(GOOD_ROW), deep,
                                                      '{"instruction": "a \\ud800 b", "output": "x"}',
                                                      '{"instruction": "ok \\ud83d\\ude00", "output": "x"}']))
    records, report = load_records(jsonl)
    assert len(records) == 2  # the good row and the paired surrogate (an emoji)
    reasons = [why for _, why in report.bad_rows]
    assert any("nested too deeply" in r for r in reasons) and any("lone surrogate" in r for r in reasons)
    with pytest.raises(ChatGLMError, match=r"rows.jsonl:2: nested too deeply"):
        load_records(jsonl, on_bad_row="error")
    array = write(tmp_path / "rows.json", "[" + json.dumps(GOOD_ROW) + ",\n" + deep + "]")
    with pytest.raises(ChatGLMError, match=r"rows.json:2: not valid JSON \(nested too deeply\)"):
        load_records(array)
    array = write(tmp_path / "pairs.json", "[" + json.dumps(GOOD_ROW) + ', {"instruction": "\\udfff", "output": "y"}]')
    records, report = load_records(array)
    assert len(records) == 1 and "lone surrogate" in report.bad_rows[0][1]


def test_yaml_numbers_written_as_text(tmp_path):
    from chatglm_ft.train_config import TrainConfig

    config = TrainConfig.from_file(write(tmp_path / "c.yaml", "learning-rate: 2e-4\nmax-steps: 1e2\nseed: 3\n"))
    assert config.learning_rate == 2e-4 and config.max_steps == 100 and isinstance(config.max_steps, int)
    for text, key in (("learning-rate: fast\n", "learning-rate"), ("max-steps: 1.5\n", "max-steps"),
                      ("resume: 1\n", "resume"), ("learning-rate: .nan\n", "learning-rate")):
        with pytest.raises(ChatGLMError, match=key):
            TrainConfig.from_file(write(tmp_path / "bad.yaml", text))


def test_examples_longer_than_the_positions(tmp_path, monkeypatch):
    from chatglm_ft.api import build_model
    from chatglm_ft.data import Example
    from chatglm_ft.train import TrainConfig, train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    small = dict(vocab_size=256, gmask_token_id=250, bos_token_id=251, eos_token_id=252, mask_token_id=253,
                 pad_token_id=3, max_sequence_length=16)

    def example(n):
        ids = list(range(10, 10 + n - 3)) + [250, 251, 252]
        return Example(input_ids=ids, labels=[-100] * (n - 2) + ids[-2:])

    examples = [example(8)] * 6 + [example(30)] * 2
    settings = dict(max_steps=2, per_device_train_batch_size=2, save_steps=0, eval_steps=0, progress=False,
                    report_to=["jsonl"], device="cpu", learning_rate=1e-3, warmup_steps=0)
    with pytest.raises(ChatGLMError, match="2 training example.*16 positions"):
        train(TrainConfig(output_dir=str(tmp_path / "a"), on_bad_row="error", **settings),
              model=build_model(ChatGLMConfig.tiny(**small), dtype=torch.float32, device="cpu"), examples=examples)
    result = train(TrainConfig(output_dir=str(tmp_path / "b"), **settings),
                   model=build_model(ChatGLMConfig.tiny(**small), dtype=torch.float32, device="cpu"), examples=examples)
    assert result.steps == 2


def test_bench_prompts_fit_a_small_vocabulary():
    from chatglm_ft.bench import random_prompt

    config = ChatGLMConfig.tiny(vocab_size=300, gmask_token_id=290, bos_token_id=291, eos_token_id=292,
                                mask_token_id=293)
    ids = random_prompt(config, 500, torch.Generator().manual_seed(0))
    assert max(ids) < 300 and not {290, 291, 292, 293, 3} & set(ids[:-2]) and ids[-2:] == [290, 291]


# -- a full disk, missing extras, file modes ------------------------------------------------------------------
def test_full_disk_while_writing_a_checkpoint(capsys, golden_dir, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "int8"
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8", "--out", out, "--device", "cpu")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8", "--out", out, "--device", "cpu",
                           "--overwrite")
    line = err.strip().splitlines()[-1]  # after the progress line
    assert code == 2 and "Traceback" not in err
    assert "error: the disk is full" in line and str(out) in line and "nothing was replaced" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no partial copy left behind


def test_full_disk_during_a_training_save(capsys, golden_dir, tmp_path, monkeypatch):
    data = write(tmp_path / "d.json", json.dumps([GOOD_ROW] * 4))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("trainer_state.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file"
                               " data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", golden_dir, "--data", data, "--output-dir", out, "--max-steps",
                           "2", "--save-steps", "1", "--no-progress", "--report-to", "jsonl", "--device", "cpu")
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert "the disk is full" in line and "checkpoint-1" in line
    assert not list(out.glob("checkpoint-*"))  # no half-written checkpoint


@pytest.mark.parametrize("command, module, extra", [
    (["generate", "--adapter", "x"], "peft", "train"),
    (["serve"], "fastapi", "serve"),
    (["train", "--config", "c.yaml"], "yaml", "train"),
])
def test_missing_extras_give_the_install_hint(capsys, golden_dir, tmp_path, monkeypatch, command, module, extra):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "c.yaml", "max-steps: 1\n")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    args = command + ["--model", golden_dir] + (["--prompt", "hi", "--device", "cpu"] if command[0] == "generate" else [])
    code, _, err = run_cli(capsys, *args)
    one_line_error(code, err, f"pip install 'chatglm-ft[{extra}]'")


def test_written_weight_files_are_readable_like_other_files(capsys, golden_dir, tmp_path):
    out = tmp_path / "int8"
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8", "--out", out, "--device", "cpu")
    assert code == 0, err
    expected = 0o666 & ~_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {expected}, modes


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
