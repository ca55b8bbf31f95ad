"""The fused eager kernels (fused_kernels.py, rotary_kernel.rotary_pairs_qk) on a GPU: speed and numbers.

1. `chatglm-ft bench` on full-size random-weight ChatGLM-6B ("full") and ChatGLM3-6B ("chatglm3") models in
   `--compile graphs` mode (eager prefill; the eager decode step captured as CUDA graphs), 128- and
   2048-token prefill and batch-1 decode, with the fused kernels on and off ($CHATGLM_FT_FUSED=1/0), each
   run in its own process. The same commands by hand:
       CHATGLM_FT_FUSED=1 CHATGLM_FT_NEW_KERNELS=1 python3 -m chatglm_ft bench --random-weights --config chatglm3 --compile graphs \\
           --prefill-lengths 128,2048 --decode-tokens 64
       CHATGLM_FT_FUSED=0 python3 -m chatglm_ft bench ... (the same)
2. Each kernel against the PyTorch form it replaces on full-size activations (2048 tokens, float16 / bfloat16
   / float32): elements that differ, the largest distance in units in the last place, and the time of
   each side (CUDA events, median of 20).

    python3 gpu/fused_check.py        # ~4 minutes on an H100; writes $OUT/fused_check.json when $OUT is set
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BENCH = ["bench", "--random-weights", "--compile", "graphs", "--prefill-lengths", "128,2048", "--decode-tokens", "64"]
DEADLINE = time.monotonic() + 300  # the bench processes' share of the 6 minutes; the kernel checks take ~30 s


def bench(config: str, fused: bool, *extra: str) -> dict:
    """One `chatglm-ft bench` process: prefill ms per length, decode tokens/s per case, graph capture seconds."""
    limit = min(150.0, DEADLINE - time.monotonic())
    if limit < 20:
        return {"config": config, "fused": fused, "error": "skipped: out of time"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "bench.json")
        env = {**os.environ, "CHATGLM_FT_FUSED": "1" if fused else "0", "CHATGLM_FT_NEW_KERNELS": "1" if fused else "0",
               "PYTHONPATH": str(REPO / "src")}
        command = [sys.executable, "-m", "chatglm_ft", *BENCH, "--config", config, *extra, "--json", "--out", str(out)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"config": config, "fused": fused, "error": f"timed out after {limit:.0f} s"}
        if done.returncode != 0:
            return {"config": config, "fused": fused, "error": done.stderr[-2000:]}
        report = json.loads(out.read_text())
    return {"config": config, "fused": fused, "device": report["device"],
            "prefill_ms": {p["tokens"]: round(p["seconds"] * 1e3, 2) for p in report["prefill"]},
            "decode_tokens_per_s": {d["name"]: round(d["tokens_per_second"], 1) for d in report["decode"]},
            "capture_seconds": report["capture_seconds"]}


# -- numbers and kernel times ----------------------------------------------------------------------
def ulp_gap(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Elements that differ, the largest distance in units in the last place of the dtype, and in units of
    the last place of the row's largest value."""
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[want.dtype]
    sign = 1 << (torch.iinfo(bits).bits - 1)

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, -(i + sign), i)

    gap = (ordered(got) - ordered(want)).abs()
    # LayerNorm's bias add cancels to values near zero, whose own ulp is tiny: also in units of the row's largest value
    diff = (got.double() - want.double()).abs().flatten(0, -2)
    scale = want.double().abs().flatten(0, -2).amax(-1, keepdim=True)
    row_ulp = 2.0 ** torch.floor(torch.log2(scale)) * torch.finfo(want.dtype).eps
    return {"differing": int((gap > 0).sum()), "of": got.numel(), "max_ulps": int(gap.max()),
            "max_row_units": round(float((diff / row_ulp).max()), 2)}


def timed(fn, repeats: int = 20) -> float:
    """Median microseconds of fn() on the GPU."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return round(statistics.median(times), 1)


@torch.no_grad()
def kernels(dtype: torch.dtype, device: str = "cuda", T: int = 2048) -> list[dict]:
    from chatglm_ft import fused_kernels, ops, rotary_kernel
    from chatglm_ft.model_glm2 import RMSNorm, rotary_tables

    torch.manual_seed(0)
    cuda, H, N, G, d, Fw = device, 4096, 32, 2, 128, 13696
    rows = []

    def row(name, fused, plain):
        got, want = fused(), plain()
        pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
        rows.append({"kernel": name, "dtype": str(dtype).removeprefix("torch."),
                     "numbers": [ulp_gap(g, w) for g, w in pairs], "fused_us": timed(fused), "pytorch_us": timed(plain)})
        print(rows[-1], flush=True)

    qkv = torch.randn(1, T, (N + 2 * G) * d, device=cuda).to(dtype)
    q, k, _ = qkv.split([N * d, G * d, G * d], dim=-1)
    q, k = q.unflatten(-1, (N, d)), k.unflatten(-1, (G, d))
    for family in ("chatglm2", "chatglm3"):
        cos, sin = rotary_tables(torch.arange(4000, 4000 + T, device=cuda)[None], d // 2, dtype, family)
        assert rotary_kernel.pairs_supported(q, k, cos, sin)
        row(f"rotary_pairs ({family} table)", lambda: rotary_kernel.rotary_pairs_qk(q, k, cos, sin),
            lambda: (ops.apply_rotary_pairs(q, cos, sin), ops.apply_rotary_pairs(k, cos, sin)))
    norm = RMSNorm(H, 1e-5, device=cuda).to(dtype)
    norm.weight.copy_(1 + 0.1 * torch.randn(H, device=cuda))
    x, a = torch.randn(1, T, H, device=cuda).to(dtype), torch.randn(1, T, H, device=cuda).to(dtype)
    row("rms_norm", lambda: fused_kernels.rms_norm(x, norm.weight, norm.eps), lambda: norm(x))
    def residual_norm(x, a):
        h = x + a
        return h, norm(h)

    row("residual + rms_norm", lambda: fused_kernels.rms_norm(x, norm.weight, norm.eps, a), lambda: residual_norm(x, a))
    ln = torch.nn.LayerNorm(H, device=cuda).to(dtype)
    torch.nn.init.normal_(ln.weight, 1.0, 0.1)
    torch.nn.init.normal_(ln.bias, 0.0, 0.1)
    alpha = (2 * 28) ** 0.5
    row("scaled residual + layer_norm", lambda: fused_kernels.add_layer_norm(a, x, alpha, ln.weight, ln.bias, ln.eps),
        lambda: ln(torch.add(a, x, alpha=alpha)))
    u = 3 * torch.randn(1, T, 2 * Fw, device=cuda).to(dtype)
    row("swiglu", lambda: fused_kernels.swiglu(u), lambda: F.silu(u[..., :Fw]) * u[..., Fw:])
    x1, a1 = x[:, :1], a[:, :1]  # one decode token
    row("residual + rms_norm, 1 token", lambda: fused_kernels.rms_norm(x1, norm.weight, norm.eps, a1),
        lambda: residual_norm(x1, a1))
    return rows


def main() -> None:
    result = {"bench": [], "kernels": []}
    for config in ("chatglm3", "full"):
        for fused in (True, False):
            result["bench"].append(bench(config, fused))
            print(result["bench"][-1], flush=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        result["kernels"] += kernels(dtype)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fused_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
