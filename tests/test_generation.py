import pytest
import torch

from chatglm_ft.errors import ChatGLMError, PromptTooLongError
from chatglm_ft.generate import GenerationConfig, TextStream, generate, process_logits, stream_text


def test_nan_guard_replaces_bad_rows_only():
    logits = torch.tensor([[1.0, float("nan"), 0.0, 0, 0, 0], [3.0, 2.0, 1.0, 0, 0, 0]])
    out = process_logits(logits, GenerationConfig(), None)
    assert out[0].tolist() == [0, 0, 0, 0, 0, 5e4]
    assert out[1].tolist() == logits[1].tolist()


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k = process_logits(logits, GenerationConfig(do_sample=True, top_k=2), None)
    assert torch.isfinite(k).tolist() == [[True, True, False, False]]
    p = process_logits(logits, GenerationConfig(do_sample=True, top_p=0.7), None)
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5+0.3 covers it
    p = process_logits(logits, GenerationConfig(do_sample=True, top_p=0.5), None)
    assert torch.isfinite(p).tolist() == [[True, False, False, False]]


def test_repetition_penalty_follows_transformers_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = process_logits(logits, GenerationConfig(repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("你好")
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, seed=7)
    a = generate(model, tokenizer, [prompt], gen)[0].token_ids
    b = generate(model, tokenizer, [prompt], gen)[0].token_ids
    c = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=8, do_sample=True, seed=8))[0].token_ids
    assert a == b and a != c


def test_stop_string_cuts_text_and_stream(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("你好")
    free = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=16))[0]
    stop = free.text[5:8]
    result = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=16, stop_strings=(stop,)))[0]
    assert result.text == free.text[: free.text.find(stop)]
    assert result.finish_reason == "stop"
    streamed = "".join(d for d, _ in stream_text(model, tokenizer, prompt, GenerationConfig(max_new_tokens=16, stop_strings=(stop,))))
    assert streamed == result.text


def test_text_stream_never_shows_part_of_a_stop_string(tokenizer):
    ids = tokenizer.encode("abc STOP def", add_special_tokens=False)
    stream = TextStream(tokenizer, ["STOP"])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "ST" not in shown
        if stream.stopped:
            break
    shown += stream.finish()
    assert shown == "abc "


def test_too_long_prompt_refused_or_truncated(tiny):
    model, tokenizer = tiny
    long_prompt = [5] * (model.config.max_sequence_length + 10) + [130001, 130004]
    with pytest.raises(PromptTooLongError, match="max_sequence_length"):
        generate(model, tokenizer, [long_prompt], GenerationConfig(max_new_tokens=2))
    (r,) = generate(model, tokenizer, [long_prompt], GenerationConfig(max_new_tokens=2, truncate_prompt=True))
    assert len(r.token_ids) == 2


def test_empty_prompt_and_bad_options_are_user_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(ChatGLMError):
        generate(model, tokenizer, [[]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ChatGLMError):
        GenerationConfig(do_sample=True, top_p=1.5).validate()


def test_max_length_counts_prompt_tokens(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("你好")
    (r,) = generate(model, tokenizer, [prompt], GenerationConfig(max_length=len(prompt) + 5))
    assert len(r.token_ids) == 5
