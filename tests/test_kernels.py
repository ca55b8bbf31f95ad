"""The float skinny-matmul kernel (kernels.skinny_matmul, what decoding's one-token matmuls run on CUDA)."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpret  # tests/triton_interpreter.py

CHECK = textwrap.dedent("""
    import torch
    from chatglm_ft import kernels
    torch.manual_seed(0)
    worst = 0.0
    for n, k, m in [(48, 64, 1), (30, 128, 3), (64, 256, 17), (30, 80, 2)]:  # rows not a multiple of the tile; M over one tile; K=80 not a multiple of the K step
        w, x, b = torch.randn(n, k), torch.randn(m, k), torch.randn(n)
        ref = x.double() @ w.double().T + b.double()
        y = kernels.skinny_matmul(x, w, bias=b, config=kernels.GemvConfig(block_n=16, block_k=32, stages=2))
        worst = max(worst, ((y.double() - ref).abs().max() / ref.abs().max()).item())
        y = kernels.skinny_matmul(x, w, bias=b, config=kernels.GemvConfig(block_n=16, block_k=32), act=1)
        gelu = torch.nn.functional.gelu(ref, approximate="tanh")
        worst = max(worst, ((y.double() - gelu).abs().max() / gelu.abs().max()).item())
    # split-K: 2-4 programs per output tile, each a slice of K, the tile's last one sums them (K=80: a short last
    # slice; 4 slices of 2 steps for K=128 at block_k 16); twice, as the per-tile counters must be zero again after
    for n, k, m, split in [(48, 64, 1, 2), (30, 128, 3, 4), (30, 80, 2, 3), (64, 256, 17, 2)]:
        w, x, b = torch.randn(n, k), torch.randn(m, k), torch.randn(n)
        ref = x.double() @ w.double().T + b.double()
        for act, expected in ((0, ref), (0, ref), (1, torch.nn.functional.gelu(ref, approximate="tanh"))):
            y = kernels.skinny_matmul(x, w, bias=b, config=kernels.GemvConfig(block_n=16, block_k=16, split=split), act=act)
            worst = max(worst, ((y.double() - expected).abs().max() / expected.abs().max()).item())
    assert int(kernels.tile_counters(torch.device("cpu"), 1).abs().sum()) == 0
    # more than 32 rows with no config: the tall tiles (64/128 rows a program), rows past the tile masked
    for n, k, m in [(48, 64, 40), (70, 96, 130)]:
        w, x = torch.randn(n, k), torch.randn(m, k)
        assert kernels.tall_config(16, n, k, m).block_m == (64 if m <= 64 else 128)
        ref = x.double() @ w.double().T
        y = kernels.skinny_matmul(x, w)
        worst = max(worst, ((y.double() - ref).abs().max() / ref.abs().max()).item())
    print(worst)
""")


def test_skinny_matmul_matches_linear_in_interpreter():
    pytest.importorskip("triton")
    assert float(interpret(CHECK).split()[-1]) < 1e-5


def test_split_k_counters_grow_without_freeing_the_old_buffer():
    """A split-K call with more tiles than the counters hold gets a larger zeroed buffer; the old one stays alive
    (a CUDA graph captured with it keeps using its address)."""
    pytest.importorskip("triton")
    import weakref

    from chatglm_ft import kernels

    device = torch.device("meta")  # a device of its own: no other test's buffers
    small = kernels.tile_counters(device, 1)
    assert kernels.tile_counters(device, 10) is small  # reused while it is large enough
    alive = weakref.ref(small)
    del small
    large = kernels.tile_counters(device, 10_000)
    assert large.numel() >= 10_000 and large.dtype == torch.int32
    assert alive() is not None and alive() is not large
    assert kernels.tile_counters(device, 1) is large
    # each stream counts in a buffer of its own (kernels on two streams may run at once)
    other = kernels.tile_counters(device, 1, stream=7)
    assert other is not large and kernels.tile_counters(device, 10, stream=7) is other


@pytest.mark.gpu
def test_cuda_split_k_on_two_streams_at_once_sums_every_tile():
    """Split-K matmuls running at the same time on two streams (the server's background compile beside its
    worker) each sum all their tiles and leave their counters at zero."""
    from chatglm_ft import kernels

    torch.manual_seed(0)
    cfg = kernels.GemvConfig(block_n=32, block_k=256, stages=3, split=4)
    w = (torch.randn(4096, 16384, device="cuda") / 128).half()
    xs = [torch.randn(2, 16384, device="cuda", dtype=torch.float16) for _ in range(2)]
    refs = [F.linear(x.double(), w.double()) for x in xs]
    streams = [torch.cuda.Stream() for _ in range(2)]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(50):  # queued without waiting, so the two streams' kernels overlap
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(kernels.skinny_matmul(xs[i], w, config=cfg))
    torch.cuda.synchronize()
    for i, s in enumerate(streams):
        for y in outs[i]:
            assert ((y.double() - refs[i]).norm() / refs[i].norm()).item() < 2e-3
        counters = kernels.tile_counters(torch.device("cuda", torch.cuda.current_device()), 1, s.cuda_stream)
        assert int(counters.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_skinny_matmul_matches_cublas(dtype):
    from chatglm_ft import kernels

    torch.manual_seed(0)
    for n, k in [(12288, 4096), (4096, 16384), (4608, 4096), (4096, 13696), (130528, 4096), (192, 64)]:
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
        b = torch.randn(n, device="cuda", dtype=dtype)
        for m in (1, 5, 16, 100):  # 100 rows: the tall tiles
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = F.linear(x.double(), w.double(), b.double())
            tolerance = 2e-3 if dtype == torch.float16 else 1e-2  # the output's rounding
            for act, expected in ((0, ref), (1, F.gelu(ref, approximate="tanh"))):
                y = torch.ops.chatglm_ft.gemv(x, w, b, act)
                assert y.dtype == dtype and y.shape == (m, n)
                assert ((y.double() - expected).norm() / expected.norm()).item() < tolerance
                if m <= 16:  # split-K: four programs per output tile
                    cfg = kernels.GemvConfig(block_n=32, block_k=256, stages=3, split=4)
                    y = kernels.skinny_matmul(x, w, bias=b, config=cfg, act=act)
                    assert ((y.double() - expected).norm() / expected.norm()).item() < tolerance
    assert int(kernels.tile_counters(torch.device("cuda", torch.cuda.current_device()), 1).abs().sum()) == 0
