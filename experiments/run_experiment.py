"""The experiment of issue 5: does a LoRA fine-tune answer better in its domain, and what does it cost elsewhere?

  (a) base: a small ChatGLM-architecture model (8 layers x 512 hidden, 8 heads, inner 2048, the real
      130k-piece tokenizer) trained from random init (full fine-tuning) on Alpaca English + Chinese
      for a time budget (150 s on an H200);
  (b) LoRA (r=8, alpha=32, query_key_value, as in the seed) on the HC3 psychology training split (60 s);
  (c) base vs LoRA on held-out HC3 psychology and held-out Alpaca (Chinese and English, whose
      translations were never trained on either): BLEU-4, ROUGE-1/2/L, perplexity; charts,
      training curves, wall time and tokens/s.

    python3 experiments/run_experiment.py --tokenizer-dir .gpu/chatglm-6b --data-dir .gpu/data --out $OUT/experiment
    python3 experiments/run_experiment.py --quick      # the whole pipeline on the CPU in a minute or two

Step counts come from a short timing probe of each phase unless --base-steps / --lora-steps fix them
(results.json records the counts used, so a rerun with them repeats the run).
Everything lands in --out: base/ (model), lora/ (adapter), eval_<dataset>/ (the `chatglm-ft eval`
outputs), chart.png, curves.png, results.json and summary.md.

Two stages: the first trains, generates and measures perplexity (GPU); the second scores BLEU/ROUGE
and draws the charts (CPU, needs the `eval` extra: jieba, nltk, rouge-chinese, matplotlib). It runs
right after the first where those are installed; elsewhere run it later with `--finish OUT`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a plain checkout too

import torch  # noqa: E402

from chatglm_ft.api import build_model, load, resolve_device  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.data import Record, load_records, split_validation, tokenize_records  # noqa: E402
from chatglm_ft.eval_report import markdown_table, write_chart, write_outputs  # noqa: E402
from chatglm_ft.evaluate import BASE, Variant, evaluate, missing_eval_modules  # noqa: E402
from chatglm_ft.generate import GenerationConfig  # noqa: E402
from chatglm_ft.options import DecodeOptions  # noqa: E402
from chatglm_ft.tokenizer import ChatGLMTokenizer  # noqa: E402
from chatglm_ft.train import TrainConfig, train  # noqa: E402

TEMPLATE = "alpaca"  # the seed's format: "Instruction: ...\nAnswer: "; HC3 questions become the instruction
LORA = "lora"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; FULL is the GPU experiment, QUICK checks the pipeline on a CPU."""
    layers: int
    hidden: int
    heads: int
    inner: int
    base_seconds: float  # training budget; the step count comes from a timing probe
    lora_seconds: float
    base_batch: int
    lora_batch: int
    base_lr: float
    lora_lr: float
    base_warmup: int
    lora_warmup: int
    lora_max_epochs: float  # HC3 train is ~1k records: an upper bound on the budget's steps
    max_source_length: int
    max_target_length: int
    eval_size: int  # records per held-out set
    lora_val_size: int  # HC3 training records held back for the LoRA eval-loss curve
    min_steps: int  # whatever the probe says: LoRA must move away from its zero start
    max_new_tokens: int
    eval_batch: int
    probe_steps: int
    alpaca_subset: int | None = None  # train on this many Alpaca records per language (quick mode)


FULL = Plan(layers=8, hidden=512, heads=8, inner=2048, base_seconds=150, lora_seconds=60, base_batch=64,
            lora_batch=16, base_lr=6e-4, lora_lr=1e-3, base_warmup=100, lora_warmup=20, lora_max_epochs=10,
            max_source_length=96, max_target_length=160, eval_size=100, lora_val_size=50, min_steps=50, max_new_tokens=128,
            eval_batch=64, probe_steps=20)
QUICK = Plan(layers=2, hidden=64, heads=4, inner=256, base_seconds=10, lora_seconds=5, base_batch=8, lora_batch=8,
             base_lr=2e-3, lora_lr=2e-3, base_warmup=0, lora_warmup=0, lora_max_epochs=10, max_source_length=48,
             max_target_length=48, eval_size=6, lora_val_size=8, min_steps=3, max_new_tokens=16, eval_batch=8, probe_steps=3,
             alpaca_subset=600)


def log(message: str) -> None:
    print(f"[experiment] {message}", file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------------------
_SOURCE = re.compile(r"(?P<file>[^/\\]+):\d+ \[(?P<index>\d+)\]$")
_ALPACA_FILE = re.compile(r"alpaca_data-(?P<start>\d+)-\d+\.json")
ZH_PART_OFFSETS = {"zh-data-part-00.json": 0, "zh-data-part-01.json": 9994}  # shared/data/README.md


def alpaca_index(record: Record) -> int:
    """Index of a record in the original 52,002-record Alpaca list (Chinese records: the one they translate)."""
    m = _SOURCE.search(record.source)
    if not m:
        raise SystemExit(f"unexpected Alpaca record source {record.source!r}: is --data-dir laid out as shared/data?")
    name, index = m["file"], int(m["index"])
    if name in ZH_PART_OFFSETS:
        return ZH_PART_OFFSETS[name] + index
    start = _ALPACA_FILE.match(name)
    if not start:
        raise SystemExit(f"unexpected Alpaca file name {name!r}")
    return int(start["start"]) + index


def load_data(data_dir: Path, plan: Plan, seed: int) -> dict[str, list[Record]]:
    """Training sets and held-out sets; an Alpaca item held out in one language is not trained on in the other."""
    sets = {}
    for name in ("alpaca_en", "alpaca_zh", "hc3_psychology_zh"):
        records, report = load_records(data_dir / name, on_bad_row="skip")
        log(f"{name}: {report.summary().splitlines()[0]}")
        sets[name] = records
    rng = random.Random(seed)
    held_en = rng.sample(sets["alpaca_en"], plan.eval_size)
    held_zh = rng.sample(sets["alpaca_zh"], plan.eval_size)
    held = {alpaca_index(r) for r in held_en + held_zh}
    train_en = [r for r in sets["alpaca_en"] if alpaca_index(r) not in held]
    train_zh = [r for r in sets["alpaca_zh"] if alpaca_index(r) not in held]
    if plan.alpaca_subset:
        train_en, train_zh = rng.sample(train_en, plan.alpaca_subset), rng.sample(train_zh, plan.alpaca_subset)
    psych_train, psych_test = split_validation(sets["hc3_psychology_zh"], val_size=0.1, seed=seed)
    if plan.eval_size < len(psych_test):
        psych_test = rng.sample(psych_test, plan.eval_size)
    return {"base_train": train_en + train_zh, "lora_train": psych_train, "psychology": psych_test,
            "alpaca_zh": held_zh, "alpaca_en": held_en}


# -- training -----------------------------------------------------------------------------------------
def small_config(tokenizer_dir: Path, plan: Plan) -> ChatGLMConfig:
    """The real checkpoint's config (vocabulary, special ids) with the small sizes."""
    return dataclasses.replace(ChatGLMConfig.from_dir(tokenizer_dir), num_layers=plan.layers, hidden_size=plan.hidden,
                               num_attention_heads=plan.heads, inner_hidden_size=plan.inner, torch_dtype="float32")


def fresh_model(config: ChatGLMConfig, device: torch.device, seed: int):
    """Random init as GPT-style pretraining does it: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    torch.manual_seed(seed)
    model = build_model(config, dtype=torch.float32, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.train()


def train_config(out: Path, plan: Plan, *, lora: bool, steps: int, device: str, seed: int, val: int = 0) -> TrainConfig:
    return TrainConfig(
        output_dir=str(out), template=TEMPLATE, finetuning_type="lora" if lora else "full",
        lora_r=8, lora_alpha=32, lora_dropout=0.1, lora_target=["query_key_value"], dtype="auto", device=device,
        max_steps=steps, per_device_train_batch_size=plan.lora_batch if lora else plan.base_batch,
        per_device_eval_batch_size=plan.eval_batch, gradient_accumulation_steps=1,
        learning_rate=plan.lora_lr if lora else plan.base_lr, warmup_steps=plan.lora_warmup if lora else plan.base_warmup,
        weight_decay=0.01 if lora else 0.1, logging_steps=10, save_steps=0,
        eval_steps=max(1, steps // 10) if val else 0, seed=seed, max_source_length=plan.max_source_length,
        max_target_length=plan.max_target_length, val_size=val, progress=True, report_to=["jsonl"],
    )


def reset_peak_memory(device: torch.device) -> None:
    """So each phase reports its own peak, not the probe's or the previous phase's."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def steps_for(seconds: float, probe, examples, batch: int, minimum: int) -> int:
    """Steps that fit `seconds`, from a probe's tokens/s (measured after its first step) and the mean example length."""
    mean_tokens = sum(len(e) for e in examples) / len(examples)
    return max(minimum, int(seconds * probe.tokens_per_second / (batch * mean_tokens)))


def train_base(args, plan: Plan, config: ChatGLMConfig, tokenizer, records, device) -> tuple:
    examples = tokenize_records(records, tokenizer, template=TEMPLATE, max_source_length=plan.max_source_length,
                                max_target_length=plan.max_target_length)
    steps = args.base_steps
    probe = None
    if not steps:
        with tempfile.TemporaryDirectory() as tmp:
            probe = train(train_config(Path(tmp), plan, lora=False, steps=plan.probe_steps, device=args.device, seed=args.seed),
                          model=fresh_model(config, device, args.seed), tokenizer=tokenizer, examples=examples)
        steps = steps_for(plan.base_seconds, probe, examples, plan.base_batch, plan.min_steps)
        log(f"base probe: {probe.tokens_per_second:,.0f} tokens/s -> {steps} steps for {plan.base_seconds:.0f}s")
    reset_peak_memory(device)
    result = train(train_config(args.work / "base", plan, lora=False, steps=steps, device=args.device, seed=args.seed),
                   model=fresh_model(config, device, args.seed), tokenizer=tokenizer, examples=examples)
    return result, probe


def train_lora(args, plan: Plan, base_dir: Path, records, device) -> tuple:
    model, tokenizer = load(base_dir, dtype="float32", device=device)
    examples = tokenize_records(records, tokenizer, template=TEMPLATE, max_source_length=plan.max_source_length,
                                max_target_length=plan.max_target_length)
    steps = args.lora_steps
    probe = None
    epochs_cap = int(plan.lora_max_epochs * (len(examples) - plan.lora_val_size) / plan.lora_batch)
    if not steps:
        with tempfile.TemporaryDirectory() as tmp:
            probe_model, _ = load(base_dir, dtype="float32", device=device)
            probe = train(train_config(Path(tmp), plan, lora=True, steps=plan.probe_steps, device=args.device, seed=args.seed),
                          model=probe_model, tokenizer=tokenizer, examples=examples)
            del probe_model
        steps = min(steps_for(plan.lora_seconds, probe, examples, plan.lora_batch, plan.min_steps), epochs_cap)
        log(f"LoRA probe: {probe.tokens_per_second:,.0f} tokens/s -> {steps} steps"
            f" (budget {plan.lora_seconds:.0f}s, at most {plan.lora_max_epochs:g} epochs = {epochs_cap} steps)")
    reset_peak_memory(device)
    result = train(train_config(args.work / LORA, plan, lora=True, steps=steps, device=args.device, seed=args.seed,
                                val=plan.lora_val_size),
                   model=model, tokenizer=tokenizer, examples=examples)
    return result, probe


# -- reporting ----------------------------------------------------------------------------------------
EVAL_SETS = ("psychology", "alpaca_zh", "alpaca_en")


def write_curves(path: Path, training: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, phase, title in ((axes[0], "base", "(a) base: full training from random init on Alpaca en+zh"),
                             (axes[1], "lora", "(b) LoRA on HC3 psychology")):
        t = training[phase]
        steps, losses = zip(*t["losses"]) if t["losses"] else ((), ())
        ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=0.8, label="train loss (per step)")
        k = max(1, len(losses) // 50)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="C0", label=f"train loss ({k}-step mean)")
        if t["eval_losses"]:
            es, el = zip(*t["eval_losses"])
            ax.plot(es, el, "o-", color="C1", label="held-back loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy per target token")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_summary(result, probe) -> dict:
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "tokens_per_second": round(result.tokens_per_second),
            "final_loss": round(result.final_loss, 4), "losses": result.losses, "eval_losses": result.eval_losses,
            "peak_memory_gb": round(result.peak_memory_bytes / 2**30, 2) if result.peak_memory_bytes else None,
            "probe_tokens_per_second": round(probe.tokens_per_second) if probe else None}


def render_summary(r: dict) -> str:
    lines = [
        "# Experiment: base vs LoRA (issue 5)", "",
        f"Command: `{r['command']}`", "",
        f"Hardware: {r['hardware']}; torch {r['torch']}. Wall time: {r['wall_seconds']:.0f}s for training and"
        " generation (" + ", ".join(f"{k} {v:.0f}s" for k, v in r["phase_seconds"].items()) + ").", "",
        f"Model: {r['model']['layers']} layers x {r['model']['hidden']} hidden, {r['model']['heads']} heads, inner "
        f"{r['model']['inner']}, vocabulary {r['model']['vocab']:,} (real ChatGLM-6B tokenizer), "
        f"{r['model']['parameters'] / 1e6:.1f}M parameters. Template `{TEMPLATE}`, prompt <= "
        f"{r['plan']['max_source_length']} + answer <= {r['plan']['max_target_length']} tokens.", "",
        "## Training", "",
        "| phase | data | steps | seconds | tokens/s | final train loss | peak GPU memory |", "|---|---|---|---|---|---|---|",
    ]
    for phase, key in (("base (full, from scratch)", "base"), ("LoRA r=8 qkv", "lora")):
        t = r["training"][key]
        memory = f"{t['peak_memory_gb']} GB" if t["peak_memory_gb"] else "-"
        lines.append(f"| {phase} | {r['data'][key + '_train']:,} records | {t['steps']} | {t['seconds']} | "
                     f"{t['tokens_per_second']:,} | {t['final_loss']} | {memory} |")
    lines += ["", "![training curves](curves.png)", "", "## Evaluation (held-out)", "",
              f"Greedy, {r['plan']['max_new_tokens']} new tokens at most, up to {r['plan']['eval_size']} records per set. "
              "BLEU-4 / ROUGE F1 x100 on jieba words (Chinese) or whitespace words (English); "
              "char BLEU-4 is the official ChatGLM BLEU (characters). Perplexity of the reference answers "
              "(all human answers for HC3).", "",
              "| dataset | variant | BLEU-4 | char BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | perplexity | gen tokens/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for dataset, variants in r["eval"].items():
        for name, s in variants.items():
            lines.append(f"| {dataset} | {name} | {s['word']['bleu-4']:.2f} | {s['char']['bleu-4']:.2f} | "
                         f"{s['word']['rouge-1']:.2f} | {s['word']['rouge-2']:.2f} | {s['word']['rouge-l']:.2f} | "
                         f"{s['perplexity']:.2f} | {s['generation']['tokens_per_second']:.0f} |")
    lines += ["", "Change LoRA - base (perplexity as a ratio):", "",
              "| dataset | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | perplexity |", "|---|---|---|---|---|---|"]
    for dataset, variants in r["eval"].items():
        b, l = variants[BASE], variants[LORA]
        d = {m: l["word"][m] - b["word"][m] for m in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")}
        lines.append(f"| {dataset} | {d['bleu-4']:+.2f} | {d['rouge-1']:+.2f} | {d['rouge-2']:+.2f} | {d['rouge-l']:+.2f} | "
                     f"x{l['perplexity'] / b['perplexity']:.3f} |")
    lines += ["", "![scores](chart.png)", "", "Per-dataset reports, predictions and metrics: "
              + ", ".join(f"`eval_{d}/`" for d in r["eval"]), "", f"Repeat with the same step counts: `{r['rerun']}`", ""]
    return "\n".join(lines)


def finish(out: Path) -> None:
    """Stage 2 (CPU): BLEU/ROUGE of the saved predictions, charts, curves and summary.md."""
    from chatglm_ft.eval_report import read_outputs
    from chatglm_ft.evaluate import score_variant

    began = time.perf_counter()
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    evaluations = {}
    for dataset in EVAL_SETS:
        variants, meta = read_outputs(out / f"eval_{dataset}")
        for v in variants:
            if not v.scored:
                score_variant(v)
        write_outputs(out / f"eval_{dataset}", variants, dataset=meta["dataset"], settings=meta["settings"], data=meta["data"])
        evaluations[dataset] = {v.name: v.summary for v in variants}
        print(f"\n{dataset}\n" + markdown_table(evaluations[dataset]), flush=True)
    write_chart(out / "chart.png", {f"{d} (held-out)": s for d, s in evaluations.items()},
                title="base vs LoRA (HC3 psychology): word-level scores x100 and reference perplexity")
    write_curves(out / "curves.png", results["training"])
    results["eval"] = evaluations
    results["phase_seconds"]["score, charts"] = round(time.perf_counter() - began, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n")
    (out / "summary.md").write_text(render_summary(results), encoding="utf-8")
    print("\n" + (out / "summary.md").read_text(encoding="utf-8"), flush=True)


def without_step_flags(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--base-steps", "--lora-steps"):
            skip = True
        elif not arg.startswith(("--base-steps=", "--lora-steps=")):
            kept.append(arg)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-dir", type=Path, default=REPO.parent / "shared" / "models" / "chatglm-6b",
                    help="directory with ice_text.model + config.json of ChatGLM-6B (default: ../shared/models/chatglm-6b)")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                    help="directory with alpaca_en/, alpaca_zh/, hc3_psychology_zh/ (default: ../shared/data)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: $OUT/experiment or runs/experiment)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the trained weights go (default: a temporary directory, removed at the end;"
                         " --out only receives the LoRA adapter, logs and reports)")
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps on the CPU: checks the pipeline")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    ap.add_argument("--base-steps", type=int, default=None, help="fix the base step count (skips its timing probe)")
    ap.add_argument("--lora-steps", type=int, default=None, help="fix the LoRA step count (skips its timing probe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finish", type=Path, default=None, metavar="OUT",
                    help="only stage 2 on a finished run's output: score, charts, summary (where the eval extra is installed)")
    args = ap.parse_args()
    if args.finish:
        finish(args.finish)
        return
    began = time.perf_counter()
    plan = QUICK if args.quick else FULL
    args.device = args.device or ("cpu" if args.quick else "cuda")
    args.out = args.out or (Path(os.environ["OUT"]) / "experiment" if os.environ.get("OUT") else REPO / "runs" / "experiment")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    temporary = args.work_dir is None
    args.work = args.work_dir or Path(tempfile.mkdtemp(prefix="chatglm-experiment-"))
    device = resolve_device(args.device)
    missing = missing_eval_modules()
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        timings[name] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()

    data = load_data(args.data_dir, plan, args.seed)
    log(", ".join(f"{k}: {len(v):,}" for k, v in data.items()))
    tokenizer = ChatGLMTokenizer.from_dir(args.tokenizer_dir)
    config = small_config(args.tokenizer_dir, plan)
    lap("data")

    log("(a) base model: full training from random init on Alpaca en+zh")
    base, base_probe = train_base(args, plan, config, tokenizer, data["base_train"], device)
    lap("base (tokenize, probe, train, save)")
    log("(b) LoRA on HC3 psychology")
    lora, lora_probe = train_lora(args, plan, base.model_dir, data["lora_train"], device)
    lap("lora (load, tokenize, probe, train, save)")

    log("(c) evaluation: base vs LoRA on the held-out sets")
    # float32: the model is small, and its activations were only ever checked under bfloat16 autocast
    model, tokenizer = load(base.model_dir, dtype="float32", device=device)
    # Eager decoding: for a model this small, compiling and capturing each batch shape and adapter
    # state would cost more time than it saves.
    model.decode_options = DecodeOptions(compile="off")
    variants = [Variant(BASE), Variant(LORA, lora.adapter_dir)]
    gen = GenerationConfig(max_new_tokens=plan.max_new_tokens)
    for dataset in EVAL_SETS:
        results, _ = evaluate(model=model, tokenizer=tokenizer, records=data[dataset], variants=variants, template=TEMPLATE,
                              gen=gen, batch_size=plan.eval_batch, max_source_length=plan.max_source_length,
                              max_target_length=plan.max_target_length, score=False)
        write_outputs(args.out / f"eval_{dataset}", results, dataset=f"{dataset} (held-out)",
                      settings={"template": TEMPLATE, "max_new_tokens": plan.max_new_tokens, "greedy": True},
                      data={"records": len(data[dataset])})
    lap("generate + perplexity (3 sets x 2 variants)")
    shutil.copytree(lora.adapter_dir, args.out / "lora_adapter")  # small; the 0.6 GB base model stays in --work-dir
    for phase in ("base", LORA):
        shutil.copy(args.work / phase / "train_log.jsonl", args.out / f"{phase}_train_log.jsonl")
    if temporary:
        shutil.rmtree(args.work)

    results = {
        "command": "python3 experiments/run_experiment.py " + " ".join(sys.argv[1:]),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "wall_seconds": round(time.perf_counter() - began, 1), "phase_seconds": timings,
        "plan": dataclasses.asdict(plan),
        "model": {"layers": plan.layers, "hidden": plan.hidden, "heads": plan.heads, "inner": plan.inner,
                  "vocab": config.vocab_size, "parameters": model.num_parameters()},
        "data": {k: len(v) for k, v in data.items()},
        "training": {"base": train_summary(base, base_probe), "lora": train_summary(lora, lora_probe)},
        "rerun": " ".join(["python3 experiments/run_experiment.py", *without_step_flags(sys.argv[1:]),
                           f"--base-steps {base.steps} --lora-steps {lora.steps}"]),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n")
    log(f"training and generation done in {time.perf_counter() - began:.0f}s")
    if missing:
        log(f"BLEU/ROUGE and charts need {', '.join(missing)} (pip install 'chatglm-ft[eval]'), missing here: the"
            f" predictions are saved; score them where they are installed with"
            f" `python3 experiments/run_experiment.py --finish {args.out}`")
        return
    finish(args.out)
    log(f"done in {time.perf_counter() - began:.0f}s; outputs in {args.out}")


if __name__ == "__main__":
    main()
