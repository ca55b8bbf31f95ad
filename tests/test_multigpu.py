"""Layers spread over several devices (`--device cuda:0,cuda:1`). On the CPU the plumbing runs with
"cpu,cpu" (every move is a no-op); the real split needs two GPUs."""
import json

import pytest
import torch

from chatglm_ft import load
from chatglm_ft.cli import main
from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.config_glm2 import ChatGLM2Config
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.model import ChatGLMForConditionalGeneration
from chatglm_ft.model_glm2 import ChatGLM2ForConditionalGeneration
from chatglm_ft.multigpu import is_split, layer_devices, parse_devices
from chatglm_ft.options import DecodeOptions, KernelOptions


def test_parse_devices():
    assert parse_devices("cuda") is None and parse_devices(None) is None
    assert parse_devices("cpu, cpu") == [torch.device("cpu")] * 2
    with pytest.raises(ChatGLMError, match="comma list"):
        parse_devices("cpu,nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ChatGLMError, match="no CUDA GPU"):
            parse_devices("cuda:0,cuda:1")


def test_layers_balanced_by_bytes_with_embeddings_on_the_first_device():
    model = ChatGLMForConditionalGeneration(ChatGLMConfig.full(), device="meta")
    model.tie_lm_head()
    a, b = torch.device("cpu", 0), torch.device("cpu", 1)  # stand-ins: only the placement is computed
    placement = layer_devices(model, [a, b])
    first = placement.count(a)
    assert placement == [a] * first + [b] * (28 - first)  # contiguous blocks
    layer = 12 * 4096 * 4096 * 4  # bytes of one float32 layer (weights; biases and LayerNorms are noise)
    embeddings = 130528 * 4096 * 4
    assert abs((embeddings + first * layer) - (28 - first) * layer) <= layer  # balanced within one layer
    four = layer_devices(model, [torch.device("cpu", i) for i in range(4)])
    assert len(set(four)) == 4 and four == sorted(four, key=lambda d: d.index)


def test_chatglm3_layers_balanced_with_the_untied_output_layer_on_the_first_device():
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config.full("chatglm3"), device="meta")
    transformer = model.transformer

    def nbytes(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    layer = nbytes(*transformer.encoder.layers[0].parameters())  # float32, grouped keys/values, SwiGLU
    # the untied output layer is as big as the embeddings: both sit on the first device
    first_extra = nbytes(transformer.embedding.word_embeddings.weight, transformer.output_layer.weight,
                         transformer.encoder.final_layernorm.weight)
    for n in (2, 4):
        devices = [torch.device("cpu", i) for i in range(n)]  # stand-ins: only the placement is computed
        placement = layer_devices(model, devices)
        assert placement == sorted(placement, key=lambda d: d.index) and set(placement) == set(devices)  # contiguous
        held = [placement.count(d) * layer + (first_extra if d == devices[0] else 0) for d in devices]
        assert max(held) - min(held) <= layer  # balanced within one layer
    assert placement.count(devices[0]) == 5  # 6 if the output layer were left out of the count


def test_split_model_gives_the_same_logits_and_tokens(tiny, golden_dir, golden):
    model, tokenizer = tiny
    split, _ = load(golden_dir, dtype="float32", device="cpu,cpu")
    assert is_split(split) is False  # one distinct device: nothing to route, but hooks and caches are in place
    ids = torch.tensor([golden["forward"][1]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(split(ids).logits, model(ids).logits)
    case = golden["greedy"][0]
    (result,) = generate(split, tokenizer, [case["input_ids"]], GenerationConfig(max_new_tokens=len(case["new_ids"])))
    assert result.token_ids == case["new_ids"]


def test_split_chatglm2_3_gives_the_same_logits_and_tokens(ckpt_dir, gold):
    model, _ = load(ckpt_dir, dtype="float32", device="cpu")
    split, _ = load(ckpt_dir, dtype="float32", device="cpu,cpu")
    assert is_split(split) is False and len(split.layer_devices) == len(split.transformer.layers)
    ids = torch.tensor([gold["forward"][1]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(split(ids).logits, model(ids).logits)
    for case in gold["greedy"]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
        assert generate(split, None, [case["input_ids"]], gen)[0].token_ids == case["new_ids"]


def test_split_chatglm2_3_with_int8_and_a_prefix_decodes_as_unsplit(family, ckpt_dir, gold, ptuning_dirs):
    prefix = ptuning_dirs["v2" if family == "chatglm2" else "v3"]
    kwargs = dict(dtype="float32", quantize="int8", ptuning=prefix)
    model, _ = load(ckpt_dir, device="cpu", **kwargs)
    split, _ = load(ckpt_dir, device="cpu,cpu", **kwargs)
    assert split.layer_devices and split.transformer.prefix_encoder is not None
    ids = torch.tensor([gold["forward"][0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(split(ids).logits, model(ids).logits)
    gen = GenerationConfig(max_new_tokens=6)
    prompt = gold["greedy"][0]["input_ids"]
    assert generate(split, None, [prompt], gen)[0].token_ids == generate(model, None, [prompt], gen)[0].token_ids


def test_cli_generate_on_cpu_cpu_gives_the_single_device_tokens(ckpt_dir, capsys):
    def tokens(device):
        capsys.readouterr()
        assert main(["generate", "--model", str(ckpt_dir), "--device", device, "--dtype", "float32", "--json",
                     "--prompt", "Give three tips for staying healthy.", "--max-new-tokens", "8", "--seed", "1"]) == 0
        return json.loads(capsys.readouterr().out)["token_ids"]

    assert tokens("cpu,cpu") == tokens("cpu")


@pytest.mark.gpu
def test_two_gpu_split_matches_one_gpu(golden_dir, golden):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    one, tokenizer = load(golden_dir, dtype="float32", device="cuda:0")
    two, _ = load(golden_dir, dtype="float32", device="cuda:0,cuda:1")
    assert is_split(two) and {p.device for p in two.parameters()} == {torch.device("cuda:0"), torch.device("cuda:1")}
    for case in golden["greedy"]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
        assert generate(two, tokenizer, [case["input_ids"]], gen)[0].token_ids == case["new_ids"]
    ids = torch.tensor([golden["forward"][0]["input_ids"]], device="cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(two(ids).logits, one(ids).logits, atol=1e-5, rtol=1e-5)
    quantized, _ = load(golden_dir, dtype="float16", device="cuda:0,cuda:1", quantize="int8")
    assert is_split(quantized)
    case = golden["greedy"][0]
    assert len(generate(quantized, tokenizer, [case["input_ids"]], GenerationConfig(max_new_tokens=4))[0].token_ids) == 4


@pytest.mark.gpu
def test_two_gpu_split_of_chatglm2_3_matches_one_gpu(ckpt_dir, gold):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    one, _ = load(ckpt_dir, dtype="float32", device="cuda:0")
    two, _ = load(ckpt_dir, dtype="float32", device="cuda:0,cuda:1")
    assert is_split(two) and {p.device for p in two.parameters()} == {torch.device("cuda:0"), torch.device("cuda:1")}
    assert two.lm_head.weight.device == torch.device("cuda:0")  # the untied output layer stays on the first card
    for case in gold["greedy"]:
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"]))
        assert generate(two, None, [case["input_ids"]], gen)[0].token_ids == case["new_ids"]
    ids = torch.tensor([gold["forward"][0]["input_ids"]], device="cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(two(ids).logits, one(ids).logits, atol=1e-5, rtol=1e-5)
    quantized, _ = load(ckpt_dir, dtype="float16", device="cuda:0,cuda:1", quantize="int8")
    assert is_split(quantized)
    case = gold["greedy"][0]
    assert len(generate(quantized, None, [case["input_ids"]], GenerationConfig(max_new_tokens=4))[0].token_ids) == 4
    # the fused norm kernel reads the final norm's weight directly: the hidden states must be back on cuda:0
    half_one, _ = load(ckpt_dir, dtype="float16", device="cuda:0")
    half_two, _ = load(ckpt_dir, dtype="float16", device="cuda:0,cuda:1")
    half_one.decode_options = DecodeOptions(compile="off")  # the eager loop on both, as a split model decodes
    for model in (half_one, half_two):
        model.use_kernels(KernelOptions(new_kernels=True))
    gen = GenerationConfig(max_new_tokens=8)
    assert generate(half_two, None, [case["input_ids"]], gen)[0].token_ids == \
        generate(half_one, None, [case["input_ids"]], gen)[0].token_ids
