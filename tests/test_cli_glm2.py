"""Every command end to end on the tiny ChatGLM2-6B / ChatGLM3-6B checkpoints, through the CLI:
train -> merge -> generate, quantize -> generate, eval of base vs adapter vs prefix, bench on random weights."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatglm_ft.api import load
from chatglm_ft.cli import main
from chatglm_ft.config_glm2 import ChatGLM2Config

TRAIN = ["--max-steps", "3", "--per-device-train-batch-size", "2", "--max-source-length", "32",
         "--max-target-length", "16", "--device", "cpu", "--no-progress", "--save-steps", "100", "--val-size", "0",
         "--learning-rate", "2e-2", "--warmup-steps", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def alpaca(shared):
    return shared / "data" / "alpaca_en" / "alpaca_data-excerpt.json"


@pytest.fixture(scope="module", params=["chatglm2", "chatglm3"])
def trained(request, shared, alpaca, tmp_path_factory):
    """A base checkpoint and a LoRA adapter trained on it from the CLI."""
    base = shared / "golden" / f"{request.param}-6b-tiny"
    out = tmp_path_factory.mktemp(request.param) / "lora"
    assert main(["train", "--model", str(base), "--data", str(alpaca), "--output-dir", str(out), *TRAIN]) == 0
    return base, out


def cli_json(capsys, *args):
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def logits(model, tokenizer, text="Give three tips for staying healthy."):
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)])).logits


def test_train_merge_generate(trained, tmp_path, capsys):
    base, run = trained
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(run), "--out", str(merged), "--dtype", "float32"]) == 0
    with_adapter, tokenizer = load(base, dtype="float32", device="cpu", adapter=str(run / "adapter"))
    folded, _ = load(merged, dtype="float32", device="cpu")
    plain, _ = load(base, dtype="float32", device="cpu")
    assert folded.config.family == plain.config.family  # the generation survives the round trip
    expected = logits(with_adapter, tokenizer)
    assert (logits(plain, tokenizer) - expected).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(logits(folded, tokenizer), expected, atol=1e-4, rtol=1e-4)
    gen = ["--prompt", "Name a color.", "--chat", "--temperature", "0", "--max-new-tokens", "6", "--json", "--device", "cpu",
           "--dtype", "float32"]
    from_merged = cli_json(capsys, "generate", "--model", str(merged), *gen)
    from_adapter = cli_json(capsys, "generate", "--model", str(base), "--adapter", str(run), *gen)
    assert from_merged["token_ids"] == from_adapter["token_ids"] and len(from_merged["token_ids"]) >= 1


def test_train_full_and_qlora_run_and_generate(shared, alpaca, tmp_path, capsys):
    base = shared / "golden" / "chatglm3-6b-tiny"
    assert main(["train", "--model", str(base), "--data", str(alpaca), "--output-dir", str(tmp_path / "full"),
                 "--finetuning-type", "full", *TRAIN]) == 0
    trained, tokenizer = load(tmp_path / "full" / "model", dtype="float32", device="cpu")
    plain, _ = load(base, dtype="float32", device="cpu")
    assert trained.config.family == "chatglm3"
    assert (logits(trained, tokenizer) - logits(plain, tokenizer)).abs().max() > 1e-3
    assert main(["train", "--model", str(base), "--data", str(alpaca), "--output-dir", str(tmp_path / "qlora"),
                 "--quantize", "int4", *TRAIN]) == 0
    out = cli_json(capsys, "generate", "--model", str(base), "--quantize", "int4", "--adapter", str(tmp_path / "qlora"),
                   "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "4", "--json", "--device", "cpu")
    assert out["completion_tokens"] == 4


@pytest.mark.parametrize("fmt, bits", [("chatglm-ft", 4), ("thudm", 8), ("thudm", 4)])
def test_quantize_then_generate(shared, tmp_path, capsys, fmt, bits):
    base = shared / "golden" / "chatglm3-6b-tiny"
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(base), "--out", str(out), "--bits", str(bits), "--format", fmt,
                 "--device", "cpu"]) == 0
    quantized, tokenizer = load(out, dtype="float32", device="cpu")
    plain, _ = load(base, dtype="float32", device="cpu")
    a, b = logits(plain, tokenizer).flatten(), logits(quantized, tokenizer).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > (0.999 if bits == 8 else 0.9)
    if fmt == "thudm":  # SPEC II.8: int8 rows, scale = max|w| / 127 (int4: 7, two columns a byte)
        stored = {}
        for f in out.glob("*.safetensors"):
            stored.update(load_file(f))
        name = "transformer.encoder.layers.0.mlp.dense_h_to_4h"
        w = plain.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.detach().to(torch.float16).float()
        scale = (w.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).half()
        assert torch.equal(stored[name + ".weight_scale"], scale)
        q = torch.round(w / scale.float()[:, None]).to(torch.int8)
        if bits == 4:
            q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)
        assert torch.equal(stored[name + ".weight"], q)
        assert json.loads((out / "config.json").read_text())["quantization_bit"] == bits
    result = cli_json(capsys, "generate", "--model", str(out), "--prompt", "hello", "--temperature", "0",
                      "--max-new-tokens", "4", "--json", "--device", "cpu")
    assert result["completion_tokens"] == 4


def test_eval_base_adapter_and_prefix(trained, alpaca, tmp_path, capsys):
    base, run = trained
    prefix = tmp_path / "pt"
    assert main(["train", "--model", str(base), "--data", str(alpaca), "--output-dir", str(prefix),
                 "--finetuning-type", "ptuning", "--pre-seq-len", "4", *TRAIN]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(base), "--data", str(alpaca), "--data-format", "alpaca", "--limit", "4",
                 "--max-new-tokens", "4", "--adapter", "base", "--adapter", str(run), "--adapter", str(prefix),
                 "--out", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
    variants = json.loads((out / "metrics.json").read_text())["variants"]
    assert len(variants) == 3 and all(v["samples"] == 4 for v in variants.values())
    losses = [v["loss"] for v in variants.values()]
    assert losses[1] < losses[0]  # the adapter was trained on these records
    assert abs(losses[2] - losses[0]) > 1e-3  # the prefix is applied (3 steps of 512 parameters teach it little)
    assert [v["adapter"] for v in variants.values()][1:] == [str(run / "adapter"), str(prefix / "prefix")]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 12


def test_bench_random_weights_on_the_glm2_network(capsys):
    report = cli_json(capsys, "bench", "--random-weights", "--config", "chatglm3-tiny", "--device", "cpu", "--json",
                      "--decode-tokens", "4", "--prefill-lengths", "8", "--bandwidth", "1e10")
    config = ChatGLM2Config.tiny(family="chatglm3")
    # grouped KV cache: 2 L G d elements per token, float32
    assert report["kv_bytes_per_token"] == 2 * config.num_layers * config.kv_heads * config.kv_channels * 4
    embedding_bytes = config.padded_vocab_size * config.hidden_size * 4  # one row a step; the output layer is read whole
    inv_freq_bytes = config.kv_channels // 4 * 4  # the rotary buffer: rotary_dim / 2 float32 frequencies
    assert report["weight_bytes"] == report["parameters"] * 4 - embedding_bytes + inv_freq_bytes
    assert report["fast_path"] is None and [d["prompt_tokens"] for d in report["decode"]] == [16, 2048 - 4]
    assert all(d["tokens_per_second"] > 0 for d in report["decode"])


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_full_size_bench_presets_are_the_published_shapes(shared, family):
    raw = json.loads((shared / "models" / f"{family}-6b" / "config.json").read_text())
    published = ChatGLM2Config.from_dict(raw)
    preset = ChatGLM2Config.full(family)
    fields = ("family", "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "multi_query_group_num",
              "ffn_hidden_size", "padded_vocab_size", "seq_length", "layernorm_epsilon", "add_qkv_bias")
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(published, f) for f in fields}


def test_generate_chat_with_system_and_tools(shared, tmp_path, capsys):
    base = shared / "golden" / "chatglm3-6b-tiny"
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "description": "weather of a city",
                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]))
    common = ["generate", "--model", str(base), "--chat", "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "2",
              "--json", "--device", "cpu"]
    plain = cli_json(capsys, *common)["prompt_tokens"]
    system = cli_json(capsys, *common, "--system", "Answer briefly.")["prompt_tokens"]
    with_tools = cli_json(capsys, *common, "--system", "Answer briefly.", "--tools", str(tools))["prompt_tokens"]
    assert plain < system < with_tools
    v2 = subprocess.run([sys.executable, "-m", "chatglm_ft", "generate", "--model", str(shared / "golden" / "chatglm2-6b-tiny"),
                         "--chat", "--system", "x", "--prompt", "hi", "--device", "cpu"], capture_output=True, text=True,
                        timeout=120)
    assert v2.returncode == 2 and "ChatGLM2-6B has no system prompt" in v2.stderr
    assert "Traceback" not in v2.stderr and v2.stderr.strip().splitlines()[-1].startswith("chatglm-ft generate: error:")
