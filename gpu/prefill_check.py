"""Prefill A/B (issue 7): one prompt of 128/512/2048 tokens through the path `stream_tokens` takes, on a
full-size float16 ChatGLM-6B with random weights, with the fused eager paths on and off (model.FUSED_EAGER:
rotary kernel, GELU epilogue, copy-free prompt attention) and each SDPA backend forced; then the GELU
epilogue's numbers against F.gelu, and a profile of the default 2048-token prefill.

    python3 gpu/prefill_check.py        # writes $OUT/prefill_check.json when $OUT is set
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from chatglm_ft.bench import profile_prefill, random_model, time_prefill  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.options import KernelOptions  # noqa: E402

BACKENDS = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION]}


def main() -> None:
    device = torch.device("cuda")
    model = random_model(ChatGLMConfig.full(), dtype=torch.float16, device=device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for fused in (True, False):
        model.use_kernels(KernelOptions(fused=fused))
        for name, backends in BACKENDS.items():
            if not fused and name != "default":
                continue
            for length in ((128, 512, 2048) if name == "default" else (2048,)):
                try:
                    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                        seconds = time_prefill(model, length, repeats=5, generator=generator)
                    rows.append({"fused": fused, "sdpa": name, "tokens": length, "ms": seconds * 1e3})
                except Exception as e:  # noqa: BLE001 - a backend may not take these inputs
                    rows.append({"fused": fused, "sdpa": name, "tokens": length, "error": f"{type(e).__name__}: {e}"[:200]})
                print(rows[-1], flush=True)
    model.use_kernels(KernelOptions())

    layer = model.transformer.layers[0].mlp.dense_h_to_4h
    x = torch.randn(2048, 4096, device=device, dtype=torch.float16)
    with torch.inference_mode():
        fused_gelu = torch._addmm_activation(layer.bias, x, layer.weight.t(), use_gelu=True)
        exact = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()), approximate="tanh")
        erf = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()))
        plain = F.gelu(layer(x), approximate="tanh")
    gelu = {"epilogue_vs_tanh_max_abs": (fused_gelu.double() - exact).abs().max().item(),
            "epilogue_vs_erf_max_abs": (fused_gelu.double() - erf).abs().max().item(),
            "plain_vs_tanh_max_abs": (plain.double() - exact).abs().max().item()}
    print(gelu, flush=True)
    profile = profile_prefill(model, 2048, generator=generator)
    print(profile)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "prefill_check.json").write_text(json.dumps({"rows": rows, "gelu": gelu, "profile": profile}, indent=1))


if __name__ == "__main__":
    main()
