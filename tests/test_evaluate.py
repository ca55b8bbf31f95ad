"""`chatglm-ft eval` on the golden tiny model: base vs a LoRA adapter, outputs, bad data, --limit."""
from __future__ import annotations

import json

import pytest
import torch

from chatglm_ft.cli import main
from chatglm_ft.data import Record, encode_example
from chatglm_ft.eval_report import read_outputs, write_outputs
from chatglm_ft.evaluate import Variant, evaluate, parse_variants, reference_losses, score_variant, sequence_losses
from chatglm_ft.errors import ChatGLMError
from chatglm_ft.generate import GenerationConfig


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, golden_dir):
    """A LoRA adapter (seed settings) with random lora_B, so it visibly changes the model."""
    from peft import LoraConfig, get_peft_model

    from chatglm_ft import load

    model, _ = load(golden_dir, dtype="float32", device="cpu")
    peft_model = get_peft_model(model, LoraConfig(target_modules=["query_key_value"], r=8, lora_alpha=32))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    path = tmp_path_factory.mktemp("adapters") / "psych-lora"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, shared):
    """Five HC3 rows (several human answers each) with two malformed lines in between."""
    lines = (shared / "data" / "hc3_psychology_zh" / "psychology-excerpt.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    lines.insert(2, '{"question": "unterminated", ')
    lines.insert(4, '{"question": 7, "human_answers": ["x"]}')
    path = tmp_path_factory.mktemp("data") / "psych.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_sequence_losses_equal_the_models_loss_per_row(tiny):
    model, tokenizer = tiny
    records = [Record(prompt="你好", response="你好！有什么可以帮你的吗？"), Record(prompt="Give three tips.", response="Eat.")]
    examples = [encode_example(r, tokenizer, template="chatglm") for r in records]
    per_row = reference_losses(model, examples, batch_size=2, pad_id=tokenizer.pad_token_id)  # left-padded together
    for example, (loss_sum, count) in zip(examples, per_row):
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        expected = model(ids, labels=labels).loss
        assert count == sum(label != -100 for label in example.labels)  # <sop> (predicted from [gMASK]) on
        torch.testing.assert_close(torch.tensor(loss_sum / count), expected, rtol=1e-4, atol=1e-4)
    sums, counts = sequence_losses(model, ids, labels)
    assert sums.shape == counts.shape == (1,)


def test_eval_base_vs_adapter_writes_all_outputs(tmp_path, golden_dir, adapter_dir, data_file, capsys):
    out = tmp_path / "out"
    code = main(["eval", "--model", str(golden_dir), "--device", "cpu", "--adapter", str(adapter_dir),
                 "--adapter", "base", "--data", str(data_file), "--out", str(out), "--limit", "2",
                 "--max-new-tokens", "8", "--batch-size", "2", "--max-target-length", "24"])
    assert code == 0
    captured = capsys.readouterr()
    assert "2 bad rows skipped" in captured.err  # malformed lines are reported, not fatal
    assert "| psych-lora |" in captured.out and "| base |" in captured.out

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["psych-lora", "base"]
    assert metrics["data"]["bad_rows"] == 2 and metrics["data"]["evaluated"] == 2  # --limit 2
    base, lora = metrics["variants"]["base"], metrics["variants"]["psych-lora"]
    for summary in (base, lora):
        assert summary["samples"] == 2
        assert set(summary["word"]) == {"bleu-4", "corpus-bleu-4", "rouge-1", "rouge-2", "rouge-l"}
        assert summary["perplexity"] == pytest.approx(2.718281828 ** summary["loss"], rel=1e-6)
        assert summary["generation"]["new_tokens"] == 2 * 8  # greedy, no early stop on a random model
    assert lora["loss"] != pytest.approx(base["loss"], abs=1e-4)  # the adapter was really applied

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2
    assert {r["variant"] for r in rows} == {"base", "psych-lora"}
    first = rows[0]
    assert len(first["references"]) > 1  # every human answer of the HC3 record is a reference
    assert {"prompt", "prediction", "loss", "lang", "word", "char"} <= set(first)
    assert first["lang"] == "zh" and first["prompt"]

    report = (out / "report.md").read_text()
    assert "| psych-lora |" in report and "| base |" in report and "Data lines skipped (2)" in report
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_after_adapters_is_the_plain_model_and_adapters_are_removed(tiny, adapter_dir):
    model, tokenizer = tiny
    records = [Record(prompt="我是个自卑的孩子", response="自信来自行动。", references=["自信来自行动。", "多和朋友聊聊。"])]
    gen = GenerationConfig(max_new_tokens=4)
    kwargs = dict(model=model, tokenizer=tokenizer, records=records, gen=gen, progress=False, workers=1)
    (plain,), _ = evaluate(**kwargs)
    with_adapter, _ = evaluate(**kwargs, variants=[Variant("lora", adapter_dir), Variant("base")])
    assert with_adapter[1].summary["loss"] == pytest.approx(plain.summary["loss"], abs=1e-6)
    assert with_adapter[1].rows[0]["prediction"] == plain.rows[0]["prediction"]
    assert with_adapter[0].summary["loss"] != pytest.approx(plain.summary["loss"], abs=1e-4)
    assert not any("lora" in name for name, _ in model.named_modules())  # the shared fixture is left as it was


def test_unscored_outputs_can_be_scored_later(tiny, tmp_path):
    """Generation where the metric libraries are missing, BLEU/ROUGE elsewhere: the same numbers."""
    model, tokenizer = tiny
    records = [Record(prompt="你好", response="你好！"), Record(prompt="Name a color.", response="Blue is a color.")]
    kwargs = dict(model=model, tokenizer=tokenizer, records=records, gen=GenerationConfig(max_new_tokens=4),
                  progress=False, workers=1)
    (scored,), _ = evaluate(**kwargs)
    (unscored,), _ = evaluate(**kwargs, score=False)
    assert scored.scored and not unscored.scored
    paths = write_outputs(tmp_path, [unscored], dataset="later")
    assert sorted(p.name for p in paths.values()) == ["metrics.json", "predictions.jsonl"]
    (loaded,), meta = read_outputs(tmp_path)
    assert meta["dataset"] == "later" and loaded.rows[0]["prediction"] == scored.rows[0]["prediction"]
    score_variant(loaded, workers=1)
    assert loaded.summary["word"] == scored.summary["word"] and loaded.summary["char"] == scored.summary["char"]
    assert loaded.rows[1]["lang"] == "en" and loaded.rows[0]["lang"] == "zh"
    assert set(write_outputs(tmp_path, [loaded], dataset="later")) == {"metrics.json", "predictions.jsonl", "report.md",
                                                                        "chart.png"}


def test_variant_names_and_errors(tmp_path, adapter_dir):
    assert parse_variants(None) == [Variant("base")]
    assert [v.name for v in parse_variants(["base", str(adapter_dir)])] == ["base", "psych-lora"]
    with pytest.raises(ChatGLMError, match="adapter_config.json"):
        parse_variants([str(tmp_path)])
    with pytest.raises(ChatGLMError, match="twice"):
        parse_variants(["base", "base"])


def test_eval_rejects_bad_limit(golden_dir, data_file, tmp_path, capsys):
    assert main(["eval", "--model", str(golden_dir), "--data", str(data_file), "--out", str(tmp_path),
                 "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
