import pytest
import torch
from golden_checks import assert_logits_match_golden  # tests/golden_checks.py

from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.model import ChatGLMForConditionalGeneration


def test_forward_matches_golden(tiny, golden):
    model, _ = tiny
    for case in golden["forward"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["input_ids"]])).logits[0].double()
        assert_logits_match_golden(logits, case)


def test_loss_matches_golden(tiny, golden):
    model, _ = tiny
    case = golden["loss"]
    with torch.no_grad():
        out = model(torch.tensor([case["input_ids"]]), labels=torch.tensor([case["labels"]]))
    assert abs(out.loss.item() - case["loss"]) <= 1e-4


def test_greedy_matches_golden(tiny, golden):
    model, tokenizer = tiny
    for case in golden["greedy"]:
        (result,) = generate(model, tokenizer, [case["input_ids"]], GenerationConfig(max_new_tokens=len(case["new_ids"])))
        assert result.token_ids == case["new_ids"]


def test_batched_greedy_matches_golden_and_unbatched(tiny, golden):
    model, tokenizer = tiny
    case = golden["batch"][0]
    prompts = [[t for t in row if t != 3] for row in case["input_ids"]]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"][0]))
    batched = generate(model, tokenizer, prompts, gen)
    assert [r.token_ids for r in batched] == case["new_ids"]
    for prompt, result in zip(prompts, batched):
        assert generate(model, tokenizer, [prompt], gen)[0].token_ids == result.token_ids


def test_padded_batch_logits_equal_unpadded(tiny, golden):
    model, _ = tiny
    case = golden["batch"][0]
    with torch.no_grad():
        batch = model(torch.tensor(case["input_ids"])).logits
        short = [t for t in case["input_ids"][0] if t != 3]
        alone = model(torch.tensor([short])).logits[0]
    torch.testing.assert_close(batch[0, -len(short):], alone, atol=1e-5, rtol=1e-5)


def test_greedy_with_and_without_cache_identical(tiny, golden):
    model, _ = tiny
    prompt = golden["greedy"][1]["input_ids"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    (cached,) = generate(model, None, [prompt], GenerationConfig(max_new_tokens=10))
    assert cached.token_ids == ids[len(prompt):]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_top1_agrees(golden_dir, golden, dtype):
    from chatglm_ft import load

    model, _ = load(golden_dir, dtype=dtype, device="cpu")
    reference, _ = load(golden_dir, dtype="float32", device="cpu")
    for case in golden["forward"]:
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            low = model(ids).logits[0, -1].float()
        assert low.argmax().item() == case["last_logits_top10_ids"][0]
        assert torch.nn.functional.cosine_similarity(low, reference(ids).logits[0, -1], dim=0) > 0.999


def test_meta_construction_is_free():
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(ChatGLMConfig.full())
    assert model.num_parameters() == 6_707_929_088  # untied
    model.tie_lm_head()
    assert model.num_parameters() == 6_173_286_400


def test_stop_token_ends_each_row_independently(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode("你好"), tokenizer.encode("Give three tips for staying healthy.")]
    free = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))
    # make the 3rd greedy token of row 0 a stop token: row 0 stops there, row 1 runs on unchanged
    stop = free[0].token_ids[2]
    stopped = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, stop_token_ids=(stop,)))
    assert stopped[0].token_ids == free[0].token_ids[:2] and stopped[0].finish_reason == "stop"
    if stop not in free[1].token_ids:
        assert stopped[1].token_ids == free[1].token_ids and stopped[1].finish_reason == "length"
