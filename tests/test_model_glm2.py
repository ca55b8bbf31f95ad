"""ChatGLM2-6B / ChatGLM3-6B network against THUDM's goldens (SPEC.md Part II), at the token-id level:
forward logits, loss, greedy and batched decoding, the KV cache, 16-bit and quantized paths, THUDM's
int8/int4 layout, LoRA through PEFT, and a differently shaped random config."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from golden_checks import assert_logits_match_golden  # tests/golden_checks.py

from chatglm_ft import cpu_quant
from chatglm_ft.api import build_model, load_model
from chatglm_ft.checkpoint import save_model
from chatglm_ft.config import ChatGLMConfig, load_config
from chatglm_ft.config_glm2 import ChatGLM2Config, family_of
from chatglm_ft.errors import ChatGLMError, CheckpointError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.model_glm2 import ChatGLM2ForConditionalGeneration, rotary_tables
from chatglm_ft.quantize import HalfStoredEmbedding, HalfStoredLinear, Int4Linear, Int8Linear, QuantizedLinear

LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@pytest.fixture(scope="module")
def model(ckpt_dir):
    """The golden tiny model, float32 on CPU (shared by the module: do not mutate)."""
    return load_model(ckpt_dir, dtype="float32", device="cpu")


def logits_of(model, ids, **kwargs):
    with torch.no_grad():
        return model(torch.tensor([ids]), **kwargs).logits[0].double()


# -- config and loading ----------------------------------------------------------------------------
def test_family_comes_from_config_json(golden_dir, golden2_dir, golden3_dir, tmp_path):
    assert load_config(golden2_dir).family == "chatglm2"
    assert load_config(golden3_dir).family == "chatglm3"
    assert isinstance(load_config(golden_dir), ChatGLMConfig)
    # the folder name plays no part: a ChatGLM3 config in a dir called chatglm2 is still ChatGLM3
    misnamed = tmp_path / "chatglm2-6b"
    misnamed.mkdir()
    shutil.copy(golden3_dir / "config.json", misnamed / "config.json")
    assert load_config(misnamed).family == "chatglm3"
    raw = json.loads((golden2_dir / "config.json").read_text())
    assert family_of({**raw, "_name_or_path": "THUDM/chatglm3-6b-32k", "seq_length": 32768}) == "chatglm3"
    assert family_of({**raw, "rope_ratio": 50}) == "chatglm3"
    assert family_of(raw, {"name_or_path": "THUDM/chatglm3-6b"}) == "chatglm3"
    config = load_config(golden2_dir)
    assert (config.kv_heads, config.head_dim, config.vocab_size, config.max_sequence_length) == (2, 16, 65024, 32768)


def test_loads_as_the_model_class_with_original_names(model, ckpt_dir):
    assert type(model) is ChatGLM2ForConditionalGeneration
    index = json.loads((ckpt_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    ours = set(model.state_dict())
    assert ours == set(index)  # every stored key, inv_freq included, under its own name
    assert model.transformer.output_layer.weight.data_ptr() != model.transformer.word_embeddings.weight.data_ptr()


def test_full_size_key_table_and_parameter_count(shared):
    """The released ChatGLM2/3-6B config builds (on meta) exactly the shapes of SPEC.md II.2's table."""
    from chatglm_ft.checkpoint import expected_shapes

    config = load_config(shared / "models" / "chatglm3-6b")
    assert config.family == "chatglm3"
    shapes = expected_shapes(config)
    assert shapes["transformer.encoder.layers.27.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.encoder.layers.0.self_attention.query_key_value.bias"] == (4608,)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] == (4096, 13696)
    assert shapes["transformer.output_layer.weight"] == (65024, 4096)
    net = ChatGLM2ForConditionalGeneration(config, device="meta")
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("inv_freq")}
    assert ours == shapes and net.num_parameters() == 6_243_584_000
    assert net.transformer.rotary_pos_emb.inv_freq.shape == (32,)


def test_unknown_missing_and_misshapen_keys_fail_loudly(golden2_dir, tmp_path):
    state = {}
    for f in sorted(golden2_dir.glob("pytorch_model-*.bin")):
        state.update(torch.load(f, weights_only=True))
    config = json.loads((golden2_dir / "config.json").read_text())

    def write(name, tensors, **config_changes):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text(json.dumps({**config, **config_changes}))
        torch.save(tensors, out / "pytorch_model.bin")
        return out

    extra = write("extra", {**state, "transformer.encoder.layers.0.mlp.dense_h_to_4h.bias": torch.zeros(512)})
    with pytest.raises(CheckpointError, match="unexpected tensor transformer.encoder.layers.0.mlp.dense_h_to_4h.bias"):
        load_model(extra, dtype="float32", device="cpu")
    missing = write("missing", {k: v for k, v in state.items() if k != "transformer.output_layer.weight"})
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. transformer.output_layer.weight"):
        load_model(missing, dtype="float32", device="cpu")
    groups = write("groups", state, multi_query_group_num=1)
    with pytest.raises(CheckpointError, match="query_key_value.weight has shape .* config.json implies"):
        load_model(groups, dtype="float32", device="cpu")
    v1 = write("v1", {k.replace("transformer.encoder.", "transformer."): v for k, v in state.items()})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(v1, dtype="float32", device="cpu")


def test_safetensors_save_and_reload_is_identical(model, gold, tmp_path):
    save_model(model, tmp_path / "saved", tokenizer_dir=None, dtype=torch.float32)
    assert (tmp_path / "saved" / "model.safetensors.index.json").exists()
    again = load_model(tmp_path / "saved", dtype="float32", device="cpu")
    assert again.config.family == model.config.family
    ids = gold["forward"][0]["input_ids"]
    assert torch.equal(logits_of(again, ids), logits_of(model, ids))


# -- the goldens -----------------------------------------------------------------------------------
def test_forward_matches_golden(model, gold):
    for case in gold["forward"]:
        logits = logits_of(model, case["input_ids"], position_ids=torch.tensor([case["position_ids"]]))
        assert_logits_match_golden(logits, case)


def test_loss_matches_golden(model, gold):
    case = gold["loss"]
    with torch.no_grad():
        out = model(torch.tensor([case["input_ids"]]), labels=torch.tensor([case["labels"]]))
    assert abs(out.loss.item() - case["loss"]) <= 1e-4


def test_greedy_matches_golden(model, gold):
    for case in gold["greedy"]:
        (result,) = generate(model, None, [case["input_ids"]], GenerationConfig(max_new_tokens=len(case["new_ids"])))
        assert result.token_ids == case["new_ids"]


def test_batch_matches_golden_and_unbatched(model, gold):
    for case in gold["batch"]:
        assert case["pad_token_id"] == model.config.pad_token_id == 0 and case["padding_side"] == "left"
        prompts = [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(case["input_ids"], case["attention_mask"])]
        gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
        batched = [r.token_ids for r in generate(model, None, prompts, gen)]
        assert batched == case["new_ids"]
        assert [generate(model, None, [p], gen)[0].token_ids for p in prompts] == batched
        # the tokenizer's batch as is (2D attention_mask, position_ids): each row's last logits as unbatched
        with torch.no_grad():
            logits = model(torch.tensor(case["input_ids"]), torch.tensor(case["position_ids"]),
                           torch.tensor(case["attention_mask"])).logits[:, -1].double()
        for row, prompt in zip(logits, prompts):
            torch.testing.assert_close(row, logits_of(model, prompt)[-1], atol=1e-5, rtol=0)


def test_cache_steps_equal_full_forward(model, gold):
    ids = gold["greedy"][0]["input_ids"] + gold["greedy"][0]["new_ids"][:5]
    full = logits_of(model, ids)
    T = len(gold["greedy"][0]["input_ids"])
    model.clear_caches()  # generation may have left a larger one
    model.setup_caches(1, len(ids))
    assert model.kv_caches[0].k.shape == (1, model.config.kv_heads, len(ids), model.config.head_dim)
    with torch.no_grad():
        x = torch.tensor([ids])
        prefill = model(x[:, :T], torch.arange(T)[None], cache_columns=slice(0, T), kv_length=T).logits[0].double()
        torch.testing.assert_close(prefill, full[:T], atol=1e-5, rtol=0)
        for column in range(T, len(ids)):
            step = model(x[:, column:column + 1], torch.tensor([[column]]), cache_columns=torch.tensor([column]),
                         kv_length=column + 1).logits[0, -1].double()
            torch.testing.assert_close(step, full[column], atol=1e-5, rtol=0)
            again = model(x[:, column:column + 1], cache_columns=torch.tensor([column]), kv_length=column + 1)
            assert torch.equal(again.logits[0, -1].double(), step)  # positions default to the cache columns
        # two tokens at once over a cache: causal between them, the cache all visible
        pair = model(x[:, T:T + 2], torch.tensor([[T, T + 1]]), cache_columns=torch.tensor([T, T + 1]),
                     kv_length=T + 2).logits[0].double()
        torch.testing.assert_close(pair, full[T:T + 2], atol=1e-5, rtol=0)
    model.clear_caches()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_agrees_on_the_top_token(ckpt_dir, gold, dtype):
    half = load_model(ckpt_dir, dtype=dtype, device="cpu")
    assert half.dtype == dtype and half.kv_caches is None
    for case in gold["forward"]:
        logits = logits_of(half, case["input_ids"])
        assert logits[-1].argmax().item() == case["last_logits_top10_ids"][0]
        assert (logits[-1, :8] - torch.tensor(case["logits_first8_each_pos"][-1])).abs().max() < 0.1
    (result,) = generate(half, None, [gold["greedy"][0]["input_ids"]], GenerationConfig(max_new_tokens=4))
    assert result.token_ids == gold["greedy"][0]["new_ids"][:4]


def test_16_bit_rotary_rounding_differs_by_generation():
    """ChatGLM2 rounds positions and angles to the model dtype (fp16 steps of 2 above 2048); ChatGLM3 does not."""
    positions = torch.tensor([[2048, 2049, 3001]])
    cos2, _ = rotary_tables(positions, 64, torch.float16, "chatglm2")
    cos3, _ = rotary_tables(positions, 64, torch.float16, "chatglm3")
    assert torch.equal(cos2[0, 0], cos2[0, 1]) and not torch.equal(cos3[0, 0], cos3[0, 1])
    exact = (positions.double()[..., None] * (1 / 10000 ** (torch.arange(0, 64, 2).double() / 64))).cos()
    assert (cos3[..., 0, :] - exact).abs().max() < 2e-3  # float32 angles, rounded once at the end
    assert (cos2[..., 0, :] - exact).abs().max() > 0.1  # position 3001 became 3000 in float16
    cos32, _ = rotary_tables(positions, 64, torch.float32, "chatglm2")
    cos33, _ = rotary_tables(positions, 64, torch.float32, "chatglm3")
    assert torch.equal(cos32, cos33)  # float32: the generations are identical


# -- quantized -------------------------------------------------------------------------------------
# Drift of the logits from float32 over the golden forward prompts (worst position), measured on the
# tiny models: int8 min cosine 0.99950, max |diff| 0.147; int4 0.889, 2.01 (logits span about +-5).
# Larger than ChatGLM-6B's (whose residual scaling damps each layer's share): the equality with the
# dequantized float model below is what pins the arithmetic; the thresholds leave ~3x margin.
THRESHOLDS = {"int8": (0.9985, 0.45), "int4": (0.67, 5.0)}


def worst_drift(reference, model, gold):
    cosines, diffs = [], []
    for case in gold["forward"]:
        a, b = logits_of(reference, case["input_ids"]), logits_of(model, case["input_ids"])
        cosines.append(F.cosine_similarity(a, b, dim=-1).min().item())
        diffs.append((a - b).abs().max().item())
    return min(cosines), max(diffs)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_model_is_the_float_model_on_dequantized_weights(model, ckpt_dir, gold, name):
    quantized = load_model(ckpt_dir, dtype="float32", device="cpu", quantize=name)
    cls = Int8Linear if name == "int8" else Int4Linear
    layers = quantized.config.num_layers
    assert all(isinstance(quantized.get_submodule(f"transformer.encoder.layers.{n}.{p}"), cls)
               for n in range(layers) for p in LINEARS)
    assert quantized.get_submodule("transformer.encoder.layers.0.self_attention.query_key_value").bias is not None
    # the output layer and embeddings stay float: on the CPU in float32, float16 as the checkpoint stores them
    assert isinstance(quantized.transformer.output_layer, HalfStoredLinear) and quantized.lm_head is quantized.transformer.output_layer
    assert isinstance(quantized.transformer.embedding.word_embeddings, HalfStoredEmbedding)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for module_name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            weight = state[module_name + ".weight"]
            dequantized = module.dequantize(torch.float32)
            step = weight.abs().amax() / (127 if name == "int8" else 7)  # bound on one rounding step
            assert (dequantized - weight).abs().max() <= step / 2 * 1.01
            state[module_name + ".weight"] = dequantized
    reference = load_model(ckpt_dir, dtype="float32", device="cpu")
    reference.load_state_dict(state)
    with cpu_quant.int8_activations(False):  # short prompts run the CPU kernels: their float input keeps this exact
        for case in gold["forward"]:
            torch.testing.assert_close(logits_of(quantized, case["input_ids"]), logits_of(reference, case["input_ids"]),
                                       rtol=0, atol=1e-5)
    cosine, max_abs = worst_drift(model, quantized, gold)
    print(f"{name}: min cosine {cosine:.6f}, max |logit diff| {max_abs:.4f}")
    assert cosine >= THRESHOLDS[name][0] and max_abs <= THRESHOLDS[name][1]
    with pytest.raises(ChatGLMError, match="ChatGLM-6B only"):
        load_model(ckpt_dir, dtype="float32", device="cpu", quantize={"bits": 8, "embeddings": True})


def test_quantized_save_and_reload_is_identical(ckpt_dir, gold, tmp_path):
    from chatglm_ft.quantize import save_quantized

    quantized = load_model(ckpt_dir, dtype="float32", device="cpu", quantize="int4")
    save_quantized(quantized, tmp_path / "int4", tokenizer_dir=None)
    again = load_model(tmp_path / "int4", dtype="float32", device="cpu")
    assert again.config.family == quantized.config.family and again.config.quantization["bits"] == 4
    ids = gold["forward"][1]["input_ids"]
    assert torch.equal(logits_of(again, ids), logits_of(quantized, ids))


def thudm_quantize(w, bits):
    """SPEC.md II.8, written independently of chatglm_ft.quantize: per-row scale, no clamp, column 2j high nibble."""
    scale = (w.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale.float()[:, None]).to(torch.int8)
    stored = q if bits == 8 else ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)
    return stored, scale, q.float() * scale.float()[:, None]


@pytest.mark.parametrize("bits", [8, 4])
def test_thudm_quantized_checkpoint_matches_dequantized_model(model, ckpt_dir, gold, tmp_path, bits):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stored, dequantized = {}, {}
    for name, tensor in state.items():
        if any(name.endswith(p + ".weight") for p in LINEARS):
            q, scale, dq = thudm_quantize(tensor, bits)
            stored[name], stored[name + "_scale"], dequantized[name] = q, scale, dq
        else:
            stored[name] = tensor.half()
    out = tmp_path / f"int{bits}"
    out.mkdir()
    config = json.loads((ckpt_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_bit": bits}))
    torch.save(stored, out / "pytorch_model.bin")

    quantized = load_model(out, dtype="float32", device="cpu")
    reference = load_model(ckpt_dir, dtype="float32", device="cpu")
    reference.load_state_dict({**state, **dequantized})
    assert isinstance(quantized.transformer.layers[1].mlp.dense_4h_to_h, Int8Linear if bits == 8 else Int4Linear)
    with cpu_quant.int8_activations(False):  # short prompts run the CPU kernels: their float input keeps this exact
        for case in gold["forward"][:3]:
            torch.testing.assert_close(logits_of(quantized, case["input_ids"]), logits_of(reference, case["input_ids"]),
                                       rtol=0, atol=1e-5)
    with pytest.raises(ChatGLMError, match=f"already quantized to int{bits}"):
        load_model(out, device="cpu", quantize="int4" if bits == 8 else "int8")


# -- LoRA through PEFT -----------------------------------------------------------------------------
def test_lora_round_trip_and_merge(ckpt_dir, gold, tmp_path):
    from safetensors.torch import load_file

    from chatglm_ft.lora import apply_adapters, apply_lora, merge_adapter, resolve_target, save_adapter

    base = load_model(ckpt_dir, dtype="float32", device="cpu")
    assert resolve_target(base, "all") == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    ids = gold["forward"][0]["input_ids"]
    plain = logits_of(base, ids)
    peft_model = apply_lora(base, target="all")
    torch.testing.assert_close(logits_of(peft_model, ids), plain, atol=0, rtol=0)  # fresh: lora_B = 0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    adapted = logits_of(peft_model, ids)
    assert (adapted - plain).abs().max() > 1e-2
    save_adapter(peft_model, tmp_path / "adapter", base_model=ckpt_dir)
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight" in keys
    assert "base_model.model.transformer.encoder.layers.1.mlp.dense_4h_to_h.lora_B.weight" in keys

    reloaded = load_model(ckpt_dir, dtype="float32", device="cpu", adapter=tmp_path / "adapter")
    torch.testing.assert_close(logits_of(reloaded, ids), adapted, atol=1e-5, rtol=0)
    merged = merge_adapter(reloaded)
    assert set(merged.state_dict()) == set(load_model(ckpt_dir, dtype="float32", device="cpu").state_dict())
    torch.testing.assert_close(logits_of(merged, ids), adapted, atol=1e-4, rtol=0)


# -- training --------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients(ckpt_dir, gold):
    case = gold["loss"]
    ids, labels = torch.tensor([case["input_ids"]]), torch.tensor([case["labels"]])
    grads = []
    for checkpointing in (False, True):
        net = load_model(ckpt_dir, dtype="float32", device="cpu").train()
        net.set_gradient_checkpointing(checkpointing)
        loss = net(ids, labels=labels, return_logits=False).loss
        loss.backward()
        assert abs(loss.item() - case["loss"]) <= 1e-4
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert grads[0]["transformer.output_layer.weight"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


# -- another shape ---------------------------------------------------------------------------------
def test_other_sizes_cache_and_batch_agree():
    """3 layers, hidden 96, 6 heads of 16 over 3 key/value groups, projection != hidden; random weights."""
    torch.manual_seed(0)
    config = ChatGLM2Config.tiny(num_layers=3, hidden_size=96, num_attention_heads=6, kv_channels=12,
                                 multi_query_group_num=3, ffn_hidden_size=160, padded_vocab_size=1000, seq_length=512)
    net = build_model(config, dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    prompts = [[5, 17, 300, 42, 9, 77, 8], [11, 12, 13], [900, 4]]
    gen = GenerationConfig(max_new_tokens=10)
    batched = [r.token_ids for r in generate(net, None, prompts, gen)]
    singles = [generate(net, None, [p], gen)[0].token_ids for p in prompts]
    assert batched == singles and len(set(map(tuple, singles))) == 3
    # cached greedy equals re-running the whole sequence without a cache, token by token
    ids = list(prompts[0])
    for _ in range(10):
        ids.append(int(logits_of(net, ids)[-1].argmax()))
    assert ids[len(prompts[0]):] == singles[0]


def test_evaluation_losses_per_row_of_a_left_padded_batch(model, gold):
    from chatglm_ft.evaluate import sequence_losses

    case = gold["loss"]
    ids, labels = case["input_ids"], case["labels"]
    short_ids, short_labels = ids[:12], [-100] * 6 + ids[6:12]
    pad = len(ids) - len(short_ids)
    batch = torch.tensor([ids, [0] * pad + short_ids])
    targets = torch.tensor([labels, [-100] * pad + short_labels])
    sums, counts = sequence_losses(model, batch, targets)
    assert abs(sums[0].item() / counts[0].item() - case["loss"]) <= 1e-4
    with torch.no_grad():
        alone = model(torch.tensor([short_ids]), labels=torch.tensor([short_labels])).loss.item()
    assert counts[1].item() == 6 and abs(sums[1].item() / 6 - alone) <= 1e-5


# -- CUDA (the lead runs these on the device) -----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_matches_cpu(model, ckpt_dir, gold, dtype):
    """On CUDA: logits close to the CPU float32 model, greedy and batched decoding as the goldens."""
    cuda = load_model(ckpt_dir, dtype=dtype, device="cuda")
    tolerance = 1e-4 if dtype == "float32" else 0.1
    for case in gold["forward"]:
        with torch.no_grad():
            logits = cuda(torch.tensor([case["input_ids"]], device="cuda")).logits[0].double().cpu()
        assert (logits[:, :8] - torch.tensor(case["logits_first8_each_pos"])).abs().max() <= tolerance
        assert logits[-1].argmax().item() == case["last_logits_top10_ids"][0]
    case = gold["greedy"][0]
    new = generate(cuda, None, [case["input_ids"]], GenerationConfig(max_new_tokens=16))[0].token_ids
    assert new == case["new_ids"] if dtype == "float32" else new[:4] == case["new_ids"][:4]
    if dtype == "float32":
        batch = gold["batch"][0]
        prompts = [[t for t, k in zip(r, m) if k] for r, m in zip(batch["input_ids"], batch["attention_mask"])]
        gen = GenerationConfig(max_new_tokens=len(batch["new_ids"][0]))
        assert [r.token_ids for r in generate(cuda, None, prompts, gen)] == batch["new_ids"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_cuda_quantized_matches_cpu_quantized(ckpt_dir, gold, name):
    from chatglm_ft import cpu_quant

    cpu = load_model(ckpt_dir, dtype="float32", device="cpu", quantize=name)
    cuda = load_model(ckpt_dir, dtype="float32", device="cuda", quantize=name)
    # the CPU kernels with float input (by default they round the input to int8 blocks: ~0.5% off);
    # the CUDA kernels meet the float input, so the two agree up to summation order
    with cpu_quant.int8_activations(False):
        for case in gold["forward"]:
            a = logits_of(cpu, case["input_ids"])
            with torch.no_grad():
                b = cuda(torch.tensor([case["input_ids"]], device="cuda")).logits[0].double().cpu()
            assert (a - b).abs().max() <= 1e-3
        case = gold["greedy"][0]
        gen = GenerationConfig(max_new_tokens=8)
        expected = generate(cpu, None, [case["input_ids"]], gen)[0].token_ids
    assert generate(cuda, None, [case["input_ids"]], gen)[0].token_ids == expected
