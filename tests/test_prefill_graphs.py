"""Short prompts prefilled as one captured step (fast.py, FastOptions.prefill_graphs): right-padded to a length
bucket, the logits read at the prompt's real last column. Exact against the unpadded prefill for ChatGLM-6B,
ChatGLM2-6B and ChatGLM3-6B, with and without a P-Tuning prefix, alone and in left-padded batches. On the CPU
the padded step runs directly (nothing is captured there); the GPU tests check the CUDA graphs."""
from __future__ import annotations

import json

import pytest
import torch

from chatglm_ft.api import load_model
from chatglm_ft.bench import random_prompt
from chatglm_ft.fast import (PREFILL_BUCKETS, PREFILL_GRAPH_TOKENS, FastOptions, decoder_for, fast_options,
                             prefill_logits, prompt_mask_for)
from chatglm_ft.generate import GenerationConfig, stream_tokens
from chatglm_ft.graphs import WARMUP_RUNS
from chatglm_ft.ptuning import prefix_length
from chatglm_ft.tokenizer import left_pad

NETWORKS = {"chatglm-6b": ("golden_dir", "golden"), "chatglm2": ("golden2_dir", "golden2"),
            "chatglm3": ("golden3_dir", "golden3")}
PREFIX_BASES = {"v1-noproj": "golden_dir", "v2": "golden2_dir", "v3": "golden3_dir"}  # THUDM's prefix per network
PADDED = FastOptions(compile=False, prefill_graphs=True)  # the captured prefill's step, run directly


def network(request, name: str, device: str = "cpu"):
    dir_fixture, golden_fixture = NETWORKS[name]
    model = load_model(request.getfixturevalue(dir_fixture), dtype="float32", device=device)
    return model, request.getfixturevalue(golden_fixture)


def prefixed(request, ptuning_dirs, name: str, device: str = "cpu"):
    path = ptuning_dirs[name]
    model = load_model(request.getfixturevalue(PREFIX_BASES[name]), dtype="float32", device=device, ptuning=path)
    assert prefix_length(model) > 0
    return model, json.loads((path / "ptuning_golden.json").read_text())


@pytest.fixture(scope="module", params=list(NETWORKS) + list(PREFIX_BASES))
def case(request, ptuning_dirs):
    """(model, golden) of each network, then of each network with THUDM's P-Tuning prefix; float32 on the CPU."""
    if request.param in NETWORKS:
        return network(request, request.param)
    return prefixed(request, ptuning_dirs, request.param)


def batch_prompts(model, batch: dict) -> list[list[int]]:
    """The unpadded prompts of a golden left-padded batch."""
    if "attention_mask" in batch:
        return [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return [[t for t in row if t != model.config.pad_token_id] for row in batch["input_ids"]]


def decode(model, prompts, new_tokens: int, fast) -> list[list[int]]:
    rows = [[] for _ in prompts]
    for step in stream_tokens(model, prompts, GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=()), fast=fast):
        for row, token in zip(rows, step):
            if token is not None:
                row.append(token)
    return rows


@torch.inference_mode()
def padded_and_plain(model, prompts: list[list[int]], options: FastOptions = PADDED) -> tuple:
    """The decoder's (padded) prefill of the left-padded `prompts` and the unpadded one into the same cache:
    (logits, cache columns of the prompt) of each, and the bucket the padded one ran at."""
    input_ids = torch.tensor(left_pad(prompts, model.config.pad_token_id), device=model.device)
    B, T = input_ids.shape
    P = prefix_length(model)
    layout = model.prompt_layout(input_ids)
    decoder = decoder_for(model, B, options)
    model.kv_caches = decoder.caches
    bucket = decoder.prefill_bucket(T)
    assert bucket in PREFILL_BUCKETS and T <= bucket

    def cached():
        return [torch.cat([c.k[:, :, P:P + T], c.v[:, :, P:P + T]]).clone() for c in decoder.caches]

    padded = decoder.prefill(input_ids, layout, None).clone()
    padded_cache = cached()
    plain = prefill_logits(model, input_ids, layout)
    assert ("prefill", bucket) in decoder.machine.runs or ("prefill", bucket) in decoder.graphs
    return (padded, padded_cache), (plain, cached()), bucket


def assert_same_prefill(model, prompts, atol: float = 1e-5) -> int:
    (padded, padded_cache), (plain, plain_cache), bucket = padded_and_plain(model, prompts)
    torch.testing.assert_close(padded, plain, atol=atol, rtol=0)
    for a, b in zip(padded_cache, plain_cache):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    return bucket


# -- CPU: the padded step, run directly -----------------------------------------------------------------------
def test_padded_prefill_equals_the_unpadded_one(case):
    """Last-position logits and the prompt's cache columns, for each golden prompt alone, the golden
    left-padded batch of 2 rows and a 100-token prompt (28 pad columns)."""
    model, golden = case
    for c in golden["greedy"]:
        assert_same_prefill(model, [c["input_ids"]])
    assert_same_prefill(model, batch_prompts(model, golden["batch"][0]))
    long = random_prompt(model.config, 100, torch.Generator().manual_seed(0))  # padded by 28 to bucket 128
    assert assert_same_prefill(model, [long]) == 128
    ids = golden["greedy"][-1]["input_ids"]
    mask = prompt_mask_for([ids], model.config)
    if mask is not None:  # ChatGLM-6B: the flash-friendly mask eager prefill of one prompt uses
        (padded, _), _, _ = padded_and_plain(model, [ids])
        with torch.inference_mode():
            split = prefill_logits(model, torch.tensor([ids]), model.prompt_layout(torch.tensor([ids])), mask)
        torch.testing.assert_close(padded, split, atol=1e-5, rtol=0)


def test_padded_prefill_decodes_the_golden_greedy_ids(case):
    """Through the fast decoder (uncompiled): the golden prompts alone and as a left-padded batch, and a
    100-token prompt decoded past its bucket's end (columns 100..131 held the pads) like the eager loop."""
    model, golden = case
    for c in golden["greedy"]:
        assert decode(model, [c["input_ids"]], len(c["new_ids"]), PADDED) == [c["new_ids"]]
    long = random_prompt(model.config, 100, torch.Generator().manual_seed(1))
    assert decode(model, [long], 32, PADDED) == decode(model, [long], 32, False)
    assert decoder_for(model, 1, PADDED).machine.runs.get(("prefill", 128))
    batch = golden["batch"][0]
    assert decode(model, batch_prompts(model, batch), len(batch["new_ids"][0]), PADDED) == batch["new_ids"]
    assert decoder_for(model, 2, PADDED).machine.runs.get(("prefill", 32))  # the batch's 21 columns ran padded


def test_which_prompts_are_padded(request):
    model, _ = network(request, "chatglm3")
    decoder = decoder_for(model, 1, PADDED)
    assert [decoder.prefill_bucket(n) for n in (1, 16, 17, 100, 128, 129, 512)] == [16, 16, 32, 128, 128, 256, 512]
    assert decoder.prefill_bucket(513) is None and PREFILL_BUCKETS[-1] == 512  # longer prompts: GPU-bound, eager
    assert decoder.prefill_path(100, None) == "padded to 128 tokens" and decoder.prefill_path(600, None) == "eager"
    assert decoder_for(model, 1, FastOptions(compile=False, prefill_graphs=False)).prefill_bucket(100) is None
    wide = decoder_for(model, 16, PADDED)  # an evaluation's batch: at most PREFILL_GRAPH_TOKENS padded tokens
    assert PREFILL_GRAPH_TOKENS == 2048 and wide.prefill_bucket(100) == 128 and wide.prefill_bucket(129) is None
    assert not wide.machine.runs  # nothing captured ahead on the CPU
    # the mask a captured step reads is always a tensor (ChatGLM2/3 would answer None after a host check otherwise)
    layout = model.prompt_layout(torch.tensor([[5, 6, 7]]))
    assert layout.mask_for(torch.arange(4), 4) is None
    assert torch.equal(layout.mask_for(torch.arange(4), 4, explicit=True)[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm3"])
def test_the_captured_step_reads_nothing_on_the_host(family):
    """A CUDA graph cannot hold a host read of device data. On `meta` tensors any such read raises: the padded
    step runs there, where the unpadded ChatGLM2/3 prefill (which checks for left padding) does not."""
    from chatglm_ft.api import model_class
    from chatglm_ft.config import ChatGLMConfig
    from chatglm_ft.config_glm2 import ChatGLM2Config
    from chatglm_ft.fast import prefill_padded
    from chatglm_ft.steps import static_layout

    config = ChatGLMConfig.tiny() if family == "chatglm-6b" else ChatGLM2Config.tiny(family=family)
    model = model_class(config)(config, device="meta").eval()
    model.setup_caches(2, 64)
    layout, ids = static_layout(model, 2, torch.device("meta")), torch.zeros(2, 32, dtype=torch.long, device="meta")
    with torch.inference_mode():
        assert prefill_padded(model, ids, layout, torch.zeros(1, dtype=torch.long, device="meta")).shape == (2, config.vocab_size)
        if family != "chatglm-6b":
            with pytest.raises(RuntimeError, match="meta"):
                prefill_logits(model, ids, layout)


def test_logits_at_picks_positions(case):
    model, golden = case
    ids = torch.tensor([golden["greedy"][-1]["input_ids"]])
    with torch.no_grad():
        full = model(ids).logits
        picked = model(ids, logits_at=torch.tensor([2, ids.shape[1] - 1])).logits
        last = model(ids, last_logits_only=True).logits
    torch.testing.assert_close(picked, full[:, [2, -1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)


# -- GPU: captured once per bucket, then replayed -----------------------------------------------------------
def assert_graphed_greedy(model, golden) -> None:
    """The model's decode options on CUDA: a prefill graph per bucket captured when the decoder is made, then
    only replayed, with the golden ids on every run."""
    options = fast_options(model, None)
    assert options is not None and options.prefill_graphs
    prompts = [c["input_ids"] for c in golden["greedy"]]
    batch = golden["batch"][0]
    for _ in range(2):
        for prompt, c in zip(prompts, golden["greedy"]):
            assert decode(model, [prompt], len(c["new_ids"]), None) == [c["new_ids"]]
        assert decode(model, batch_prompts(model, batch), len(batch["new_ids"][0]), None) == batch["new_ids"]
    for rows in (1, 2):
        decoder = decoder_for(model, rows, options)
        assert {key for key in decoder.graphs if key[0] == "prefill"} == {("prefill", b) for b in PREFILL_BUCKETS}
        assert all(decoder.machine.runs[("prefill", b)] == WARMUP_RUNS for b in PREFILL_BUCKETS)  # then only replays
        assert decoder.prefill_path(100, None) == "CUDA graph (128-token bucket)"
    # a replay's logits and cache are the unpadded eager prefill's
    (padded, padded_cache), (plain, plain_cache), bucket = padded_and_plain(model, [prompts[-1]], options)
    assert ("prefill", bucket) in decoder_for(model, 1, options).graphs
    torch.testing.assert_close(padded, plain, atol=1e-4, rtol=0)
    for a, b in zip(padded_cache, plain_cache):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(NETWORKS))
def test_cuda_prefill_graphs_give_the_golden_greedy_ids(request, name):
    """--compile auto (compiled decode step, CUDA graphs) with --prefill-graphs."""
    from chatglm_ft.options import DecodeOptions

    model, golden = network(request, name, "cuda")
    model.decode_options = DecodeOptions(prefill_graphs=True)
    assert_graphed_greedy(model, golden)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PREFIX_BASES))
def test_cuda_prefill_graphs_with_a_prefix(request, ptuning_dirs, name):
    """--compile graphs (no compile wait; the prefill graphs are the same in both modes)."""
    from chatglm_ft.options import DecodeOptions

    model, golden = prefixed(request, ptuning_dirs, name, "cuda")
    model.decode_options = DecodeOptions(compile="graphs", prefill_graphs=True)
    assert_graphed_greedy(model, golden)


@pytest.mark.gpu
def test_cuda_compile_modes_and_prefill_graphs(request):
    from chatglm_ft.options import DecodeOptions

    model, golden = network(request, "chatglm3", "cuda")
    assert fast_options(model, DecodeOptions(compile="off")) is None  # the eager loop: nothing captured
    graphs_only = fast_options(model, DecodeOptions(compile="graphs", prefill_graphs=True))
    assert graphs_only == FastOptions(compile=False, prefill_graphs=True)
    assert fast_options(model, DecodeOptions()).prefill_graphs is True  # the default on a GPU
    assert fast_options(model, DecodeOptions(prefill_graphs=False)).prefill_graphs is False
    c = golden["greedy"][0]
    assert decode(model, [c["input_ids"]], len(c["new_ids"]), graphs_only) == [c["new_ids"]]
    assert ("prefill", 16) in decoder_for(model, 1, graphs_only).graphs


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["tiny", "chatglm3-tiny"])
def test_cuda_bench_times_the_captured_prefill(capsys, config):
    from chatglm_ft.cli import main

    assert main(["bench", "--random-weights", "--config", config, "--device", "cuda", "--compile", "graphs", "--prefill-graphs", "--json",
                 "--prefill-lengths", "128,2048", "--decode-tokens", "4", "--bandwidth", "1e12"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fast_path"]["prefill_graphs"] is True
    assert [p["path"] for p in report["prefill"]] == ["CUDA graph (128-token bucket)", "eager"]
