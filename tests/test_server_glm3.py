"""The OpenAI server's ChatGLM3 tool calls, request to response, with an engine that answers fixed token ids:
the prompt ids it is sent must be the golden ones, its answer must come back as Chat Completions tool_calls."""
import json

import pytest
from fastapi.testclient import TestClient

from chatglm_ft.engine import Chunk, Completion
from chatglm_ft.server import create_app
from chatglm_ft.tokenizers import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "track", "description": "追踪指定股票的实时价格", "parameters": {
    "type": "object", "properties": {"symbol": {"description": "需要追踪的股票代码"}}, "required": ["symbol"]}}}]
TOOL_CALL = "track\n```python\ntool_call(symbol='10111')\n```"


class ScriptedHandle:
    def __init__(self, tokenizer, prompt_ids, answer_ids):
        self.completion = Completion(text=tokenizer.decode(answer_ids), token_ids=list(answer_ids),
                                     finish_reason="stop", prompt_tokens=len(prompt_ids))
        self.texts = [tokenizer.decode(answer_ids[:k + 1])[len(tokenizer.decode(answer_ids[:k])):]
                      for k in range(len(answer_ids))]

    async def wait(self, timeout=None):
        return self.completion

    async def chunks(self):
        for text in self.texts:
            yield Chunk(text, 1)
        yield Chunk("", 0, self.completion)

    def cancel(self):
        pass


class ScriptedEngine:
    """Stands in for engine.Engine: records what it is asked and answers `answer` (text, encoded)."""

    alive, active, queue_depth, max_batch = True, 0, 0, 1

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.answer = ""
        self.requests = []

    def start(self):
        pass

    def stop(self, drain=True):
        pass

    def submit(self, prompt_ids, gen, loop=None):
        self.requests.append((list(prompt_ids), gen))
        return ScriptedHandle(self.tokenizer, prompt_ids, self.tokenizer.encode(self.answer, add_special_tokens=False))


@pytest.fixture(scope="module")
def server(golden3_dir):
    engine = ScriptedEngine(load_tokenizer(golden3_dir))
    with TestClient(create_app(engine, model_name="chatglm3-6b-tiny"), base_url="http://localhost") as client:
        yield client, engine


def _events(response) -> list[dict]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_tool_call_round_trip(server, golden3):
    client, engine = server
    by_kind = {case["kind"]: case for case in golden3["chat"]}
    engine.answer = TOOL_CALL
    question = [{"role": "user", "content": "帮我查询股票10111的价格"}]
    reply = client.post("/v1/chat/completions", json={"messages": question, "tools": TOOLS}).json()
    prompt_ids, gen = engine.requests[-1]
    assert prompt_ids == by_kind["system message with tools"]["prompt_ids"]
    assert gen.stop_token_ids == (2, 64795, 64797)
    (choice,) = reply["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "track", "arguments": '{"symbol": "10111"}'}
    # the client runs the tool and sends the result back
    engine.answer = "\n股票10111的价格是12412。"
    messages = question + [message, {"role": "tool", "tool_call_id": call["id"], "content": '{"price": 12412}'}]
    reply = client.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS}).json()
    assert engine.requests[-1][0] == by_kind["observation role after an assistant tool call"]["prompt_ids"]
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "股票10111的价格是12412。"}
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_streamed_tool_call_is_one_delta(server):
    client, engine = server
    engine.answer = TOOL_CALL
    body = {"messages": [{"role": "user", "content": "帮我查询股票10111的价格"}], "tools": TOOLS, "stream": True}
    events = _events(client.post("/v1/chat/completions", json=body))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == ""  # nothing of the call leaks out as text
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert calls[0][0]["function"] == {"name": "track", "arguments": '{"symbol": "10111"}'}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("answer, shown", [("\n你好 [[训练时间]]", "你好 2023年"), ("可根据學者", "可根据學者")])
def test_streamed_text(server, answer, shown):
    client, engine = server
    engine.answer = answer
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}], "stream": True}
    events = _events(client.post("/v1/chat/completions", json=body))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == shown
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    tokenizer = engine.tokenizer
    assert engine.requests[-1][0] == [64790, 64792] + tokenizer.build_single_message("system", "", "be brief") + \
        tokenizer.build_single_message("user", "", "你好") + [64796]


def test_bad_tool_requests(server, golden2_dir):
    client, _ = server
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert reply.status_code == 400 and "unknown role" in reply.json()["error"]["message"]
    with TestClient(create_app(ScriptedEngine(load_tokenizer(golden2_dir))), base_url="http://localhost") as v2:
        reply = v2.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
        assert reply.status_code == 400 and "tools need ChatGLM3-6B" in reply.json()["error"]["message"]
