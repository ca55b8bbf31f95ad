"""Batching for training (`--batching grouped|random|packed`): every example once per epoch, deterministic,
resumable, split over processes; packed rows give each example exactly the loss it has alone, on ChatGLM-6B
(prefix LM, 2-D positions) and ChatGLM2/3 (causal, 1-D positions); the loop logs the padding it trained on."""
import json

import numpy as np
import pytest
import torch
from interrupted_training import killed_in_step  # tests/interrupted_training.py

from chatglm_ft import load
from chatglm_ft.api import build_model
from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.config_glm2 import ChatGLM2Config
from chatglm_ft.data import Example, LengthGroupedBatches, Record, collate, tokenize_records
from chatglm_ft.errors import ChatGLMError, DataError
from chatglm_ft.packing import PackedBatches, collate_packed, pack_rows
from chatglm_ft.ptuning import add_prefix_encoder
from chatglm_ft.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest.py: no test writes to ~/.cache

SMALL = dict(vocab_size=256, gmask_token_id=250, bos_token_id=251, eos_token_id=252, mask_token_id=253, pad_token_id=3)
SMALL2 = dict(padded_vocab_size=256, pad_token_id=0, eos_token_id=2)

RECORDS = [Record(prompt="你好", response="你好！很高兴见到你。"), Record(prompt="What is 2+2?", response="4"),
           Record(prompt="写一首诗", response="床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
           Record(prompt="hi", response="hello there, how are you doing today?", history=[("a", "b")]),
           Record(prompt="Name a color.", response="Blue.")]


def lengths_of(n, seed=0):
    return np.random.default_rng(seed).integers(5, 300, size=n).tolist()


# -- grouped and random batches ------------------------------------------------------------------------
def test_grouped_batches_are_sorted_within_their_mega_batch_and_random_ones_are_not():
    lengths = lengths_of(1000)
    size, group = 8, 25  # mega-batches of 25 batches: 200 examples
    grouped = LengthGroupedBatches(lengths, batch_size=size, seed=3, group_batches=group)
    plain = LengthGroupedBatches(lengths, batch_size=size, seed=3, group_batches=group, by_length=False)
    for sampler in (grouped, plain):
        for epoch in (0, 1):
            batches = sampler.epoch_batches(epoch)
            assert sorted(i for b in batches for i in b) == list(range(1000))  # every example exactly once
            assert batches == LengthGroupedBatches(lengths, batch_size=size, seed=3, group_batches=group,
                                                   by_length=sampler.by_length).epoch_batches(epoch)  # deterministic
        assert sampler.epoch_batches(0) != sampler.epoch_batches(1)
    # A mega-batch is a run of the epoch's permutation; the batches cut from it cover disjoint length ranges.
    permutation = np.random.default_rng([3, 0]).permutation(1000)
    where = {int(i): k // (size * group) for k, i in enumerate(permutation)}
    by_mega: dict[int, list] = {}
    for batch in grouped.epoch_batches(0):
        assert len({where[i] for i in batch}) == 1
        by_mega.setdefault(where[batch[0]], []).append(sorted((lengths[i] for i in batch), reverse=True))
    for batches in by_mega.values():
        batches.sort(reverse=True)
        assert all(earlier[-1] >= later[0] for earlier, later in zip(batches, batches[1:]))
    assert [len(b) for b in grouped.epoch_batches(0)] == [8] * 125
    # random batches: the permutation as it is (after the longest batch is moved to the front)
    assert sorted(map(sorted, plain.epoch_batches(0))) == sorted(sorted(permutation[i:i + 8].tolist())
                                                                 for i in range(0, 1000, 8))
    real, positions = grouped.token_counts(0)
    assert real == sum(lengths) and positions == sum(len(b) * max(lengths[i] for i in b) for b in grouped.epoch_batches(0))
    assert real / positions > 0.9 > 0.6 > real / plain.token_counts(0)[1]


def test_resuming_needs_the_same_batching():
    lengths = lengths_of(100)
    plain = LengthGroupedBatches(lengths, batch_size=4, seed=0, by_length=False)
    iterator = iter(plain)
    head = [next(iterator) for _ in range(7)]
    resumed = LengthGroupedBatches(lengths, batch_size=4, seed=0, by_length=False)
    resumed.load_state_dict(json.loads(json.dumps(plain.state_dict())))
    assert head + list(resumed) == plain.epoch_batches(0)  # random batches resume mid-epoch too
    grouped = LengthGroupedBatches(lengths, batch_size=4, seed=0)
    with pytest.raises(DataError, match="by_length True -> False.*--batching"):
        LengthGroupedBatches(lengths, batch_size=4, seed=0, by_length=False).load_state_dict(grouped.state_dict())
    packed = PackedBatches(lengths, pack_length=600, batch_size=2, seed=0)
    with pytest.raises(DataError, match="were not packed"):
        packed.load_state_dict(grouped.state_dict())
    with pytest.raises(DataError, match="pack_length 600 -> 700"):
        PackedBatches(lengths, pack_length=700, batch_size=2, seed=0).load_state_dict(packed.state_dict())


# -- packed rows -------------------------------------------------------------------------------------------
def test_pack_rows_hold_every_example_once_and_fill_their_rows():
    lengths = lengths_of(3000) + [900]  # one example longer than a row gets a row of its own
    rows = pack_rows(lengths, 1024, seed=1, group_size=1000)
    assert sorted(int(i) for row in rows for i in row) == list(range(3001))
    sizes = [sum(lengths[i] for i in row) for row in rows]
    assert max(sizes) <= 1024 and sum(sizes) / (1024 * len(rows)) > 0.98
    assert [r.tolist() for r in rows] == [r.tolist() for r in pack_rows(lengths, 1024, seed=1, group_size=1000)]
    assert [r.tolist() for r in rows] != [r.tolist() for r in pack_rows(lengths, 1024, seed=2, group_size=1000)]
    assert sorted(sorted(r.tolist()) for r in pack_rows([2000, 10, 10], 1024, seed=0)) == [[0], [1, 2]]


def test_packed_batches_cover_every_example_split_over_processes_and_resume():
    lengths = lengths_of(400)
    sampler = PackedBatches(lengths, pack_length=700, batch_size=4, seed=5)
    epoch0, epoch1 = list(sampler), list(sampler)
    for epoch in (epoch0, epoch1):
        assert sorted(i for batch in epoch for row in batch for i in row) == list(range(400))
        assert all(sum(lengths[i] for i in row) <= 700 for batch in epoch for row in batch)
    assert epoch0 != epoch1 and sampler.epoch == 2 and len(epoch0) == len(sampler)
    real, positions = sampler.token_counts(0)
    assert real == sum(lengths) and real / positions > 0.97

    run = PackedBatches(lengths, pack_length=700, batch_size=4, seed=5)
    iterator = iter(run)
    head = [next(iterator) for _ in range(3)]
    resumed = PackedBatches(lengths, pack_length=700, batch_size=4, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
    assert head + list(resumed) == epoch0

    ranks = [PackedBatches(lengths, pack_length=700, batch_size=2, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for single, (b0, b1) in zip(epoch0, zip(*(r.epoch_batches(0) for r in ranks))):
        assert sorted(b0 + b1) == sorted(single)


def separate_and_packed_losses(model, examples, rows):
    """(summed loss of each example alone, summed loss of the packed rows), and the packed forward's output."""
    pad = model.config.pad_token_id
    alone = []
    for e in examples:
        batch = collate([e], pad)
        alone.append(model(batch["input_ids"], labels=batch["labels"]).loss * int((batch["labels"][:, 1:] != -100).sum()))
    packed = collate_packed([[examples[i] for i in row] for row in rows], pad, model.prompt_layout)
    out = model(packed["input_ids"], position_ids=packed["position_ids"], attention_mask=packed["attention_mask"],
                labels=packed["labels"])
    return torch.stack(alone).sum(), out.loss * int((packed["labels"][:, 1:] != -100).sum()), packed, out


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_a_packed_row_has_the_loss_and_logits_of_its_examples_alone(family, golden_dir, golden2_dir, golden3_dir):
    model, tokenizer = load({"chatglm": golden_dir, "chatglm2": golden2_dir, "chatglm3": golden3_dir}[family],
                            dtype="float32", device="cpu")
    examples = tokenize_records(RECORDS, tokenizer)
    rows = [[0, 1, 4], [2], [3]]  # a row of three, and rows padded to the longest
    with torch.no_grad():
        alone, packed_sum, packed, out = separate_and_packed_losses(model, examples, rows)
        torch.testing.assert_close(packed_sum, alone, rtol=1e-6, atol=1e-5)
        logits = model(collate([examples[1]], model.config.pad_token_id)["input_ids"]).logits[0]
        at = len(examples[0])
        torch.testing.assert_close(out.logits[0, at:at + len(examples[1])], logits, rtol=0, atol=1e-5)
        # without the per-example mask and positions the same row is not the same computation
        plain = model(packed["input_ids"], labels=packed["labels"]).loss * int((packed["labels"][:, 1:] != -100).sum())
        assert abs(float(plain - alone)) > 1e-2
    if family == "chatglm":  # the 2-D positions restart in every example: 0.. through the context, then [gMASK]'s
        context = examples[1].context_length
        assert packed["position_ids"][0, :, at:at + context + 2].tolist() == [
            list(range(context)) + [context - 1] * 2, [0] * context + [1, 2]]


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_rows_padded_to_the_pack_length_keep_their_loss(family, golden_dir, golden3_dir):
    """`width` (train passes --pack-length) pads every row to one length: the columns added are padding that no
    example sees, so the loss and every real column's logits stay those of the row at its own length."""
    model, tokenizer = load({"chatglm": golden_dir, "chatglm3": golden3_dir}[family], dtype="float32", device="cpu")
    examples = tokenize_records(RECORDS, tokenizer)
    rows = [[examples[i] for i in row] for row in ([0, 1, 4], [2], [3])]
    pad = model.config.pad_token_id
    tight = collate_packed(rows, pad, model.prompt_layout)
    wide = collate_packed(rows, pad, model.prompt_layout, width=tight["input_ids"].shape[1] + 7)
    assert wide["input_ids"].shape == (3, tight["input_ids"].shape[1] + 7)
    assert bool((wide["labels"][:, -7:] == -100).all()) and bool((wide["input_ids"][:, -7:] == pad).all())
    with torch.no_grad():
        outs = [model(b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                      labels=b["labels"]) for b in (tight, wide)]
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-6, atol=1e-6)
    real = tight["labels"] != -100
    torch.testing.assert_close(outs[1].logits[:, :real.shape[1]][real], outs[0].logits[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_packed_rows_see_a_p_tuning_prefix_like_single_rows(family, golden_dir, golden2_dir):
    model, tokenizer = load({"chatglm": golden_dir, "chatglm2": golden2_dir}[family], dtype="float32", device="cpu")
    add_prefix_encoder(model, pre_seq_len=4, projection=False, seed=0)
    torch.nn.init.normal_(next(model.transformer.prefix_encoder.parameters()), std=0.5)  # a prefix that matters
    model.eval()  # no prefix dropout
    examples = tokenize_records(RECORDS, tokenizer)
    with torch.no_grad():
        alone, packed_sum, _, _ = separate_and_packed_losses(model, examples, [[0, 1, 2], [3, 4]])
    torch.testing.assert_close(packed_sum, alone, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("glm2", [False, True], ids=["chatglm", "chatglm2"])
def test_no_target_crosses_from_one_packed_example_into_the_next(glm2):
    """Examples whose every token is labelled: alone, the first label is never a target (nothing comes before
    it); packed, it must not become the target of the previous example's last token."""
    model = small_model(glm2).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 5, 9):
        ids = torch.randint(10, 60, (n,), generator=g).tolist()
        ids = ([64, 65] + ids) if glm2 else (ids + [250, 251, 30, 31])
        examples.append(Example(input_ids=ids, labels=list(ids)))
    with torch.no_grad():
        alone, packed_sum, _, _ = separate_and_packed_losses(model, examples, [[0, 1, 2]])
    torch.testing.assert_close(packed_sum, alone, rtol=1e-6, atol=1e-5)


# -- the training loop ----------------------------------------------------------------------------------------
def copy_task(n, seed=0, glm2=False):
    """Prompt of random tokens; the answer repeats its first three tokens (as tests/test_train.py)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = torch.randint(10, 60, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        if glm2:  # [gMASK] sop prompt, answer </s>: labels from the answer on
            ids = [64, 65] + prompt + prompt[:3] + [2]
            context = len(prompt) + 2
        else:
            ids = prompt + [250, 251] + prompt[:3] + [252]
            context = len(prompt) + 1  # index of <sop>
        examples.append(Example(input_ids=ids, labels=[-100] * context + ids[context:]))
    return examples


def small_model(glm2=False, seed=0):
    torch.manual_seed(seed)
    config = ChatGLM2Config.tiny(**SMALL2) if glm2 else ChatGLMConfig.tiny(**SMALL)
    return build_model(config, dtype=torch.float32, device="cpu")


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                  warmup_steps=1, logging_steps=1, save_steps=0, eval_steps=0, progress=False, report_to=["jsonl"],
                  seed=0, batching="packed", pack_length=40, lora_dropout=0.0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("glm2", [False, True], ids=["chatglm", "chatglm2"])
def test_packed_training_step_has_the_loss_of_its_examples_alone(glm2, tmp_path):
    """The first step's loss (LoRA starts as a zero update) is the token mean over its examples run one by one:
    the loop hands the packed positions and masks to the model."""
    examples = copy_task(30, glm2=glm2)
    result = train(config(tmp_path, max_steps=1), model=small_model(glm2), examples=examples)
    first = PackedBatches([len(e) for e in examples], pack_length=40, batch_size=2, seed=0).epoch_batches(0)[0]
    chosen = [examples[i] for row in first for i in row]
    assert len(chosen) > 2 * len(first)  # rows of several examples
    model = small_model(glm2)
    with torch.no_grad():
        sums = [(model(b["input_ids"], labels=b["labels"]).loss * int((b["labels"][:, 1:] != -100).sum()),
                 int((b["labels"][:, 1:] != -100).sum())) for b in (collate([e], model.config.pad_token_id) for e in chosen)]
    expected = float(sum(s for s, _ in sums) / sum(n for _, n in sums))
    assert result.losses[0][1] == pytest.approx(expected, rel=1e-5)


def test_packed_training_resumes_exactly_and_logs_its_padding(tmp_path):
    settings = dict(max_steps=6, gradient_accumulation_steps=2, save_steps=2, lora_dropout=0.1)
    examples = copy_task(40)
    whole = train(config(tmp_path / "whole", **settings), model=small_model(), examples=examples)
    with killed_in_step(4):
        train(config(tmp_path / "split", **settings), model=small_model(), examples=examples)
    resumed = train(config(tmp_path / "split", resume=True, **settings), model=small_model(), examples=examples)
    assert resumed.losses == whole.losses
    with pytest.raises(DataError, match="were packed; resume with --batching packed"):
        train(config(tmp_path / "split", resume=True, **{**settings, "batching": "grouped"}), model=small_model(),
              examples=examples)

    # each step's logged padding is its batches': rows are --pack-length (40) wide, whatever their own length
    log = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    sampler = PackedBatches([len(e) for e in examples], pack_length=40, batch_size=2, seed=0)
    micro = [b for epoch in range(3) for b in sampler.epoch_batches(epoch)]  # 4 batches an epoch, 2 a step
    real = [sum(len(examples[i]) for row in b for i in row) for b in micro]
    expected = [round(1 - (real[2 * s] + real[2 * s + 1]) / (40 * (len(micro[2 * s]) + len(micro[2 * s + 1]))), 4)
                for s in range(6)]
    assert [r["step"] for r in log] == list(range(1, 7)) and [r["padding"] for r in log] == expected


def test_one_epoch_logs_the_padding_of_its_batches(tmp_path):
    """The reported padding is counted from the batches trained on: one epoch gives the sampler's own count."""
    examples = copy_task(32)
    lengths = [len(e) for e in examples]
    for batching in ("random", "grouped", "packed"):
        steps = 4 if batching != "packed" else len(PackedBatches(lengths, pack_length=40, batch_size=2, seed=0))
        result = train(config(tmp_path / batching, batching=batching, max_steps=steps, per_device_train_batch_size=8
                              if batching != "packed" else 2), model=small_model(), examples=examples)
        sampler = (PackedBatches(lengths, pack_length=40, batch_size=2, seed=0) if batching == "packed" else
                   LengthGroupedBatches(lengths, batch_size=8, seed=0, by_length=batching == "grouped"))
        real, positions = sampler.token_counts(0)
        assert result.padding_fraction == round(1 - real / positions, 4), batching
    with pytest.raises(ChatGLMError, match="batching must be one of grouped, random, packed"):
        TrainConfig(batching="sorted").validate()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_packed_rows_on_gpu(family, golden_dir, golden3_dir, tmp_path):
    """Positions and masks built on the GPU equal the CPU's; the packed loss is the examples' loss there too
    (float32: the kernels with a mask), and a packed LoRA run goes through under bfloat16 autocast."""
    model, tokenizer = load({"chatglm": golden_dir, "chatglm3": golden3_dir}[family], dtype="float32", device="cuda")
    examples = tokenize_records(RECORDS, tokenizer)
    rows = [[examples[i] for i in row] for row in ([0, 1, 4], [2], [3])]
    pad = model.config.pad_token_id
    on_gpu = collate_packed(rows, pad, model.prompt_layout, device="cuda")
    on_cpu = collate_packed(rows, pad, model.prompt_layout)
    for key in ("position_ids", "attention_mask"):
        assert on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), on_cpu[key])
    with torch.no_grad():
        alone = sum(model(b["input_ids"].cuda(), labels=b["labels"].cuda()).loss * int((b["labels"][:, 1:] != -100).sum())
                    for b in (collate([e], pad) for e in examples))
        packed = model(on_gpu["input_ids"].cuda(), position_ids=on_gpu["position_ids"],
                       attention_mask=on_gpu["attention_mask"], labels=on_gpu["labels"].cuda()).loss
    torch.testing.assert_close(packed * int((on_gpu["labels"][:, 1:] != -100).sum()), alone, rtol=1e-4, atol=1e-3)
    result = train(config(tmp_path, max_steps=4, device="cuda", pack_length=64, learning_rate=1e-2),
                   model=model, examples=examples * 8)
    assert len(result.losses) == 4 and all(np.isfinite(v) for _, v in result.losses)
    assert result.padding_fraction is not None and result.peak_memory_bytes
