"""Continuous batching engine on the golden tiny model (float32, CPU)."""
import time

import pytest

from chatglm_ft import load
from chatglm_ft.engine import Engine, EngineClosedError, QueueFullError
from chatglm_ft.errors import ChatGLMError, PromptTooLongError
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.tokenizer import StreamDecoder

GREEDY16 = GenerationConfig(max_new_tokens=16, stop_token_ids=())  # the golden ids run past <eop>-free 16 steps


@pytest.fixture(scope="module")
def engine_model(golden_dir):
    """A model of its own: the engine owns its KV cache (the session `tiny` model stays untouched)."""
    model, _ = load(golden_dir, dtype="float32", device="cpu")
    return model


@pytest.fixture
def make_engine(engine_model, tokenizer):
    engines = []

    def make(**kwargs):
        kwargs.setdefault("max_context", 256)
        engine = Engine(engine_model, tokenizer, **kwargs).start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.stop(drain=False, timeout=30)


@pytest.fixture(scope="module")
def golden_generate(tiny, golden):
    """Plain `generate`, one golden prompt at a time (float32, greedy, 16 tokens)."""
    model, _ = tiny
    expected = [generate(model, None, [c["input_ids"]], GREEDY16)[0].token_ids for c in golden["greedy"]]
    assert expected == [c["new_ids"] for c in golden["greedy"]]
    return expected


@pytest.mark.parametrize("decode", ["eager", "graphs", "compile"])  # graphs: bucketed static buffers (captured on CUDA only); compile: dynamic batch
def test_slot_prefill_and_decode_match_generate_on_golden_prompts(make_engine, golden_generate, golden, decode):
    """All golden prompts at once (different lengths in one prefill), then with staggered arrivals and
    slot reuse: every row equals plain `generate` and the golden ids."""
    cases, expected = golden["greedy"], golden_generate
    engine = make_engine(max_batch=4, decode=decode)
    together = [engine.submit(c["input_ids"], GREEDY16) for c in cases]
    assert [h.result(60).token_ids for h in together] == expected

    engine = make_engine(max_batch=3, decode=decode)  # 6 requests through 3 slots: queueing, reused slots, idle bucket rows
    staggered = []
    for c in cases + cases[:2]:
        staggered.append(engine.submit(c["input_ids"], GREEDY16))
        next(iter(staggered[-1]))  # wait for its first token, so the next one joins a running batch
    results = [h.result(60) for h in staggered]
    assert [r.token_ids for r in results] == expected + expected[:2]
    assert all(r.finish_reason == "length" and r.prompt_tokens == len(c["input_ids"]) for r, c in zip(results, cases))
    assert engine.stats.decode_rows > engine.stats.decode_steps  # rows really shared decode steps


@pytest.fixture
def blocked_compile(monkeypatch):
    """torch.compile replaced by a step that blocks until `release` is set, then records which thread ran it."""
    import threading

    from chatglm_ft import batching

    release, compiled_calls = threading.Event(), []

    def slow_compile(fn, device, gemv="kernel"):
        def step(*args):
            assert release.wait(60)
            compiled_calls.append(threading.current_thread().name)
            return fn(*args)
        return step

    monkeypatch.setattr(batching, "compile_step", slow_compile)
    return release, compiled_calls


def test_compile_in_the_background_serves_at_once_then_switches(make_engine, golden_generate, golden, blocked_compile):
    """decode="compile" (the default on one GPU) answers while the step compiles in another thread, then
    switches to the compiled step between two iterations; the tokens are the same before and after."""
    import sys

    from chatglm_ft import engine as engine_module

    switch_interval = sys.getswitchinterval()
    release, compiled_calls = blocked_compile
    cases, expected = golden["greedy"], golden_generate
    engine = make_engine(max_batch=4, decode="compile")
    assert engine.warm_up_seconds == 0 and not engine.compile_done.is_set()
    assert engine.decode_step_state == "compiling"
    assert [engine.submit(c["input_ids"], GREEDY16).result(60).token_ids for c in cases] == expected  # compile blocked
    assert not engine._graphs.compiled and compiled_calls == []
    assert sys.getswitchinterval() == pytest.approx(engine_module.COMPILE_SWITCH_INTERVAL)  # the GIL back soon
    release.set()
    assert engine.compile_done.wait(60) and engine.compile_error is None  # switched while idle
    assert engine._graphs.compiled and set(compiled_calls) == {"chatglm-compile"}
    assert engine.decode_step_state == "compiled"
    together = [engine.submit(c["input_ids"], GREEDY16) for c in cases]
    assert [h.result(60).token_ids for h in together] == expected
    assert "chatglm-engine" in compiled_calls  # the worker now runs the compiled step
    assert sys.getswitchinterval() == switch_interval  # restored once the compile ended


def test_a_compile_outliving_its_run_is_not_handed_to_the_next_start(make_engine, golden_generate, golden,
                                                                        blocked_compile):
    """stop() without a timeout leaves a compile running; after a new start() only that start's own compile
    is switched in (the old one was built on the previous run's buffers)."""
    release, _ = blocked_compile
    engine = make_engine(max_batch=4, decode="compile")
    stale = engine._compiler
    engine.stop()  # no timeout: the compile thread goes on
    assert stale.is_alive()
    engine.start()
    assert engine._compiler is not stale
    release.set()
    stale.join(60)
    assert engine.compile_done.wait(60) and engine._graphs.compiled
    assert engine._graphs.last_token is engine._last_token  # this run's buffers
    cases = golden["greedy"]
    assert [engine.submit(c["input_ids"], GREEDY16).result(60).token_ids for c in cases] == golden_generate


def test_a_failed_background_compile_leaves_the_uncompiled_step_serving(make_engine, golden_generate, golden,
                                                                         monkeypatch):
    from chatglm_ft import batching

    def broken_compile(fn, device, gemv="kernel"):
        def step(*args):
            raise RuntimeError("inductor failed")
        return step

    monkeypatch.setattr(batching, "compile_step", broken_compile)
    engine = make_engine(max_batch=4, decode="compile")
    assert engine.compile_done.wait(60) and engine.compile_error == "RuntimeError: inductor failed"
    assert not engine._graphs.compiled and engine.decode_step_state == "uncompiled"
    cases = golden["greedy"]
    assert [engine.submit(c["input_ids"], GREEDY16).result(60).token_ids for c in cases] == golden_generate


def test_compile_at_start_compiles_before_serving(make_engine, monkeypatch):
    from chatglm_ft import batching

    calls = []
    monkeypatch.setattr(batching, "compile_step", lambda fn, device, gemv="kernel": calls.append(fn) or fn)
    engine = make_engine(max_batch=4, decode="compile", compile_in_background=False)
    assert engine.compile_done.is_set() and engine._graphs.compiled and len(calls) == 1


def test_text_and_stop_strings_match_generate(make_engine, tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("Give three tips for staying healthy.")
    free = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=20))[0]
    stop = free.text[6:9]
    cut = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=20, stop_strings=(stop,)))[0]
    engine = make_engine(max_batch=2)
    handle = engine.submit(prompt, GenerationConfig(max_new_tokens=20, stop_strings=(stop,)))
    streamed = "".join(chunk.text for chunk in handle)
    done = handle.result(1)
    assert streamed == done.text == cut.text == free.text[: free.text.find(stop)]
    assert done.finish_reason == "stop" and done.token_ids == cut.token_ids


def test_stop_token_ends_the_row(make_engine, golden):
    case = golden["greedy"][1]
    stop_id = case["new_ids"][5]
    first = case["new_ids"].index(stop_id)
    engine = make_engine(max_batch=2)
    done = engine.generate(case["input_ids"], GenerationConfig(max_new_tokens=16, stop_token_ids=(stop_id,)), timeout=60)
    assert done.finish_reason == "stop" and done.token_ids == case["new_ids"][:first]


def test_sampling_rows_are_seeded_and_do_not_disturb_greedy_rows(make_engine, golden):
    engine = make_engine(max_batch=4)
    case = golden["greedy"][2]
    # top_k: the random tiny model's distribution is nearly flat over 130k tokens, where the last-bit differences
    # of CPU matrix products at another batch size (BLAS sums in another order) can move a top-p draw to another
    # token; among 20 candidates they cannot
    sampled = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=20, seed=7, stop_token_ids=())
    a = engine.generate(case["input_ids"], sampled, timeout=60).token_ids
    handles = [engine.submit(case["input_ids"], sampled), engine.submit(case["input_ids"], GREEDY16),
               engine.submit(case["input_ids"], GenerationConfig(max_new_tokens=12, do_sample=True, top_k=20, seed=8,
                                                                 stop_token_ids=()))]
    b, greedy, other = (h.result(60).token_ids for h in handles)
    assert a == b and a != other
    assert greedy == case["new_ids"]


def test_cancel_frees_the_slot(make_engine, golden):
    engine = make_engine(max_batch=1)
    case = golden["greedy"][0]
    handle = engine.submit(case["input_ids"], GenerationConfig(max_new_tokens=200, stop_token_ids=()))
    next(iter(handle))
    handle.cancel()
    done = handle.result(30)
    assert done.finish_reason == "cancelled" and len(done.token_ids) < 200
    assert engine.generate(case["input_ids"], GREEDY16, timeout=60).token_ids == case["new_ids"]  # the slot is free again
    assert engine.active == 0 and engine.stats.finished["cancelled"] == 1


def test_rejections_up_front(make_engine, golden):
    engine = make_engine(max_batch=1, max_queue=1, max_context=64)
    ids = golden["greedy"][0]["input_ids"]
    with pytest.raises(PromptTooLongError, match="context"):
        engine.submit([5] * 70 + ids, GREEDY16)
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        engine.submit(ids, GenerationConfig(max_new_tokens=61))
    with pytest.raises(ChatGLMError, match="empty"):
        engine.submit([], GREEDY16)
    long = GenerationConfig(max_new_tokens=55, stop_token_ids=())
    running = engine.submit(ids, long)
    next(iter(running))  # it holds the only slot
    queued = engine.submit(ids, long)
    with pytest.raises(QueueFullError):
        engine.submit(ids, long)
    assert engine.stats.rejected == 1
    assert running.result(60).finish_reason == queued.result(60).finish_reason == "length"


def test_a_failing_forward_fails_its_requests_not_the_worker(make_engine, golden):
    engine = make_engine(max_batch=2)
    real = engine._decode
    calls = {"n": 0}

    def failing_once(requests):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return real(requests)

    engine._decode = failing_once
    case = golden["greedy"][0]
    failed = engine.generate(case["input_ids"], GREEDY16, timeout=60)
    assert failed.finish_reason == "error" and "simulated" in failed.error
    assert engine.generate(case["input_ids"], GREEDY16, timeout=60).token_ids == case["new_ids"]
    assert engine.alive and engine.active == 0


def test_stop_drains_then_refuses(make_engine, golden):
    engine = make_engine(max_batch=2)
    handles = [engine.submit(c["input_ids"], GREEDY16) for c in golden["greedy"]]
    engine.stop(drain=True, timeout=60)
    assert [h.result(1).token_ids for h in handles] == [c["new_ids"] for c in golden["greedy"]]
    with pytest.raises(EngineClosedError):
        engine.submit(golden["greedy"][0]["input_ids"], GREEDY16)


def test_idle_engine_waits_without_spinning(make_engine):
    engine = make_engine(max_batch=1)
    before = engine.stats.decode_steps
    time.sleep(0.2)
    assert engine.stats.decode_steps == before and engine.alive


def test_stream_decoder_gives_the_full_decode(tokenizer):
    import random

    texts = ["Hello world.\nNew line\tTab   three spaces", "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你。",
             "def f(x):\n    return x  # 𝔘nicode ✓ ½", "  leading spaces, ünïcödé ñ 😀😃  "]
    rng = random.Random(1)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sequences += [[rng.choice([rng.randrange(130528), rng.randrange(300), rng.randrange(130000, 130400), 5])
                   for _ in range(rng.randrange(1, 60))] for _ in range(200)]  # byte pieces, controls, unused ids
    for ids in sequences:
        decoder = StreamDecoder(tokenizer)
        pieces = [decoder.push(i) for i in ids]
        full = tokenizer.decode(ids)
        if "\ufffd" not in full:  # random byte pieces can form invalid UTF-8: then U+FFFD is the real text
            assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + decoder.flush() == full


@pytest.mark.gpu
def test_default_engine_on_cuda_compiles_and_matches_generate(golden_dir, golden):
    """On one GPU the engine compiles its decode step (dynamic batch: 1 row, 2-16 rows, more) and
    captures it; every golden prompt, alone and all together, gives plain `generate`'s tokens."""
    model, _ = load(golden_dir, dtype="float32", device="cuda")
    cases = golden["greedy"]
    expected = [generate(model, None, [c["input_ids"]], GREEDY16)[0].token_ids for c in cases]
    assert expected == [c["new_ids"] for c in cases]
    engine = Engine(model, None, max_batch=32, max_context=256, compile_in_background=False).start()
    try:
        assert engine.decode_mode == "compile" and engine.warm_up_seconds > 0 and engine.compile_done.is_set()
        assert engine.generate(cases[0]["input_ids"], GREEDY16, timeout=120).token_ids == expected[0]
        handles = [engine.submit(c["input_ids"], GREEDY16) for c in cases * 5]  # more than 16 rows
        assert [h.result(120).token_ids for h in handles] == expected * 5
    finally:
        engine.stop(drain=False, timeout=30)


@pytest.mark.gpu
def test_engine_serves_while_compiling_in_the_background_on_cuda(golden_dir, golden):
    """The default engine on one GPU answers before its compile is done (uncompiled captured steps, captured
    while the compile thread runs), then switches to the compiled step: plain `generate`'s tokens throughout."""
    model, _ = load(golden_dir, dtype="float32", device="cuda")
    cases = golden["greedy"]
    expected = [c["new_ids"] for c in cases]
    engine = Engine(model, None, max_batch=32, max_context=256).start()
    try:
        assert engine.warm_up_seconds == 0
        handles = [engine.submit(c["input_ids"], GREEDY16) for c in cases * 5]
        assert [h.result(120).token_ids for h in handles] == expected * 5
        assert engine.compile_done.wait(600) and engine.compile_error is None and engine.compile_seconds > 0
        assert engine._graphs.compiled
        handles = [engine.submit(c["input_ids"], GREEDY16) for c in cases * 5]
        assert [h.result(120).token_ids for h in handles] == expected * 5
    finally:
        engine.stop(drain=False, timeout=30)
