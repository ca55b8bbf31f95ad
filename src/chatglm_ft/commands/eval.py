"""`chatglm-ft eval`: BLEU-4 / ROUGE of generated answers and reference perplexity, base vs adapters."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .options import add_compile_arg, add_generation_args, add_model_args, apply_threads, configure_model, \
    generation_config, quantize_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a model and its adapters on a dataset (BLEU-4, ROUGE, perplexity)",
        description="Generate an answer for every record of --data (batched; greedy unless --do-sample) and score it "
                    "against the reference answer(s) with BLEU-4 and ROUGE-1/2/L (jieba words and characters for "
                    "Chinese, whitespace words for English), and measure the loss/perplexity of the references "
                    "under the model. Every --adapter (and 'base') is evaluated on the same records and compared "
                    "side by side. Writes metrics.json, predictions.jsonl, report.md and chart.png to --out.")
    add_model_args(p, adapter=False)
    p.add_argument("--adapter", action="append", default=None, metavar="DIR|base",
                   help="LoRA adapter or P-Tuning prefix directory to evaluate (repeatable); 'base' is the model without adapters "
                        "(default: base only)")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="evaluation data: JSON/JSONL file, directory or glob (repeatable); Alpaca, HC3, chat, ...")
    p.add_argument("--data-format", dest="data_format", default="auto",
                   choices=["auto", "alpaca", "chatglm-tuning", "hc3", "chat", "messages"],
                   help="data format, as for train (default: detected per file)")
    p.add_argument("--format", dest="data_format", help=argparse.SUPPRESS)  # the old name, kept working
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N records only")
    p.add_argument("--template", default="chatglm", choices=["chatglm", "alpaca"],
                   help="prompt template; use the one the adapter was trained with (default: chatglm)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default: 16)")
    p.add_argument("--max-source-length", type=int, default=512, help="prompt tokens kept, as in training")
    p.add_argument("--max-target-length", type=int, default=512, help="reference tokens scored for perplexity")
    add_generation_args(p, max_new_tokens=256, sample_default=False)
    add_compile_arg(p)
    p.add_argument("--do-sample", action="store_true",
                   help="sample instead of greedy decoding (temperature 0.95 unless --temperature; --seed fixes it)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..api import load, model_path
    from ..data import load_records
    from ..errors import ChatGLMError
    from ..eval_report import markdown_table, write_outputs
    from ..evaluate import evaluate, missing_eval_modules, parse_variants

    missing = missing_eval_modules()
    if missing:  # before minutes of generation, not after
        raise ChatGLMError(f"scoring needs {', '.join(missing)}: pip install 'chatglm-ft[eval]'")
    if args.limit is not None and args.limit < 1:
        raise ChatGLMError(f"--limit must be at least 1, not {args.limit}")
    if args.batch_size < 1:
        raise ChatGLMError(f"--batch-size must be at least 1, not {args.batch_size}")
    apply_threads(args)
    variants = parse_variants(args.adapter)
    gen = generation_config(args)
    if args.do_sample and not gen.do_sample:
        gen = replace(gen, do_sample=True, temperature=0.95)

    records, report = load_records(args.data, format=args.data_format, on_bad_row="skip")
    print(report.summary(), file=sys.stderr)
    if args.limit is not None:
        records = records[: args.limit]

    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, quantize=quantize_from_args(args))
    configure_model(model, args)
    results, no_reference = evaluate(
        model=model, tokenizer=tokenizer, records=records, variants=variants, template=args.template, gen=gen,
        batch_size=args.batch_size, max_source_length=args.max_source_length, max_target_length=args.max_target_length,
    )
    data = {
        "files": report.files, "rows": report.total_rows, "records": report.kept, "duplicates": report.duplicates,
        "bad_rows": len(report.bad_rows), "limit": args.limit, "evaluated": len(records) - no_reference,
        "no_reference": no_reference, "problems": [f"{source}: {reason}" for source, reason in report.bad_rows],
    }
    settings = {
        "model": str(model_path(args.model)), "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
        "quantize": args.quantize, "template": args.template, "batch_size": args.batch_size,
        "max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "seed": gen.seed,
        "max_source_length": args.max_source_length, "max_target_length": args.max_target_length,
    }
    dataset = ", ".join(report.files) if len(report.files) <= 2 else f"{len(report.files)} files"
    paths = write_outputs(args.out, results, dataset=dataset, settings=settings, data=data)

    print(markdown_table({r.name: r.summary for r in results}, view="word"))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0
