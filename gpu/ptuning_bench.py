"""P-Tuning v2 training on one GPU vs LoRA on the same machine: full-size ChatGLM-6B with random weights,
measured through `chatglm_ft.train.train` (the loop users run: optimizer, clipping, logging).

  lora-b4          LoRA r=8 on query_key_value, batch 4 x 1024 tokens, bfloat16 base (as gpu/train_bench.py A)
  ptuning-b4       P-Tuning pre_seq_len 128, same batch, bfloat16 base
  ptuning-proj-b4  the same with prefix_projection (a 0.9 B-parameter float32 MLP: much more memory)
  ptuning-int4     THUDM's small-GPU recipe: int4 base, pre_seq_len 128, batch 1 x accumulation 16,
                   64 prompt + 64 answer tokens (ADGEN's max_source/target_length); THUDM publishes about 7 GB
  qlora-int4       LoRA on the same int4 base with the same batch shape

tokens/s counts the tokens of the sequences (not the prefix) after the first step; peak is
torch.cuda.max_memory_allocated during the run, weights included. The int4 rows quantize the same
random model in place, so they run last.

    python3 gpu/ptuning_bench.py [--only lora-b4,ptuning-b4,ptuning-int4,qlora-int4] [--steps 10]

Writes $OUT/ptuning_bench.json when $OUT is set; prints a table last. About 3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chatglm_ft.bench import random_model  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.lora import remove_adapters  # noqa: E402
from chatglm_ft.ptuning import detach  # noqa: E402
from chatglm_ft.random_data import random_examples  # noqa: E402
from chatglm_ft.train import TrainConfig, train  # noqa: E402
from train_bench import save_and_report  # noqa: E402  (the training benches' common ending)

THUDM_INT4_GB = 7.0  # ChatGLM-6B ptuning README: INT4, batch 1 x accumulation 16, pre_seq_len 128 (6.7 GB "at least")
PLANS = {
    "lora-b4": dict(finetuning_type="lora", batch=4, seq=1024, accumulation=1, learning_rate=1e-3),
    "ptuning-b4": dict(finetuning_type="ptuning", batch=4, seq=1024, accumulation=1, learning_rate=2e-2),
    "ptuning-proj-b4": dict(finetuning_type="ptuning", projection=True, batch=4, seq=1024, accumulation=1,
                            learning_rate=2e-2),
    "ptuning-int4": dict(finetuning_type="ptuning", batch=1, seq=128, accumulation=16, learning_rate=2e-2, int4=True),
    "qlora-int4": dict(finetuning_type="lora", batch=1, seq=128, accumulation=16, learning_rate=1e-3, int4=True),
}


def run_plan(name: str, model, config: ChatGLMConfig, plan: dict, steps: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seq, batch, accumulation = plan["seq"], plan["batch"], plan["accumulation"]
    data = random_examples(max(8, batch * accumulation), config=config, seq_len=seq, prompt_tokens=min(62, seq // 2 - 2))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out, finetuning_type=plan["finetuning_type"], pre_seq_len=128,
                          prefix_projection=plan.get("projection", False), max_steps=steps,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                          learning_rate=plan["learning_rate"], warmup_steps=0, logging_steps=steps, save_steps=0,
                          eval_steps=0, progress=False, report_to=["none"], max_source_length=seq,
                          max_target_length=seq)
        try:
            result = train(cfg, model=model, examples=data)
        finally:
            remove_adapters(model)  # the next plan starts from the plain base again
            detach(model)
    losses = [v for _, v in result.losses]
    return {
        "config": name, "finetuning_type": plan["finetuning_type"], "base": "int4" if plan.get("int4") else "bfloat16",
        "batch": batch, "accumulation": accumulation, "seq": seq, "steps": result.steps,
        "tokens_per_second": round(result.tokens_per_second),
        "peak_gb": round(result.peak_memory_bytes / 1e9, 2), "first_loss": losses[0], "last_loss": losses[-1],
        "losses_finite": all(v == v and abs(v) != float("inf") for v in losses),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="lora-b4,ptuning-b4,ptuning-proj-b4,ptuning-int4,qlora-int4")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    wanted = [name for name in PLANS if name in args.only.split(",")]
    started = time.perf_counter()
    config = ChatGLMConfig.full()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "errors": {},
                     "thudm_int4_gb": THUDM_INT4_GB}
    model = random_model(config, dtype=torch.bfloat16, device=torch.device("cuda"))  # N(0, 0.02), lm_head tied
    model.requires_grad_(False)
    quantized = False
    for name in wanted:
        plan = PLANS[name]
        steps = args.steps if plan["accumulation"] == 1 else max(3, args.steps // 3)
        try:
            if plan.get("int4") and not quantized:
                from chatglm_ft.quantize import quantize_model

                quantize_model(model, "int4")  # in place: the float layer weights are dropped
                quantized = True
                gc.collect()
                torch.cuda.empty_cache()
                results["int4_weights_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
            results["rows"].append(run_plan(name, model, config, plan, steps))
        except Exception:
            results["errors"][name] = traceback.format_exc()[-3000:]
    results["seconds"] = round(time.perf_counter() - started, 1)

    save_and_report(results, "ptuning_bench.json")
    print(f"{'config':16} {'base':>8} {'batch':>5} {'accum':>5} {'seq':>5} {'tokens/s':>9} {'peak GB':>8} "
          f"{'loss first->last':>18}")
    for r in results["rows"]:
        print(f"{r['config']:16} {r['base']:>8} {r['batch']:>5} {r['accumulation']:>5} {r['seq']:>5} "
              f"{r['tokens_per_second']:>9,} {r['peak_gb']:>8} {r['first_loss']:>8.4f}->{r['last_loss']:<8.4f}")
    print(f"THUDM's published P-Tuning INT4 figure (batch 1 x accumulation 16): about {THUDM_INT4_GB} GB")


if __name__ == "__main__":
    main()
