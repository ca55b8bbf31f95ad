"""LoRA training on two GPUs with DDP (issue 8): full-size ChatGLM-6B with random weights, LoRA r=8 on
query_key_value (dropout 0), 1024-token sequences, bfloat16 base and autocast, per-GPU batch 4 without
gradient checkpointing (config A of gpu/train_bench.py), trained through `chatglm_ft.train.train`:

  1gpu      1 GPU,  batch 4                      -> tokens/s and peak memory of one GPU
  2gpu      torchrun --nproc_per_node 2, batch 4 -> tokens/s (both GPUs together), peak memory per GPU
  1gpu_acc  1 GPU,  batch 4 x 2 accumulation     -> the same global batch of 8 as 2gpu, for the loss curves

Scaling = tokens/s of 2gpu / tokens/s of 1gpu (goal >= 1.8x). Every run trains on the same 8 random
sequences of exactly 1024 tokens (`random_data.random_examples`, no padding) from the same random model
(`bench.random_model`, seed 0 on every rank) and the same fresh adapter (train() seeds it), so with a
global batch of 8 every step of 2gpu and 1gpu_acc sees the same examples, split the same way into
4 + 4: their loss curves must agree (max |difference| below TOLERANCE). tokens/s counts the steps after
the first `--warmup` steps; peak memory is torch.cuda.max_memory_allocated of each process (weights
included: 12.35 GB). FSDP (`chatglm-ft train --fsdp`, full fine-tuning sharded over the GPUs) is another
setup and is not measured here.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): set below before torch loads, and passed in every child's environment.
Each run is its own process (torchrun for 2gpu) with a time limit: a failing run prints its error
and the others still run.

    python3 gpu/ddp_bench.py [--steps 12] [--warmup 3]
    python3 gpu/ddp_bench.py --device cpu --tiny     # the plumbing on a CPU: tiny model, gloo, 2 processes

Writes $OUT/ddp_bench.json when $OUT is set; prints a table last.
"""
from __future__ import annotations

import os

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
INHERITED = {name: os.environ.get(name) for name in MULTICAST_OFF}  # what the launcher passed (proof in the JSON)
os.environ.update(MULTICAST_OFF)  # before torch and NCCL load

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatglm_ft.bench import random_model  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.random_data import random_examples  # noqa: E402
from chatglm_ft.train import LOG_FILE, TrainConfig, train  # noqa: E402

EXAMPLES = 8  # one global batch of the 2-GPU run: every step of 2gpu and 1gpu_acc trains on all of them
PER_GPU_BATCH = 4
SCALING_GOAL = 1.8
TOLERANCE = {"cuda": 1e-2, "cpu": 1e-5}  # max |loss difference|: bfloat16 autocast on GPU, float32 on CPU
RUNS = [  # name, processes, gradient accumulation steps, limit in seconds
    ("1gpu", 1, 1, 150),
    ("2gpu", 2, 1, 200),
    ("1gpu_acc", 1, 2, 150),
]
GB = 1e9


# -- one run (a process, or every rank under torchrun) --------------------------------------------------
def steady_tokens_per_second(log: Path, tokens_per_step: int, warmup: int) -> float | None:
    """tokens/s over the steps after `warmup`, from the log's running tokens/s.

    train() logs, every `logging_steps` (= warmup), tokens/s counted from the end of step 1; so step k
    ended (k - 1) * tokens_per_step / speed_k seconds after step 1, and the difference of two such
    times is the window's duration (the log's elapsed_s is rounded to 10 ms, this is not).
    """
    speed = {r["step"]: r["tokens_per_second"] for r in map(json.loads, log.read_text().splitlines())
             if "tokens_per_second" in r}
    last = max(speed, default=0)
    if warmup < 2 or warmup not in speed or last <= warmup:
        return None

    def since_first(step: int) -> float:
        return (step - 1) * tokens_per_step / speed[step]

    return (last - warmup) * tokens_per_step / (since_first(last) - since_first(warmup))


def worker(args: argparse.Namespace) -> None:
    import peft

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = ChatGLMConfig.tiny() if args.tiny else ChatGLMConfig.full()
    started = time.perf_counter()
    # Same seed on every rank: the same weights everywhere (DDP also broadcasts rank 0's at start).
    model = random_model(config, dtype=torch.bfloat16 if cuda else torch.float32, device=device, seed=0)
    build_s = time.perf_counter() - started
    data = random_examples(EXAMPLES, config=config, seq_len=args.seq, prompt_tokens=min(62, args.seq // 8))
    run_dir = Path(args.run_dir)
    settings = TrainConfig(
        output_dir=str(run_dir / "train"), device=args.device, seed=42, max_steps=args.steps,
        per_device_train_batch_size=PER_GPU_BATCH, gradient_accumulation_steps=args.accumulation,
        learning_rate=args.lr, warmup_steps=0, lora_r=8, lora_alpha=32, lora_dropout=0.0,
        lora_target=["query_key_value"], gradient_checkpointing=False,
        logging_steps=args.warmup, save_steps=0, eval_steps=0, progress=False, report_to=["jsonl"],
        max_source_length=args.seq, max_target_length=args.seq,
    )
    result = train(settings, model=model, examples=data)
    tokens_per_step = PER_GPU_BATCH * args.accumulation * world * args.seq  # every example is exactly seq tokens
    record = {
        "rank": rank, "world": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "peft": peft.__version__, "multicast_env_inherited": INHERITED,
        "build_s": round(build_s, 2), "seconds": round(result.seconds, 2), "steps": result.steps,
        "losses": [v for _, v in result.losses],
        "tokens_per_second_after_first_step": round(result.tokens_per_second, 1),
        "peak_gb": round(result.peak_memory_bytes / GB, 2) if cuda else None,
        "reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 2) if cuda else None,
    }
    if rank == 0:
        steady = steady_tokens_per_second(run_dir / "train" / LOG_FILE, tokens_per_step, args.warmup)
        record["tokens_per_second"] = round(steady if steady is not None else result.tokens_per_second, 1)
    (run_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


# -- the driver -------------------------------------------------------------------------------------------
def child_env(device: str) -> dict[str, str]:
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # two processes on a small CPU: no oversubscription
    return env


def launch(name: str, processes: int, accumulation: int, limit: float, args: argparse.Namespace, root: Path) -> dict:
    """Run one configuration in its own process(es); returns the merged per-rank records, or raises."""
    run_dir = root / name
    run_dir.mkdir()
    worker_args = [str(Path(__file__).resolve()), "--worker", "--run-dir", str(run_dir), "--device", args.device,
                   "--accumulation", str(accumulation), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--seq", str(args.seq), "--lr", str(args.lr)] + (["--tiny"] if args.tiny else [])
    launcher = []
    if processes > 1:  # `torchrun`, through this interpreter
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *launcher, *worker_args]
    log = run_dir / "output.log"
    started = time.perf_counter()
    with log.open("w") as out:
        # Own session: on a timeout the whole group (torchrun and its workers) is stopped.
        proc = subprocess.Popen(command, env=child_env(args.device), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise RuntimeError(f"{name}: stopped after {limit:.0f} s\n{tail(log)}")
    if code != 0:
        raise RuntimeError(f"{name}: exit code {code}\n{tail(log)}")
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(processes)]
    first = ranks[0]
    tokens_per_second = first["tokens_per_second"]
    return {
        "processes": processes, "per_gpu_batch": PER_GPU_BATCH, "accumulation": accumulation,
        "global_batch": PER_GPU_BATCH * processes * accumulation, "seq": args.seq, "steps": first["steps"],
        "tokens_per_second": tokens_per_second, "tokens_per_second_per_gpu": round(tokens_per_second / processes, 1),
        "tokens_per_second_after_first_step": first["tokens_per_second_after_first_step"],
        "peak_gb_per_gpu": [r["peak_gb"] for r in ranks], "reserved_gb_per_gpu": [r["reserved_gb"] for r in ranks],
        "losses": first["losses"], "ranks_agree": all(r["losses"] == first["losses"] for r in ranks),
        "build_s": first["build_s"], "train_s": first["seconds"], "wall_s": round(time.perf_counter() - started, 1),
        "device": first["device"], "torch": first["torch"], "peft": first["peft"],
        "multicast_env_inherited": [r["multicast_env_inherited"] for r in ranks],
    }


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def summarize(results: dict, device: str) -> None:
    runs = results["runs"]
    one, two, acc = runs.get("1gpu"), runs.get("2gpu"), runs.get("1gpu_acc")
    if one and two:
        factor = two["tokens_per_second"] / one["tokens_per_second"]
        results["scaling"] = {"tokens_per_second_1gpu": one["tokens_per_second"],
                              "tokens_per_second_2gpu": two["tokens_per_second"], "factor": round(factor, 3),
                              "goal": SCALING_GOAL, "meets_goal": factor >= SCALING_GOAL}
    if two and acc:
        pairs = list(zip(two["losses"], acc["losses"]))
        diff = max(abs(a - b) for a, b in pairs) if pairs else float("nan")
        results["loss_curves"] = {
            "global_batch": two["global_batch"], "two_gpus": two["losses"], "one_gpu_accumulation": acc["losses"],
            "max_abs_diff": diff, "tolerance": TOLERANCE[device],
            "agree": len(two["losses"]) == len(acc["losses"]) > 0 and diff <= TOLERANCE[device],
            "loss_falls": two["losses"][-1] < two["losses"][0] if two["losses"] else False,
        }


def print_table(results: dict) -> None:
    for name, error in results["errors"].items():
        print(f"--- {name} failed:\n{error}", file=sys.stderr)
    unit = "GPU" if results["settings"]["device"] == "cuda" else "proc"
    print(f"{'run':9} {unit + 's':>5} {'batch':>5} {'accum':>5} {'global':>6} {'tokens/s':>9} "
          f"{'per ' + unit:>9} {'peak GB per ' + unit:>16} {'loss first->last':>18}")
    for name, run in results["runs"].items():
        peaks = "/".join(f"{p}" for p in run["peak_gb_per_gpu"]) if run["peak_gb_per_gpu"][0] is not None else "-"
        losses = run["losses"]
        print(f"{name:9} {run['processes']:>5} {run['per_gpu_batch']:>5} {run['accumulation']:>5} "
              f"{run['global_batch']:>6} {run['tokens_per_second']:>9,.0f} {run['tokens_per_second_per_gpu']:>9,.0f} "
              f"{peaks:>16} {losses[0]:>8.4f}->{losses[-1]:<8.4f}")
    scaling = results.get("scaling")
    if scaling:
        print(f"scaling 2 {unit}s / 1 {unit}: {scaling['factor']:.2f}x (goal >= {SCALING_GOAL}x): "
              f"{'yes' if scaling['meets_goal'] else 'NO'}")
    curves = results.get("loss_curves")
    if curves:
        print(f"loss curves 2gpu vs 1gpu_acc (global batch {curves['global_batch']}, {len(curves['two_gpus'])} steps): "
              f"max |diff| {curves['max_abs_diff']:.2e} (tolerance {curves['tolerance']:g}): "
              f"{'agree' if curves['agree'] else 'DIFFER'}; loss falls: {'yes' if curves['loss_falls'] else 'NO'}")
    print("FSDP (train --fsdp, full fine-tuning sharded over the GPUs): not measured by this LoRA benchmark")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="ChatGLMConfig.tiny() (2 layers, hidden 64) instead of 6B")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; 6 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default 3; 2 with --tiny)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; 64 with --tiny)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; 1e-2 with --tiny)")
    ap.add_argument("--budget", type=float, default=330, help="seconds for all runs together")
    ap.add_argument("--only", default=",".join(name for name, *_ in RUNS), help="runs to do, comma-separated")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (6 if args.tiny else 12)
    args.warmup = args.warmup or (2 if args.tiny else 3)
    args.seq = args.seq or (64 if args.tiny else 1024)
    args.lr = args.lr or (1e-2 if args.tiny else 1e-3)
    if not 2 <= args.warmup < args.steps:
        ap.error("need 2 <= --warmup < --steps (step 1 is always left out)")
    if args.worker:
        worker(args)
        return

    started = time.perf_counter()
    results: dict = {
        "settings": {"device": args.device, "model": "ChatGLMConfig.tiny()" if args.tiny else "ChatGLM-6B (random)",
                     "seq": args.seq, "examples": EXAMPLES, "per_gpu_batch": PER_GPU_BATCH, "steps": args.steps,
                     "warmup_steps_excluded": args.warmup, "learning_rate": args.lr,
                     "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target": ["query_key_value"]},
                     "gradient_checkpointing": False, "multicast_env": MULTICAST_OFF},
        "runs": {}, "errors": {},
        "fsdp": "not offered: train() wraps the model in DDP only; the bfloat16 ChatGLM-6B (12.35 GB) fits one GPU",
    }
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    wanted = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="ddp_bench-") as tmp:
        for name, processes, accumulation, limit in RUNS:
            if name not in wanted:
                continue
            left = args.budget - (time.perf_counter() - started)
            if gpus is not None and gpus < processes:
                results["errors"][name] = f"needs {processes} GPUs, found {gpus}"
            elif left < 30:
                results["errors"][name] = f"skipped: {left:.0f} s of the {args.budget:.0f} s budget left"
            else:
                print(f"[{time.perf_counter() - started:5.0f} s] {name}: {processes} process(es), batch "
                      f"{PER_GPU_BATCH} x {accumulation} accumulation", file=sys.stderr, flush=True)
                try:
                    results["runs"][name] = launch(name, processes, accumulation, min(limit, left), args, Path(tmp))
                except Exception as e:  # one failed run must not cost the others
                    results["errors"][name] = f"{type(e).__name__}: {e}"[-4000:]
    summarize(results, args.device)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "ddp_bench.json").write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
