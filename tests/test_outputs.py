"""Output directories: merge, quantize, demo and train never destroy files they do not own."""
import hashlib
import json
import shutil

import pytest
import torch
from cli_in_process import one_line_error, run_cli  # tests/cli_in_process.py


def snapshot(path):
    """Every file under `path` with its content hash: compared before and after to prove nothing changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def model_copy(golden_dir, tmp_path):
    """The golden model inside tmp/parent/model (a copy: some tests point --out at its parent)."""
    model = tmp_path / "parent" / "model"
    shutil.copytree(golden_dir, model)
    return model


def test_quantize_refuses_a_folder_of_unrelated_files(capsys, golden_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8", "--out", out, "--overwrite")
    one_line_error(code, err, str(out), "not a chatglm-ft quantize output")
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["quantize", "merge"])
def test_out_may_not_hold_the_source_model(capsys, command, model_copy):
    parent = model_copy.parent
    before = snapshot(parent)
    extra = ["--bits", "8"] if command == "quantize" else ["--adapter", parent / "adapter"]
    for out in (parent, model_copy):
        code, _, err = run_cli(capsys, command, "--model", model_copy, *extra, "--out", out, "--overwrite")
        one_line_error(code, err, "--model")
    assert snapshot(parent) == before


def test_merge_out_may_not_be_the_adapter(capsys, golden_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    code, _, err = run_cli(capsys, "merge", "--model", golden_dir, "--adapter", adapter, "--out", adapter)
    one_line_error(code, err, "--adapter")
    assert (adapter / "adapter_config.json").read_text() == "{}"


@pytest.mark.parametrize("out", [".", "PWD", ".."])
def test_out_may_not_be_the_working_directory(capsys, golden_dir, tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8",
                           "--out", str(work) if out == "PWD" else out, "--overwrite")
    one_line_error(code, err, "working directory")
    assert (work / "keep.txt").read_text() == "keep"


def test_quantize_replaces_its_own_output_only_with_overwrite(capsys, golden_dir, tmp_path):
    out = tmp_path / "int8"
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8", "--out", out, "--device", "cpu")
    assert code == 0, err
    before = snapshot(out)
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8", "--out", out, "--device", "cpu")
    one_line_error(code, err, "--overwrite")
    assert snapshot(out) == before
    # a merge is not a quantize output, and the other way round
    code, _, err = run_cli(capsys, "merge", "--model", golden_dir, "--adapter", tmp_path / "a", "--out", out, "--overwrite")
    one_line_error(code, err, "not a chatglm-ft merge output")
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "4", "--out", out, "--device", "cpu",
                           "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob(".int8*"))


def test_an_empty_out_is_fine(capsys, golden_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = run_cli(capsys, "quantize", "--model", golden_dir, "--bits", "8", "--out", out, "--device", "cpu")
    assert code == 0, err and (out / "config.json").exists()


def fake_demo_output(out):
    for sub in ("base", "data", "adapter"):
        (out / sub).mkdir(parents=True)
        (out / sub / "file").write_text(sub)
    (out / "demo_results.json").write_text("{}")


def test_demo_refuses_foreign_and_earlier_outputs(capsys, tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "base").mkdir(parents=True)
    (foreign / "base" / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "demo", "--out", foreign, "--overwrite")
    one_line_error(code, err, "not a chatglm-ft demo output")
    assert (foreign / "base" / "thesis.tex").read_text() == "years of work"
    earlier = tmp_path / "earlier"
    fake_demo_output(earlier)
    before = snapshot(earlier)
    code, _, err = run_cli(capsys, "demo", "--out", earlier)
    one_line_error(code, err, "--overwrite")
    assert snapshot(earlier) == before


def test_is_output_of_recognises_each_command(tmp_path):
    from chatglm_ft.outputs import is_output_of

    demo = tmp_path / "demo"
    fake_demo_output(demo)
    assert is_output_of(demo, "demo") and not is_output_of(demo, "train") and not is_output_of(demo, "merge")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    assert is_output_of(run, "train") and not is_output_of(run, "demo")
    (run / "thesis.tex").write_text("x")
    assert not is_output_of(run, "train")


# -- train ------------------------------------------------------------------------------------------------
@pytest.fixture
def train_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": f"{i} {i}"} for i in range(8)]))
    return data


def train_args(golden_dir, data, out, *extra):
    return ["train", "--model", golden_dir, "--data", data, "--output-dir", out, "--max-steps", "2",
            "--per-device-train-batch-size", "4", "--save-steps", "1", "--no-progress", "--report-to", "jsonl",
            "--device", "cpu", "--learning-rate", "1e-3", "--logging-steps", "1", *extra]


def test_train_refuses_an_earlier_run_and_overwrite_moves_it_aside(capsys, golden_dir, train_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(golden_dir, train_data, out))
    assert code == 0, err
    assert (out / "checkpoint-1").is_dir() and (out / "adapter").is_dir()
    before = snapshot(out)
    code, _, err = run_cli(capsys, *train_args(golden_dir, train_data, out, "--seed", "7"))
    one_line_error(code, err, "--overwrite", "--resume")
    assert snapshot(out) == before
    code, _, err = run_cli(capsys, *train_args(golden_dir, train_data, out, "--seed", "7", "--overwrite"))
    assert code == 0, err
    assert "moved to" in err
    assert json.loads((out / "train_config.json").read_text())["seed"] == 7
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the new run's log only: nothing mixed in
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []  # the old run removed at the end


def test_train_beside_unrelated_files_keeps_them(capsys, golden_dir, train_data, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("notes")
    code, _, err = run_cli(capsys, *train_args(golden_dir, train_data, out))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "notes" and (out / "adapter").is_dir()
    code, _, err = run_cli(capsys, *train_args(golden_dir, train_data, out, "--overwrite"))
    one_line_error(code, err, "other files")
    assert (out / "notes.txt").read_text() == "notes"


def test_train_output_may_not_hold_the_model(capsys, model_copy, train_data):
    before = snapshot(model_copy.parent)
    code, _, err = run_cli(capsys, *train_args(model_copy, train_data, model_copy.parent))
    one_line_error(code, err, "--model")
    assert snapshot(model_copy.parent) == before


def test_resume_tolerates_a_torn_last_log_line(capsys, golden_dir, train_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(golden_dir, train_data, out, "--save-steps", "1", "--max-steps", "1"))
    assert code == 0, err
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    code, _, err = run_cli(capsys, *train_args(golden_dir, train_data, out, "--save-steps", "1", "--resume"))
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
