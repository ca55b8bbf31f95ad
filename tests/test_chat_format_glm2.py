"""ChatGLM2/3 chat formats against the goldens of THUDM's chat() (SPEC II.5): prompt ids, post-processing,
history, stop ids, the OpenAI tool-call mapping."""
import json

import pytest

from chatglm_ft.chat_format import ChatFormat, chat_format_for
from chatglm_ft.chat_glm2 import ChatGLM2Format
from chatglm_ft.chat_glm3 import (ChatGLM3Format, openai_message, openai_to_chat, parse_tool_call,
                                  process_response, visible_text)
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def v2(golden2_dir):
    return chat_format_for(load_tokenizer(golden2_dir))


@pytest.fixture(scope="module")
def v3(golden3_dir):
    return chat_format_for(load_tokenizer(golden3_dir))


def test_format_follows_the_tokenizer(v2, v3, tokenizer):
    assert type(v2) is ChatGLM2Format and type(v3) is ChatGLM3Format
    assert type(chat_format_for(tokenizer)) is ChatFormat
    assert chat_format_for(tokenizer).stop_token_ids == (130005,)
    assert v2.stop_token_ids == (2,)
    assert v3.stop_token_ids == (2, 64795, 64797)
    assert (v2.max_length, v2.top_p, v2.temperature) == (8192, 0.8, 0.8)
    assert (v3.max_length, v3.top_p, v3.temperature) == (8192, 0.8, 0.8)


def test_v2_prompt_ids_and_history(v2, golden2):
    assert len(golden2["chat"]) == 4
    for case in golden2["chat"]:
        history = [tuple(h) for h in case["history"]]
        assert v2.prompt_text(case["query"], history) == case["prompt"]
        assert v2.prompt_ids(case["query"], history) == case["prompt_ids"]
        response, history_out = v2.process_response(v2.tokenizer.decode(case["new_ids"]), case["query"], history)
        assert response == case["response"]
        assert [list(h) for h in history_out] == case["history_out"]
        assert history == [tuple(h) for h in case["history"]]  # the caller's list is left alone


def test_v2_process_response(v2, golden2):
    for case in golden2["process_response"]:
        assert v2.clean(case["output"]) == case["response"]


def test_v3_prompt_ids_and_history(v3, golden3):
    kinds = {case["kind"] for case in golden3["chat"]}
    assert {"system message", "system message with tools", "observation role after an assistant tool call"} <= kinds
    for case in golden3["chat"]:
        ids = v3.prompt_ids(case["query"], case["history"], role=case["role"])
        assert ids == case["prompt_ids"], case["kind"]
        assert v3.tokenizer.decode(ids) == case["prompt_decoded"]
        # every golden answer ran into max_length: the original drops its last real token
        new_ids = case["new_ids"]
        assert len(case["prompt_ids"]) + len(new_ids) == case["max_length"]
        output = v3.output_text(new_ids, v3.tokenizer.decode(new_ids), "length")
        response, history_out = v3.process_response(output, case["query"], case["history"], role=case["role"])
        assert response == case["response"]
        assert history_out == case["history_out"]


def test_v3_output_text_after_a_stop_token(v3):
    # generation leaves the stop token out; then nothing more is dropped
    assert v3.output_text([30910, 13, 36474], "\n 你", "stop") == "\n 你"


def test_v3_process_response(golden3):
    assert len(golden3["process_response"]) == 6
    for case in golden3["process_response"]:
        history_in = json.loads(json.dumps(case["history_in"]))
        response, history_out = process_response(case["output"], history_in)
        assert response == case["response"], case["output"]
        assert history_out == case["history_out"]
        assert history_in == case["history_in"]  # worked on a copy


def test_tool_call_parsing_runs_no_code():
    assert parse_tool_call("tool_call(symbol='10111', n=3, x=[1, 2.5], f=None)") == {
        "symbol": "10111", "n": 3, "x": [1, 2.5], "f": None}
    assert parse_tool_call("tool_call()") == {}
    assert parse_tool_call("__import__('os').system('echo hi')") is None
    assert parse_tool_call("tool_call(x=open('/etc/passwd'))") is None
    assert parse_tool_call("tool_call('positional')") is None
    assert parse_tool_call("not python (") is None
    tools = [{"role": "system", "content": "t", "tools": []}]
    response, history = process_response("track\n```python\nprint(1)\n```", tools)
    assert response == {"name": "track", "content": "```python\nprint(1)\n```"}
    assert history[-1]["metadata"] == "track"


def test_visible_text_holds_back_tool_calls():
    assert visible_text("") == ""
    assert visible_text("\n 你好 [[训练时间]]") == "你好 2023年"
    assert visible_text("tra") is None  # may still be a tool name
    assert visible_text("track\n```python") is None
    assert visible_text("\n好的<|assistant|>") == ""
    assert visible_text("\n好的<|assistant|>\n第二段") == "第二段"


def test_v3_new_history_and_roles(v3, v2):
    assert v3.new_history() == []
    assert v3.new_history(system="be brief") == [{"role": "system", "content": "be brief"}]
    tools = [{"name": "track", "parameters": {}}]
    (system,) = v3.new_history(tools=tools)
    assert system["tools"] == tools and system["content"].startswith("Answer the following questions")
    with pytest.raises(ChatGLMError, match="no system prompt"):
        v2.new_history(system="x")
    with pytest.raises(ChatGLMError, match="no 'observation' turns"):
        v2.prompt_ids("x", [], role="observation")
    assert v3.history_pairs([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == [("q", "a")]


TOOLS = [{"type": "function", "function": {"name": "track", "description": "追踪指定股票的实时价格", "parameters": {
    "type": "object", "properties": {"symbol": {"description": "需要追踪的股票代码"}}, "required": ["symbol"]}}}]


def test_openai_request_maps_to_the_golden_tool_prompts(v3, golden3):
    by_kind = {case["kind"]: case for case in golden3["chat"]}
    # the first request: tools + a user question
    query, role, history = openai_to_chat([{"role": "user", "content": "帮我查询股票10111的价格"}], TOOLS)
    case = by_kind["system message with tools"]
    assert (query, role, history) == (case["query"], case["role"], case["history"])
    assert v3.prompt_ids(query, history, role=role) == case["prompt_ids"]
    # the model's tool call goes back as an OpenAI message...
    response, _ = process_response("track\n```python\ntool_call(symbol='10111')\n```", history)
    message, finish_reason = openai_message(response, call_id="call_1")
    assert finish_reason == "tool_calls" and message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "track", "arguments": '{"symbol": "10111"}'}}]
    # ...and the client sends it back with the tool's result: an observation turn
    messages = [{"role": "user", "content": "帮我查询股票10111的价格"}, message,
                {"role": "tool", "tool_call_id": "call_1", "content": '{"price": 12412}'}]
    query, role, history = openai_to_chat(messages, TOOLS)
    case = by_kind["observation role after an assistant tool call"]
    assert (query, role, history) == (case["query"], case["role"], case["history"])
    assert v3.prompt_ids(query, history, role=role) == case["prompt_ids"]


def test_openai_request_without_tools(v3, golden3):
    by_kind = {case["kind"]: case for case in golden3["chat"]}
    case = by_kind["system message"]
    messages = case["history"] + [{"role": "user", "content": case["query"]}]
    query, role, history = openai_to_chat(messages)
    assert v3.prompt_ids(query, history, role=role) == case["prompt_ids"]
    assert openai_message("你好") == ({"role": "assistant", "content": "你好"}, "stop")
    with pytest.raises(ChatGLMError, match="last message"):
        openai_to_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(ChatGLMError, match="unknown role"):
        openai_to_chat([{"role": "robot", "content": "q"}])
    with pytest.raises(ChatGLMError, match="tools\\[0\\]"):
        openai_to_chat([{"role": "user", "content": "q"}], [{"type": "function"}])


# -- end to end with the tiny networks (runs once the ChatGLM2/3 network can be loaded) ------------------
def _load_or_skip(directory):
    from chatglm_ft.api import load
    from chatglm_ft.errors import CheckpointError

    try:
        return load(directory, dtype="float32", device="cpu")
    except CheckpointError as e:
        if "ChatGLM-6B (v1) only" in str(e):
            pytest.skip("this build cannot load the ChatGLM2/3 network yet")
        raise


@pytest.mark.parametrize("version", ["2", "3"])
def test_chat_end_to_end_matches_golden(version, golden2_dir, golden3_dir, golden2, golden3):
    """chat()/stream_chat() on the tiny networks: every golden conversation, cut to its first new ids to stay fast
    on CPU (the full 200/320-token answers match as well; they take minutes here)."""
    from chatglm_ft.chat import chat, stream_chat

    directory, golden = (golden2_dir, golden2) if version == "2" else (golden3_dir, golden3)
    model, tokenizer = _load_or_skip(directory)
    fmt = chat_format_for(tokenizer)
    new = 6
    for case in golden["chat"]:
        role = case.get("role", "user")
        history = case["history"] if version == "3" else [tuple(h) for h in case["history"]]
        max_length = len(case["prompt_ids"]) + new
        # what the original answers at this max_length: its greedy ids are a prefix of the golden's, and
        # ChatGLM3 drops the last one because the answer ran into max_length
        kept = case["new_ids"][:new - 1] if version == "3" else case["new_ids"][:new]
        expected = fmt.process_response(tokenizer.decode(kept), case["query"], history, role=role)
        got = chat(model, tokenizer, case["query"], history, role=role, do_sample=False, max_length=max_length)
        assert got == expected, case["query"]
        *_, last = stream_chat(model, tokenizer, case["query"], history, role=role, do_sample=False,
                               max_length=max_length)
        assert last == expected
