"""The one sampler (sampling.py): its filters and draws, and the same tokens for the same seed on
every decode path (eager `generate`, the fast decoder, the server engine alone and in a batch)."""
import pytest
import torch

from chatglm_ft.engine import Engine
from chatglm_ft.fast import FastOptions
from chatglm_ft.generate import GenerationConfig, process_logits, stream_tokens
from chatglm_ft.sampling import RowSettings, choose, uniform


def test_draws_follow_the_kept_probabilities():
    """Over many seeds, choose() picks each token as often as process_logits' distribution says."""
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    n = 20000
    for top_k, top_p, min_p in [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.6, 0.0), (8, 0.8, 0.0), (0, 1.0, 0.2)]:
        gen = GenerationConfig(do_sample=True, temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
        reference = process_logits(logits, gen, None).softmax(dim=-1)[0]
        rows = RowSettings.of([gen] * n, list(range(n)), "cpu")
        draws = choose(logits.expand(n, -1), rows, torch.zeros(n, dtype=torch.long))
        frequency = torch.bincount(draws, minlength=40).float() / n
        assert set(draws.unique().tolist()) <= set(reference.nonzero().flatten().tolist())
        torch.testing.assert_close(frequency, reference, atol=0.015, rtol=0)


def test_rows_mix_greedy_and_sampling_and_the_nan_guard():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    configs = [GenerationConfig(), GenerationConfig(do_sample=True, top_k=1), None]
    rows = RowSettings.of(configs, [1, 2, 3], "cpu")
    assert choose(logits, rows, torch.zeros(3, dtype=torch.long)).tolist() == [0, 0, 0]
    bad = torch.tensor([[1.0, float("nan"), 0, 0, 0, 0, 0]])
    assert choose(bad, RowSettings.of([GenerationConfig(do_sample=True)], [5], "cpu"), torch.zeros(1, dtype=torch.long)
                  ).tolist() == [5]  # the original's guard: a bad row becomes token 5


def test_uniforms_depend_on_seed_and_step_only():
    seed = torch.tensor([7, 7, 8, 2**61 + 3])
    step = torch.tensor([0, 1, 0, 0])
    u = uniform(seed, step)
    assert ((u > 0) & (u < 1)).all() and len(set(u.tolist())) == 4
    assert torch.equal(uniform(seed[:1], step[:1]), u[:1])  # the same draw whatever batch it sits in
    many = uniform(torch.arange(100000), torch.zeros(100000, dtype=torch.long))
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 12) < 0.005


SETTINGS = [
    GenerationConfig(max_new_tokens=10, stop_token_ids=()),
    GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.3,
                     seed=11, stop_token_ids=()),
    GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.2, min_p=0.05, seed=12, stop_token_ids=()),
]


@pytest.mark.parametrize("gen", SETTINGS, ids=["greedy", "top_p_top_k_penalty", "min_p"])
def test_same_seed_same_tokens_on_every_path(golden_dir, golden, tokenizer, gen):
    from chatglm_ft import load

    model, _ = load(golden_dir, dtype="float32", device="cpu")
    prompt = golden["greedy"][1]["input_ids"]
    eager = [t for (t,) in stream_tokens(model, [prompt], gen, fast=False)]
    fast = [t for (t,) in stream_tokens(model, [prompt], gen, fast=FastOptions(compile=False))]
    batch = [row[0] for row in stream_tokens(model, [prompt, golden["greedy"][0]["input_ids"]], gen, fast=False)]
    engine = Engine(model, tokenizer, max_batch=16, max_context=128, decode="eager").start()
    try:
        alone = engine.generate(prompt, gen, timeout=60).token_ids
        others = [c["input_ids"] for c in golden["greedy"]]
        handles = [engine.submit(others[i % len(others)] if i % 4 else prompt, gen) for i in range(16)]
        results = [h.result(120).token_ids for h in handles]
    finally:
        engine.stop(drain=False, timeout=30)
    assert eager == fast == batch == alone
    assert all(results[i] == eager for i in range(0, 16, 4))  # inside a batch of 16
    if gen.do_sample:
        other = [t for (t,) in stream_tokens(model, [prompt], GenerationConfig(**{**gen.__dict__, "seed": 99}), fast=False)]
        assert other != eager


@pytest.mark.gpu
@pytest.mark.parametrize("gen", SETTINGS, ids=["greedy", "top_p_top_k_penalty", "min_p"])
def test_same_seed_same_tokens_on_every_cuda_path(golden_dir, golden, gen):
    """On CUDA (float32): the eager loop, the compiled + CUDA-graphed decoder and the compiled server
    engine (alone and inside 16 concurrent requests) give the same tokens for the same seed."""
    from chatglm_ft import load

    model, tokenizer = load(golden_dir, dtype="float32", device="cuda")
    prompt = golden["greedy"][1]["input_ids"]
    eager = [t for (t,) in stream_tokens(model, [prompt], gen, fast=False)]
    fast = [t for (t,) in stream_tokens(model, [prompt], gen, fast=None)]  # compiled + CUDA graphs
    engine = Engine(model, tokenizer, max_batch=16, max_context=128).start()  # compiled, graphed slots
    try:
        alone = engine.generate(prompt, gen, timeout=300).token_ids
        others = [c["input_ids"] for c in golden["greedy"]]
        handles = [engine.submit(others[i % len(others)] if i % 4 else prompt, gen) for i in range(16)]
        results = [h.result(300).token_ids for h in handles]
    finally:
        engine.stop(drain=False, timeout=30)
    assert eager == fast == alone
    assert all(results[i] == eager for i in range(0, 16, 4))
