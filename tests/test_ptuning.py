"""P-Tuning v2 on ChatGLM-6B: THUDM's prefix checkpoints load and reproduce the original's numbers; prefixes
trained here are saved in THUDM's layout; wrong directories fail with one clear line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from chatglm_ft import load
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.ptuning import PREFIX_KEY, detach, load_prefix, prefix_length, save_prefix

V1 = ("v1-noproj", "v1-proj")


def golden_of(path) -> dict:
    return json.loads((path / "ptuning_golden.json").read_text())


@pytest.fixture(scope="module")
def prefixed(golden_dir, ptuning_dirs):
    """name -> (model with that prefix, tokenizer, golden); float32 on the CPU like the goldens."""
    out = {}
    for name in V1:
        model, tokenizer = load(golden_dir, dtype="float32", device="cpu", ptuning=ptuning_dirs[name])
        out[name] = (model, tokenizer, golden_of(ptuning_dirs[name]))
    return out


@pytest.mark.parametrize("name", V1)
def test_forward_matches_golden(prefixed, name):
    model, _, golden = prefixed[name]
    for case in golden["forward"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["input_ids"]])).logits[0].double()
        torch.testing.assert_close(logits[:, :8], torch.tensor(case["logits_first8_each_pos"], dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(logits.logsumexp(-1), torch.tensor(case["logsumexp_each_pos"], dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        top = logits[-1].topk(10)
        assert top.indices.tolist() == case["last_logits_top10_ids"]
        torch.testing.assert_close(top.values, torch.tensor(case["last_logits_top10"], dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", V1)
def test_greedy_matches_golden(prefixed, name):
    model, tokenizer, golden = prefixed[name]
    for case in golden["greedy"]:
        (result,) = generate(model, tokenizer, [case["input_ids"]], GenerationConfig(max_new_tokens=len(case["new_ids"])))
        assert result.token_ids == case["new_ids"]


@pytest.mark.parametrize("name", V1)
def test_left_padded_batch_matches_golden(prefixed, name):
    model, tokenizer, golden = prefixed[name]
    case = golden["batch"][0]
    prompts = [[t for t in row if t != case["pad_token_id"]] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
    assert [r.token_ids for r in generate(model, tokenizer, prompts, gen)] == case["new_ids"]
    assert [generate(model, tokenizer, [p], gen)[0].token_ids for p in prompts] == case["new_ids"]


@pytest.mark.parametrize("name", V1)
def test_chat_matches_golden(prefixed, name):
    model, tokenizer, golden = prefixed[name]
    for case in golden["chat"]:
        response, _ = model.chat(tokenizer, case["query"], history=case["history"], max_length=120, do_sample=False)
        assert response == case["response"]


@pytest.mark.parametrize("name", V1)
def test_loss_matches_golden(prefixed, name):
    model, _, golden = prefixed[name]
    case = golden["loss"]
    with torch.no_grad():
        out = model(torch.tensor([case["input_ids"]]), labels=torch.tensor([case["labels"]]))
    assert abs(out.loss.item() - case["loss"]) <= 1e-4


def test_prefix_changes_the_output_and_detaching_restores_the_base(golden_dir, ptuning_dirs, tiny):
    base, _ = tiny
    model, _ = load(golden_dir, dtype="float32", device="cpu")
    ids = torch.tensor([golden_of(ptuning_dirs["v1-noproj"])["forward"][0]["input_ids"]])
    with torch.no_grad():
        plain = base(ids).logits
        load_prefix(model, ptuning_dirs["v1-noproj"])
        assert prefix_length(model) == 4
        assert (model(ids).logits - plain).abs().max() > 0.1
        detach(model)
        torch.testing.assert_close(model(ids).logits, plain, atol=0, rtol=0)
