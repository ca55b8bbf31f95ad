"""P-Tuning v2 on ChatGLM2-6B and ChatGLM3-6B (their golden numbers: test_ptuning.py, with every family's):
the grouped key/value prefix leaves positions unchanged and gives the plain forward's logits through the cache;
prefixes are saved in THUDM's layout; wrong directories fail with one clear line."""
from __future__ import annotations

import json

import pytest
import torch
from ptuning_checks import (SAVED_FIELDS, assert_refused_in_one_line, assert_saved_as_thudm,  # tests/ptuning_checks.py
                            broken_copy, full_save_with_prefix, golden_of)

from chatglm_ft import load
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.ptuning import PREFIX_KEY, add_prefix_encoder, load_prefix, save_prefix
from chatglm_ft.steps import decode_one_token, prefill

VERSIONS = ("v2", "v3")


@pytest.mark.parametrize("name", VERSIONS)
def test_the_prefix_does_not_shift_positions(prefixed, name):
    """THUDM's forward cases (whose logits test_ptuning.py checks) ran at positions 0.. as without a prefix."""
    _, _, golden = prefixed[name]
    for case in golden["forward"]:
        assert case["position_ids"] == list(range(len(case["input_ids"])))


@pytest.mark.parametrize("name", VERSIONS)
def test_forward_with_a_cache_and_a_padding_mask_equals_the_plain_forward(prefixed, name):
    """The prompt written behind the prefix in the cache (steps.py's prefill and decode steps, which place
    the sequence behind the prefix's cache columns), and a left-padded row under a 2D mask, give the
    logits of the uncached forward."""
    model, _, golden = prefixed[name]
    ids = torch.tensor([golden["forward"][1]["input_ids"]])
    T = ids.shape[1]
    with torch.no_grad():
        plain = model(ids).logits
        model.setup_caches(1, T + 4)
        layout = model.prompt_layout(ids[:, :-3])
        cached = prefill(model, ids[:, :-3], layout)[:, None]
        steps = [decode_one_token(model, ids[:, c:c + 1], torch.tensor([c]), layout, c + 1)[:, None]
                 for c in range(T - 3, T)]
        model.clear_caches()
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        mask = (padded != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        masked = model(padded, position_ids=positions, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(torch.cat([cached, *steps], dim=1), plain[:, T - 4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", VERSIONS)
def test_save_reproduces_thudms_files_and_reloads(prefixed, ptuning_bases, ptuning_dirs, name, tmp_path):
    """A loaded official prefix saved again: the same float32 tensors bit for bit, the same config fields; it loads back."""
    model, _, golden = prefixed[name]
    out = save_prefix(model, tmp_path / "again", tokenizer_dir=ptuning_bases[name])
    ours = assert_saved_as_thudm(out, ptuning_dirs[name], golden,
                                 SAVED_FIELDS + ("kv_channels", "multi_query_group_num", "ffn_hidden_size",
                                                 "padded_vocab_size", "seq_length"))
    assert f"chatglm{name[1]}" in ours["_name_or_path"]  # the generation survives the save (it decides the family)
    assert json.loads((out / "generation_config.json").read_text()) == {
        k: v for k, v in json.loads((ptuning_dirs[name] / "generation_config.json").read_text()).items()
        if k != "transformers_version"}
    assert (out / "tokenizer.model").exists()
    reloaded, _ = load(ptuning_bases[name], dtype="float32", device="cpu", ptuning=out)
    ids = torch.tensor([golden["forward"][0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_projection_prefix_shapes_and_round_trip(golden3_dir, tmp_path):
    """ChatGLM2/3's projection embeds into K = 2·L·G·d (not H as ChatGLM-6B): [P, K] -> Linear(K, H) -> Linear(H, K)."""
    model, _ = load(golden3_dir, dtype="float32", device="cpu")
    ids = torch.tensor([[64790, 64792, 30910, 36474, 54591]])
    with torch.no_grad():
        plain = model(ids).logits
    encoder = add_prefix_encoder(model, pre_seq_len=4, projection=True, seed=0)
    K = 2 * 2 * 2 * 16
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == {
        "embedding.weight": (4, K), "trans.0.weight": (64, K), "trans.0.bias": (64,), "trans.2.weight": (K, 64),
        "trans.2.bias": (K,)}
    model.eval()
    with torch.no_grad():
        prefixed_logits = model(ids).logits
    assert (prefixed_logits - plain).abs().max() > 0.1
    out = save_prefix(model, tmp_path / "proj")
    assert json.loads((out / "config.json").read_text())["prefix_projection"] is True
    reloaded, _ = load(golden3_dir, dtype="float32", device="cpu", ptuning=out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, prefixed_logits, atol=0, rtol=0)


# -- wrong directories: one line naming the problem --------------------------------------------------------
def test_wrong_directories_fail_with_one_line(golden_dir, golden2_dir, ptuning_dirs, tmp_path):
    model, _ = load(golden2_dir, dtype="float32", device="cpu")
    v2 = ptuning_dirs["v2"]
    state = torch.load(v2 / "pytorch_model.bin", weights_only=True)
    cases = {
        "pre_seq_len 8 but the prefix has 4 positions; set pre_seq_len to 4": broken_copy(
            v2, tmp_path / "len", config={"pre_seq_len": 8}),
        r"prefix for another model size \(3 layers, hidden 64, 4 heads, 2 key/value groups of 16\); the base has 2 layers":
            broken_copy(v2, tmp_path / "size", config={"num_layers": 3}),
        r"another model size \(2 layers, hidden 64, 4 heads, 4 key/value groups": broken_copy(
            v2, tmp_path / "groups", config={"multi_query_group_num": 4}),
        r"is \(4, 256\), this model needs \(4, 128\)": broken_copy(
            v2, tmp_path / "width", state={PREFIX_KEY + "embedding.weight": torch.zeros(4, 256)}),
        "prefix_projection true but the weights lack the projection": broken_copy(
            v2, tmp_path / "proj", config={"prefix_projection": True}),
        "a full model checkpoint .1 tensors besides the prefix encoder": broken_copy(
            v2, tmp_path / "full", state={**state, "transformer.encoder.final_layernorm.weight": torch.ones(64)}),
        "a full model checkpoint .pytorch_model.bin.index.json": full_save_with_prefix(
            golden2_dir, tmp_path / "fullsharded"),
        "a ChatGLM3-6B prefix; load it on a ChatGLM3-6B base model, not this ChatGLM2-6B one": ptuning_dirs["v3"],
        "a ChatGLM-6B prefix; load it on a ChatGLM-6B base model, not this ChatGLM2-6B one": ptuning_dirs["v1-noproj"],
    }
    assert_refused_in_one_line(model, cases, golden2_dir)
    base1, _ = load(golden_dir, dtype="float32", device="cpu")
    with pytest.raises(ChatGLMError, match="a ChatGLM2-6B prefix; load it on a ChatGLM2-6B base model, not this ChatGLM-6B"):
        load_prefix(base1, v2)


# -- training from the command line -------------------------------------------------------------------------
def test_cli_trains_a_chatglm3_prefix_and_generates_with_it(golden3_dir, tmp_path, capsys, private_cache):
    from chatglm_ft.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"问题 {i}", "response": "好的"}, ensure_ascii=False) + "\n"
                            for i in range(8)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(golden3_dir), "--data", str(data), "--output-dir", str(run),
                 "--finetuning-type", "ptuning", "--pre-seq-len", "4", "--max-steps", "4",
                 "--per-device-train-batch-size", "4", "--learning-rate", "0.3", "--warmup-steps", "0",
                 "--logging-steps", "1", "--save-steps", "0", "--no-progress", "--report-to", "none",
                 "--device", "cpu"]) == 0
    losses = [loss for _, loss in json.loads((run / "train_results.json").read_text())["losses"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    out = run / "prefix"
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".bin")) == [
        "config.json", "generation_config.json", "pytorch_model.bin"] + (
        ["tokenizer_config.json"] if (out / "tokenizer_config.json").exists() else [])
    config = json.loads((out / "config.json").read_text())
    assert (config["pre_seq_len"], config["prefix_projection"], config["torch_dtype"]) == (4, False, "float16")
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        PREFIX_KEY + "embedding.weight": ((4, 128), torch.float32)}

    outputs = []
    for flags in (["--ptuning", str(out)], []):
        capsys.readouterr()
        assert main(["generate", "--model", str(golden3_dir), *flags, "--device", "cpu", "--temperature", "0",
                     "--max-new-tokens", "4", "--json", "--prompt", "你好"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert len(outputs[0]) == 4 and outputs[0] != outputs[1]


def copy_task(n, seed=0):
    """Random prompts that all have one answer: what a prefix (a fixed context) learns in a few steps."""
    from chatglm_ft.data import Example

    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = [64790, 64792] + torch.randint(30000, 30100, (int(torch.randint(3, 9, (1,), generator=g)),),
                                                generator=g).tolist()
        answer = [31000, 32000, 33000, 2]
        examples.append(Example(input_ids=prompt + answer, labels=[-100] * len(prompt) + answer))
    return examples


def test_training_with_checkpointing_trains_only_the_prefix(golden2_dir, tmp_path, private_cache):
    """Gradient checkpointing passes each layer its prefix keys/values: the same losses as without; base frozen."""
    from chatglm_ft.train import TrainConfig, train

    runs = []
    for ckpt in (False, True):
        model, _ = load(golden2_dir, dtype="float32", device="cpu")
        before = {name: p.clone() for name, p in model.named_parameters()}
        config = TrainConfig(output_dir=str(tmp_path / str(ckpt)), finetuning_type="ptuning", pre_seq_len=4,
                             max_steps=4, per_device_train_batch_size=4, learning_rate=0.3, warmup_steps=0,
                             logging_steps=1, save_steps=0, eval_steps=0, progress=False, report_to=["none"], seed=0,
                             gradient_checkpointing=ckpt)
        runs.append(train(config, model=model, examples=copy_task(16)).losses)
        assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)
        assert [name for name, p in model.named_parameters() if p.requires_grad] == [PREFIX_KEY + "embedding.weight"]
    assert runs[0][-1][1] < runs[0][0][1] - 0.3, runs[0]
    for (_, a), (_, b) in zip(*runs):
        assert abs(a - b) < 1e-5


def test_int8_base_with_a_prefix_stays_close_to_float(prefixed, golden2_dir, ptuning_dirs):
    model, _, golden = prefixed["v2"]
    quantized, _ = load(golden2_dir, dtype="float32", device="cpu", quantize="int8", ptuning=ptuning_dirs["v2"])
    ids = torch.tensor([golden["forward"][0]["input_ids"]])
    with torch.no_grad():
        exact, approx = model(ids).logits, quantized(ids).logits
    assert (approx - exact).abs().max() < 0.2  # the tiny random network is far more sensitive than a real one
    assert torch.equal(approx[0, -1].topk(5).indices, exact[0, -1].topk(5).indices)


# -- on a GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", VERSIONS)
def test_cuda_generation_matches_golden_and_trains_in_bf16(ptuning_bases, ptuning_dirs, name, tmp_path):
    """float32 on CUDA: greedy and the left-padded batch give the golden ids with the prefix in the first
    cache columns; a bfloat16 base trains a float32 prefix."""
    from chatglm_ft.train import TrainConfig, train

    model, tokenizer = load(ptuning_bases[name], dtype="float32", device="cuda", ptuning=ptuning_dirs[name])
    golden = golden_of(ptuning_dirs[name])
    for case in golden["greedy"]:
        (result,) = generate(model, tokenizer, [case["input_ids"]], GenerationConfig(max_new_tokens=len(case["new_ids"])))
        assert result.token_ids == case["new_ids"]
    case = golden["batch"][0]
    prompts = [[t for t in row if t != case["pad_token_id"]] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
    assert [r.token_ids for r in generate(model, tokenizer, prompts, gen)] == case["new_ids"]
    result = train(TrainConfig(model=str(ptuning_bases[name]), output_dir=str(tmp_path), max_steps=6,
                               finetuning_type="ptuning", pre_seq_len=8, per_device_train_batch_size=4,
                               learning_rate=0.3, warmup_steps=0, logging_steps=1, progress=False, report_to=["none"],
                               device="cuda"),
                   examples=copy_task(24))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    assert result.losses[-1][1] < result.losses[0][1]
    state = torch.load(result.adapter_dir / "pytorch_model.bin", weights_only=True)
    assert state[PREFIX_KEY + "embedding.weight"].dtype == torch.float32


@pytest.mark.parametrize("name", VERSIONS)
def test_fast_decoder_and_engine_with_a_prefix_give_the_golden_greedy_ids(prefixed, name):
    """The prefix on the core's other decode paths: the fast decoder's static cache and the server engine's
    slots (steps.py places the sequence behind the prefix for every path)."""
    from chatglm_ft.engine import Engine
    from chatglm_ft.fast import FastOptions
    from chatglm_ft.generate import stream_tokens

    model, _, golden = prefixed[name]
    for case in golden["greedy"]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]), stop_token_ids=())
        fast = [t for (t,) in stream_tokens(model, [case["input_ids"]], gen, fast=FastOptions(compile=False))]
        assert fast == case["new_ids"]
    engine = Engine(model, None, max_batch=2, max_context=128, decode="eager").start()
    try:
        for case in golden["greedy"]:
            gen = GenerationConfig(max_new_tokens=len(case["new_ids"]), stop_token_ids=())
            assert engine.generate(case["input_ids"], gen, timeout=60).token_ids == case["new_ids"]
    finally:
        engine.stop(drain=False, timeout=30)
