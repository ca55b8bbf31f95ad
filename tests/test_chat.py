from chatglm_ft.chat import ResponseStreamer
from chatglm_ft.prompt import alpaca_prompt, chat_prompt, clean_response


def test_chat_matches_golden(tiny, golden):
    model, tokenizer = tiny
    for case in golden["chat"]:
        assert chat_prompt(case["query"], case["history"]) == case["prompt"]
        response, history = model.chat(tokenizer, case["query"], history=case["history"], max_length=200, do_sample=False)
        assert response == case["response"]
        assert history[-1] == (case["query"], case["response"])
        assert len(history) == len(case["history"]) + 1


def test_stream_chat_ends_with_the_chat_response(tiny, golden):
    model, tokenizer = tiny
    case = golden["chat"][0]
    partials = [r for r, _ in model.stream_chat(tokenizer, case["query"], history=case["history"], max_length=200, do_sample=False)]
    assert len(partials) > 10
    assert partials[-1] == case["response"]


def test_prompt_formats():
    assert chat_prompt("你好") == "你好"
    assert chat_prompt("q2", [("q1", "a1")]) == "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答："
    assert alpaca_prompt("Do it", "data") == "Instruction: Do it\nInput: data\nAnswer: "
    assert alpaca_prompt("Do it") == "Instruction: Do it\nAnswer: "


def test_clean_response():
    assert clean_response("  你好,世界!ok, fine?好  ") == "你好，世界！ok, fine？好"
    assert clean_response("训练于[[训练时间]]") == "训练于2023年"
    assert clean_response("a:b;中") == "a:b；中"


def test_response_streamer_prints_only_final_characters():
    streamer = ResponseStreamer()
    raw = "你好,世界!"
    out = "".join(streamer.update(raw[: k + 1]) for k in range(len(raw))) + streamer.finish()
    assert out == clean_response(raw) == "你好，世界！"


# THUDM's chat() decodes with transformers' clean_up_tokenization_spaces: the same tokens give the same text.
SPACE_CLEAN_UP_CASES = [
    ("你好 ,我是助手 。", "你好，我是助手 。"),  # " ," loses its space, then becomes full-width next to CJK
    ("It 's fine , isn't it ?", "It's fine, isn't it?"),
    ("I do n't know . We 're here , they 've gone , I 'm done !", "I don't know. We're here, they've gone, I'm done!"),
    ("a ' b", "a'b"),
    ("睡前 :喝牛奶", "睡前 ：喝牛奶"),  # " :" is not in transformers' list: the space stays
]


def test_reply_text_gets_the_original_decodes_space_clean_up():
    for raw, expected in SPACE_CLEAN_UP_CASES:
        assert clean_response(raw) == expected


def test_streamed_reply_equals_the_final_clean_up_character_by_character():
    for raw, _ in SPACE_CLEAN_UP_CASES:
        streamer = ResponseStreamer()
        printed = "".join(streamer.update(raw[:k]) for k in range(1, len(raw) + 1)) + streamer.finish()
        assert printed == clean_response(raw)
