"""LoRA through PEFT on our model: fresh adapters change nothing, the PEFT layout interoperates both ways,
merging equals the unmerged adapter, and broken adapters fail with one clear message."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from chatglm_ft import load
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.lora import apply_adapters, apply_lora, merge_adapter, resolve_target, save_adapter

PROMPTS = [[5, 74874, 130001, 130004, 5, 9, 7], [3461, 295, 4703, 108, 8555, 1849, 7, 130001, 130004]]


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def randomize_lora(peft_model, seed=0):
    """A trained-looking adapter: lora_B is zero when fresh, which would make every comparison trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.fixture
def golden_model(tiny):
    """A private copy of the golden model (float32, CPU) that a test may wrap and change."""
    return copy.deepcopy(tiny[0])


def test_fresh_adapter_leaves_logits_unchanged(golden_model, tiny):
    base, _ = tiny
    peft_model = apply_lora(golden_model)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 2 * (8 * 64 + 192 * 8)
    for ids in PROMPTS:
        torch.testing.assert_close(logits_of(peft_model, ids), logits_of(base, ids), rtol=0, atol=0)


def test_target_all_and_unknown_target(golden_model):
    assert resolve_target(golden_model, "all") == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert resolve_target(golden_model, ["dense,dense_h_to_4h"]) == ["dense", "dense_h_to_4h"]
    with pytest.raises(ChatGLMError, match="unknown LoRA target qkv; choose from query_key_value"):
        resolve_target(golden_model, "qkv")


def test_saved_adapter_has_the_peft_layout_and_loads_everywhere(golden_dir, golden_model, tiny, tmp_path):
    from peft import PeftModel

    peft_model = apply_lora(golden_model, target="all")
    randomize_lora(peft_model)
    expected = [logits_of(peft_model, ids) for ids in PROMPTS]
    save_adapter(peft_model, tmp_path / "adapter", base_model=golden_dir)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["lora_dropout"] == 0.1 and config["bias"] == "none"
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.layers.1.attention.query_key_value.lora_A.weight" in keys
    assert "base_model.model.transformer.layers.0.mlp.dense_4h_to_h.lora_B.weight" in keys
    assert len(keys) == 2 * 4 * 2

    # our loader (unmerged, the model keeps its class) ...
    ours, _ = load(golden_dir, dtype="float32", device="cpu", adapter=tmp_path / "adapter")
    assert type(ours).__name__ == "ChatGLMForConditionalGeneration"
    # ... and PEFT's own loader on a plain model
    theirs = PeftModel.from_pretrained(copy.deepcopy(tiny[0]), str(tmp_path / "adapter"))
    for ids, want in zip(PROMPTS, expected):
        torch.testing.assert_close(logits_of(ours, ids), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits_of(theirs, ids), want, rtol=0, atol=1e-6)
        assert (want - logits_of(tiny[0], ids)).abs().max() > 1e-3  # the adapter does change the output


def test_adapter_written_by_another_tool_loads(golden_dir, golden_model, tmp_path):
    """A ChatGLM-Tuning style adapter: peft applied to the original module paths, CAUSAL_LM task type,
    pre-0.4 config keys and an adapter_model.bin."""
    from peft import LoraConfig, get_peft_model

    other = get_peft_model(golden_model, LoraConfig(r=4, lora_alpha=16, target_modules=["query_key_value"]))
    randomize_lora(other, seed=1)
    expected = [logits_of(other, ids) for ids in PROMPTS]
    other.save_pretrained(str(tmp_path / "tool"), safe_serialization=False, save_embedding_layers=False)
    config_file = tmp_path / "tool" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(task_type="CAUSAL_LM", enable_lora=None, merge_weights=False, base_model_name_or_path="THUDM/chatglm-6b")
    config_file.write_text(json.dumps(config))
    assert (tmp_path / "tool" / "adapter_model.bin").exists()

    model, _ = load(golden_dir, dtype="float32", device="cpu", adapter=tmp_path / "tool")
    for ids, want in zip(PROMPTS, expected):
        torch.testing.assert_close(logits_of(model, ids), want, rtol=0, atol=1e-6)


def test_merged_equals_unmerged(golden_dir, golden_model, tiny, tmp_path):
    from chatglm_ft.checkpoint import save_model

    peft_model = apply_lora(golden_model, target=["query_key_value", "dense_h_to_4h"])
    randomize_lora(peft_model)
    save_adapter(peft_model, tmp_path / "adapter")
    unmerged, _ = load(golden_dir, dtype="float32", device="cpu", adapter=tmp_path / "adapter")
    expected = [logits_of(unmerged, ids) for ids in PROMPTS]
    merged = merge_adapter(unmerged)
    assert set(merged.state_dict()) == set(tiny[0].state_dict())
    save_model(merged, tmp_path / "merged", tokenizer_dir=golden_dir)
    reloaded, _ = load(tmp_path / "merged", dtype="float32", device="cpu")
    for ids, want in zip(PROMPTS, expected):
        torch.testing.assert_close(logits_of(merged, ids), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits_of(reloaded, ids), want, rtol=0, atol=1e-5)


def test_two_adapters_add_up(tiny, tmp_path):
    deltas = []
    base = tiny[0]
    plain = logits_of(base, PROMPTS[0])
    for seed in (1, 2):
        peft_model = apply_lora(copy.deepcopy(base))
        randomize_lora(peft_model, seed=seed)
        save_adapter(peft_model, tmp_path / f"a{seed}")
        deltas.append(merge_adapter(peft_model).transformer.layers[0].attention.query_key_value.weight
                      - base.transformer.layers[0].attention.query_key_value.weight)
    both = merge_adapter(apply_adapters(copy.deepcopy(base), [tmp_path / "a1", tmp_path / "a2"]))
    torch.testing.assert_close(both.transformer.layers[0].attention.query_key_value.weight,
                               base.transformer.layers[0].attention.query_key_value.weight + deltas[0] + deltas[1],
                               rtol=0, atol=1e-6)
    assert not torch.equal(logits_of(both, PROMPTS[0]), plain)


def test_bad_adapters_are_one_clear_error(golden_dir, golden_model, tmp_path):
    with pytest.raises(ChatGLMError, match="no such adapter directory"):
        load(golden_dir, dtype="float32", device="cpu", adapter=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatGLMError, match="no adapter_config.json"):
        load(golden_dir, dtype="float32", device="cpu", adapter=tmp_path / "empty")
    # an adapter for a model with another hidden size
    peft_model = apply_lora(golden_model)
    save_adapter(peft_model, tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in weights.items()},
              tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ChatGLMError, match="adapter does not fit this model"):
        load(golden_dir, dtype="float32", device="cpu", adapter=tmp_path / "adapter")


def test_merge_refuses_nan(golden_model):
    peft_model = apply_lora(golden_model)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    with pytest.raises(ChatGLMError, match="NaN/Inf"):
        merge_adapter(peft_model)
