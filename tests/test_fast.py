"""The fast decode path (fast.py) against the eager loop, and `chatglm-ft bench`.

On the CPU the fast path runs uncompiled (same static cache, buckets, masks and on-device
sampling; cheap) and once compiled; the CUDA-graph tests need a GPU.
"""
import json

import pytest
import torch

from chatglm_ft.bench import random_model, random_prompt, random_quantized_model, weight_bytes
from chatglm_ft.cli import main
from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.fast import FastOptions, decoder_for, fast_options, kv_buckets, prefill_logits, prompt_mask_for
from chatglm_ft.generate import GenerationConfig, process_logits, stream_tokens
from chatglm_ft.sampling import guarded_scores
from chatglm_ft.model import PromptMask
from chatglm_ft.positions import prefix_layout

UNCOMPILED = FastOptions(compile=False)


def decode(model, prompts, gen, fast):
    return [list(row) for row in zip(*stream_tokens(model, prompts, gen, fast=fast))]


def test_uncompiled_fast_path_matches_golden_greedy_and_batch(tiny, golden):
    model, _ = tiny
    for case in golden["greedy"][:2]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
        assert decode(model, [case["input_ids"]], gen, UNCOMPILED) == [case["new_ids"]]
    case = golden["batch"][0]
    prompts = [[t for t in row if t != 3] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
    decode(model, prompts + prompts[:1], GenerationConfig(max_new_tokens=2), UNCOMPILED)  # a 3-row decoder
    assert decode(model, prompts, gen, UNCOMPILED) == case["new_ids"]  # runs in it, padded with a copy
    assert decoder_for(model, 2, UNCOMPILED).batch_size == 3


def test_decoders_are_built_and_run_without_gradients(tiny, golden, monkeypatch):
    """A decoder made or stepped where gradients are on (a caller outside inference mode; the parameters
    require grad) still builds and steps with them off: compiling with them on traces a backward graph,
    which fails on the cache's in-place writes (seen on CUDA with --compile auto)."""
    from chatglm_ft import fast

    model, _ = tiny
    modes: list[bool] = []
    build, step = fast.FastDecoder.__init__, fast.FastDecoder.decode

    def recorded(original):
        def wrapper(self, *args, **kwargs):
            modes.append(torch.is_grad_enabled())
            return original(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(fast.FastDecoder, "__init__", recorded(build))
    monkeypatch.setattr(fast.FastDecoder, "decode", recorded(step))
    assert torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    fast._DECODERS.pop(model, None)  # a new decoder is built here
    decoder = decoder_for(model, 1, UNCOMPILED)
    case = golden["greedy"][0]
    ids = torch.tensor([case["input_ids"]])
    steps = list(decoder.steps(ids, 3, GenerationConfig(max_new_tokens=3), None))
    assert [t for (t,) in steps] == case["new_ids"][:3]
    assert len(modes) >= 3 and not any(modes)  # the build and every decode step


def test_fast_path_crosses_attention_buckets_like_eager(tiny):
    model, _ = tiny
    prompt = [5 + (i * 7919) % 20000 for i in range(250)] + [130001, 130004]  # decoding crosses column 256
    gen = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    assert decode(model, [prompt], gen, UNCOMPILED) == decode(model, [prompt], gen, False)
    assert decoder_for(model, 1, UNCOMPILED).machine.runs.keys() >= {(256, False), (512, False)}


def test_fast_path_stops_and_samples_like_a_seeded_loop(tiny, golden):
    model, _ = tiny
    prompts = [golden["greedy"][0]["input_ids"], golden["greedy"][1]["input_ids"]]
    free = decode(model, prompts, GenerationConfig(max_new_tokens=6), UNCOMPILED)
    stop = free[0][2]
    stopped = decode(model, prompts, GenerationConfig(max_new_tokens=6, stop_token_ids=(stop,)), UNCOMPILED)
    assert stopped[0] == free[0][:2] + [None] * 4
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, top_p=0.7, temperature=0.95, repetition_penalty=1.1, seed=5)
    a, b = decode(model, prompts[:1], gen, UNCOMPILED), decode(model, prompts[:1], gen, UNCOMPILED)
    assert a == b and a != decode(model, prompts[:1], GenerationConfig(**{**gen.__dict__, "seed": 6}), UNCOMPILED)


def test_scores_match_process_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    seen = torch.rand(3, 50) < 0.3
    gen = GenerationConfig(repetition_penalty=1.3)
    expected = process_logits(logits, gen, seen)
    assert torch.equal(guarded_scores(logits, seen, torch.tensor(1.3)), expected)
    assert torch.equal(guarded_scores(logits, seen, torch.tensor(1.0)), process_logits(logits, GenerationConfig(), None))


def test_prompt_mask_prefill_equals_the_bool_mask(tiny, golden):
    model, _ = tiny
    ids = golden["greedy"][1]["input_ids"]
    assert prompt_mask_for([ids], model.config) == PromptMask(context=len(ids) - 1)
    assert prompt_mask_for([ids, ids], model.config) is None
    assert prompt_mask_for([ids[:-1]], model.config) is None  # no <sop> at the end
    assert prompt_mask_for([[3] + ids], model.config) is None  # would read as left padding
    input_ids = torch.tensor([ids])
    layout = prefix_layout(input_ids, model.config)
    with torch.inference_mode():
        model.setup_caches(1, len(ids))
        split = prefill_logits(model, input_ids, layout, PromptMask(context=len(ids) - 1))
        masked = prefill_logits(model, input_ids, layout)
    torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-5)


def test_decode_and_kernel_options(tiny):
    from chatglm_ft.commands.options import kernel_options
    from chatglm_ft.options import DecodeOptions, KernelOptions

    model, _ = tiny
    assert fast_options(model, None) is None  # CPU: eager unless asked
    assert fast_options(model, False) is None and fast_options(model, DecodeOptions(compile="off")) is None
    # no padded prefill on the CPU, where padding only costs time
    assert fast_options(model, DecodeOptions(compile="graphs")) == FastOptions(compile=False, prefill_graphs=False)
    assert fast_options(model, DecodeOptions(compile="on")) == FastOptions(prefill_graphs=False)
    with pytest.raises(ChatGLMError, match="--compile must be one of"):
        fast_options(model, DecodeOptions(compile="sometimes"))
    # the A/B switches are read by the CLI layer only, into plain options
    assert kernel_options({"CHATGLM_FT_GEMV": "cublas", "CHATGLM_FT_FUSED": "0"}) == KernelOptions(gemv="cublas", fused=False)
    with pytest.raises(ChatGLMError, match="CHATGLM_FT_GEMV=fast"):
        kernel_options({"CHATGLM_FT_GEMV": "fast"})
    assert kernel_options({"CHATGLM_FT_QUANT_GEMV_ROWS": "16"}) == KernelOptions(quantized_rows=16)
    for bad in ("many", "0"):
        with pytest.raises(ChatGLMError, match=f"CHATGLM_FT_QUANT_GEMV_ROWS={bad}"):
            kernel_options({"CHATGLM_FT_QUANT_GEMV_ROWS": bad})
    assert kernel_options({"CHATGLM_FT_GEMV_ROWS": "128"}) == KernelOptions(float_rows=128)
    with pytest.raises(ChatGLMError, match="CHATGLM_FT_GEMV_ROWS=5000.*float_rows must be from 1 to 4096"):
        kernel_options({"CHATGLM_FT_GEMV_ROWS": "5000"})
    assert kv_buckets(2048) == [256, 512, 1024, 2048] and kv_buckets(100) == [100] and kv_buckets(600) == [256, 512, 600]


def test_weight_bytes_count_tied_weights_once():
    config = ChatGLMConfig.tiny()
    model = random_model(config, dtype=torch.float32, device=torch.device("cpu"))
    assert model.lm_head_tied
    inv_freq = model.transformer.inv_freq
    assert weight_bytes(model) == model.num_parameters() * 4 + inv_freq.numel() * inv_freq.element_size()
    assert model.transformer.final_layernorm.weight.eq(1).all() and 0.015 < model.lm_head.weight.std() < 0.025


@pytest.mark.parametrize("config_name,scheme,half", [
    ("tiny", "int8", None), ("tiny", "int4", None), ("tiny", {"bits": 4, "embeddings": True}, None),
    ("tiny", "int8", False), ("chatglm3-tiny", "int4", None), ("chatglm3-tiny", "int8", None)])
def test_random_quantized_model_is_the_quantized_random_model(config_name, scheme, half):
    """Built quantized in place (what `bench --random-weights --quantize` does, so a full-size model never
    exists in float): the same modules, tensors, bytes per token and greedy tokens as quantizing a float one."""
    from chatglm_ft.commands.bench import bench_config
    from chatglm_ft.quantize import quantize_model

    cpu = torch.device("cpu")
    expected = quantize_model(random_model(bench_config(config_name), dtype=torch.float32, device=cpu, seed=3),
                              scheme, float16_embeddings=half)
    model = random_quantized_model(bench_config(config_name), scheme, dtype=torch.float32, device=cpu, seed=3,
                                   float16_embeddings=half)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in expected.named_modules()]
    state, reference = model.state_dict(), expected.state_dict()
    assert list(state) == list(reference)
    for name, tensor in reference.items():
        assert (state[name].dtype, state[name].shape) == (tensor.dtype, tensor.shape), name
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)  # the same draws, in blocks
    assert model.lm_head_tied == expected.lm_head_tied == config_name.startswith("tiny")
    assert model.config.quantization == expected.config.quantization
    assert weight_bytes(model) == weight_bytes(expected)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])

    prompt = random_prompt(model.config, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits
    assert logits.isfinite().all() and logits.std() > 0
    gen = GenerationConfig(max_new_tokens=4, do_sample=False)
    tokens = decode(model, [prompt], gen, UNCOMPILED)
    assert tokens == decode(expected, [prompt], gen, UNCOMPILED) and len(tokens[0]) == 4


def test_bench_command_on_a_tiny_random_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    code = main(["bench", "--random-weights", "--config", "tiny", "--device", "cpu", "--compile", "graphs", "--json",
                 "--decode-tokens", "4", "--prefill-lengths", "8,32", "--bandwidth", "1e10", "--out", str(out),
                 "--profile", "2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    config = ChatGLMConfig.tiny()
    assert report["fast_path"] == {"compile": False, "cuda_graphs": False, "gemv": "kernel", "compile_prefill": False,
                                   "prefill_graphs": False}
    assert [(p["tokens"], p["path"]) for p in report["prefill"]] == [(8, "eager"), (32, "eager")]  # CPU: no padding
    assert "aten::" in report["profile"] and "aten::mm" in report["prefill_profile"]  # decode steps; the 32-token prefill
    assert report["kv_bytes_per_token"] == 2 * config.num_layers * config.hidden_size * 4
    assert [d["name"] for d in report["decode"]] == ["short context", "2k context"]
    for d in report["decode"]:
        assert d["new_tokens"] == 4 and d["tokens_per_second"] > 0
        assert d["bytes_per_token"] == report["weight_bytes"] + int(report["kv_bytes_per_token"] * d["mean_context"])
        assert d["roofline_fraction"] == pytest.approx(d["tokens_per_second"] * d["bytes_per_token"] / 1e10)
    assert report["decode"][1]["prompt_tokens"] == config.max_sequence_length - 4
    assert report["peak_memory"] > 0


def test_bench_random_weights_quantized(capsys):
    from chatglm_ft.quantize import quantize_model

    code = main(["bench", "--random-weights", "--config", "tiny", "--device", "cpu", "--quantize", "int4", "--json",
                 "--decode-tokens", "2", "--prefill-lengths", "8", "--bandwidth", "1e10"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    expected = quantize_model(random_model(ChatGLMConfig.tiny(), dtype=torch.float32, device=torch.device("cpu")), "int4")
    assert report["quantize"] == "int4" and report["weight_bytes"] == weight_bytes(expected)
    assert all(d["tokens_per_second"] > 0 for d in report["decode"])


def test_bench_needs_exactly_one_model_source(capsys):
    assert main(["bench", "--config", "tiny"]) == 2
    assert "--random-weights" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_decode_matches_golden_greedy(golden_dir, golden):
    """The real compiled step on the CPU (inductor + C++): same tokens as the reference."""
    from chatglm_ft import load

    model, _ = load(golden_dir, dtype="float32", device="cpu")  # its own model: compiled state stays here
    for case in golden["greedy"][:2]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
        assert decode(model, [case["input_ids"]], gen, FastOptions()) == [case["new_ids"]]


# -- GPU --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_fast_path_matches_eager_on_golden_prompts(golden_dir, golden, dtype):
    from chatglm_ft import load

    model, _ = load(golden_dir, dtype=dtype, device="cuda")
    for case in golden["greedy"]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
        fast = decode(model, [case["input_ids"]], gen, None)  # the default on CUDA: compiled + CUDA graphs
        assert fast == decode(model, [case["input_ids"]], gen, False)
        if dtype == "float32":
            assert fast == [case["new_ids"]]
    if dtype == "float16":
        return  # a batch compiles another graph: once is enough
    case = golden["batch"][0]
    prompts = [[t for t in row if t != 3] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
    assert decode(model, prompts, gen, None) == decode(model, prompts, gen, False)
    assert decoder_for(model, 2, fast_options(model, None)).graphs  # decoding ran as graph replays


@pytest.mark.gpu
def test_cuda_fast_path_long_and_sampled(golden_dir):
    from chatglm_ft import load

    model, _ = load(golden_dir, dtype="float32", device="cuda")
    prompt = [5 + (i * 7919) % 20000 for i in range(240)] + [130001, 130004]
    gen = GenerationConfig(max_new_tokens=40, stop_token_ids=())  # crosses the 256-column bucket
    assert decode(model, [prompt], gen, None) == decode(model, [prompt], gen, False)
    gen = GenerationConfig(max_new_tokens=24, do_sample=True, top_p=0.7, temperature=0.95, seed=3)
    assert decode(model, [prompt], gen, None) == decode(model, [prompt], gen, None)
