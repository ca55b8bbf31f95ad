import json
import shutil

import pytest
import torch

from chatglm_ft import load
from chatglm_ft.checkpoint import save_model
from chatglm_ft.errors import CheckpointError, TokenizerError


def copy_golden(golden_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(golden_dir, out)
    return out


def test_saved_safetensors_gives_identical_logits(tiny, golden, golden_dir, tmp_path):
    model, _ = tiny
    save_model(model, tmp_path / "saved", tokenizer_dir=golden_dir)
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "model.safetensors.index.json" in files and "ice_text.model" in files and "config.json" in files
    reloaded, _ = load(tmp_path / "saved", dtype="float32", device="cpu")
    ids = torch.tensor([golden["forward"][1]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_single_bin_file_loads(tiny, golden, golden_dir, tmp_path):
    model, _ = tiny
    out = tmp_path / "single"
    out.mkdir()
    for name in ("config.json", "ice_text.model", "tokenizer_config.json"):
        shutil.copy(golden_dir / name, out / name)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
    reloaded, _ = load(out, dtype="float32", device="cpu")
    ids = torch.tensor([golden["forward"][0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_equal_lm_head_is_tied(golden_dir, tmp_path):
    out = copy_golden(golden_dir, tmp_path)
    second = out / "pytorch_model-00002-of-00002.bin"
    state = torch.load(second, weights_only=True)
    first = torch.load(out / "pytorch_model-00001-of-00002.bin", weights_only=True)
    embeddings = {**first, **state}["transformer.word_embeddings.weight"]
    for shard_file, shard in ((second, state), (out / "pytorch_model-00001-of-00002.bin", first)):
        if "lm_head.weight" in shard:
            shard["lm_head.weight"] = embeddings.clone()
            torch.save(shard, shard_file)
    model, _ = load(out, dtype="float32", device="cpu")
    assert model.lm_head_tied


def test_golden_lm_head_not_tied(tiny):
    assert not tiny[0].lm_head_tied


def test_missing_shard(golden_dir, tmp_path):
    out = copy_golden(golden_dir, tmp_path)
    (out / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="missing shard pytorch_model-00002-of-00002.bin"):
        load(out, device="cpu")


def test_truncated_shard_names_the_file(golden_dir, tmp_path):
    out = copy_golden(golden_dir, tmp_path)
    shard = out / "pytorch_model-00001-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00002.bin.*truncated or corrupt"):
        load(out, device="cpu")


def test_truncated_safetensors_names_the_file(tiny, golden_dir, tmp_path):
    save_model(tiny[0], tmp_path / "saved", tokenizer_dir=golden_dir)
    shard = next((tmp_path / "saved").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=shard.name):
        load(tmp_path / "saved", device="cpu")


def test_wrong_config(golden_dir, tmp_path):
    out = copy_golden(golden_dir, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["hidden_size"] = 128
    config["num_attention_heads"] = 8
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load(out, device="cpu")
    config["model_type"] = "llama"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not 'chatglm'"):
        load(out, device="cpu")


def test_missing_tokenizer(golden_dir, tmp_path):
    out = copy_golden(golden_dir, tmp_path)
    (out / "ice_text.model").unlink()
    with pytest.raises(TokenizerError, match="ice_text.model"):
        load(out, device="cpu")


def test_wrong_tokenizer(golden_dir, shared, tmp_path):
    out = copy_golden(golden_dir, tmp_path)
    (out / "ice_text.model").unlink()
    shutil.copy(shared / "models" / "chatglm2-6b" / "tokenizer.model", out / "ice_text.model")
    with pytest.raises(TokenizerError, match="not the ChatGLM-6B tokenizer"):
        load(out, device="cpu")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path, device="cpu")


def test_missing_tensor_is_reported(golden_dir, tmp_path):
    out = copy_golden(golden_dir, tmp_path)
    shard = out / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    del state["transformer.final_layernorm.bias"]
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        load(out, device="cpu")
