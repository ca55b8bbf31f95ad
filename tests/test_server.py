"""The HTTP server against a live uvicorn on loopback (golden tiny model, float32, CPU), through the
official `openai` client and plain httpx."""
import asyncio
import json
import re
import signal
import time

import httpx
import openai
import pytest

from chatglm_ft import load
from chatglm_ft.engine import Engine
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.prompt import chat_prompt, clean_response
from chatglm_ft.server import create_app
from live_server import LiveServer, serve_process  # tests/live_server.py

MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def engine_model(golden_dir):
    model, _ = load(golden_dir, dtype="float32", device="cpu")  # the engine owns this one's KV cache
    return model


@pytest.fixture(scope="module")
def live(engine_model, tokenizer):
    engine = Engine(engine_model, tokenizer, max_batch=32, max_queue=64, max_context=MAX_CONTEXT)
    with LiveServer(create_app(engine, model_name="chatglm-6b-tiny", max_body_bytes=64 * 1024)) as server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(tiny, prompt: str, **gen) -> tuple[list[int], object]:
    """The same request run alone through plain `generate` (float32, greedy unless told otherwise)."""
    model, tokenizer = tiny
    ids = tokenizer.encode(prompt)
    return ids, generate(model, tokenizer, [ids], GenerationConfig(**gen))[0]


def metric(url: str, name: str, **headers) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


# -- OpenAI API through the official client ---------------------------------------------------------
def test_chat_completion_matches_generate(client, tiny):
    ids, ref = reference(tiny, "你好", max_new_tokens=12)
    out = client.chat.completions.create(model="chatglm-6b-tiny", messages=[{"role": "user", "content": "你好"}],
                                         temperature=0, max_tokens=12)
    assert out.choices[0].message.content == clean_response(ref.text)
    assert out.choices[0].finish_reason == ref.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_streamed_chat_with_history_and_system_prompt(client, tiny):
    history = [("你好", "你好，我是 ChatGLM。")]
    ids, ref = reference(tiny, chat_prompt("Give three tips for staying healthy.", [("Be brief.\n你好", history[0][1])]),
                         max_new_tokens=20)
    stream = client.chat.completions.create(
        model="chatglm-6b-tiny", temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                  {"role": "assistant", "content": history[0][1]},
                  {"role": "user", "content": "Give three tips for staying healthy."}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == clean_response(ref.text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 20


def test_completions_stream_and_stop_strings(client, tiny):
    prompt = "Instruction: Name three colors.\nAnswer: "
    _, ref = reference(tiny, prompt, max_new_tokens=16)
    out = client.completions.create(model="chatglm-6b-tiny", prompt=prompt, temperature=0, max_tokens=16)
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="chatglm-6b-tiny", prompt=prompt, temperature=0, max_tokens=16, stream=True))
    assert streamed == ref.text
    stop = ref.text[5:8]
    _, cut = reference(tiny, prompt, max_new_tokens=16, stop_strings=(stop,))
    out = client.completions.create(model="chatglm-6b-tiny", prompt=prompt, temperature=0, max_tokens=16, stop=[stop, "never"])
    assert out.choices[0].text == cut.text == ref.text[: ref.text.find(stop)]
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == len(cut.token_ids)
    streamed = list(client.completions.create(model="chatglm-6b-tiny", prompt=prompt, temperature=0, max_tokens=16,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.text and streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    ask = dict(model="chatglm-6b-tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=10, temperature=1.0, top_p=0.9)
    a, b = (client.chat.completions.create(seed=3, **ask).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(seed=4, **ask).choices[0].message.content
    assert a == b and a != c


def test_sampling_with_repetition_penalty_equals_generate(client, tiny):
    """The server's sampler is `generate`'s: the same seed and settings give the same text."""
    settings = dict(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.9, top_k=30, repetition_penalty=1.3, seed=5)
    _, ref = reference(tiny, chat_prompt("你好", []), **settings)
    out = client.chat.completions.create(model="chatglm-6b-tiny", messages=[{"role": "user", "content": "你好"}],
                                         max_tokens=10, temperature=1.0, top_p=0.9, seed=5,
                                         extra_body={"top_k": 30, "repetition_penalty": 1.3})
    assert out.choices[0].message.content == clean_response(ref.text)


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["chatglm-6b-tiny"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# -- the original api.py format --------------------------------------------------------------------
def test_original_api_format(live, tiny):
    model, tokenizer = tiny
    history = [["你好", "你好👋！"]]
    r = httpx.post(live.url + "/", json={"prompt": "Name three colors.", "history": history, "max_length": 80,
                                         "do_sample": False}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    expected, _ = model.chat(tokenizer, "Name three colors.", history=history, max_length=80, do_sample=False)
    assert body["response"] == expected
    assert body["history"] == history + [["Name three colors.", expected]]
    assert body["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    # the original clients post without a JSON content type and with sampling defaults
    r = httpx.post(live.url + "/", content=json.dumps({"prompt": "你好", "history": [], "max_length": 30}), timeout=60)
    assert r.status_code == 200 and r.json()["history"][0][0] == "你好"


# -- bad input --------------------------------------------------------------------------------------
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [  # (path, raw body or JSON, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": USER, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "system", "content": "x"}] + USER}, 400, "messages[1].role"),
    ("/v1/chat/completions", {"messages": USER + USER}, 400, "messages[1].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 600}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": MAX_CONTEXT}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400, "echo"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/", {"history": []}, 400, "prompt"),
    ("/", {"prompt": "hi", "history": [["only one"]]}, 400, "history[0]"),
    ("/", {"prompt": "hi", "max_length": "long"}, 400, "max_length"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(live, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 400:
        assert error["type"] == "invalid_request_error"


def test_body_size_limit(live):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]})
    r = httpx.post(live.url + "/v1/chat/completions", content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit must hold while reading
        for _ in range(80):
            yield b"x" * 1024

    r = httpx.post(live.url + "/v1/chat/completions", content=chunked(), timeout=30)
    assert r.status_code == 413


def test_wrong_method_is_an_error_object(live):
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# -- authentication and the queue limit, on a second server -----------------------------------------
@pytest.fixture(scope="module")
def guarded(golden_dir, tokenizer):
    model, _ = load(golden_dir, dtype="float32", device="cpu")
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1, max_context=MAX_CONTEXT)
    with LiveServer(create_app(engine, api_key="s3cret")) as server:
        yield server


def test_api_key_required_everywhere_but_health(guarded):
    url = guarded.url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert ok.models.list().data[0].id == "chatglm-6b"
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("GET", "/v1/models/chatglm-6b")]:
        r = httpx.request(method, url + path, json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/").status_code == 200  # the static page; its API calls carry the key


def test_full_queue_answers_429_with_retry_after(guarded):
    headers = {"Authorization": "Bearer s3cret"}
    long = {"prompt": "x", "max_tokens": MAX_CONTEXT - 8, "temperature": 0, "stream": True}
    with httpx.Client(base_url=guarded.url, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # keep the iterator: dropping it would close the connection
            next(lines)  # it holds the only slot
            with http.stream("POST", "/v1/completions", json=long) as queued:
                assert queued.status_code == 200  # waits in the queue (max 1)
                r = http.post("/v1/completions", json=long)
                assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
        # both streams were closed early: their slots come back
        deadline = time.monotonic() + 30
        while metric(guarded.url, "chatglm_active_requests", **headers) or metric(guarded.url, "chatglm_queue_depth", **headers):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metric(guarded.url, "chatglm_requests_rejected_total", **headers) == 1


# -- load -------------------------------------------------------------------------------------------
def top2_margins(model, prompt_ids, continuation):
    """Smallest gap between the two best logits over the steps that produced `continuation`."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + continuation[:-1]])
        logits = model(ids).logits[0, len(prompt_ids) - 1:].float()
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


@pytest.fixture(scope="module")
def load_cases(tiny, shared):
    """64 prompts whose greedy run alone never has two logits within 1e-4 (so batching cannot flip a token)."""
    model, tokenizer = tiny
    records = json.loads(sorted((shared / "data" / "alpaca_en").glob("*.json"))[0].read_text(encoding="utf-8"))
    cases = []
    for record in records:
        query = record["instruction"]
        ids, ref = reference(tiny, chat_prompt(query), max_new_tokens=8)
        produced = ref.token_ids + ([model.config.eos_token_id] if ref.finish_reason == "stop" else [])
        if len(ids) < 40 and top2_margins(model, ids, produced) > 1e-4:
            cases.append((query, clean_response(ref.text), ref.finish_reason, len(ref.token_ids)))
        if len(cases) == 64:
            return cases
    pytest.fail(f"only {len(cases)} usable prompts")


def test_64_concurrent_streams_equal_their_solo_runs(live, load_cases):
    async def one(client, query):
        stream = await client.chat.completions.create(
            model="chatglm-6b-tiny", messages=[{"role": "user", "content": query}], temperature=0, max_tokens=8,
            stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage.completion_tokens

    async def run_all():
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, query) for query, *_ in load_cases))

    steps_before = live.engine.stats.decode_steps
    results = asyncio.run(run_all())
    for (query, text, finish, n), got in zip(load_cases, results):
        assert got == (text, finish, n), query
    assert live.engine.stats.decode_rows / (live.engine.stats.decode_steps - steps_before) > 1
    assert live.engine.stats.finished["error"] == 0
    assert httpx.get(live.url + "/health").json() == {"status": "ok", "model": "chatglm-6b-tiny", "active": 0,
                                                      "queued": 0, "decode_step": "uncompiled"}  # CPU: eager
    assert metric(live.url, "chatglm_active_requests") == 0


def test_disconnected_streams_free_their_slots(live):
    cancelled = metric(live.url, "chatglm_requests_total{finish_reason=\"cancelled\"}")
    finished = metric(live.url, "chatglm_requests_total{finish_reason=\"length\"}")
    clients = [httpx.Client(base_url=live.url, timeout=60) for _ in range(6)]
    for http in clients:
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": USER, "max_tokens": MAX_CONTEXT - 8, "temperature": 0, "stream": True}) as r:
            next(r.iter_lines())  # first event arrived: the request holds a slot
        http.close()  # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 30
    while metric(live.url, "chatglm_active_requests") > 0:
        assert time.monotonic() < deadline, "slots still held"
        time.sleep(0.05)
    assert metric(live.url, "chatglm_requests_total{finish_reason=\"cancelled\"}") == cancelled + 6
    assert metric(live.url, "chatglm_requests_total{finish_reason=\"length\"}") == finished
    assert httpx.get(live.url + "/health").status_code == 200


# -- the command and graceful shutdown ----------------------------------------------------------------
def test_serve_command_drains_on_sigterm(golden_dir):
    with serve_process("--model", str(golden_dir), "--device", "cpu", "--max-context", str(MAX_CONTEXT),
                       "--log-level", "warning") as (proc, port):
        url = f"http://127.0.0.1:{port}"
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                "messages": USER, "max_tokens": 60, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 60  # the request in flight was finished, not cut
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
