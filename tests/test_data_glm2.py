"""ChatGLM2/3 training examples rebuilt from the `loss` goldens' raw examples (SPEC II.6), and the data loader's
records mapped into those formats."""
import json

import pytest

from chatglm_ft.data import IGNORE_INDEX, Record, encode_example, load_records, tokenize_records
from chatglm_ft.data_glm2 import encode_chatglm2, encode_conversation
from chatglm_ft.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tok2(golden2_dir):
    return load_tokenizer(golden2_dir)


@pytest.fixture(scope="module")
def tok3(golden3_dir):
    return load_tokenizer(golden3_dir)


def _unpadded(loss: dict) -> tuple[list[int], list[int]]:
    """The golden's rows without the right padding of ptuning/main.py (pad 0, label -100)."""
    ids, labels = loss["input_ids"], loss["labels"]
    end = len(ids)
    while end and ids[end - 1] == 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    return ids[:end], labels[:end]


def test_chatglm2_loss_golden(tok2, golden2):
    loss = golden2["loss"]
    example = loss["example"]
    assert "ChatGLM2-6B ptuning/main.py" in loss["format"]
    ids, labels = _unpadded(loss)
    assert len(loss["input_ids"]) == 129 and len(ids) < 129
    record = Record(prompt=example["query"], response=example["answer"], history=example["history"] or [])
    built = encode_example(record, tok2, max_source_length=64, max_target_length=64)
    assert built.input_ids == ids
    assert built.labels == labels
    assert built.prompt_ids == tok2.encode(example["prompt"])
    direct = encode_chatglm2(example["prompt"], example["answer"], tok2, max_source_length=64, max_target_length=64)
    assert direct == built


def test_chatglm3_loss_golden(tok3, golden3):
    loss = golden3["loss"]
    conversation = loss["example"]["conversations"]
    assert "finetune_hf.py" in loss["format"]
    built = encode_conversation(conversation, tok3, max_length=256 + 512 + 1)
    assert built.input_ids == loss["input_ids"]
    assert built.labels == loss["labels"]
    # the prompt for the last answer is what chat() builds for it
    history, query = conversation[:-2], conversation[-2]["content"]
    from chatglm_ft.chat_glm3 import build_chat_input

    assert built.prompt_ids == build_chat_input(tok3, query, history)


def test_chatglm3_rule_on_a_tool_conversation(tok3):
    tools = [{"name": "track", "parameters": {}}]
    messages = [
        {"role": "system", "content": "sys", "tools": tools},
        {"role": "user", "content": "q"},
        {"role": "assistant", "metadata": "track", "content": "```python\ntool_call(symbol='1')\n```"},
        {"role": "observation", "content": '{"price": 1}'},
        {"role": "assistant", "content": "a"},
    ]
    example = encode_conversation(messages, tok3, max_length=1000)
    ids, labels = example.input_ids, example.labels
    # the system message carries the tools as the chat prompt writes them
    sys_ids = tok3.build_single_message("system", "", "sys\n" + json.dumps(tools, indent=4, ensure_ascii=False))
    assert ids[2:2 + len(sys_ids)] == sys_ids
    assistant = [i for i, t in enumerate(ids) if t == tok3.role_id("assistant")]
    assert len(assistant) == 2
    # <|assistant|> after a user turn is not a target, the tokens after it (tool name, "▁\n") are
    assert labels[assistant[0]] == IGNORE_INDEX and labels[assistant[0] + 1] == ids[assistant[0] + 1]
    observation = ids.index(tok3.role_id("observation"))
    assert labels[observation] == ids[observation]  # ends the tool call: learned
    # finetune_hf.py masks only system and user turns: observation tokens, and so the <|assistant|> after them,
    # are targets too (SPEC II.6)
    assert labels[observation + 1:assistant[1] + 2] == ids[observation + 1:assistant[1] + 2]
    user = ids.index(tok3.role_id("user"))
    assert labels[user] == IGNORE_INDEX and labels[user + 1] == IGNORE_INDEX
    assert labels[-1] == ids[-1] == tok3.eos_token_id
    assert example.prompt_length == assistant[-1] + 1
    cut = encode_conversation(messages, tok3, max_length=20)
    assert cut.input_ids == ids[:20] and cut.labels == labels[:20]


def test_alpaca_and_chat_templates(tok2, tok3):
    record = Record(prompt="Say hi\nto Bob", response="Hi Bob", instruction="Say hi", input="to Bob")
    v2 = encode_example(record, tok2, template="alpaca", max_source_length=64, max_target_length=64)
    assert v2.prompt_ids == tok2.encode("Instruction: Say hi\nInput: to Bob\nAnswer: ")
    v3 = encode_example(record, tok3, template="alpaca", max_source_length=64, max_target_length=64)
    assert v3.prompt_ids == tok3.encode("", False) + [64790, 64792] + tok3.build_single_message(
        "user", "", "Instruction: Say hi\nInput: to Bob\nAnswer: ") + [tok3.role_id("assistant")]
    chat = encode_example(record, tok3, max_source_length=64, max_target_length=64)
    assert tok3.decode(chat.input_ids) == "[gMASK]sop<|user|> \n Say hi\nto Bob<|assistant|> \n Hi Bob"


def test_long_chatglm2_prompt_keeps_prefix_and_end(tok2):
    record = Record(prompt="很长的问题" * 40 + "最后一句", response="答")
    example = encode_example(record, tok2, max_source_length=16, max_target_length=4)
    assert example.input_ids[:2] == [64790, 64792] and len(example.prompt_ids) == 16
    assert tok2.decode(example.prompt_ids).endswith("答：")


def test_loader_rows_to_chatglm3_conversations(tok3, tmp_path, golden3):
    rows = [golden3["loss"]["example"],
            {"tools": [{"name": "track"}], "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "metadata": "track", "content": "```python\ntool_call(symbol='1')\n```"},
                {"role": "tool", "content": "{}"},
                {"role": "assistant", "content": "done"}]}]
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    records, _ = load_records(path)
    assert len(records) == 4  # one per assistant turn, as for every model
    examples = tokenize_records(records, tok3, max_source_length=256, max_target_length=512)
    assert len(examples) == 2  # ChatGLM3 learns a conversation at once
    assert examples[0].input_ids == golden3["loss"]["input_ids"]
    assert examples[0].labels == golden3["loss"]["labels"]
    second = examples[1]
    messages = records[-1].messages
    assert messages[0]["role"] == "system" and messages[0]["tools"] == [{"name": "track"}]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "observation", "assistant"]
    assert second.input_ids == encode_conversation(messages, tok3, max_length=769).input_ids


def test_token_cache_keeps_labels(tok3, tok2, tmp_path, golden3):
    records = [Record(prompt="q1", response="a1"), Record(prompt="q2", response="a2", history=[("q1", "a1")])]
    first = tokenize_records(records, tok3, cache_dir=tmp_path)
    assert list(tmp_path.glob("tokens-*.safetensors"))
    again = tokenize_records(records, tok3, cache_dir=tmp_path)
    assert again == first
    assert sum(label != IGNORE_INDEX for label in first[1].labels) > sum(
        label != IGNORE_INDEX for label in first[0].labels)  # both answers of the second conversation
    v2 = tokenize_records(records, tok2, cache_dir=tmp_path)
    assert v2 != first and tokenize_records(records, tok2, cache_dir=tmp_path) == v2


def test_evaluation_samples_score_the_last_answer(tok3, tok2):
    from chatglm_ft.chat_glm3 import build_chat_input
    from chatglm_ft.evaluate import prepare_samples

    record = Record(prompt="q2", response="a2", history=[("q1", "a1")], references=["a2", "b2"])
    (sample,), skipped = prepare_samples([record], tok3, template="chatglm", max_source_length=64, max_target_length=64)
    assert skipped == 0 and len(sample.examples) == 2
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert sample.prompt_ids == build_chat_input(tok3, "q2", history)
    for example, ref in zip(sample.examples, ["a2", "b2"]):
        scored = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        # "▁\n" after <|assistant|>, the answer, </s>; nothing of the earlier answer a1
        assert scored == example.input_ids[len(sample.prompt_ids):] == [30910, 13] + tok3.encode(ref, False) + [2]
    (v2,), _ = prepare_samples([record], tok2, template="chatglm", max_source_length=64, max_target_length=64)
    assert v2.prompt_ids == tok2.encode("[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：")
