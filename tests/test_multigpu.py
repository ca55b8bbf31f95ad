"""Layers spread over several devices (`--device cuda:0,cuda:1`). On the CPU the plumbing runs with
"cpu,cpu" (every move is a no-op); the real split needs two GPUs."""
import pytest
import torch

from chatglm_ft import load
from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.model import ChatGLMForConditionalGeneration
from chatglm_ft.multigpu import is_split, layer_devices, parse_devices


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
