"""`chatglm-ft demo` end to end, as CI runs it: the base fails, LoRA fixes it, and the saved
adapter works through `chatglm-ft chat`. One demo run (module fixture) serves every test."""
import json
import os
import subprocess
import sys

import pytest

from chatglm_ft.demo import (CONTROL_PIECES, TEXT_PIECES, all_phrases, build_tokenizer, demo_config, repeat_pairs,
                             split_phrases, translation_pairs)

SEED = 0


def run_cli(*args, input=None, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "chatglm_ft", *args], capture_output=True, text=True, input=input,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(output dir, finished process, demo_results.json) of one default demo run."""
    root = tmp_path_factory.mktemp("demo")
    out = root / "demo-out"
    result = run_cli("demo", "--out", str(out), "--seed", str(SEED), env={"XDG_CACHE_HOME": str(root / "cache")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result, json.loads((out / "demo_results.json").read_text())


# -- the pieces, without training ---------------------------------------------------------------------
def test_test_phrases_are_unseen_but_made_of_seen_words():
    train, test = split_phrases(SEED)
    assert len(train) + len(test) == len(all_phrases()) == 8 * 7 * 8
    assert not set(train) & set(test)
    train_words = {w for p in train for w in p.english.split()}
    assert all(w in train_words for p in test for w in p.english.split())
    assert split_phrases(SEED) == (train, test) and split_phrases(SEED + 1) != (train, test)
    pairs = dict(translation_pairs(test))
    assert all(pairs[f"Translate into Chinese: {p.english}"] == p.chinese for p in test)
    assert translation_pairs([p for p in all_phrases() if p.english == "three red books"]) == [
        ("Translate into Chinese: three red books", "三本红书"), ("翻译成英文：三本红书", "three red books")]


def test_tokenizer_has_chatglm_special_pieces(tmp_path):
    texts = [t for q, a in translation_pairs(all_phrases()) + repeat_pairs(all_phrases()) for t in (q, a)]
    tokenizer = build_tokenizer(texts, tmp_path)
    build_tokenizer(texts, tmp_path / "again")  # deterministic: the same bytes twice
    assert (tmp_path / "ice_text.model").read_bytes() == (tmp_path / "again" / "ice_text.model").read_bytes()
    sp = tokenizer.sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tokenizer.pad_token_id == 3
    assert all(sp.is_control(sp.piece_to_id(p)) for p in CONTROL_PIECES)
    assert all(sp.piece_to_id(p) != sp.unk_id() and not sp.is_control(sp.piece_to_id(p)) for p in TEXT_PIECES)
    assert 500 <= tokenizer.vocab_size <= 1000  # small: the embedding stays tiny
    ids = tokenizer.encode("Translate into Chinese: three red apples")
    assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert [sp.id_to_piece(i) for i in ids[:-2]] == ["▁Translate", "▁into", "▁Chinese", ":", "▁three", "▁red", "▁apples"]
    assert [sp.id_to_piece(i) for i in tokenizer.encode("三个红苹果", add_special_tokens=False)] == [
        "▁", "三", "个", "红", "苹", "果"]  # one piece per character: compositions stay visible
    text = "a\nb\tc    d 你好 ☃"  # newline, tab, a blank run, and characters outside the corpus (byte fallback)
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    config = demo_config(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.mask_token_id, config.gmask_token_id, config.pad_token_id) == (
        sp.piece_to_id("<sop>"), sp.piece_to_id("<eop>"), sp.piece_to_id("[MASK]"), sp.piece_to_id("[gMASK]"), 3)
    assert config.vocab_size == tokenizer.vocab_size


# -- the demo run ---------------------------------------------------------------------------------------
def test_demo_base_fails_and_lora_fixes_it(demo):
    out, result, summary = demo
    assert summary["test_questions"] == 96 and summary["lora_steps"] == 300 and summary["device"] == "cpu"
    assert summary["base_repeat_accuracy"] >= 0.9  # the base works on what it was trained for ...
    assert summary["before"] <= 0.05  # ... but cannot translate
    assert summary["after"] >= 0.9
    assert f"translation exact match: {summary['before']:.1%} -> {summary['after']:.1%}" in result.stdout
    samples = summary["samples"]
    correct = sum(s["after"] == s["expected"] for s in samples)
    assert correct / len(samples) == pytest.approx(summary["after"])
    assert sum(s["before"] == s["expected"] for s in samples) / len(samples) == pytest.approx(summary["before"])
    assert "%|" in result.stderr  # the progress bar


def test_demo_prints_the_real_model_commands(demo):
    out, result, _ = demo
    assert f"chatglm-ft chat --model {out / 'base'} --adapter {out / 'adapter'}" in result.stdout
    for command in ("chatglm-ft train --model /path/to/chatglm-6b", "chatglm-ft eval --model /path/to/chatglm-6b",
                    "chatglm-ft chat --model /path/to/chatglm-6b --adapter"):
        assert command in result.stdout


def test_demo_training_is_chatglm_ft_train(demo, tmp_path):
    """The demo's LoRA step through the command line, from the config it saved: the same losses."""
    out, result, _ = demo
    assert f"chatglm-ft train --config {out}/train_config.json" in result.stdout
    cli = run_cli("train", "--config", str(out / "train_config.json"), "--output-dir", str(tmp_path / "cli-run"),
                  "--max-steps", "20", "--no-progress",  # within the 30 warmup steps the schedule ignores the total
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr
    demo_losses = json.loads((out / "train_results.json").read_text())["losses"][:20]
    cli_losses = json.loads((tmp_path / "cli-run" / "train_results.json").read_text())["losses"]
    assert [step for step, _ in cli_losses] == list(range(1, 21))
    assert [loss for _, loss in cli_losses] == pytest.approx([loss for _, loss in demo_losses], rel=1e-5)


def test_demo_saves_a_checkpoint_and_a_peft_adapter(demo):
    from safetensors.torch import load_file

    from chatglm_ft.config import ChatGLMConfig
    from chatglm_ft.tokenizer import ChatGLMTokenizer

    out, _, _ = demo
    config = ChatGLMConfig.from_dir(out / "base")  # model_type chatglm, readable by our loader
    tokenizer = ChatGLMTokenizer.from_dir(out / "base")
    assert config.gmask_token_id == tokenizer.gmask_token_id and config.vocab_size == tokenizer.vocab_size
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and set(adapter_config["target_modules"]) == {"query_key_value", "dense"}
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 32
    assert adapter_config["base_model_name_or_path"] == str(out / "base")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    expected = {f"base_model.model.transformer.layers.{n}.attention.{m}.lora_{ab}.weight"
                for n in range(config.num_layers) for m in ("query_key_value", "dense") for ab in "AB"}
    assert set(weights) == expected  # the original parameter paths: PEFT on the original model loads it
    assert weights["base_model.model.transformer.layers.0.attention.query_key_value.lora_B.weight"].abs().max() > 0
    for name in ("train.json", "test.json", "warmup.json"):
        rows = json.loads((out / "data" / name).read_text(encoding="utf-8"))
        assert rows and set(rows[0]) == {"instruction", "input", "output"}


def test_chat_with_the_demo_adapter_answers_correctly(demo):
    out, _, summary = demo
    solved = [s for s in summary["samples"] if s["after"] == s["expected"]]
    questions = [next(s for s in solved if s["question"].startswith("翻译")),
                 next(s for s in solved if s["question"].startswith("Translate"))]
    script = f"{questions[0]['question']}\nclear\n{questions[1]['question']}\nexit\n"  # clear: no history
    result = run_cli("chat", "--model", str(out / "base"), "--adapter", str(out / "adapter"), "--temperature", "0",
                     "--device", "cpu", input=script, timeout=300)
    assert result.returncode == 0, result.stderr
    for q in questions:
        assert f"ChatGLM-6B: {q['expected']}\n" in result.stdout


def test_demo_adapter_loads_with_peft_itself(demo):
    """peft.PeftModel.from_pretrained on the plain base gives the same logits as our loader's --adapter path."""
    import torch
    from peft import PeftModel

    from chatglm_ft import load

    out, _, summary = demo
    ours, tokenizer = load(out / "base", dtype="float32", device="cpu", adapter=out / "adapter")
    base, _ = load(out / "base", dtype="float32", device="cpu")
    with torch.no_grad():
        plain = base(torch.tensor([tokenizer.encode(summary["samples"][0]["question"])])).logits
        peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        ids = torch.tensor([tokenizer.encode(summary["samples"][0]["question"])])
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        assert (peft_model(ids).logits - plain).abs().max() > 1e-2  # the adapter changes the output


def test_demo_model_answers_the_second_question_of_a_conversation(demo):
    out, result, summary = demo
    rows = json.loads((out / "data" / "train.json").read_text(encoding="utf-8"))
    with_history = [r for r in rows if r.get("history")]
    assert len(with_history) == len(rows) // 2 and all(len(turn) == 2 for r in with_history for turn in r["history"])
    assert summary["after_with_history"] >= 0.85  # trained on multi-turn prompts (single-turn only: far lower)
    assert "as the second turn of a conversation" in result.stdout
    assert f"chatglm-ft serve --model {out / 'base'} --adapter {out / 'adapter'}" in result.stdout
    assert "http://127.0.0.1:8000/" in result.stdout


def test_chat_page_with_its_defaults_gets_two_questions_of_one_conversation_right(demo):
    """The demo server (context 256) in real Chromium: the page bounds its slider by the server's context,
    keeps the conversation, and the sampling defaults (temperature 0.95, top-p 0.7) still answer right."""
    from test_server import LiveServer
    from test_web import CHROMIUM, CHROMIUM_ARGS, require_browser, send, wait_idle

    from chatglm_ft import load
    from chatglm_ft.engine import Engine
    from chatglm_ft.server import create_app

    require_browser()
    from playwright.sync_api import sync_playwright

    out, _, summary = demo
    samples = summary["samples"]
    model, tokenizer = load(out / "base", dtype="float32", device="cpu", adapter=out / "adapter")

    def confident(query, history):
        """Greedy is right and every token (and the end) has probability >= 0.75: then top-p 0.7 keeps only
        that token at the page's temperature 0.95, so the page's sampling gives the same answer."""
        import torch

        from chatglm_ft.generate import GenerationConfig, generate
        from chatglm_ft.prompt import chat_prompt

        ids = tokenizer.encode(chat_prompt(query, history))
        answer = generate(model, tokenizer, [ids], GenerationConfig(max_new_tokens=16))[0].token_ids
        answer = answer + [tokenizer.eos_token_id]
        with torch.no_grad():
            probs = model(torch.tensor([ids + answer[:-1]])).logits[0, len(ids) - 1:].softmax(-1)
        return bool(probs[torch.arange(len(answer)), answer].min() >= 0.75)

    # the demo asked question i after question i+1 (answered): pick such a pair the model answers confidently
    i = next(i for i in range(len(samples) - 1)
             if samples[i + 1]["after"] == samples[i + 1]["expected"] and samples[i]["after_in_chat"] == samples[i]["expected"]
             and confident(samples[i + 1]["question"], None)
             and confident(samples[i]["question"], [(samples[i + 1]["question"], samples[i + 1]["expected"])]))
    first, second = samples[i + 1], samples[i]
    engine = Engine(model, tokenizer, max_batch=2)
    assert engine.max_context == 256
    with LiveServer(create_app(engine, model_name="chatglm-ft-demo")) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('max-length').max === '256'")
        assert page.inner_text("#max-length-value") == "256 (up to the context)"
        send(page, first["question"])
        wait_idle(page, 2)
        send(page, second["question"])
        wait_idle(page, 4)
        messages = page.evaluate("window.chatState.messages")
        browser.close()
    assert [m["content"] for m in messages] == [first["question"], first["expected"], second["question"], second["expected"]]
