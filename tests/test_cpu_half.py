"""Quantized models on the CPU keep word_embeddings and lm_head in float16 (quantize.HalfStoredLinear /
HalfStoredEmbedding) and read the lm_head with cpu_quant's float16 kernel: the same results as the
float32-stored model, half the bytes."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from chatglm_ft import load
from chatglm_ft.api import load_model
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.quantize import HalfStoredEmbedding, HalfStoredLinear, save_quantized


@pytest.fixture(scope="module")
def cpu_kernels():
    from chatglm_ft import cpu_quant

    if not cpu_quant.available():
        pytest.skip("no C++ compiler: the CPU kernels cannot be built here")
    return cpu_quant


# -- the kernel --------------------------------------------------------------------------------------
# K: multiples of 32 (the vector loop only), 1000 (its 8-wide step), 37 and 20 (the scalar tail too)
@pytest.mark.parametrize("n,k", [(37, 1024), (50, 1000), (29, 37), (16, 4096), (300, 20)])
def test_half_kernel_is_the_float32_matmul(cpu_kernels, n, k):
    torch.manual_seed(0)
    w, bias = torch.randn(n, k).half(), torch.randn(n)
    for m in range(1, cpu_kernels.MAX_ROWS + 1):
        x = torch.randn(m, k)
        exact = x.double() @ w.double().T  # the float16 weight widened exactly; float32 summation differs
        scale = exact.abs().max().item()
        torch.testing.assert_close(cpu_kernels.half_linear(x, w, None).double(), exact, rtol=0, atol=1e-5 * scale)
        with_bias = cpu_kernels.half_linear(x, w, bias).double()
        torch.testing.assert_close(with_bias, exact + bias.double(), rtol=0, atol=1e-5 * scale)
        # a row's result does not depend on the rows batched with it (the same summation order)
        assert torch.equal(cpu_kernels.half_linear(x[-1:], w, bias), cpu_kernels.half_linear(x, w, bias)[-1:])


def test_half_kernel_keeps_the_input_shape_and_dtype(cpu_kernels):
    w = torch.randn(40, 64).half()
    x = torch.randn(2, 1, 64)
    y = cpu_kernels.half_linear(x, w, None)
    assert y.shape == (2, 1, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ w.float().T, rtol=1e-5, atol=1e-5)
    assert cpu_kernels.half_linear(x.double(), w, None).dtype == torch.float64


def test_half_kernel_does_not_depend_on_the_thread_count(cpu_kernels):
    torch.manual_seed(0)
    w, x = torch.randn(1001, 256).half(), torch.randn(3, 256)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append((cpu_kernels.half_linear(x, w, None), cpu_kernels.half_linear(x[:1], w, None)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0][0], y) and torch.equal(outputs[0][1], y1) for y, y1 in outputs[1:])


# -- the modules -------------------------------------------------------------------------------------
def half_linear_layer(n: int, k: int) -> HalfStoredLinear:
    layer = HalfStoredLinear(k, n)
    layer.weight.data = torch.randn(n, k).half()
    return layer


def test_decode_rows_never_widen_the_weight(cpu_kernels, monkeypatch):
    import chatglm_ft.quantize as quantize

    torch.manual_seed(0)
    layer = half_linear_layer(70, 96)
    exact = lambda x: x @ layer.weight.float().T  # noqa: E731
    x = torch.randn(cpu_kernels.MAX_ROWS + 1, 96)
    expected = layer(x)  # more rows: widened a block at a time, then BLAS
    torch.testing.assert_close(expected, exact(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(quantize, "widened_linear", None)  # the kernel path never builds a float weight
    with torch.no_grad():
        for rows in (1, cpu_kernels.MAX_ROWS):
            torch.testing.assert_close(layer(x[:rows]), exact(x[:rows]), rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError):  # more rows than the kernel takes: the widening path (forbidden here)
            layer(x)


def test_widening_goes_block_by_block_with_a_gradient_for_the_input():
    torch.manual_seed(0)
    layer = half_linear_layer(70_000, 64)  # two blocks of 65,536 rows
    x = torch.randn(3, 64, requires_grad=True)
    reference = x.detach().clone().requires_grad_(True)
    probe = torch.randn(3, 70_000)
    (layer(x) * probe).sum().backward()
    (F.linear(reference, layer.weight.float()) * probe).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-5, atol=1e-4)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight.float()), rtol=1e-5, atol=1e-5)


def test_embedding_rows_come_in_the_compute_dtype():
    emb = HalfStoredEmbedding(10, 4, dtype=torch.float32)
    emb.weight.data = torch.randn(10, 4).half()
    ids = torch.tensor([[3, 1, 3]])
    rows = emb(ids)
    assert rows.dtype == torch.float32 and rows.shape == (1, 3, 4)
    assert torch.equal(rows, emb.weight.float()[ids])
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16  # model.to(dtype) moves the compute dtype


# -- golden models ---------------------------------------------------------------------------------
def greedy_tokens(model, gold) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=16)
    return [generate(model, None, [case["input_ids"]], config)[0].token_ids for case in gold["greedy"]]


def forward_logits(model, gold) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([case["input_ids"]])).logits[0] for case in gold["forward"]]


def assert_same_model(half, wide, gold):
    """The float16-stored model computes what the float32-stored one does: the checkpoints store these
    weights in float16, so only the summation order of the lm_head differs."""
    assert greedy_tokens(half, gold) == greedy_tokens(wide, gold)
    for a, b in zip(forward_logits(half, gold), forward_logits(wide, gold)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_chatglm6b_quantized_cpu_model_keeps_float16_embeddings(cpu_kernels, golden, golden_dir, name):
    half, _ = load(golden_dir, dtype="float32", device="cpu", quantize=name)
    wide, _ = load(golden_dir, dtype="float32", device="cpu", quantize=name, float16_embeddings=False)
    assert isinstance(half.transformer.word_embeddings, HalfStoredEmbedding) and isinstance(half.lm_head, HalfStoredLinear)
    assert half.lm_head.weight.dtype == half.transformer.word_embeddings.weight.dtype == torch.float16
    assert half.dtype == torch.float32  # the compute dtype
    assert type(wide.lm_head) is torch.nn.Linear and wide.lm_head.weight.dtype == torch.float32
    assert_same_model(half, wide, golden)
    from chatglm_ft.bench import weight_bytes

    # a decode step reads the untied lm_head in float16: half its float32 bytes
    assert weight_bytes(wide) - weight_bytes(half) == half.lm_head.weight.numel() * 2


def test_chatglm2_and_3_keep_float16_embeddings_untied(cpu_kernels, family, ckpt_dir, gold):
    half = load_model(ckpt_dir, dtype="float32", device="cpu", quantize="int4")
    wide = load_model(ckpt_dir, dtype="float32", device="cpu", quantize="int4", float16_embeddings=False)
    assert isinstance(half.transformer.output_layer, HalfStoredLinear) and half.lm_head is half.transformer.output_layer
    assert isinstance(half.transformer.embedding.word_embeddings, HalfStoredEmbedding)
    assert half.lm_head.weight.data_ptr() != half.transformer.word_embeddings.weight.data_ptr()
    assert_same_model(half, wide, gold)


def tied_checkpoint(tiny, golden_dir, tmp_path):
    """The golden checkpoint with lm_head equal to the embeddings, as the released ChatGLM-6B."""
    ckpt = tmp_path / "tied"
    shutil.copytree(golden_dir, ckpt)
    state = {k: v.detach().clone() for k, v in tiny[0].state_dict().items()}
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    for f in ckpt.glob("pytorch_model*"):
        f.unlink()
    torch.save({k: v.half() for k, v in state.items()}, ckpt / "pytorch_model.bin")
    return ckpt


def test_tied_lm_head_is_one_float16_tensor_and_saves_as_before(cpu_kernels, tiny, golden, golden_dir, tmp_path):
    ckpt = tied_checkpoint(tiny, golden_dir, tmp_path)
    half, _ = load(ckpt, dtype="float32", device="cpu", quantize="int4")
    assert half.lm_head_tied and half.lm_head.weight is half.transformer.word_embeddings.weight
    assert half.lm_head.weight.dtype == torch.float16
    wide, _ = load(ckpt, dtype="float32", device="cpu", quantize="int4", float16_embeddings=False)
    assert wide.lm_head_tied and wide.lm_head.weight.dtype == torch.float32
    assert_same_model(half, wide, golden)
    # the saved checkpoint is the same either way: embeddings in float16, lm_head stored once
    for model, out in ((half, tmp_path / "q-half"), (wide, tmp_path / "q-wide")):
        save_quantized(model, out, tokenizer_dir=golden_dir)
    saved = json.loads((tmp_path / "q-half" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith("lm_head.") for k in saved)
    from safetensors.torch import load_file

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(tmp_path / "q-half"), tensors(tmp_path / "q-wide")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["transformer.word_embeddings.weight"].dtype == torch.float16
    # and it loads as a float16 model (the GPU's dtype) with plain float layers, as before
    reloaded = load_model(tmp_path / "q-half", dtype="float16", device="cpu")
    assert type(reloaded.lm_head) is torch.nn.Linear and reloaded.lm_head_tied
    assert torch.equal(reloaded.transformer.word_embeddings.weight, half.transformer.word_embeddings.weight)
    again, _ = load(tmp_path / "q-half", dtype="float32", device="cpu")
    assert again.lm_head_tied and isinstance(again.lm_head, HalfStoredLinear)
    ids = torch.tensor([golden["forward"][0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, half(ids).logits)


def test_in_memory_quantization_keeps_the_tie(cpu_kernels):
    from chatglm_ft.bench import random_model
    from chatglm_ft.config import ChatGLMConfig
    from chatglm_ft.quantize import quantize_model

    model = random_model(ChatGLMConfig.tiny(), dtype=torch.float32, device=torch.device("cpu"))
    embeddings = model.transformer.word_embeddings.weight.detach().clone()
    quantize_model(model, "int8")
    assert model.lm_head_tied and isinstance(model.lm_head, HalfStoredLinear) and model.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, embeddings.half())


def test_where_float16_embeddings_apply(golden_dir):
    plain, _ = load(golden_dir, dtype="float32", device="cpu")  # an unquantized model is unchanged
    assert type(plain.lm_head) is torch.nn.Linear and plain.lm_head.weight.dtype == torch.float32
    assert type(plain.transformer.word_embeddings) is torch.nn.Embedding
    in_float16 = load_model(golden_dir, dtype="float16", device="cpu", quantize="int8")  # the GPU's dtype: as stored
    assert type(in_float16.lm_head) is torch.nn.Linear and in_float16.lm_head.weight.dtype == torch.float16
    quantized = load_model(golden_dir, dtype="float32", device="cpu", quantize={"bits": 8, "embeddings": True})
    assert not isinstance(quantized.lm_head, HalfStoredLinear)  # quantized embeddings: nothing left in float
    with pytest.raises(ChatGLMError, match="cannot also be quantized"):
        load_model(golden_dir, dtype="float32", device="cpu", quantize={"bits": 8, "embeddings": True},
                   float16_embeddings=True)
    with pytest.raises(ChatGLMError, match="applies to quantized models"):
        load_model(golden_dir, dtype="float32", device="cpu", float16_embeddings=True)


def test_loss_and_its_gradient_match_the_float32_lm_head(golden_dir):
    """LoRA/P-Tuning training on a quantized CPU base: the loss goes through the float16 lm_head
    (no gradient for it) and gives what the float32 one gives."""
    half = load_model(golden_dir, dtype="float32", device="cpu", quantize="int4")
    wide = load_model(golden_dir, dtype="float32", device="cpu", quantize="int4", float16_embeddings=False)
    torch.manual_seed(0)
    h = torch.randn(2, 7, half.config.hidden_size)
    labels = torch.randint(0, 1000, (2, 7))
    labels[0, :3] = -100
    losses, grads = [], []
    for model in (half, wide):
        x = h.clone().requires_grad_(True)
        loss = model.loss_from_hidden(x, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert half.lm_head.weight.grad is None


def test_half_layer_traces_into_one_graph(cpu_kernels):
    layer = half_linear_layer(64, 256)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))
