"""Issue 2 on the GPU: save a full-size random-weight ChatGLM-6B, load it back with `chatglm-ft generate`
in a child process, and record load time, peak host RAM (vs weight bytes), peak GPU memory and decode speed.

    python3 gpu/foundation_check.py [--workdir /tmp/ckpt]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatglm_ft.checkpoint import save_model  # noqa: E402
from chatglm_ft.bench import random_model  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/chatglm-6b-random")
    ap.add_argument("--tokenizer-dir", default=".gpu/chatglm-6b")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    config = ChatGLMConfig.full()
    t0 = time.perf_counter()
    model = random_model(config, dtype=torch.float16, device=torch.device("cuda"))
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    t0 = time.perf_counter()
    save_model(model, Path(args.workdir), tokenizer_dir=Path(args.tokenizer_dir), dtype=torch.float16)
    save_s = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    disk_bytes = sum(f.stat().st_size for f in Path(args.workdir).glob("*.safetensors"))
    # VmHWM of the child itself: ru_maxrss of children would include the pages inherited at fork.
    launcher = ("import sys; from chatglm_ft.cli import main; rc = main(sys.argv[1:]); "
                "print('VmHWM_kB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr); sys.exit(rc)")
    cmd = [sys.executable, "-c", launcher, "generate", "--model", args.workdir, "--prompt", "你好，请介绍一下你自己",
           "--temperature", "0", "--max-new-tokens", "128", "--json", "--device", "cuda", "--dtype", "float16",
           "--compile", "off"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    hwm = [line for line in proc.stderr.splitlines() if line.startswith("VmHWM_kB")]
    peak_rss = int(hwm[-1].split()[1]) * 1024 if hwm else -1
    print(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    report = {
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
        "weight_bytes": weight_bytes, "checkpoint_bytes_on_disk": disk_bytes,
        "build_random_s": round(build_s, 2), "save_s": round(save_s, 2),
        "generate_process_wall_s": round(wall, 2),
        "child_peak_host_rss_bytes": peak_rss, "peak_rss_over_weight_bytes": round(peak_rss / weight_bytes, 3),
        "decode_tokens_per_s_eager": result.get("tokens_per_second"), "completion_tokens": result.get("completion_tokens"),
        "generate_stderr_tail": proc.stderr.strip().splitlines()[-2:] if proc.stderr else [],
    }
    (out / "foundation_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
