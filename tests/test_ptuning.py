"""P-Tuning v2: THUDM's prefix checkpoints of every family (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B) load and
reproduce the original's numbers; on ChatGLM-6B, prefixes trained here are saved in THUDM's layout and wrong
directories fail with one clear line (test_ptuning_glm2.py: the same for ChatGLM2/3)."""
from __future__ import annotations

import json

import pytest
import torch
from golden_checks import assert_logits_match_golden  # tests/golden_checks.py
from interrupted_training import killed_in_step  # tests/interrupted_training.py
from ptuning_checks import (PREFIXES, SAVED_FIELDS, assert_refused_in_one_line,  # tests/ptuning_checks.py
                            assert_saved_as_thudm, broken_copy, full_save_with_prefix, golden_of)

from chatglm_ft import load
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.ptuning import PREFIX_KEY, detach, load_prefix, prefix_length, save_prefix

V1 = ("v1-noproj", "v1-proj")


# -- THUDM's numbers, every family (`prefixed`: conftest.py) ----------------------------------------------
@pytest.mark.parametrize("name", PREFIXES)
def test_forward_matches_golden(prefixed, name):
    model, _, golden = prefixed[name]
    assert prefix_length(model) == 4
    for case in golden["forward"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["input_ids"]])).logits[0].double()
        assert_logits_match_golden(logits, case)


@pytest.mark.parametrize("name", PREFIXES)
def test_greedy_matches_golden(prefixed, name):
    model, tokenizer, golden = prefixed[name]
    for case in golden["greedy"]:
        (result,) = generate(model, tokenizer, [case["input_ids"]], GenerationConfig(max_new_tokens=len(case["new_ids"])))
        assert result.token_ids == case["new_ids"]


@pytest.mark.parametrize("name", PREFIXES)
def test_left_padded_batch_matches_golden_and_unbatched(prefixed, name):
    model, tokenizer, golden = prefixed[name]
    case = golden["batch"][0]
    assert case["padding_side"] == "left" and all(case["rows_equal_unbatched"])
    prompts = [[t for t in row if t != case["pad_token_id"]] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
    assert [r.token_ids for r in generate(model, tokenizer, prompts, gen)] == case["new_ids"]
    assert [generate(model, tokenizer, [p], gen)[0].token_ids for p in prompts] == case["new_ids"]


@pytest.mark.parametrize("name", PREFIXES)
def test_chat_matches_golden(prefixed, name):
    model, tokenizer, golden = prefixed[name]
    for case in golden["chat"]:
        response, _ = model.chat(tokenizer, case["query"], history=case["history"], max_length=120, do_sample=False)
        assert response == case["response"]


@pytest.mark.parametrize("name", PREFIXES)
def test_loss_matches_golden(prefixed, name):
    model, _, golden = prefixed[name]
    case = golden["loss"]
    with torch.no_grad():
        out = model(torch.tensor([case["input_ids"]]), labels=torch.tensor([case["labels"]]))
    assert abs(out.loss.item() - case["loss"]) <= 1e-4


# -- ChatGLM-6B -----------------------------------------------------------------------------------------
def test_prefix_changes_the_output_and_detaching_restores_the_base(golden_dir, ptuning_dirs, tiny):
    base, _ = tiny
    model, _ = load(golden_dir, dtype="float32", device="cpu")
    ids = torch.tensor([golden_of(ptuning_dirs["v1-noproj"])["forward"][0]["input_ids"]])
    with torch.no_grad():
        plain = base(ids).logits
        load_prefix(model, ptuning_dirs["v1-noproj"])
        assert prefix_length(model) == 4
        assert (model(ids).logits - plain).abs().max() > 0.1
        detach(model)
        torch.testing.assert_close(model(ids).logits, plain, atol=0, rtol=0)


def test_save_reproduces_thudms_files(prefixed, golden_dir, ptuning_dirs, tmp_path):
    """A loaded official prefix saved again: the same tensors bit for bit, float32, the same keys and config fields."""
    model, _, golden = prefixed["v1-proj"]
    out = save_prefix(model, tmp_path / "again", tokenizer_dir=golden_dir)
    assert_saved_as_thudm(out, ptuning_dirs["v1-proj"], golden, SAVED_FIELDS + ("vocab_size",))
    assert (out / "ice_text.model").exists()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 130005


# -- training ---------------------------------------------------------------------------------------
def copy_task(n, seed=0):
    """Prompts of random tokens, all with one answer: what a prefix (a fixed context) can learn in a few steps
    (at a high learning rate: the random tiny model gives the prefix little leverage)."""
    from chatglm_ft.data import Example

    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = torch.randint(10, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        ids = prompt + [130001, 130004] + [20, 31, 42] + [130005]
        context = len(prompt) + 1  # index of <sop>
        examples.append(Example(input_ids=ids, labels=[-100] * context + ids[context:]))
    return examples


def train_config(tmp_path, **overrides):
    from chatglm_ft.train import TrainConfig

    values = dict(output_dir=str(tmp_path), finetuning_type="ptuning", pre_seq_len=4, max_steps=6,
                  per_device_train_batch_size=4, learning_rate=0.3, warmup_steps=0, logging_steps=1, save_steps=0,
                  eval_steps=0, progress=False, report_to=["jsonl"], seed=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("projection", [False, True])
def test_training_lowers_the_loss_trains_only_the_prefix_and_saves_thudms_layout(golden_dir, tmp_path, projection,
                                                                                  private_cache):
    from chatglm_ft.train import train

    model, _ = load(golden_dir, dtype="float32", device="cpu")
    before = {name: p.clone() for name, p in model.named_parameters()}
    result = train(train_config(tmp_path / "run", prefix_projection=projection, max_steps=8), model=model,
                   examples=copy_task(32))
    assert result.losses[-1][1] < result.losses[0][1] - 0.3, result.losses
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)  # base frozen
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [PREFIX_KEY + name for name in (["embedding.weight", "trans.0.weight", "trans.0.bias",
                                                          "trans.2.weight", "trans.2.bias"] if projection else ["embedding.weight"])]

    out = result.adapter_dir
    assert out == tmp_path / "run" / "prefix"
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".bin")) == [
        "config.json", "generation_config.json", "pytorch_model.bin"]
    config = json.loads((out / "config.json").read_text())
    assert (config["pre_seq_len"], config["prefix_projection"], config["model_type"]) == (4, projection, "chatglm")
    assert (config["num_layers"], config["hidden_size"], config["torch_dtype"]) == (2, 64, "float16")
    # what THUDM's loading snippet does: torch.load, keep and strip transformer.prefix_encoder.*
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    expected = {"embedding.weight": (4, 64 if projection else 256)}
    if projection:
        expected.update({"trans.0.weight": (64, 64), "trans.0.bias": (64,), "trans.2.weight": (256, 64),
                         "trans.2.bias": (256,)})
    assert {k[len(PREFIX_KEY):]: tuple(v.shape) for k, v in state.items()} == expected
    assert all(k.startswith(PREFIX_KEY) and v.dtype == torch.float32 for k, v in state.items())

    reloaded, _ = load(golden_dir, dtype="float32", device="cpu", adapter=tmp_path / "run")  # found via --adapter
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 9]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_kill_and_resume_gives_the_uninterrupted_losses(golden_dir, tmp_path, private_cache):
    from chatglm_ft.train import train

    settings = dict(max_steps=5, gradient_accumulation_steps=2, per_device_train_batch_size=3, save_steps=2,
                    save_total_limit=2)  # prefix dropout on: resume must restore the RNG too
    whole = train(train_config(tmp_path / "whole", **settings), model=load(golden_dir, dtype="float32", device="cpu")[0],
                  examples=copy_task(16))
    with killed_in_step(4):
        train(train_config(tmp_path / "split", **settings), model=load(golden_dir, dtype="float32", device="cpu")[0],
              examples=copy_task(16))
    resumed = train(train_config(tmp_path / "split", resume=True, **settings),
                    model=load(golden_dir, dtype="float32", device="cpu")[0], examples=copy_task(16))
    assert resumed.losses == whole.losses
    with pytest.raises(ChatGLMError, match="resume with the same --pre-seq-len"):
        train(train_config(tmp_path / "split", resume=True, pre_seq_len=3, **settings),
              model=load(golden_dir, dtype="float32", device="cpu")[0], examples=copy_task(16))


def test_trains_on_an_int4_base(golden_dir, tmp_path, private_cache):
    from chatglm_ft.train import train

    model, tokenizer = load(golden_dir, dtype="float32", device="cpu", quantize="int4")
    packed = model.transformer.layers[0].attention.query_key_value.weight.clone()
    result = train(train_config(tmp_path, max_steps=6), model=model, examples=copy_task(24))
    assert result.losses[-1][1] < result.losses[0][1] - 0.3, result.losses
    assert torch.equal(model.transformer.layers[0].attention.query_key_value.weight, packed)
    reloaded, _ = load(golden_dir, dtype="float32", device="cpu", quantize="int4", ptuning=result.adapter_dir)
    (a,) = generate(model, tokenizer, [[5, 74874, 130001, 130004]], GenerationConfig(max_new_tokens=6))
    (b,) = generate(reloaded, tokenizer, [[5, 74874, 130001, 130004]], GenerationConfig(max_new_tokens=6))
    assert a.token_ids == b.token_ids


# -- wrong directories: one line naming the problem --------------------------------------------------------
def test_wrong_directories_fail_with_one_line(tiny, golden_dir, ptuning_dirs, tmp_path):
    model, _ = tiny
    noproj = ptuning_dirs["v1-noproj"]
    state = torch.load(noproj / "pytorch_model.bin", weights_only=True)
    cases = {
        # config.json and weights disagree on pre_seq_len (the classic size-mismatch report)
        "pre_seq_len 8 but the prefix has 4 positions; set pre_seq_len to 4": broken_copy(
            noproj, tmp_path / "len", config={"pre_seq_len": 8}),
        "prefix for another model size .3 layers, hidden 64, 4 heads.; the base has 2 layers": broken_copy(
            noproj, tmp_path / "size", config={"num_layers": 3}),
        "is .4, 512.,.*prefix for another model size": broken_copy(
            noproj, tmp_path / "width", state={PREFIX_KEY + "embedding.weight": torch.zeros(4, 512)}),
        "prefix_projection false but the weights hold the projection": broken_copy(
            ptuning_dirs["v1-proj"], tmp_path / "proj", config={"prefix_projection": False}),
        "a full model checkpoint .1 tensors besides the prefix encoder": broken_copy(
            noproj, tmp_path / "full", state={**state, "transformer.final_layernorm.weight": torch.ones(64)}),
        "a full model checkpoint .pytorch_model.bin.index.json": full_save_with_prefix(
            golden_dir, tmp_path / "fullsharded"),
        "a ChatGLM2-6B prefix; load it on a ChatGLM2-6B base model, not this ChatGLM-6B one": ptuning_dirs["v2"],
    }
    assert_refused_in_one_line(model, cases, golden_dir)


def test_cli_train_generate_and_merge_refusal(golden_dir, tmp_path, capsys, private_cache):
    """End to end on the command line: train a prefix, generate with --ptuning and via --adapter, refuse merge."""
    from chatglm_ft.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"问题 {i}", "response": "好的"}, ensure_ascii=False) + "\n"
                            for i in range(8)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(golden_dir), "--data", str(data), "--output-dir", str(run),
                 "--finetuning-type", "ptuning", "--pre-seq-len", "4", "--max-steps", "2",
                 "--per-device-train-batch-size", "4", "--learning-rate", "0.3", "--warmup-steps", "0",
                 "--save-steps", "1", "--no-progress", "--report-to", "none"]) == 0
    assert (run / "prefix" / "pytorch_model.bin").exists() and (run / "checkpoint-1" / "prefix" / "config.json").exists()
    outputs = []
    for flags in (["--ptuning", str(run / "prefix")], ["--adapter", str(run)]):
        capsys.readouterr()
        assert main(["generate", "--model", str(golden_dir), *flags, "--device", "cpu", "--temperature", "0",
                     "--max-new-tokens", "4", "--json", "--prompt", "你好"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    capsys.readouterr()
    assert main(["generate", "--model", str(golden_dir), "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "4", "--json", "--prompt", "你好"]) == 0
    base_output = json.loads(capsys.readouterr().out)["token_ids"]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4 and outputs[0] != base_output
    assert main(["merge", "--model", str(golden_dir), "--adapter", str(run), "--out", str(tmp_path / "merged")]) != 0
    err = capsys.readouterr().err
    assert "is a P-Tuning prefix, which cannot be merged" in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_eval_variants_apply_and_remove_a_prefix(tiny, ptuning_dirs):
    from chatglm_ft.evaluate import activated, parse_variants

    model, _ = tiny
    ids = torch.tensor([[5, 74874, 130001, 130004]])
    with torch.no_grad():
        base = model(ids).logits
    variants = parse_variants(["base", str(ptuning_dirs["v1-proj"])])
    assert [(v.name, v.ptuning) for v in variants] == [("base", False), ("ptuning-v1-proj", True)]
    seen = []
    for variant, m in activated(model, variants):
        with torch.no_grad():
            seen.append(m(ids).logits)
    assert torch.equal(seen[0], base) and (seen[1] - base).abs().max() > 0.1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base) and prefix_length(model) == 0


# -- the other decode loops: the prefix sits in the first cache columns --------------------------------------
def test_uncompiled_fast_path_matches_golden(prefixed):
    from chatglm_ft.fast import FastOptions
    from chatglm_ft.generate import stream_tokens

    model, _, golden = prefixed["v1-proj"]
    uncompiled = FastOptions(compile=False)
    case = golden["greedy"][0]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
    assert [list(r) for r in zip(*stream_tokens(model, [case["input_ids"]], gen, fast=uncompiled))] == [case["new_ids"]]
    case = golden["batch"][0]
    prompts = [[t for t in row if t != 3] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
    assert [list(r) for r in zip(*stream_tokens(model, prompts, gen, fast=uncompiled))] == case["new_ids"]


@pytest.mark.parametrize("decode", ["eager", "graphs"])
def test_continuous_batching_engine_matches_golden(golden_dir, ptuning_dirs, decode):
    from chatglm_ft.engine import Engine

    model, tokenizer = load(golden_dir, dtype="float32", device="cpu", ptuning=ptuning_dirs["v1-noproj"])
    golden = golden_of(ptuning_dirs["v1-noproj"])
    engine = Engine(model, tokenizer, max_batch=3, max_context=128, decode=decode).start()
    try:
        gen = GenerationConfig(max_new_tokens=16, stop_token_ids=())
        handles = [engine.submit(c["input_ids"], gen) for c in golden["greedy"]]
        case = golden["batch"][0]
        batch = [engine.submit([t for t in row if t != 3], GenerationConfig(max_new_tokens=12, stop_token_ids=()))
                 for row in case["input_ids"]]
        assert [h.result(120).token_ids for h in handles] == [c["new_ids"] for c in golden["greedy"]]
        assert [h.result(120).token_ids for h in batch] == case["new_ids"]
    finally:
        engine.stop(drain=False, timeout=30)


def test_prompt_mask_prefill_equals_the_bool_mask_with_a_prefix(prefixed):
    from chatglm_ft.fast import prefill_logits
    from chatglm_ft.model import PromptMask
    from chatglm_ft.positions import prefix_layout

    model, _, golden = prefixed["v1-noproj"]
    ids = torch.tensor([golden["greedy"][1]["input_ids"]])
    layout = prefix_layout(ids, model.config)
    with torch.inference_mode():
        model.setup_caches(1, ids.shape[1])
        split = prefill_logits(model, ids, layout, PromptMask(context=ids.shape[1] - 1))
        masked = prefill_logits(model, ids, layout)
    torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-5)


def test_int8_base_with_a_prefix_stays_close_to_float(prefixed, golden_dir, ptuning_dirs):
    model, _, golden = prefixed["v1-proj"]
    quantized, _ = load(golden_dir, dtype="float32", device="cpu", quantize="int8", ptuning=ptuning_dirs["v1-proj"])
    ids = torch.tensor([golden["forward"][0]["input_ids"]])
    with torch.no_grad():
        exact, approx = model(ids).logits, quantized(ids).logits
    assert (approx - exact).abs().max() < 0.05
    assert torch.equal(approx[0, -1].topk(5).indices, exact[0, -1].topk(5).indices)


def test_gradient_checkpointing_gives_the_same_losses(golden_dir, tmp_path, private_cache):
    from chatglm_ft.train import train

    runs = [train(train_config(tmp_path / str(ckpt), max_steps=3, gradient_checkpointing=ckpt),
                  model=load(golden_dir, dtype="float32", device="cpu")[0], examples=copy_task(12)).losses
            for ckpt in (False, True)]
    assert [s for s, _ in runs[0]] == [1, 2, 3]
    for (_, a), (_, b) in zip(*runs):
        assert abs(a - b) < 1e-5


def test_fsdp_and_ddp_train_the_same_prefix(golden_dir, tmp_path):
    """Two CPU processes over gloo: FSDP (the prefix its own unit) and DDP give the same losses and prefix
    (both seed the prefix dropout per rank alike), and a checkpoint written under FSDP resumes."""
    import os
    import subprocess
    import sys

    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
            for a in range(4) for b in range(4)]
    data = tmp_path / "add.json"
    data.write_text(json.dumps(rows))
    worker = tmp_path / "worker.py"
    worker.write_text("import json, sys\nimport torch.distributed as dist\nfrom chatglm_ft.cli import main\n"
                      "dist.init_process_group('gloo')\n"
                      "for argv in json.load(open(sys.argv[1])):\n    assert main(argv) == 0\n"
                      "dist.destroy_process_group()\n")
    common = ["train", "--model", str(golden_dir), "--data", str(data), "--finetuning-type", "ptuning",
              "--pre-seq-len", "4", "--max-steps", "3", "--per-device-train-batch-size", "2", "--learning-rate", "0.3",
              "--warmup-steps", "0", "--logging-steps", "1", "--save-steps", "2", "--template", "alpaca",
              "--no-progress", "--report-to", "none", "--device", "cpu", "--max-source-length", "32",
              "--max-target-length", "16"]
    runs = [[*common, "--fsdp", "--output-dir", str(tmp_path / "fsdp")], [*common, "--output-dir", str(tmp_path / "ddp")],
            [*common, "--fsdp", "--resume", "--max-steps", "4", "--output-dir", str(tmp_path / "fsdp")]]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(tmp_path / "runs.json")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp, ddp = (json.loads((tmp_path / name / "train_results.json").read_text()) for name in ("fsdp", "ddp"))
    torch.testing.assert_close(torch.tensor(fsdp["losses"][:3]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-5)
    assert [s for s, _ in fsdp["losses"]] == [1, 2, 3, 4]  # resumed from checkpoint-2 under FSDP
    assert "resuming from" in result.stderr
    a, b = (torch.load(tmp_path / name / "prefix" / "pytorch_model.bin", weights_only=True) for name in ("fsdp", "ddp"))
    assert list(a) == [PREFIX_KEY + "embedding.weight"] and a[PREFIX_KEY + "embedding.weight"].dtype == torch.float32


# -- on a GPU: the compiled, CUDA-graphed decode loops and 16-bit training --------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", V1)
def test_cuda_fast_path_and_engine_match_golden(golden_dir, ptuning_dirs, name):
    """float32 on CUDA: the default (compiled + CUDA graphs) loop, the eager loop and the compiled engine
    all give the golden ids with the prefix in the first cache columns."""
    from chatglm_ft.engine import Engine
    from chatglm_ft.generate import stream_tokens

    model, _ = load(golden_dir, dtype="float32", device="cuda", ptuning=ptuning_dirs[name])
    golden = golden_of(ptuning_dirs[name])
    for case in golden["greedy"]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]), stop_token_ids=())
        for fast in (None, False):
            assert [list(r) for r in zip(*stream_tokens(model, [case["input_ids"]], gen, fast=fast))] == [case["new_ids"]]
    case = golden["batch"][0]
    prompts = [[t for t in row if t != 3] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]), stop_token_ids=())
    assert [list(r) for r in zip(*stream_tokens(model, prompts, gen))] == case["new_ids"]
    engine = Engine(model, None, max_batch=8, max_context=256).start()
    try:
        handles = [engine.submit(c["input_ids"], GenerationConfig(max_new_tokens=16, stop_token_ids=()))
                   for c in golden["greedy"] * 3]
        assert [h.result(120).token_ids for h in handles] == [c["new_ids"] for c in golden["greedy"]] * 3
    finally:
        engine.stop(drain=False, timeout=30)


@pytest.mark.gpu
def test_ptuning_trains_on_gpu_over_bf16_and_int4(golden_dir, tmp_path):
    from chatglm_ft.train import TrainConfig, train

    for quantize in (None, "int4"):
        result = train(TrainConfig(model=str(golden_dir), output_dir=str(tmp_path / str(quantize)), max_steps=6,
                                   finetuning_type="ptuning", pre_seq_len=8, per_device_train_batch_size=4,
                                   learning_rate=0.3, warmup_steps=0, quantize=quantize, logging_steps=1,
                                   progress=False, report_to=["none"], device="cuda"), examples=copy_task(24))
        assert all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
        assert result.losses[-1][1] < result.losses[0][1]
        state = torch.load(result.adapter_dir / "pytorch_model.bin", weights_only=True)
        assert state[PREFIX_KEY + "embedding.weight"].dtype == torch.float32


def test_cache_reuse_across_inference_mode(golden_dir, ptuning_dirs):
    """The prefix is rewritten whenever caches are set up, whether they were made inside inference mode
    (generation) or outside it."""
    model, tokenizer = load(golden_dir, dtype="float32", device="cpu", ptuning=ptuning_dirs["v1-noproj"])
    case = golden_of(ptuning_dirs["v1-noproj"])["greedy"][0]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
    assert generate(model, tokenizer, [case["input_ids"]], gen)[0].token_ids == case["new_ids"]
    model.setup_caches(1, 8)  # outside inference mode, on caches generation made
    model.clear_caches()
    model.setup_caches(1, 64)  # made outside inference mode, then reused by generation
    assert generate(model, tokenizer, [case["input_ids"]], gen)[0].token_ids == case["new_ids"]


def test_a_prefix_changed_after_the_decoders_were_built_is_the_one_decoded(golden_dir, ptuning_dirs):
    """The fast decoder and a running engine set up their caches (and wrote the prefix) once; a prefix
    changed in place afterwards (as a training step does) is written again before the next prompt."""
    from chatglm_ft.engine import Engine
    from chatglm_ft.fast import FastOptions
    from chatglm_ft.generate import stream_tokens

    golden = golden_of(ptuning_dirs["v1-noproj"])
    case = golden["greedy"][0]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"]), stop_token_ids=())
    model, tokenizer = load(golden_dir, dtype="float32", device="cpu", ptuning=ptuning_dirs["v1-noproj"])
    served, _ = load(golden_dir, dtype="float32", device="cpu", ptuning=ptuning_dirs["v1-noproj"])  # the engine's own

    def decode(fast):
        return [t for (t,) in stream_tokens(model, [case["input_ids"]], gen, fast=fast)]

    uncompiled = FastOptions(compile=False)
    assert decode(uncompiled) == case["new_ids"]
    engine = Engine(served, tokenizer, max_batch=2, max_context=128, decode="eager").start()
    try:
        assert engine.generate(case["input_ids"], gen, timeout=60).token_ids == case["new_ids"]
        with torch.no_grad():
            for m in (model, served):
                m.transformer.prefix_encoder.embedding.weight.mul_(-1.0)  # in place: same storage, new values
        changed = decode(uncompiled)
        assert changed != case["new_ids"]
        assert decode(False) == changed  # the eager loop agrees
        assert engine.generate(case["input_ids"], gen, timeout=60).token_ids == changed
    finally:
        engine.stop(drain=False, timeout=30)
