"""`chatglm-ft demo`: the whole LoRA story on a CPU in about 40 seconds, with nothing downloaded.

    run_demo(out="demo-out", seed=0)

1. Generate a bilingual task whose answers can be checked exactly: translate counted, coloured
   things between English and Chinese ("three red apples" <-> "三个红苹果"; the Chinese measure
   word depends on the noun: 个/只/本/辆/条/支). Phrases are split so the test phrases are never
   seen in training, in either direction.
2. Train a small sentencepiece tokenizer on that text, with ChatGLM-6B's special pieces, and build
   a tiny model of the ChatGLM-6B architecture. A short full fine-tuning on a warm-up task
   (repeat the phrase) stands in for pre-training: the base knows the words, not the translation.
3. Measure exact match on the held-out translations (the base fails), LoRA-train with
   `chatglm_ft.train.train` exactly as `chatglm-ft train` does, reload base + adapter from disk
   as `chatglm-ft chat --adapter` does, and measure again.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import ChatGLMConfig
from .tokenizer import MAX_BLANK_LENGTH, ChatGLMTokenizer

# -- the task -----------------------------------------------------------------------------------------
COUNTS = [("two", "两"), ("three", "三"), ("four", "四"), ("five", "五"), ("six", "六"), ("seven", "七"),
          ("eight", "八"), ("nine", "九")]
COLOURS = [("red", "红"), ("blue", "蓝"), ("green", "绿"), ("yellow", "黄"), ("black", "黑"), ("white", "白"),
           ("purple", "紫")]
NOUNS = [("apples", "苹果", "个"), ("cats", "猫", "只"), ("books", "书", "本"), ("cars", "车", "辆"),
         ("birds", "鸟", "只"), ("cups", "杯子", "个"), ("fish", "鱼", "条"), ("pens", "笔", "支")]
TEST_PHRASES = 48  # held out: 96 test questions (both directions)
# Training settings (TrainConfig fields). A 0.5M-parameter model from scratch wants far larger
# learning rates than the original chatglm6b_ft project's 2e-5 for ChatGLM-6B.
BASE_TRAINING = dict(finetuning_type="full", learning_rate=3e-3, warmup_steps=20, per_device_train_batch_size=32)
# The original chatglm6b_ft project's LoRA (r=8, alpha=32, dropout 0.1) on query_key_value and the attention output `dense`: with
# query_key_value alone a model this small reaches 85-100% depending on the seed, with both 100%.
LORA_TRAINING = dict(finetuning_type="lora", lora_r=8, lora_alpha=32, lora_dropout=0.1,
                     lora_target=["query_key_value", "dense"], learning_rate=5e-3, warmup_steps=30,
                     per_device_train_batch_size=32)


@dataclass(frozen=True)
class Phrase:
    english: str  # "three red apples"
    chinese: str  # "三个红苹果"


def all_phrases() -> list[Phrase]:
    return [Phrase(f"{count} {colour} {noun}", f"{count_zh}{measure}{colour_zh}{noun_zh}")
            for count, count_zh in COUNTS for colour, colour_zh in COLOURS for noun, noun_zh, measure in NOUNS]


def split_phrases(seed: int, test_size: int = TEST_PHRASES) -> tuple[list[Phrase], list[Phrase]]:
    """(train, test) phrases; every word of a test phrase still occurs in many training phrases."""
    phrases = all_phrases()
    random.Random(seed).shuffle(phrases)
    return phrases[test_size:], phrases[:test_size]


def translation_pairs(phrases: Sequence[Phrase]) -> list[tuple[str, str]]:
    """(question, answer) pairs of the skill LoRA must learn, both directions."""
    pairs = []
    for p in phrases:
        pairs += [(f"Translate into Chinese: {p.english}", p.chinese), (f"翻译成英文：{p.chinese}", p.english)]
    return pairs


def repeat_pairs(phrases: Sequence[Phrase]) -> list[tuple[str, str]]:
    """The warm-up task the base model is pre-trained on: same words, no translation."""
    pairs = []
    for p in phrases:
        pairs += [(f"Repeat: {p.english}", p.english), (f"重复：{p.chinese}", p.chinese)]
    return pairs


def with_histories(pairs: Sequence[tuple[str, str]], seed: int) -> list[list[tuple[str, str]]]:
    """A conversation before every second question (one or two other questions, answered correctly):
    chat keeps history by default, so the model must answer the last question of a multi-turn prompt."""
    rng = random.Random(seed + 1)
    return [[] if i % 2 == 0 else [pairs[rng.randrange(len(pairs))] for _ in range(rng.choice((1, 1, 2)))]
            for i in range(len(pairs))]


def write_alpaca(path: Path, pairs: Sequence[tuple[str, str]],
                 histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> Path:
    """Alpaca JSON (instruction/input/output, and `history` where there is one): `chatglm-ft train --data`
    and `eval --data` read it as is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": q, "input": "", "output": a} for q, a in pairs]
    for row, history in zip(rows, histories or []):
        if history:
            row["history"] = [list(turn) for turn in history]
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


# -- tokenizer and model ------------------------------------------------------------------------------
# ChatGLM-6B's pieces, looked up by name by ChatGLMTokenizer: the prompt/answer markers are control
# pieces (never produced from text), the whitespace stand-ins are matched in the text.
CONTROL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
TEXT_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK_LENGTH + 1)]
_HAN = re.compile(r"([\u4e00-\u9fff])")
_SPLIT = "|"  # pretokenization_delimiter: no piece spans it, and it is dropped (never in the generated text)


def build_tokenizer(texts: Sequence[str], out_dir: Path, *, vocab_size: int = 1000) -> ChatGLMTokenizer:
    """Train a small sentencepiece model with ChatGLM-6B's special pieces and write `ice_text.model`.

    BPE keeps English words whole; every Chinese character is its own piece (a piece spanning
    "红苹果" would hide from the model that a test phrase is made of words it has seen). Byte
    fallback lets the chat encode any text. Ids 0-3 are <unk> <s> </s> <pad>, as in ChatGLM-6B.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([_HAN.sub(rf"{_SPLIT}\1{_SPLIT}", t) for t in texts]), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        split_digits=True, byte_fallback=True, normalization_rule_name="nmt_nfkc",
        pretokenization_delimiter=_SPLIT, unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
        control_symbols=CONTROL_PIECES, user_defined_symbols=TEXT_PIECES, num_threads=1, minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ice_text.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}) + "\n")
    return ChatGLMTokenizer.from_dir(out_dir)


def demo_config(tokenizer: ChatGLMTokenizer) -> ChatGLMConfig:
    """ChatGLM-6B's architecture at 0.56M parameters; the special ids are the tokenizer's."""
    return ChatGLMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, num_layers=2, num_attention_heads=4, inner_hidden_size=512,
        max_sequence_length=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )


# -- checking answers ---------------------------------------------------------------------------------
@dataclass
class Score:
    correct: int
    total: int
    answers: list[str]  # what the model said, per question

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)


def exact_match(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 96,
                histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> Score:
    """Greedy answers (chat prompt with the given history, chat clean-up) compared to the expected text."""
    from .generate import GenerationConfig, generate
    from .prompt import chat_prompt, clean_response

    model.eval()
    gen = GenerationConfig(max_new_tokens=16)
    answers: list[str] = []
    for start in range(0, len(pairs), batch_size):
        prompts = [tokenizer.encode(chat_prompt(q, histories[start + i] if histories else None))
                   for i, (q, _) in enumerate(pairs[start:start + batch_size])]
        answers += [clean_response(g.text) for g in generate(model, tokenizer, prompts, gen)]
    correct = sum(a == expected for a, (_, expected) in zip(answers, pairs))
    return Score(correct, len(pairs), answers)


def show_samples(log: Callable[[str], None], pairs: Sequence[tuple[str, str]], score: Score, count: int = 4) -> None:
    """The first questions (pairs alternate directions, so both languages show up)."""
    for (question, expected), answer in list(zip(pairs, score.answers))[:count]:
        verdict = "ok " if answer == expected else "BAD"
        log(f"    {verdict} {question}  ->  {answer!r}" + ("" if answer == expected else f"  (expected {expected!r})"))


# -- the pipeline -------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    out: str
    seed: int
    device: str
    base_repeat_accuracy: float  # the warm-up task, held-out phrases: the base model works
    before: float  # held-out translation exact match, base model
    after: float  # the same, base + adapter loaded from disk
    after_with_history: float  # the same questions, each after an earlier question and answer (as in a chat)
    test_questions: int
    lora_steps: int
    final_loss: float
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def run_demo(*, out: str | Path = "demo-out", seed: int = 0, steps: int = 300, base_steps: int = 300,
             device: str = "cpu", threads: int | None = 1, log: Callable[[str], None] | None = None) -> DemoResult:
    """Build, pre-train, test, LoRA-train, reload and test again; everything is written under `out`.

    `threads` caps torch's CPU threads while the demo runs (None: leave as is). The matrices are
    tiny, so one thread is about as fast as several, and far faster on a busy machine, where
    threads that wait for each other at every small operation slow a step down tenfold.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(Path(out).expanduser(), seed=seed, steps=steps, base_steps=base_steps, device=device,
                         log=log or (lambda line: print(line, flush=True)))
    finally:
        torch.set_num_threads(previous)


def _run_demo(out: Path, *, seed: int, steps: int, base_steps: int, device: str, log: Callable[[str], None]) -> DemoResult:
    from .api import load, resolve_device
    from .records import load_records
    from .train import TrainConfig, train

    resolved = resolve_device(device)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 2)

    log(f"chatglm-ft demo: LoRA fine-tuning end to end on {resolved}, nothing downloaded (seed {seed}, output {out}/)")
    log("")
    log("[1/5] Data, tokenizer and base model")
    train_phrases, test_phrases = split_phrases(seed)
    train_pairs, test_pairs = translation_pairs(train_phrases), translation_pairs(test_phrases)
    data_dir = out / "data"
    warmup_file = write_alpaca(data_dir / "warmup.json", repeat_pairs(train_phrases))
    train_file = write_alpaca(data_dir / "train.json", train_pairs, with_histories(train_pairs, seed))
    write_alpaca(data_dir / "test.json", test_pairs)
    log("  task: translate between English and Chinese, e.g. 'three red apples' <-> '三个红苹果'")
    log(f"  {len(train_pairs)} training questions; {len(test_pairs)} test questions on {len(test_phrases)} phrases"
        f" never seen in training ({data_dir}/)")
    base_dir = out / "base"
    model = build_base(base_dir, warmup_file, seed=seed, steps=base_steps, device=resolved,
                       run_dir=out / "base-training", log=log)
    tokenizer = ChatGLMTokenizer.from_dir(base_dir)
    lap("build")

    log("")
    log("[2/5] Before LoRA: the base model on the held-out phrases")
    repeat_score = exact_match(model, tokenizer, repeat_pairs(test_phrases))
    before = exact_match(model, tokenizer, test_pairs)
    log(f"  warm-up task (repeat): {repeat_score.accuracy:.1%} exact match; translation: {before.accuracy:.1%}"
        f" ({before.correct}/{before.total})")
    show_samples(log, test_pairs, before)
    lap("before")

    log("")
    log(f"[3/5] LoRA fine-tuning with chatglm_ft.train, the code behind `chatglm-ft train`"
        f" ({steps} steps, r={LORA_TRAINING['lora_r']} on {','.join(LORA_TRAINING['lora_target'])})")
    records, _ = load_records(train_file)  # read as `chatglm-ft train --data` reads it
    lora_run = train(TrainConfig(
        model=str(base_dir), data=[str(train_file)], output_dir=str(out), max_steps=steps, save_steps=0,
        logging_steps=20, seed=seed, device=str(resolved), dtype="float32", report_to=["jsonl"], **LORA_TRAINING,
    ), model=model, tokenizer=tokenizer, records=records)
    lap("train")

    log("")
    log("[4/5] After LoRA: base + adapter loaded back from disk, as `chatglm-ft chat --adapter` loads them")
    tuned, tokenizer = load(base_dir, dtype="float32", device=resolved, adapter=lora_run.adapter_dir)
    after = exact_match(tuned, tokenizer, test_pairs)
    log(f"  translation exact match: {before.accuracy:.1%} -> {after.accuracy:.1%} ({after.correct}/{after.total})")
    show_samples(log, test_pairs, after)
    # a chat keeps the conversation: each question again, after another test question and its answer
    chats = [[test_pairs[(i + 1) % len(test_pairs)]] for i in range(len(test_pairs))]
    in_chat = exact_match(tuned, tokenizer, test_pairs, histories=chats)
    log(f"  the same questions as the second turn of a conversation: {in_chat.accuracy:.1%}"
        f" ({in_chat.correct}/{in_chat.total})")
    lap("after")

    result = DemoResult(
        out=str(out), seed=seed, device=str(resolved), base_repeat_accuracy=repeat_score.accuracy,
        before=before.accuracy, after=after.accuracy, after_with_history=in_chat.accuracy, test_questions=len(test_pairs), lora_steps=lora_run.steps,
        final_loss=lora_run.final_loss, seconds={**seconds, "total": round(time.perf_counter() - started, 2)},
        samples=[{"question": q, "expected": a, "before": b, "after": c, "after_in_chat": d}
                 for (q, a), b, c, d in zip(test_pairs, before.answers, after.answers, in_chat.answers)],
    )
    (out / "demo_results.json").write_text(json.dumps(asdict(result), ensure_ascii=False, indent=1) + "\n")

    log("")
    log(f"[5/5] Saved under {out}/ ({result.seconds['total']:.0f}s in all)")
    saved = [(f"{base_dir}/", "the tiny base model: a ChatGLM-6B checkpoint directory (config.json, safetensors, ice_text.model)"),
             (f"{lora_run.adapter_dir}/", "the LoRA adapter in the PEFT layout (adapter_config.json, adapter_model.safetensors)"),
             (f"{data_dir}/", "the generated data (Alpaca JSON); beside it train_log.jsonl and demo_results.json")]
    width = max(len(path) for path, _ in saved)
    for path, what in saved:
        log(f"  {path:<{width}}  {what}")
    log("  Talk to it:")
    log(f"    chatglm-ft chat --model {base_dir} --adapter {lora_run.adapter_dir} --temperature 0")
    log(f"    (ask: 翻译成英文：{test_phrases[0].chinese}   or   Translate into Chinese: {test_phrases[1].english})")
    log("  Or in the browser (the chat page; the conversation is kept, as in chat):")
    log(f"    chatglm-ft serve --model {base_dir} --adapter {lora_run.adapter_dir}   then open http://127.0.0.1:8000/")
    log("  The LoRA step from the command line (same settings, same losses):")
    log(f"    chatglm-ft train --config {out}/train_config.json --output-dir {out}/cli-run --threads 1")
    log("")
    log("The same pipeline on the real ChatGLM-6B (on a GPU; add --quantize int4 for QLoRA on 6-8 GB):")
    for line in real_model_commands(data_dir):
        log("  " + line)
    return result


def build_base(base_dir: Path, warmup_file: Path, *, seed: int, steps: int, device: torch.device, run_dir: Path,
               log: Callable[[str], None]):
    """Tokenizer + tiny model, pre-trained on the warm-up task (full fine-tuning) and saved to `base_dir`."""
    from .api import build_model
    from .checkpoint import replace_dir
    from .records import load_records
    from .train import TrainConfig, train

    # The tokenizer sees every phrase (a real tokenizer knows the words of the test set too).
    texts = [t for q, a in repeat_pairs(all_phrases()) + translation_pairs(all_phrases()) for t in (q, a)]
    work = Path(tempfile.mkdtemp(prefix="chatglm-ft-demo-"))
    try:
        tokenizer = build_tokenizer(texts, work)
        config = demo_config(tokenizer)
        torch.manual_seed(seed)
        model = build_model(config, dtype=torch.float32, device=device)
        log(f"  tokenizer: sentencepiece, {tokenizer.vocab_size} pieces incl. ChatGLM-6B's special pieces"
            f" ([gMASK]={tokenizer.gmask_token_id}, <sop>={tokenizer.bos_token_id}, <eop>={tokenizer.eos_token_id})")
        log(f"  model: the ChatGLM-6B architecture with {config.num_layers} layers, hidden {config.hidden_size}:"
            f" {model.num_parameters() / 1e6:.2f}M parameters (ChatGLM-6B: 6,173M)")
        log(f"  pre-training the base on a warm-up task ('Repeat: ...', full fine-tuning, {steps} steps):"
            " it learns the words, not the translation")
        records, _ = load_records(warmup_file)
        run = train(TrainConfig(
            output_dir=str(run_dir), data=[str(warmup_file)], max_steps=steps, save_steps=0, logging_steps=20,
            seed=seed, device=str(device), dtype="float32", report_to=["jsonl"], **BASE_TRAINING,
        ), model=model, tokenizer=tokenizer, records=records)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if base_dir.exists():
        shutil.rmtree(base_dir)
    replace_dir(run.model_dir, base_dir)  # the checkpoint train() wrote, tokenizer files included
    return model


def real_model_commands(data_dir: Path) -> list[str]:
    model = "/path/to/chatglm-6b"
    return [
        f"chatglm-ft train --model {model} --data {data_dir}/train.json --output-dir runs/demo-6b \\",
        "    --learning-rate 5e-4 --max-steps 300 --warmup-steps 30 --per-device-train-batch-size 32",
        f"chatglm-ft eval --model {model} --adapter base --adapter runs/demo-6b/adapter \\",
        f"    --data {data_dir}/test.json --out runs/demo-6b/eval",
        f"chatglm-ft chat --model {model} --adapter runs/demo-6b/adapter",
        "# your own data: Alpaca / ChatGLM-Tuning / HC3 / chat JSON(L), e.g.",
        f"chatglm-ft train --model {model} --data data/alpaca_zh/ --output-dir runs/alpaca-zh --learning-rate 2e-4 \\",
        "    --num-train-epochs 1 --per-device-train-batch-size 4 --gradient-accumulation-steps 8",
    ]
