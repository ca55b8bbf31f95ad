"""A/B speed check of two source trees on one machine, interleaved: `chatglm-ft bench --random-weights`
(float16, int8, int4; batch-1 decode and prefill) and the serving engine (`gpu/serve_bench.py`, the
default decode mode, 1 and 128 streams), each run once per tree in its own process, BEFORE then AFTER.

    BEFORE_SRC=/path/to/old/src AFTER_SRC=src python3 gpu/ab_bench.py [--parts bench,serve]

Writes $OUT/ab_bench_<parts>.json (and each run's own JSON under $OUT/ab/) and prints a comparison table
last: after / before for every number, where >= 0.98 is "no regression" (2%). The scripts of THIS
checkout drive both trees (serve_bench.py imports the tree named by $CHATGLM_FT_SRC; bench is the
tree's own CLI), so a tree only needs the library's public entry points.

Time: each bench run compiles its decode step (about a minute on a fresh machine) and each engine
compiles three steps at start (about two minutes; inductor's disk cache is shared, but the two trees'
code differs, so each compiles). The full set is ~12-15 minutes: more than one 10-minute device
command, so run it as two commands on the same warm machine (`--parts bench`, then `--parts serve`);
each part stops starting runs when its budget ($AB_BUDGET_S, default 540 s) would be exceeded and
says what it skipped. To fit, the bench times prefill at 128 and 2048 tokens only (not 512) and the
serving answers are 128 tokens, as in serve_bench's own run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = float(os.environ.get("AB_BUDGET_S", 540))
STARTED = time.monotonic()
BENCH_CASES = {
    "float16": ["--dtype", "float16"],
    "int8": ["--dtype", "float16", "--quantize", "int8", "--quantize-embeddings"],
    "int4": ["--dtype", "float16", "--quantize", "int4", "--quantize-embeddings"],
}
# seconds a run needs before it is started (a compile included)
NEEDS = {"bench": 100, "serve": 200}


def elapsed() -> float:
    return time.monotonic() - STARTED


def run(name: str, command: list[str], src: Path, out: Path, timeout: float) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(src), "CHATGLM_FT_SRC": str(src), "PYTHONUNBUFFERED": "1"}
    print(f"[{elapsed():5.0f} s] {name}", flush=True)
    began = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {name}: timed out after {timeout:.0f} s", flush=True)
        return {"error": "timeout"}
    if proc.returncode != 0 or not out.exists():
        print(f"  {name}: failed (exit {proc.returncode})\n" + "\n".join(proc.stderr.strip().splitlines()[-25:]), flush=True)
        return {"error": proc.stderr[-2000:]}
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.monotonic() - began
    return result


def bench_numbers(report: dict) -> dict:
    decode = {d["name"]: d["tokens_per_second"] for d in report.get("decode", [])}
    prefill = {p["tokens"]: p["seconds"] for p in report.get("prefill", [])}
    longest = max(prefill, default=None)
    return {"decode short tok/s": decode.get("short context"), "decode 2k tok/s": decode.get("2k context"),
            f"prefill {longest} tok/s": longest / prefill[longest] if longest and prefill[longest] else None}


def serve_numbers(report: dict) -> dict:
    levels = (report.get("engine_default") or {}).get("levels", [])
    return {f"serve {lv['streams']} streams tok/s": lv["tokens_per_s"] for lv in levels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bench,serve", help="bench, serve or both (comma-separated)")
    parser.add_argument("--dtypes", default="float16,int8,int4")
    parser.add_argument("--smoke", action="store_true", help="the same runs on the tiny config on the CPU (seconds)")
    args = parser.parse_args()
    trees = {"before": Path(os.environ["BEFORE_SRC"]).resolve(), "after": Path(os.environ.get("AFTER_SRC", "src")).resolve()}
    for name, src in trees.items():
        if not (src / "chatglm_ft" / "__init__.py").exists():
            print(f"{name.upper()}_SRC={src} holds no chatglm_ft package", file=sys.stderr)
            return 2
    out_dir = Path(os.environ.get("OUT") or "/tmp") / "ab"
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    jobs = []  # (case, tree, command, output file, kind)
    if "bench" in parts:
        for dtype in args.dtypes.split(","):
            for tree in trees:
                out = out_dir / f"bench_{dtype}_{tree}.json"
                command = [sys.executable, "-m", "chatglm_ft", "bench", "--random-weights", "--json", "--out", str(out),
                           "--prefill-lengths", "128,2048", *BENCH_CASES[dtype]]
                if args.smoke:
                    command = [*command[:command.index("--prefill-lengths")], "--config", "tiny", "--device", "cpu",
                               "--prefill-lengths", "8,32", "--decode-tokens", "4",
                               *(a for a in BENCH_CASES[dtype] if a not in ("--dtype", "float16"))]
                jobs.append((f"bench {dtype}", tree, command, out, "bench"))
    if "serve" in parts:
        for tree in trees:
            out = out_dir / f"serve_{tree}.json"
            command = [sys.executable, str(REPO / "gpu" / "serve_bench.py"), "--engine-only", "--levels=1,128",
                       "--answer=128"] + (["--smoke"] if args.smoke else [])
            jobs.append(("serve", tree, command, out, "serve"))
    results: dict = {"trees": {k: str(v) for k, v in trees.items()}, "runs": {}, "skipped": []}
    for case, tree, command, out, kind in jobs:
        left = BUDGET_S - elapsed()
        if left < NEEDS[kind]:
            results["skipped"].append(f"{case} [{tree}]")
            print(f"skipping {case} [{tree}]: {left:.0f} s of the budget left", flush=True)
            continue
        os.environ["SERVE_BENCH_NAME"] = out.name  # serve_bench writes $OUT/<this>
        saved_out = os.environ.get("OUT")
        os.environ["OUT"] = str(out_dir)
        report = run(f"{case} [{tree}]", command, trees[tree], out, timeout=max(60.0, left - 10))
        if saved_out is None:
            os.environ.pop("OUT")
        else:
            os.environ["OUT"] = saved_out
        numbers = {} if report is None or "error" in report else (
            bench_numbers(report) if kind == "bench" else serve_numbers(report))
        results["runs"].setdefault(case, {})[tree] = {"numbers": numbers, "device": (report or {}).get("device"),
                                                      "error": (report or {}).get("error", "")[:500] or None}
    results["total_seconds"] = elapsed()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"ab_bench_{'_'.join(parts)}.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print(f"\nA/B on one machine ({results['total_seconds']:.0f} s): before = {results['trees']['before']}, "
          f"after = {results['trees']['after']}")
    print(f"{'case':<14} {'number':<26} {'before':>10} {'after':>10} {'after/before':>13}")
    for case, trees in results["runs"].items():
        before, after = trees.get("before", {}), trees.get("after", {})
        keys = list(dict.fromkeys([*before.get("numbers", {}), *after.get("numbers", {})]))
        if not keys:
            print(f"{case:<14} {'error':<26} {str(before.get('error'))[:40]} / {str(after.get('error'))[:40]}")
        for key in keys:
            b, a = before.get("numbers", {}).get(key), after.get("numbers", {}).get(key)
            ratio = f"{a / b:.3f}" + ("" if a / b >= 0.98 else "  <-- slower") if a and b else "-"
            fmt = lambda v: f"{v:10.1f}" if isinstance(v, (int, float)) else f"{'-':>10}"  # noqa: E731
            print(f"{case:<14} {key:<26} {fmt(b)} {fmt(a)} {ratio:>13}")
    if results["skipped"]:
        print("skipped (time budget): " + ", ".join(results["skipped"]))


if __name__ == "__main__":
    sys.exit(main())
