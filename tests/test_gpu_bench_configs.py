"""gpu/serve_bench.py and gpu/train_bench.py --config: the model and the inputs they build for each
generation, on the CPU at the tiny shape (the GPU runs use the same functions at full size)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

GPU = Path(__file__).resolve().parents[1] / "gpu"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(GPU))
    try:
        import serve_bench
        import train_bench
    finally:
        sys.path.remove(str(GPU))
    return serve_bench, train_bench


@pytest.mark.parametrize("name", ["full", "chatglm2", "chatglm3"])
def test_serve_bench_prompts_fit_the_generation(scripts, name):
    serve_bench, _ = scripts
    config = serve_bench.bench_model_config(name, smoke=True)
    assert type(config).__name__ == ("ChatGLMConfig" if name == "full" else "ChatGLM2Config")
    model = serve_bench.build(config, smoke=True)
    batch = serve_bench.prompts(config, 2, seed=0)
    assert [len(p) for p in batch] == [serve_bench.PROMPT_TOKENS] * 2 and batch[0] != batch[1]
    if name == "full":  # ChatGLM-6B: text, then [gMASK] <sop>
        assert all(p[-2:] == [config.gmask_token_id, config.bos_token_id] for p in batch)
    else:  # ChatGLM2/3: [gMASK] sop, then text pieces only (no stop or special id)
        assert all(p[:2] == [64790, 64792] and max(p[2:]) < 64789 and config.eos_token_id not in p for p in batch)
    with torch.no_grad():
        logits = model(torch.tensor(batch)).logits
    assert logits.shape[:2] == (2, serve_bench.PROMPT_TOKENS) and torch.isfinite(logits).all()
    long = serve_bench.prompts(config, 1, seed=0, length=1024)[0]  # --prompt 1024: the same shape, longer text
    assert len(long) == 1024 and (long[-2:] == batch[0][-2:] if name == "full" else long[:2] == batch[0][:2])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_serve_bench_builds_quantized_engines(scripts, quantize):
    """--quantize: the engine's model has quantized layers (what the int8/int4 serving rows measure)."""
    serve_bench, _ = scripts
    from chatglm_ft.quantize import QuantizedWeight

    model = serve_bench.build(serve_bench.bench_model_config("chatglm3", smoke=True), smoke=True, quantize=quantize)
    layers = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    assert layers and {m.bits for m in layers} == {8 if quantize == "int8" else 4}


def test_serve_bench_makes_the_slots_that_fit(scripts, monkeypatch):
    """--max-context: a server's slots of that many tokens, as many as the free GPU memory holds (ChatGLM-6B's
    2048-token slots: 0.94 GB each, so 128 do not fit beside the weights on an 80 GB card; ChatGLM3's do)."""
    serve_bench, _ = scripts
    from chatglm_ft.api import model_class

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (66 << 30, 80 << 30))  # an H100 with the weights loaded
    fits = {}
    for name in ("full", "chatglm3"):
        config = serve_bench.bench_model_config(name, smoke=False)
        fits[name] = serve_bench.slots_that_fit(model_class(config)(config, device="meta").to(torch.float16), 2048, 128)
    assert fits == {"full": (60 << 30) // (2 * 28 * 32 * 128 * 2 * 2049), "chatglm3": 128} and fits["full"] == 68


def test_serve_bench_ceiling_counts_the_kv_heads(scripts):
    """ChatGLM3's 2 KV groups: its cache per token is 16x smaller than ChatGLM-6B's 32 heads at the same shape."""
    serve_bench, _ = scripts
    from chatglm_ft.api import model_class
    from chatglm_ft.bench import kv_bytes_per_token

    sizes = {}
    for name in ("full", "chatglm3"):
        config = serve_bench.bench_model_config(name, smoke=False)
        sizes[name] = kv_bytes_per_token(model_class(config)(config, device="meta").to(torch.float16))
    assert sizes == {"full": 2 * 28 * 32 * 128 * 2, "chatglm3": 2 * 28 * 2 * 128 * 2}
    results = {"engine_default": {"levels": [{"streams": 128, "tokens_per_s": 1000.0}]}}
    serve_bench.add_ceilings(results, weights=10**10, kv_per_token=sizes["chatglm3"], bandwidth=4e12, answer=128,
                            prompt=1024)
    level = results["engine_default"]["levels"][0]
    context = 1024 + 127 / 2  # the prompt, then half the answer on average
    step_bytes = 10**10 + 128 * sizes["chatglm3"] * context
    assert level["memory_ceiling_tokens_per_s"] == pytest.approx(128 * 4e12 / step_bytes)


@pytest.mark.parametrize("name", ["full", "chatglm3"])
def test_train_bench_rows_train_on_the_answer(scripts, name):
    _, train_bench = scripts
    config = train_bench.bench_model_config(name, smoke=True)
    model = train_bench.build(config, torch.device("cpu"))
    examples = train_bench.rows(2, config, 64)
    assert all(len(e.input_ids) == 64 for e in examples)
    check = train_bench.loss_check(model, config, 64)
    assert check["ok"]
    # FLOPs count the matmul weights: ChatGLM-6B's tied embedding once (it is the lm_head), ChatGLM3's input
    # embedding (a lookup) not at all
    embedding = model.transformer.word_embeddings.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert train_bench.matmul_parameters(model) == (total if name == "full" else total - embedding)
