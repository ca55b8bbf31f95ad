"""ChatGLM2/3 through the one decode core (steps.py with the model's PaddingLayout): the fast decoder,
the continuous-batching engine and the server give THUDM's greedy ids, and one seed gives one set of
sampled tokens on every path (float32, CPU)."""
import json

import pytest
import torch

from chatglm_ft.api import load_model
from chatglm_ft.engine import Engine
from chatglm_ft.fast import FastOptions
from chatglm_ft.generate import GenerationConfig, stream_tokens
from chatglm_ft.tokenizers import load_tokenizer

UNCOMPILED = FastOptions(compile=False)  # the fast decoder's static cache, buckets and on-device sampling


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return load_model(ckpt_dir, dtype="float32", device="cpu")


def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, stop_token_ids=())


def decode(model, prompts, gen, fast) -> list[list[int]]:
    rows = [[] for _ in prompts]
    for step in stream_tokens(model, prompts, gen, fast=fast):
        for row, token in zip(rows, step):
            if token is not None:
                row.append(token)
    return rows


def batch_prompts(case) -> list[list[int]]:
    return [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(case["input_ids"], case["attention_mask"])]


def test_layout_positions_and_masks(model):
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])  # row 0 left-padded by two
    layout = model.prompt_layout(ids)
    assert layout.start.tolist() == [2, 0]
    assert layout.positions(torch.arange(4)).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    mask = layout.mask_for(torch.arange(4), 4)
    assert mask[0, 0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    assert mask[1, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    unpadded = model.prompt_layout(ids[1:])
    assert unpadded.mask_for(torch.arange(4), 4) is None  # a plain causal prompt: SDPA's own causal mask
    assert unpadded.mask_for(torch.tensor([4]), 5).shape == (1, 1, 1, 5)  # a decode step always gets a tensor
    assert model.idle_slot_state() == () and model.slot_layout(torch.zeros(3, 0, dtype=torch.long)).start.tolist() == [0] * 3


def test_fast_path_gives_the_golden_greedy_ids(model, gold):
    for case in gold["greedy"]:
        assert decode(model, [case["input_ids"]], greedy(len(case["new_ids"])), UNCOMPILED) == [case["new_ids"]]
    for case in gold["batch"]:
        assert decode(model, batch_prompts(case), greedy(len(case["new_ids"][0])), UNCOMPILED) == case["new_ids"]


@pytest.mark.parametrize("decode", ["eager", "graphs"])  # graphs: the bucketed static step (captured on CUDA only)
def test_engine_gives_the_golden_greedy_ids_alone_and_in_a_batch(model, gold, decode):
    cases = [(c["input_ids"], c["new_ids"]) for c in gold["greedy"]]
    for case in gold["batch"]:
        cases += list(zip(batch_prompts(case), case["new_ids"]))
    engine = Engine(model, None, max_batch=4, max_context=128, decode=decode).start()
    try:
        for prompt, new_ids in cases:
            assert engine.generate(prompt, greedy(len(new_ids)), timeout=60).token_ids == new_ids
        handles = [engine.submit(prompt, greedy(len(new_ids))) for prompt, new_ids in cases * 3]  # queued, slots reused
        assert [h.result(120).token_ids for h in handles] == [new_ids for _, new_ids in cases * 3]
        assert engine.stats.decode_rows > engine.stats.decode_steps  # rows of different lengths shared steps
    finally:
        engine.stop(drain=False, timeout=30)


@pytest.mark.parametrize("gen", [
    GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.3,
                     seed=11, stop_token_ids=()),
    GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.2, min_p=0.05, seed=12, stop_token_ids=()),
], ids=["top_p_top_k_penalty", "min_p"])
def test_same_seed_same_tokens_on_eager_fast_and_engine(model, gold, gen):
    prompt = gold["greedy"][0]["input_ids"]
    eager = [t for (t,) in stream_tokens(model, [prompt], gen, fast=False)]
    fast = [t for (t,) in stream_tokens(model, [prompt], gen, fast=UNCOMPILED)]
    others = batch_prompts(gold["batch"][0])
    batch = [row[0] for row in stream_tokens(model, [prompt, *others], gen, fast=False)]
    engine = Engine(model, None, max_batch=6, max_context=128, decode="eager").start()
    try:
        alone = engine.generate(prompt, gen, timeout=60).token_ids
        handles = [engine.submit(others[i % len(others)] if i % 3 else prompt, gen) for i in range(6)]
        results = [h.result(120).token_ids for h in handles]
    finally:
        engine.stop(drain=False, timeout=30)
    assert eager == fast == batch == alone
    assert results[0] == results[3] == eager
    other = [t for (t,) in stream_tokens(model, [prompt], GenerationConfig(**{**gen.__dict__, "seed": 99}), fast=False)]
    assert other != eager


def test_compiled_decode_gives_the_golden_greedy_ids(golden3_dir, golden3):
    """The real compiled step on the CPU (inductor + C++) over the ChatGLM2/3 layout (one family: compiling
    takes a while, and the layout code is the same)."""
    model = load_model(golden3_dir, dtype="float32", device="cpu")  # its own model: compiled state stays here
    case = golden3["greedy"][0]
    assert decode(model, [case["input_ids"]], greedy(len(case["new_ids"])), FastOptions()) == [case["new_ids"]]


def test_server_answers_a_chatglm3_chat_request(golden3_dir, golden3):
    """/v1/chat/completions on a real engine: the golden chat prompt in, THUDM's greedy ids out."""
    from fastapi.testclient import TestClient

    from chatglm_ft.server import create_app

    case = golden3["chat"][0]
    model, tokenizer = load_model(golden3_dir, dtype="float32", device="cpu"), load_tokenizer(golden3_dir)
    n = 12
    expected_ids = case["new_ids"][:n]
    engine = Engine(model, tokenizer, max_batch=2, max_context=256, decode="eager")
    with TestClient(create_app(engine, model_name="chatglm3-6b-tiny"), base_url="http://localhost") as client:
        body = {"model": "chatglm3-6b-tiny", "messages": [{"role": "user", "content": case["query"]}],
                "temperature": 0, "max_tokens": n}
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["usage"]["prompt_tokens"] == len(case["prompt_ids"])
        assert data["usage"]["completion_tokens"] == n
        assert data["choices"][0]["finish_reason"] == "length"
        # THUDM's ChatGLM3 chat() drops the last generated id before decoding, whatever it is
        assert data["choices"][0]["message"]["content"] == tokenizer.decode(expected_ids[:-1]).strip()
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        lines = [json.loads(line[6:]) for line in streamed.text.splitlines()
                 if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in lines if c.get("choices"))
        assert text == data["choices"][0]["message"]["content"]


@pytest.mark.gpu
@pytest.mark.parametrize("dir_fixture,gold_fixture", [("golden2_dir", "golden2"), ("golden3_dir", "golden3")])
def test_cuda_paths_give_the_golden_ids_and_one_seed_one_answer(request, dir_fixture, gold_fixture):
    """On CUDA (float32): the eager loop, the compiled + CUDA-graphed decoder and the compiled server engine
    (alone and among other requests) give THUDM's greedy ids, and the same sampled tokens for one seed."""
    ckpt, gold = request.getfixturevalue(dir_fixture), request.getfixturevalue(gold_fixture)
    model = load_model(ckpt, dtype="float32", device="cuda")
    case = gold["greedy"][0]
    sampled = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.8, top_k=20,
                               repetition_penalty=1.3, seed=11, stop_token_ids=())
    want = decode(model, [case["input_ids"]], sampled, False)
    assert decode(model, [case["input_ids"]], greedy(len(case["new_ids"])), False) == [case["new_ids"]]
    assert decode(model, [case["input_ids"]], greedy(len(case["new_ids"])), None) == [case["new_ids"]]
    assert decode(model, [case["input_ids"]], sampled, None) == want
    batch = gold["batch"][0]
    assert decode(model, batch_prompts(batch), greedy(len(batch["new_ids"][0])), None) == batch["new_ids"]
    engine = Engine(model, None, max_batch=4, max_context=128).start()  # compiled, graphed slots
    try:
        assert engine.generate(case["input_ids"], greedy(len(case["new_ids"])), timeout=300).token_ids == case["new_ids"]
        handles = [engine.submit(p, greedy(len(n))) for p, n in zip(batch_prompts(batch), batch["new_ids"])]
        handles.append(engine.submit(case["input_ids"], sampled))
        assert [h.result(300).token_ids for h in handles] == batch["new_ids"] + want
    finally:
        engine.stop(drain=False, timeout=30)
