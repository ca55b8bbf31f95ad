"""Data pipeline: every input format incl. malformed rows, templates and masking (SPEC.md 5 and 6, golden
`loss` and `chat` cases), truncation, the tokenization cache, the split and length-grouped batching."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm_ft.data import (DataReport, Example, LengthGroupedBatches, Record, build_prompt, collate, encode_example,
                             load_records, split_validation, tokenize_records)
from chatglm_ft.errors import ChatGLMError, DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat well. 2. Sleep. 3. Exercise."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
]


# -- formats ------------------------------------------------------------------------------------------
def test_alpaca_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    records, report = load_records([path])
    assert [r.prompt for r in records] == ["Give three tips for staying healthy.", "Translate to French.\nGood morning"]
    assert (records[1].instruction, records[1].input, records[1].response) == ("Translate to French.", "Good morning",
                                                                                 "Bonjour")
    assert records[1].references == ["Bonjour"] and records[1].history == []
    lines = path.read_text().splitlines()
    line = int(records[1].source.split(":")[-1].split(" ")[0])
    assert records[1].source.endswith(" [1]") and lines[line - 1].strip() == "{"
    assert lines[line].strip().startswith('"instruction": "Translate')
    assert (report.total_rows, report.kept, report.duplicates, report.bad_rows) == (2, 2, 0, [])
    assert report.formats == {str(path): "alpaca"}


def test_bad_rows_reported_with_line_numbers_then_skipped_or_fatal(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        ALPACA[0],
        '{"instruction": "broken", "output": ',                  # 2: malformed JSON
        {"instruction": "no output"},                             # 3: missing field
        "",                                                       # 4: blank line, not a row
        {"instruction": "typed", "output": 42},                   # 5: wrong type
        {"instruction": "empty", "input": "", "output": "   "},  # 6: empty target
        ["not", "an", "object"],                                  # 7: wrong type of row
        {"instruction": "null input is fine", "input": None, "output": "ok"},
    ])
    records, report = load_records([path])
    assert [r.prompt for r in records] == [ALPACA[0]["instruction"], "null input is fine"]
    assert [(source.rsplit(":", 1)[1], reason.split(" ")[0]) for source, reason in report.bad_rows] == [
        ("2", "not"), ("3", "missing"), ("5", "wrong"), ("6", "empty"), ("7", "wrong")]
    assert report.bad_rows[1][1] == "missing field 'output'"
    assert report.bad_rows[2][1] == "wrong type: field 'output' must be a string, not int"
    assert report.bad_rows[3][1] == "empty target 'output'"
    assert (report.total_rows, report.kept) == (7, 2)
    summary = report.summary()
    assert "5 bad rows" in summary and f"{path}:3: missing field 'output'" in summary
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_records([path], on_bad_row="error")
    with pytest.raises(ChatGLMError, match="on_bad_row"):
        load_records([path], on_bad_row="ignore")


def test_unparseable_json_array_and_empty_data_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=rf"{broken}:3: not valid JSON"):
        load_records([broken])
    single = tmp_path / "single.json"
    single.write_text(json.dumps(ALPACA[0], indent=2))
    with pytest.raises(DataError, match="single JSON object"):
        load_records([single])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "x", "output": ""}])
    with pytest.raises(DataError, match=r"no usable records .*1 x empty target"):
        load_records([empty])
    with pytest.raises(DataError, match="cannot tell the data format"):
        load_records([write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])])
    with pytest.raises(DataError, match="no such file"):
        load_records([tmp_path / "missing.json"])
    with pytest.raises(DataError, match="matches no files"):
        load_records([str(tmp_path / "nothing-*.json")])
    with pytest.raises(ChatGLMError, match="unknown data format"):
        load_records([empty], format="csv")


def test_chatglm_tuning_context_target_is_used_verbatim(tmp_path):
    context = "Instruction: Give three tips for staying healthy.\nAnswer: "
    path = write_jsonl(tmp_path / "t.jsonl", [{"context": context, "target": "Sleep."}, {"context": "x", "target": ""}])
    records, report = load_records([path])
    assert report.formats[str(path)] == "chatglm-tuning" and report.bad_rows == [(f"{path}:2", "empty target 'target'")]
    # Already rendered: neither template wraps it again.
    assert build_prompt(records[0], "chatglm") == build_prompt(records[0], "alpaca") == context


def test_hc3_first_human_answer_is_target_all_are_references(tmp_path):
    path = write_jsonl(tmp_path / "hc3.jsonl", [
        {"question": "我很自卑", "human_answers": ["", "接受自己。", "多运动。"],
         "chatgpt_answers": ["..."]},
        {"question": "q", "human_answers": "not a list"},
        {"question": "q", "human_answers": [" "]},
    ])
    records, report = load_records([path])
    assert (records[0].prompt, records[0].response) == ("我很自卑", "接受自己。")
    assert records[0].references == ["接受自己。", "多运动。"]
    assert [reason for _, reason in report.bad_rows] == [
        "wrong type: field 'human_answers' must be a list of strings", "empty target 'human_answers'"]


def test_chat_history_every_turn_or_last_turn(tmp_path):
    row = {"prompt": "q2", "response": "a2", "history": [["q0", "a0"], ["q1", "a1"]]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row, {"prompt": "x", "response": "y", "history": [["only one"]]}])
    records, report = load_records([path])
    assert [(r.prompt, r.response, r.history) for r in records] == [
        ("q0", "a0", []), ("q1", "a1", [("q0", "a0")]), ("q2", "a2", [("q0", "a0"), ("q1", "a1")])]
    assert report.bad_rows == [(f"{path}:2", "wrong type: history[0] must be a [query, response] pair of strings")]
    last, _ = load_records([path], last_turn_only=True)
    assert [(r.prompt, r.history) for r in last] == [("q2", [("q0", "a0"), ("q1", "a1")])]
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i1", "output": "o1", "history": [["i0", "o0"]]}])
    records, _ = load_records([alpaca])
    assert [(r.prompt, r.instruction, r.history) for r in records] == [("i0", "", []), ("i1", "i1", [("i0", "o0")])]


def test_messages_and_sharegpt_conversations(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "unanswered"}]},
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    records, report = load_records([path])
    assert [(r.prompt, r.response, r.history) for r in records] == [
        ("Be brief.\nhi", "hello", []), ("2+2?", "4", [("Be brief.\nhi", "hello")]), ("你好", "你好！", [])]
    assert [(s.rsplit(":", 1)[1], r) for s, r in report.bad_rows] == [
        ("3", "unexpected role 'user' at messages[1] (turns must alternate user, assistant)"),
        ("4", "empty target: no assistant turn in 'messages'")]
    last, _ = load_records([path], last_turn_only=True)
    assert [r.prompt for r in last] == ["2+2?", "你好"]


def test_columns_mapping(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "why?", "answer": "because", "id": 1}])
    records, report = load_records([qa], columns={"prompt": "question", "response": "answer"})
    assert (records[0].prompt, records[0].response, report.formats[str(qa)]) == ("why?", "because", "chat")
    # The original chatglm6b_ft project's validation file layout (source/target) and renamed message keys.
    seed = write_jsonl(tmp_path / "seed.jsonl", [{"source": "问", "target": "答"}])
    records, _ = load_records([seed], columns={"prompt": "source", "response": "target"})
    assert (records[0].prompt, records[0].response, records[0].templated) == ("问", "答", False)
    dialog = write_jsonl(tmp_path / "d.jsonl", [{"turns": [{"speaker": "user", "text": "a"},
                                                          {"speaker": "assistant", "text": "b"}]}])
    records, _ = load_records([dialog], columns={"messages": "turns", "role": "speaker", "content": "text"})
    assert (records[0].prompt, records[0].response) == ("a", "b")
    with pytest.raises(ChatGLMError, match="unknown field"):
        load_records([qa], columns={"question_text": "question"})


def test_exact_duplicates_removed_across_files_and_paths_expand(tmp_path):
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "p1.jsonl", [ALPACA[0], ALPACA[1], ALPACA[0]])
    (tmp_path / "parts" / "p2.json").write_text(json.dumps([ALPACA[1], {**ALPACA[1], "output": "Salut"}]))
    (tmp_path / "parts" / "notes.txt").write_text("ignored")
    records, report = load_records([tmp_path / "parts"])
    assert [r.response for r in records] == [ALPACA[0]["output"], "Bonjour", "Salut"]
    assert (report.total_rows, report.kept, report.duplicates) == (5, 3, 2)
    assert report.files == [str(tmp_path / "parts" / "p1.jsonl"), str(tmp_path / "parts" / "p2.json")]
    by_glob, _ = load_records([str(tmp_path / "parts" / "*.json*"), tmp_path / "parts" / "p1.jsonl"])
    assert by_glob == records  # a file named twice is read once


# -- templates and encoding ---------------------------------------------------------------------------
def test_chatglm_template_matches_golden_chat_prompts(golden):
    for case in golden["chat"]:
        record = Record(prompt=case["query"], response="x", history=[tuple(t) for t in case["history"]])
        assert build_prompt(record, "chatglm") == case["prompt"]
    with pytest.raises(ChatGLMError, match="unknown template"):
        build_prompt(record, "vicuna")


def test_alpaca_template():
    record = Record(prompt="Translate.\nhi", response="salut", instruction="Translate.", input="hi")
    assert build_prompt(record, "alpaca") == "Instruction: Translate.\nInput: hi\nAnswer: "
    assert build_prompt(record, "chatglm") == "Translate.\nhi"
    chat = Record(prompt="q1", response="a1", history=[("q0", "a0")])
    assert build_prompt(chat, "alpaca") == "Instruction: q0\nAnswer: a0\nInstruction: q1\nAnswer: "


def test_golden_loss_case_through_the_data_path(tmp_path, golden, tiny):
    """SPEC.md section 6 masking: the reference's ids, labels and loss, from an Alpaca file."""
    model, tokenizer = tiny
    case = golden["loss"]
    path = write_jsonl(tmp_path / "golden.jsonl", [ALPACA[0]])
    records, _ = load_records([path])
    example = encode_example(records[0], tokenizer, template="alpaca")
    assert example.input_ids == case["input_ids"]
    assert example.labels == case["labels"]
    batch = collate([example], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(batch["input_ids"], labels=batch["labels"]).loss
    assert abs(loss.item() - case["loss"]) < 1e-4
    # Right padding in a batch leaves the loss unchanged (pads carry -100 and come after <eop>).
    longer = encode_example(Record(prompt="Hello there, how are you doing today?", response="Fine, thanks a lot."),
                            tokenizer)
    batch = collate([example, longer], tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits[0, :len(example)]
    loss_row0 = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(case["labels"][1:]), ignore_index=-100)
    assert abs(loss_row0.item() - case["loss"]) < 1e-4


def test_truncation_keeps_gmask_sop_and_drops_eop_of_cut_targets(tokenizer):
    gmask, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    record = Record(prompt=" ".join(f"word{i}" for i in range(200)) + " final question?", response="a short answer")
    full = encode_example(record, tokenizer, max_source_length=1000)
    cut = encode_example(record, tokenizer, max_source_length=16, max_target_length=1000)
    context = cut.context_length
    assert context == 15 and cut.input_ids[context - 1:context + 1] == [gmask, sop]
    assert cut.input_ids[:context + 1] == full.input_ids[full.context_length - 15:full.context_length + 1]
    assert "final question?" in tokenizer.decode(cut.input_ids[:context])
    assert cut.input_ids[-1] == eop and cut.labels == [-100] * context + cut.input_ids[context:]
    target_tokens = len(full) - full.context_length - 1  # answer tokens + <eop>
    exact = encode_example(record, tokenizer, max_source_length=1000, max_target_length=target_tokens)
    assert exact.input_ids == full.input_ids and exact.input_ids[-1] == eop
    short = encode_example(record, tokenizer, max_source_length=1000, max_target_length=3)
    assert len(short) == full.context_length + 1 + 3 and eop not in short.input_ids
    assert short.input_ids == full.input_ids[:full.context_length + 1 + 3]
    with pytest.raises(ChatGLMError, match="max_source_length"):
        encode_example(record, tokenizer, max_source_length=1)


class CountingTokenizer:
    """The real tokenizer, counting encode() calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenization_cache_hit_skips_the_tokenizer(tmp_path, tokenizer):
    records = [Record(prompt=f"question {i}", response=f"answer {i} " * (i % 5 + 1)) for i in range(40)]
    counting = CountingTokenizer(tokenizer)
    kwargs = dict(template="chatglm", max_source_length=64, max_target_length=8, cache_dir=tmp_path / "cache")
    first = tokenize_records(records, counting, **kwargs)
    assert counting.calls == 80 and len(list((tmp_path / "cache").iterdir())) == 1
    assert first == [encode_example(r, tokenizer, template="chatglm", max_source_length=64, max_target_length=8)
                     for r in records]
    counting.calls = 0
    second = tokenize_records(records, counting, **kwargs)
    assert counting.calls == 0 and second == first
    # Any change to the key tokenizes afresh: the lengths, the template, the texts.
    tokenize_records(records, counting, **{**kwargs, "max_target_length": 9})
    tokenize_records(records, counting, **{**kwargs, "template": "alpaca"})
    tokenize_records(records[:-1] + [Record(prompt="question 39", response="changed")], counting, **kwargs)
    assert counting.calls == 3 * 80 and len(list((tmp_path / "cache").iterdir())) == 4
    # A damaged cache file is rebuilt, not fatal.
    for f in (tmp_path / "cache").iterdir():
        f.write_bytes(b"garbage")
    counting.calls = 0
    assert tokenize_records(records, counting, **kwargs) == first and counting.calls == 80
    assert not list((tmp_path / "cache").glob("*.tmp"))


# -- split, batching, collation -------------------------------------------------------------------------
def test_split_validation_is_deterministic_and_keeps_conversations_together():
    items = list(range(100))
    train, val = split_validation(items, val_size=0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and train == sorted(train)
    assert split_validation(items, val_size=0.1, seed=3) == (train, val)
    assert split_validation(items, val_size=0.1, seed=4)[1] != val
    assert len(split_validation(items, val_size=25, seed=0)[1]) == 25
    assert split_validation(items, val_size=0, seed=0) == (items, [])
    for bad in (100, 1.5, -1, "10%"):
        with pytest.raises(ChatGLMError):
            split_validation(items, val_size=bad, seed=0)
    turns = [Record(prompt=f"q{i}", response="a", source=f"f:{i // 3}") for i in range(30)]  # 10 conversations
    train, val = split_validation(turns, val_size=6, seed=0)
    assert len(val) == 6 and not {r.source for r in train} & {r.source for r in val}


def test_length_grouped_batches_cover_every_index_and_resume():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=203).tolist()
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=1, group_batches=4)
    epoch0 = list(sampler)
    epoch1 = list(sampler)
    for epoch in (epoch0, epoch1):
        assert sorted(i for b in epoch for i in b) == list(range(203)) and len(epoch) == len(sampler) == 26
        assert max(lengths[i] for i in epoch[0]) == max(lengths)  # the biggest batch comes first
    assert epoch0 != epoch1
    assert LengthGroupedBatches(lengths, batch_size=8, seed=1, group_batches=4).epoch_batches(1) == epoch1

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    random_batches = [list(range(i, min(i + 8, 203))) for i in range(0, 203, 8)]
    assert padded_tokens(epoch0) < 0.75 * padded_tokens(random_batches)

    # Stop in mid-epoch, save, resume in a fresh sampler: the same batches follow.
    run = LengthGroupedBatches(lengths, batch_size=8, seed=1, group_batches=4)
    list(run)
    iterator = iter(run)
    head = [next(iterator) for _ in range(10)]
    state = json.loads(json.dumps(run.state_dict()))
    resumed = LengthGroupedBatches(lengths, batch_size=8, seed=1, group_batches=4)
    resumed.load_state_dict(state)
    assert head + list(resumed) == epoch1 and resumed.epoch == 2
    with pytest.raises(DataError, match="cannot resume"):
        LengthGroupedBatches(lengths[:-1], batch_size=8, seed=1, group_batches=4).load_state_dict(state)

    # Two ranks of batch 4 together see exactly the batches of one process of batch 8.
    ranks = [LengthGroupedBatches(lengths, batch_size=4, seed=1, group_batches=4, num_replicas=2, rank=r)
             for r in (0, 1)]
    for single, (b0, b1) in zip(epoch0, zip(*(r.epoch_batches(0) for r in ranks))):
        assert len(b0) == len(b1) and sorted(set(b0 + b1)) == sorted(single)
    evaluation = LengthGroupedBatches(lengths, batch_size=8, shuffle=False).epoch_batches(0)
    assert [lengths[b[0]] for b in evaluation] == sorted((lengths[b[0]] for b in evaluation), reverse=True)


def test_collate_right_pads():
    batch = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_id=3)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


# -- the data sets (excerpts in tests/fixtures/data) -----------------------------------------------
def test_data_set_excerpts_load_with_their_known_problems(shared):
    data = shared / "data"
    en, report = load_records([data / "alpaca_en"])
    # Alpaca records 284 and 1223 have an empty output (28 in the full set)
    assert (report.total_rows, report.kept, report.duplicates, len(report.files)) == (82, 80, 0, 1)
    assert len(report.bad_rows) == 2 and {reason for _, reason in report.bad_rows} == {"empty target 'output'"}
    assert en[0].instruction == "Give three tips for staying healthy." and en[0].source.endswith(":2 [0]")

    zh, report = load_records([str(data / "alpaca_zh" / "*.json")])
    # The two parts overlap (27 records in the full set, 3 in the excerpts); each has an empty output.
    assert (report.total_rows, report.kept, report.duplicates, len(report.bad_rows)) == (21, 16, 3, 2)
    source, reason = report.bad_rows[0]
    path, line = source.split(" ")[0].rsplit(":", 1)
    element = "".join(Path(path).read_text(encoding="utf-8").splitlines()[int(line) - 1:int(line) + 4])
    assert reason == "empty target 'output'" and element.lstrip().startswith("{") and '"output": ""' in element

    path = data / "hc3_psychology_zh" / "psychology-excerpt.jsonl"
    hc3, report = load_records([path])
    # The last two lines (1098 and 1099 of the full file) repeat one question with the same human answers.
    assert (report.total_rows, report.kept, report.duplicates, report.bad_rows) == (7, 6, 1, [])
    assert report.formats == {str(path): "hc3"}
    assert all(len(r.references) >= 3 and r.response == r.references[0] for r in hc3)
    assert isinstance(report, DataReport) and "6 records" in report.summary()
