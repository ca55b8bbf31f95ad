"""The training loop: loss goes down, kill-and-resume repeats the uninterrupted losses exactly,
two DDP processes (gloo, torchrun) equal one process with the same global batch, NaN stops the run
without saving, and `chatglm-ft train` / `merge` work end to end on the golden checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch
from interrupted_training import killed_in_step  # tests/interrupted_training.py

from chatglm_ft import load
from chatglm_ft.api import build_model
from chatglm_ft.cli import main
from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.data import Example
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest.py: no test writes to ~/.cache

# A small vocabulary keeps the lm_head cheap, so loop tests take a fraction of a second per step.
SMALL = dict(vocab_size=256, gmask_token_id=250, bos_token_id=251, eos_token_id=252, mask_token_id=253, pad_token_id=3)


def small_model(seed=0):
    torch.manual_seed(seed)
    return build_model(ChatGLMConfig.tiny(**SMALL), dtype=torch.float32, device="cpu")


def copy_task(n, seed=0):
    """Prompt of random tokens; the answer repeats its first three tokens: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = torch.randint(10, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        ids = prompt + [250, 251] + prompt[:3] + [252]
        context = len(prompt) + 1  # index of <sop>
        examples.append(Example(input_ids=ids, labels=[-100] * context + ids[context:]))
    return examples


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                  warmup_steps=1, logging_steps=1, save_steps=0, eval_steps=0, progress=False, report_to=["jsonl"],
                  seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_training_lowers_the_loss_and_writes_the_adapter(tmp_path):
    result = train(config(tmp_path / "run", max_steps=16, lora_target=["all"], val_size=8, eval_steps=8),
                   model=small_model(), examples=copy_task(40))
    first, last = result.losses[0][1], result.final_loss
    assert result.steps == 16 and [s for s, _ in result.losses] == list(range(1, 17))
    assert last < first - 0.5, result.losses
    assert [s for s, _ in result.eval_losses] == [8, 16] and result.eval_losses[1][1] < result.eval_losses[0][1]
    assert (result.adapter_dir / "adapter_config.json").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 17))
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["steps"] == 16


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    # dropout on, accumulation, evaluation and a mid-epoch checkpoint: everything resume must restore
    settings = dict(max_steps=7, gradient_accumulation_steps=2, per_device_train_batch_size=3, lora_dropout=0.1,
                    save_steps=2, eval_steps=3, val_size=4, warmup_steps=2, save_total_limit=2)
    whole = train(config(tmp_path / "whole", **settings), model=small_model(), examples=copy_task(22))

    with killed_in_step(6):  # as if killed after checkpoint-4 and one more step
        train(config(tmp_path / "split", **settings), model=small_model(), examples=copy_task(22))
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = train(config(tmp_path / "split", resume=True, **settings), model=small_model(seed=0), examples=copy_task(22))

    assert resumed.losses == whole.losses  # bit-identical on CPU
    assert resumed.eval_losses == whole.eval_losses
    log = [json.loads(line) for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 8))  # the killed run's step 5 is gone
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_nan_loss_stops_without_saving(tmp_path):
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")
    with pytest.raises(ChatGLMError, match=r"loss is nan at step 1: training stopped, nothing saved"):
        train(config(tmp_path, save_steps=1, logging_steps=5), model=model, examples=copy_task(8))
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_accumulation_equals_one_big_batch(tmp_path):
    """Token-weighted accumulation: 2 micro-batches of 4 give the step of one batch of 8 (every step sees
    all 8 examples in both runs, so the losses must agree step for step)."""
    examples = copy_task(8)
    settings = dict(max_steps=3, lora_dropout=0.0, lora_target=["all"])
    big = train(config(tmp_path / "a", per_device_train_batch_size=8, **settings), model=small_model(), examples=examples)
    accumulated = train(config(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, **settings),
                        model=small_model(), examples=examples)
    torch.testing.assert_close(torch.tensor(accumulated.losses), torch.tensor(big.losses), rtol=1e-6, atol=1e-6)
    assert big.losses[-1][1] < big.losses[0][1]


def test_full_finetuning_saves_a_loadable_checkpoint(golden_dir, tmp_path):
    from chatglm_ft.data import Record

    model, tokenizer = load(golden_dir, dtype="float32", device="cpu")
    records = [Record(prompt=f"{a} + {b} =", response=str(a + b)) for a in range(4) for b in range(4)]
    result = train(config(tmp_path, finetuning_type="full", max_steps=3, learning_rate=1e-3, template="alpaca"),
                   model=model, tokenizer=tokenizer, records=records)
    assert result.adapter_dir is None and result.losses[-1][1] < result.losses[0][1]
    reloaded, _ = load(result.model_dir, dtype="float32", device="cpu")
    ids = torch.tensor([[5, 74874, 130001, 130004]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_qlora_trains_an_adapter_on_an_int4_base(golden_dir, tmp_path):
    from chatglm_ft.lora import merge_adapter

    model, _ = load(golden_dir, dtype="float32", device="cpu", quantize="int4")
    packed = model.transformer.layers[0].attention.query_key_value.weight.clone()
    result = train(config(tmp_path, max_steps=6, lora_target=["all"]), model=model, examples=copy_task_golden())
    assert result.losses[-1][1] < result.losses[0][1] - 0.3, result.losses
    qkv = model.transformer.layers[0].attention.query_key_value
    assert torch.equal(qkv.get_base_layer().weight, packed)  # the int4 base never changes
    reloaded, _ = load(golden_dir, dtype="float32", device="cpu", quantize="int4", adapter=result.adapter_dir)
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ChatGLMError, match="cannot merge into the quantized layer"):
        merge_adapter(reloaded)


def test_config_file_and_flags(tmp_path):
    from chatglm_ft.cli import build_parser
    from chatglm_ft.commands.train import config_from_args

    (tmp_path / "train.yaml").write_text("learning-rate: 3.0e-4\nlora_target: all\ndata: a.json\nmax_steps: 9\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "train.yaml"), "--max-steps", "5",
                                      "--data", "b.json", "--data", "c.json", "--no-progress", "--val-size", "0.1"])
    c = config_from_args(args)
    assert (c.learning_rate, c.lora_target, c.max_steps, c.data, c.progress, c.val_size) == (
        3e-4, ["all"], 5, ["b.json", "c.json"], False, 0.1)
    assert c.per_device_train_batch_size == 32 and c.warmup_steps == 500  # the original chatglm6b_ft project's defaults
    (tmp_path / "bad.json").write_text('{"learning_rate": 1e-4, "epochs": 3}')
    with pytest.raises(ChatGLMError, match="unknown key.*epochs"):
        config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.json")]))


# -- the command line, one process and two --------------------------------------------------------------
def write_data(path):
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
            for a in range(4) for b in range(4)]
    path.write_text(json.dumps(rows))
    return path


def cli_env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


COMMON = ["--max-steps", "3", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-2", "--warmup-steps", "0",
          "--lora-dropout", "0", "--logging-steps", "1", "--save-steps", "2", "--template", "alpaca", "--no-progress",
          "--report-to", "jsonl", "--device", "cpu", "--max-source-length", "32", "--max-target-length", "16"]


@pytest.fixture(scope="module")
def ddp_run(golden_dir, tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m chatglm_ft train` on CPU (gloo), per-device batch 2."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_data(tmp / "add.json")
    out = tmp / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "chatglm_ft",
         "train", "--model", str(golden_dir), "--data", str(data), "--output-dir", str(out),
         "--per-device-train-batch-size", "2", *COMMON],
        capture_output=True, text=True, env=cli_env(tmp), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, data, result


def test_two_processes_equal_one_with_the_same_global_batch(ddp_run, golden_dir, tmp_path, monkeypatch):
    out, data, _ = ddp_run
    ddp = json.loads((out / "train_results.json").read_text())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["train", "--model", str(golden_dir), "--data", str(data), "--output-dir", str(tmp_path / "one"),
                 "--per-device-train-batch-size", "4", *COMMON]) == 0
    one = json.loads((tmp_path / "one" / "train_results.json").read_text())
    assert [s for s, _ in ddp["losses"]] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([v for _, v in ddp["losses"]]), torch.tensor([v for _, v in one["losses"]]),
                               rtol=1e-5, atol=1e-5)
    assert ddp["losses"][-1][1] < ddp["losses"][0][1]
    assert (out / "checkpoint-2" / "trainer_state.pt").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # rank 0 alone logs


def test_merge_command_equals_the_unmerged_adapter(ddp_run, golden_dir, tmp_path):
    from peft import PeftModel

    out, _, _ = ddp_run
    assert main(["merge", "--model", str(golden_dir), "--adapter", str(out), "--out", str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    merged, _ = load(tmp_path / "merged", dtype="float32", device="cpu")
    unmerged, _ = load(golden_dir, dtype="float32", device="cpu", adapter=out / "adapter")
    # PEFT's own loader reads the trained adapter too
    peft_model = PeftModel.from_pretrained(load(golden_dir, dtype="float32", device="cpu")[0], str(out / "adapter"))
    ids = torch.tensor([[3461, 295, 4703, 108, 8555, 1849, 7, 130001, 130004, 5, 9]])
    with torch.no_grad():
        want = unmerged(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=0, atol=1e-5)
        assert (want - load(golden_dir, dtype="float32", device="cpu")[0](ids).logits).abs().max() > 1e-4


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/bad.jsonl", "--on-bad-row", "error"], "bad.jsonl:2: "),
    (["--data", "{tmp}/bad.jsonl", "--lora-target", "qkv"], "unknown LoRA target qkv"),
    (["--data", "{tmp}/bad.jsonl", "--config", "{tmp}/missing.yaml"], "missing.yaml: no such config file"),
])
def test_bad_input_is_a_one_line_error(args, message, golden_dir, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "no output"}\n')
    code = main(["train", "--model", str(golden_dir), "--output-dir", str(tmp_path / "o"), "--max-steps", "1",
                 "--no-progress", *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatglm-ft train: error: ") and message in lines[0], err
    assert not (tmp_path / "o").exists()


def test_missing_data_fails_fast_in_a_real_process(golden_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "chatglm_ft", "train", "--model", str(golden_dir), "--data", str(tmp_path / "nope.json"),
         "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, env=cli_env(tmp_path), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("chatglm-ft train: error:")]
    assert "nope.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.gpu
def test_lora_and_qlora_train_on_gpu(golden_dir, tmp_path):
    for quantize in (None, "int4"):
        result = train(TrainConfig(model=str(golden_dir), output_dir=str(tmp_path / str(quantize)), max_steps=4,
                                   per_device_train_batch_size=2, learning_rate=1e-2, warmup_steps=0, quantize=quantize,
                                   logging_steps=1, progress=False, report_to=["jsonl"], device="cuda"),
                       examples=copy_task_golden())
        assert all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
        assert result.losses[-1][1] < result.losses[0][1]


def copy_task_golden():
    examples = []
    for ex in copy_task(16):
        ids = [{250: 130001, 251: 130004, 252: 130005}.get(t, t) for t in ex.input_ids]
        labels = [{250: 130001, 251: 130004, 252: 130005}.get(t, t) for t in ex.labels]
        examples.append(Example(input_ids=ids, labels=labels))
    return examples
