"""`chatglm-ft train --fsdp` (FSDP2 fully_shard) with two CPU processes over gloo, on the golden checkpoint.

One torchrun launch runs three trainings in the same two processes (starting processes costs more
than training the tiny model): full fine-tuning with a checkpoint and an uneven evaluation split,
the same run resumed from its checkpoint-2 in another directory, and LoRA with gradient
checkpointing. Each is compared with one process and the same global batch (2 x 2 processes vs
4 x 1, accumulation 2). Everything is float32 on the CPU; the only difference from one process is
the order in which the two halves of each gradient are summed (reduce-scatter), a few ulps that 3
AdamW steps cannot grow past 1e-5 — observed: identical losses.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatglm_ft import load
from chatglm_ft.cli import main

# The worker owns the process group, so train() joins it and leaves it for the next run.
WORKER = """
import json, shutil, sys
import torch.distributed as dist
from chatglm_ft.cli import main

dist.init_process_group("gloo")
for step in json.load(open(sys.argv[1])):
    if "copy" in step:
        if dist.get_rank() == 0:
            shutil.copytree(*step["copy"])
        dist.barrier()
    elif main(step["argv"]) != 0:
        sys.exit(1)
dist.destroy_process_group()
"""

COMMON = ["--max-steps", "3", "--gradient-accumulation-steps", "2", "--warmup-steps", "0", "--logging-steps", "1",
          "--save-steps", "2", "--template", "alpaca", "--no-progress", "--report-to", "jsonl", "--device", "cpu",
          "--max-source-length", "32", "--max-target-length", "16",
          # 3 held out, one per batch: rank 0 evaluates 2 examples, rank 1 one and a stand-in
          "--val-size", "3", "--eval-steps", "3", "--per-device-eval-batch-size", "1"]
FULL = ["--finetuning-type", "full", "--learning-rate", "1e-3"]
LORA = ["--lora-target", "all", "--lora-dropout", "0", "--learning-rate", "1e-2"]


def write_data(path):
    """15 rows: 12 train examples fill 3 global batches of 4 exactly (a short last batch is padded by
    repeating examples on each rank, which changes the global batch), 3 held out."""
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
            for a in range(5) for b in range(3)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def fsdp_runs(golden_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    data = write_data(tmp / "add.json")
    base = ["train", "--model", str(golden_dir), "--data", str(data), "--per-device-train-batch-size", "2", "--fsdp",
            *COMMON]
    steps = [
        {"argv": [*base, *FULL, "--output-dir", str(tmp / "full")]},
        {"copy": [str(tmp / "full" / "checkpoint-2"), str(tmp / "resumed" / "checkpoint-2")]},
        {"argv": [*base, *FULL, "--output-dir", str(tmp / "resumed"), "--resume"]},
        {"argv": [*base, *LORA, "--output-dir", str(tmp / "lora"), "--gradient-checkpointing"]},
    ]
    (tmp / "steps.json").write_text(json.dumps(steps))
    (tmp / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp / "worker.py"), str(tmp / "steps.json")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, data, result.stderr


def one_process(golden_dir, data, out, *args):
    assert main(["train", "--model", str(golden_dir), "--data", str(data), "--output-dir", str(out),
                 "--per-device-train-batch-size", "4", *COMMON, *args]) == 0
    return json.loads((out / "train_results.json").read_text())


def assert_same_curves(sharded, single):
    assert [s for s, _ in sharded["losses"]] == [1, 2, 3] and [s for s, _ in sharded["eval_losses"]] == [3]
    for key in ("losses", "eval_losses"):
        torch.testing.assert_close(torch.tensor(sharded[key]), torch.tensor(single[key]), rtol=1e-5, atol=1e-5)


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


def model_tensors(model_dir):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for file in dict.fromkeys(index["weight_map"].values()):
        out.update(load_file(model_dir / file))
    return {name: out[name] for name in index["weight_map"]}


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_full_finetuning_under_fsdp_equals_one_process(fsdp_runs, golden_dir, tmp_path):
    tmp, data, stderr = fsdp_runs
    sharded = json.loads((tmp / "full" / "train_results.json").read_text())
    single = one_process(golden_dir, data, tmp_path / "one", *FULL)
    assert "full fine-tuning, FSDP over 2 processes" in stderr
    assert_same_curves(sharded, single)
    assert sharded["losses"][-1][1] < sharded["losses"][0][1]

    # the final model: the same files and tensor order a single process writes, loadable by our loader
    assert list(model_tensors(tmp / "full" / "model")) == list(model_tensors(tmp_path / "one" / "model"))
    assert sorted(p.name for p in (tmp / "full" / "model").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "model").iterdir())
    assert_same_tensors(model_tensors(tmp / "full" / "model"), model_tensors(tmp_path / "one" / "model"))
    reloaded, _ = load(tmp / "full" / "model", dtype="float32", device="cpu")
    reference, _ = load(tmp_path / "one" / "model", dtype="float32", device="cpu")
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)

    # the checkpoint too: optimizer state numbered like optimizer.state_dict() of one process
    mine = torch.load(tmp / "full" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    theirs = torch.load(tmp_path / "one" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    count = sum(len(group["params"]) for group in theirs["optimizer"]["param_groups"])
    assert sorted(mine["optimizer"]["state"]) == sorted(theirs["optimizer"]["state"]) == list(range(count))
    for i, state in theirs["optimizer"]["state"].items():
        assert_same_tensors(mine["optimizer"]["state"][i], state)


def test_resume_under_fsdp_and_without_it_continues_the_same_run(fsdp_runs, golden_dir, tmp_path):
    tmp, data, stderr = fsdp_runs
    whole = json.loads((tmp / "full" / "train_results.json").read_text())
    resumed = json.loads((tmp / "resumed" / "train_results.json").read_text())
    assert "resuming from" in stderr
    assert resumed["losses"] == whole["losses"] and resumed["eval_losses"] == whole["eval_losses"]
    assert_same_tensors(model_tensors(tmp / "resumed" / "model"), model_tensors(tmp / "full" / "model"))

    # one process without FSDP continues the FSDP checkpoint: the layouts are the same
    shutil.copytree(tmp / "full" / "checkpoint-2", tmp_path / "single" / "checkpoint-2")
    single = one_process(golden_dir, data, tmp_path / "single", *FULL, "--resume")
    assert_same_curves(single, whole)
    assert_same_tensors(model_tensors(tmp_path / "single" / "model"), model_tensors(tmp / "full" / "model"))


def test_lora_with_gradient_checkpointing_under_fsdp(fsdp_runs, golden_dir, tmp_path, capsys):
    tmp, data, _ = fsdp_runs
    sharded = json.loads((tmp / "lora" / "train_results.json").read_text())
    single = one_process(golden_dir, data, tmp_path / "one", *LORA, "--fsdp")  # --fsdp alone: a no-op
    assert "note: --fsdp with one process: nothing to shard" in capsys.readouterr().err
    assert_same_curves(sharded, single)
    assert sharded["losses"][-1][1] < sharded["losses"][0][1]
    adapter = load_file(tmp / "lora" / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 4 * 2  # lora_A and lora_B of 4 Linears in 2 layers, full tensors
    assert_same_tensors(adapter, load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))


def test_fsdp_refuses_a_quantized_base(golden_dir, tmp_path, capsys):
    code = main(["train", "--model", str(golden_dir), "--data", "x.json", "--output-dir", str(tmp_path / "o"),
                 "--fsdp", "--quantize", "int4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--fsdp" in err[0] and "--quantize" in err[0], err
