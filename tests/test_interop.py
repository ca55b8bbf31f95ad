"""Folders written by `merge` and `quantize` and THUDM's own loading code (trust_remote_code): merged and
`--format thudm` folders carry THUDM's *.py + auto_map and its tensor layout; our own quantized format
carries neither, so THUDM's code refuses it instead of loading int8 tensors as float weights."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from chatglm_ft import cpu_quant, load
from chatglm_ft.cli import main
from chatglm_ft.lora import apply_lora, save_adapter

LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
THUDM_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py")


@pytest.fixture
def base_with_code(golden_dir, tmp_path):
    """The golden checkpoint as THUDM publishes it: with its Python files beside the weights."""
    base = tmp_path / "chatglm-6b"
    shutil.copytree(golden_dir, base)
    for name in THUDM_CODE:
        (base / name).write_text(f"# {name} of THUDM/chatglm-6b\n")
    return base


def test_merged_folder_keeps_thudms_code_and_auto_map(base_with_code, tiny, tmp_path):
    import copy

    peft_model = apply_lora(copy.deepcopy(tiny[0]))
    save_adapter(peft_model, tmp_path / "adapter", base_model=base_with_code)
    assert main(["merge", "--model", str(base_with_code), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged"), "--device", "cpu"]) == 0
    merged = tmp_path / "merged"
    for name in THUDM_CODE:
        assert (merged / name).read_text() == (base_with_code / name).read_text()
    config = json.loads((merged / "config.json").read_text())
    assert config["auto_map"] == json.loads((base_with_code / "config.json").read_text())["auto_map"]
    assert config["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"


def test_own_quantized_format_is_refused_by_thudms_loader(base_with_code, tmp_path):
    assert main(["quantize", "--model", str(base_with_code), "--bits", "8", "--out", str(tmp_path / "q"),
                 "--device", "cpu"]) == 0
    out = tmp_path / "q"
    config = json.loads((out / "config.json").read_text())
    # no code and no auto_map: AutoModel.from_pretrained(out, trust_remote_code=True) stops with an error
    assert not list(out.glob("*.py")) and "auto_map" not in config
    assert config["architectures"] == ["ChatGLMForConditionalGenerationChatglmFtQuantized"]
    assert config["quantization_bit"] == 0 and config["quantization"]["format"] == "chatglm-ft"
    model, _ = load(out, device="cpu")  # ours still loads it
    assert model.config.quantization["bits"] == 8


@pytest.mark.parametrize("bits", [8, 4])
def test_thudm_format_has_thudms_layout_and_loads_back(base_with_code, tiny, golden, tmp_path, bits):
    from safetensors.torch import load_file

    out = tmp_path / f"chatglm-6b-int{bits}"
    assert main(["quantize", "--model", str(base_with_code), "--bits", str(bits), "--format", "thudm",
                 "--out", str(out), "--device", "cpu"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_bit"] == bits and "quantization" not in config and "auto_map" in config
    assert all((out / name).exists() for name in THUDM_CODE)
    stored = {}
    for shard in out.glob("*.safetensors"):
        stored.update(load_file(shard))
    float_state = tiny[0].state_dict()
    dequantized = {}
    for name, tensor in float_state.items():
        if any(name.endswith(p + ".weight") for p in LINEARS):
            # SPEC.md section 7, independently: per-row float16 scale, round to nearest, signed nibbles
            w = tensor.float()
            scale = (w.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).half()
            q = torch.round(w / scale.float()[:, None]).to(torch.int8)
            packed = q if bits == 8 else ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)
            assert torch.equal(stored[name], packed) and torch.equal(stored[name[:-len("weight")] + "weight_scale"], scale)
            dequantized[name] = q.float() * scale.float()[:, None]
        elif name in stored:
            assert stored[name].dtype == torch.float16
    model, _ = load(out, dtype="float32", device="cpu")
    reference, _ = load(base_with_code, dtype="float32", device="cpu")
    reference.load_state_dict({**float_state, **dequantized})
    ids = torch.tensor([golden["forward"][0]["input_ids"]])
    with torch.no_grad(), cpu_quant.int8_activations(False):  # the CPU kernels with float input: exact
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
