"""The fused eager paths of inference on CUDA: the rotary kernel (rotary_kernel.py), GELU in the matmul
and prefill attention without copies. The kernel also runs on the CPU in Triton's interpreter."""
from __future__ import annotations

import textwrap

import pytest
import torch
from triton_interpreter import interpret  # tests/triton_interpreter.py

CHECK = textwrap.dedent("""
    import torch
    from chatglm_ft import model, rotary_kernel
    torch.manual_seed(0)
    worst = 0.0
    for B, T, nh, hd in [(1, 5, 3, 16), (2, 3, 5, 128)]:  # heads not a multiple of the head block
        qkv = torch.randn(B, T, nh, 3 * hd)
        positions = torch.stack([torch.randint(0, 9, (B, T)), torch.randint(0, 3, (B, T))], dim=1)
        cos, sin = model.rotary_tables(positions, model.rotary_inv_freq(hd // 2), torch.float32)
        q, k = rotary_kernel.rotary_qk(qkv, cos, sin)
        rq, rk, _ = qkv.split(hd, dim=-1)
        for got, want in ((q, model.apply_rotary(rq, cos, sin)), (k, model.apply_rotary(rk, cos, sin))):
            assert got.shape == want.shape and got.is_contiguous()
            worst = max(worst, (got - want).abs().max().item())
    print(worst)
""")


def test_rotary_kernel_matches_apply_rotary_in_interpreter():
    pytest.importorskip("triton")
    assert float(interpret(CHECK).split()[-1]) < 1e-5


@pytest.mark.gpu
def test_fused_eager_prefill_matches_plain_pytorch():
    """A full-width layer (the real head count and head dim) on CUDA: the fused paths against the plain
    PyTorch ops, with a PromptMask prefill and a masked batch."""
    from chatglm_ft import ops
    from chatglm_ft.config import ChatGLMConfig
    from chatglm_ft.options import KernelOptions
    from chatglm_ft.model import GLMBlock, PromptMask, rotary_inv_freq, rotary_tables

    torch.manual_seed(0)
    config = ChatGLMConfig(hidden_size=4096, num_attention_heads=32, inner_hidden_size=16384, num_layers=1)
    block = GLMBlock(config, device="cuda").half()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    T = 300
    h = torch.randn(1, T, 4096, device="cuda", dtype=torch.float16)
    positions = torch.stack([torch.arange(T), torch.zeros(T, dtype=torch.long)])[None].cuda()
    cos, sin = rotary_tables(positions, rotary_inv_freq(64, device="cuda"), torch.float16)
    mask = torch.ones(1, 1, T, T, dtype=torch.bool, device="cuda")
    mask[..., -1] = False
    mask[..., -1, -1] = True  # the prefix mask of a prompt ending in <sop>
    outputs = {}
    for fused in (True, False):
        ops.use_kernels(block, KernelOptions(fused=fused))
        with torch.inference_mode():
            outputs[fused] = [block(h, cos, sin, PromptMask(context=T - 1)), block(h, cos, sin, mask)]
    for fused, plain in zip(outputs[True], outputs[False]):
        assert ((fused.float() - plain.float()).norm() / plain.float().norm()).item() < 2e-3
    assert ((outputs[True][0].float() - outputs[True][1].float()).norm() / outputs[True][1].float().norm()).item() < 2e-3
