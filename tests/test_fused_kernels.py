"""The fused eager kernels of inference on CUDA (fused_kernels.py: RMSNorm with the residual add, ChatGLM-6B's
scaled residual with LayerNorm, SwiGLU; rotary_kernel.py: ChatGLM2/3's interleaved-pair rotary) against
the PyTorch forms they replace: on the CPU in Triton's interpreter, and on CUDA (the gpu tests).

What "the same" means (fused_kernels.py's docstring): the kernels round where the PyTorch forms round,
so element-wise results are bit for bit equal; a norm's row sums may run in another order, which moves
an output by one unit in the last place (ulp) where it sat on a rounding boundary. Triton's interpreter
truncates float32 -> bfloat16 (the GPU rounds to nearest), so bfloat16 is checked exactly on CUDA only.
"""
from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpret  # tests/triton_interpreter.py


def ulp_gap(got: torch.Tensor, want: torch.Tensor) -> tuple[int, int]:
    """(elements that differ, largest distance in units in the last place of the dtype)."""
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[want.dtype]
    sign = 1 << (torch.iinfo(bits).bits - 1)

    def ordered(t: torch.Tensor) -> torch.Tensor:  # float bit patterns -> integers in the floats' order
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, -(i + sign), i)

    gap = (ordered(got) - ordered(want)).abs()
    return int((gap > 0).sum()), int(gap.max()) if gap.numel() else 0


def row_gap(got: torch.Tensor, want: torch.Tensor) -> tuple[int, float]:
    """(elements that differ, largest difference in units in the last place of its row's largest value): for
    LayerNorm, whose bias add cancels to values near zero, where an element's own ulp means nothing."""
    diff = (got.double() - want.double()).abs().flatten(0, -2)
    scale = want.double().abs().flatten(0, -2).amax(-1, keepdim=True)
    ulp = 2.0 ** torch.floor(torch.log2(scale)) * torch.finfo(want.dtype).eps
    return int((diff > 0).sum()), float((diff / ulp).max())


CHECK = "import torch\n" + inspect.getsource(ulp_gap) + inspect.getsource(row_gap) + textwrap.dedent("""
    import json
    import torch.nn.functional as F
    from chatglm_ft import fused_kernels, ops, rotary_kernel
    from chatglm_ft.model_glm2 import RMSNorm, rotary_tables

    def gaps(got, want):
        return {"ulp": ulp_gap(got, want), "row": row_gap(got, want)}

    torch.manual_seed(0)
    out = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[1]
        H = 64  # a power of two as the models' (4096): 1/H exact, so PyTorch's mean (sum / H) equals sum * (1/H)
        norm = RMSNorm(H, 1e-5).to(dtype)
        norm.weight.data.copy_(1 + 0.1 * torch.randn(H))
        x, a = torch.randn(3, 5, H).to(dtype), torch.randn(3, 5, H).to(dtype)
        dyadic = (torch.randint(-64, 64, (7, H)) / 16).to(dtype)  # sums of squares exact in any order
        with torch.no_grad():
            h, y = fused_kernels.rms_norm(x, norm.weight, norm.eps, a)
            out[f"rms_{name}"] = gaps(fused_kernels.rms_norm(x, norm.weight, norm.eps), norm(x))
            out[f"rms_residual_h_{name}"] = gaps(h, x + a)
            out[f"rms_residual_y_{name}"] = gaps(y, norm(x + a))
            out[f"rms_dyadic_{name}"] = gaps(fused_kernels.rms_norm(dyadic, norm.weight, norm.eps), norm(dyadic))

            ln = torch.nn.LayerNorm(96).to(dtype)  # not a power of two: masked lanes
            torch.nn.init.normal_(ln.weight)
            torch.nn.init.normal_(ln.bias)
            a, x, alpha = torch.randn(12, 96).to(dtype), torch.randn(12, 96).to(dtype), 56 ** 0.5
            # ATen's CUDA add keeps alpha in float32 and rounds a + alpha * x once (an fma); the CPU's rounds
            # alpha to float16 first, so the reference sum is spelled out
            alpha32 = torch.tensor(alpha, dtype=torch.float32).double()
            h = (a.double() + alpha32 * x.double()).float().to(dtype)
            out[f"ln_{name}"] = gaps(fused_kernels.add_layer_norm(a, x, alpha, ln.weight, ln.bias, ln.eps), ln(h))
            out[f"ln_nobias_{name}"] = gaps(fused_kernels.add_layer_norm(a, x, 1.0, ln.weight, None, ln.eps),
                                            F.layer_norm(a + x, (96,), ln.weight, None, ln.eps))

            u = (3 * torch.randn(2, 3, 2 * 200)).to(dtype)  # 200: two column blocks, the second masked
            gate, up = u.chunk(2, dim=-1)
            out[f"swiglu_{name}"] = gaps(fused_kernels.swiglu(u), F.silu(gate) * up)
            strided = torch.randn(4, 2 * 200 + 8).to(dtype)[:, :400]  # rows 408 apart
            gate, up = strided.chunk(2, dim=-1)
            out[f"swiglu_strided_{name}"] = gaps(fused_kernels.swiglu(strided), F.silu(gate) * up)

            worst = {"ulp": [0, 0], "row": [0, 0]}
            for family, (B, T, N, G, d, r2), table_rows in [("chatglm2", (2, 3, 5, 2, 16, 4), 2),
                                                           ("chatglm3", (2, 3, 4, 1, 32, 8), 1),
                                                           ("chatglm2", (1, 2, 2, 2, 16, 8), 1)]:  # r = d: no rest
                qkv = (4 * torch.randn(B, T, (N + 2 * G) * d)).to(dtype)
                q, k, v = qkv.split([N * d, G * d, G * d], dim=-1)
                q, k = q.unflatten(-1, (N, d)), k.unflatten(-1, (G, d))
                positions = torch.randint(0, 9000, (table_rows, T))  # fp16 positions above 2048 round (chatglm2)
                cos, sin = rotary_tables(positions, 2 * r2, dtype, family)
                rq, rk = rotary_kernel.rotary_pairs_qk(q, k, cos, sin)
                assert rq.is_contiguous() and rk.is_contiguous() and rk.shape == (B, T, G, d)
                for got, want in ((rq, ops.apply_rotary_pairs(q, cos, sin)), (rk, ops.apply_rotary_pairs(k, cos, sin))):
                    for key, gap in gaps(got, want).items():
                        worst[key] = [max(w, g) for w, g in zip(worst[key], gap)]
            out[f"rotary_{name}"] = worst
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, list]]:
    """{check: {"ulp": ulp_gap, "row": row_gap}} from one interpreter run of every kernel (~10 s on one core)."""
    pytest.importorskip("triton")
    return json.loads(interpret(CHECK).split("\n")[-2])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_elementwise_kernels_are_bit_exact_in_interpreter(measured, dtype):
    """The rotary (rounded in the dtype op by op, as PyTorch) and the residual add equal PyTorch's bit for bit.
    SwiGLU up to the last bits of exp: the interpreter's is numpy's, not the CPU's (on CUDA both sides use
    libdevice's expf, and the GPU test checks the bits)."""
    assert measured[f"rotary_{dtype}"]["ulp"] == [0, 0]
    assert measured[f"rms_residual_h_{dtype}"]["ulp"] == [0, 0]
    for check in ("swiglu", "swiglu_strided"):
        differing, ulps = measured[f"{check}_{dtype}"]["ulp"]
        assert ulps <= 1 and differing <= 3 if dtype == "float16" else ulps <= 4, (check, differing, ulps)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_norm_kernels_in_interpreter(measured, dtype):
    """Where a row's sums are exact in any order (dyadic inputs) the RMSNorm is bit for bit PyTorch's; with
    random rows the sums' order moves an output by an ulp (float32: up to three, in the elements of a row
    whose rstd differs in its last bit). LayerNorm's CPU kernel uses another formula (x * rstd - mean * rstd, whose
    cancellation costs float32 a few bits), so it is compared in units of each row's largest value."""
    assert measured[f"rms_dyadic_{dtype}"]["ulp"] == [0, 0]
    for check in ("rms", "rms_residual_y"):
        differing, ulps = measured[f"{check}_{dtype}"]["ulp"]
        assert ulps <= (1 if dtype == "float16" else 3) and (dtype == "float32" or differing <= 3), (check, differing)
    for check in ("ln", "ln_nobias"):
        differing, units = measured[f"{check}_{dtype}"]["row"]
        assert units <= (1 if dtype == "float16" else 4) and (dtype == "float32" or differing <= 10), (check, differing)


def test_bfloat16_in_interpreter_within_truncation(measured):
    """bfloat16: the interpreter truncates each rounding to bfloat16 (CUDA rounds to nearest), so only
    closeness is checked here; the GPU test checks the bits."""
    for check in ("rotary", "rms_residual_h", "rms", "rms_residual_y", "rms_dyadic", "ln", "swiglu"):
        assert measured[f"{check}_bfloat16"]["row"][1] <= 4, check


# -- CUDA (the lead runs these on the device) -------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_kernels_match_pytorch_on_cuda(dtype):
    """Full-size shapes on CUDA: the rotary, the residual add and SwiGLU bit for bit (SwiGLU: libdevice's expf
    and a correctly rounded division, as ATen's SiLU); RMSNorm within one ulp in at most one element in a
    thousand (float32: a few ulps, in rows whose sum of squares of 4096 values came out different in its last
    bits); LayerNorm (Welford's sums in ATen) likewise in units of each row's largest value."""
    from chatglm_ft import fused_kernels, ops, rotary_kernel
    from chatglm_ft.model_glm2 import RMSNorm, rotary_tables

    torch.manual_seed(0)
    device, T, H, N, G, d, Fw = "cuda", 300, 4096, 32, 2, 128, 13696
    norm = RMSNorm(H, 1e-5, device=device).to(dtype)
    ln = torch.nn.LayerNorm(H, device=device).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(H, device=device))
        torch.nn.init.normal_(ln.weight)
        torch.nn.init.normal_(ln.bias)
    with torch.inference_mode():
        qkv = torch.randn(2, T, (N + 2 * G) * d, device=device).to(dtype)
        q, k, _ = qkv.split([N * d, G * d, G * d], dim=-1)
        q, k = q.unflatten(-1, (N, d)), k.unflatten(-1, (G, d))
        for family in ("chatglm2", "chatglm3"):
            cos, sin = rotary_tables(torch.randint(0, 8000, (2, T), device=device), d // 2, dtype, family)
            assert rotary_kernel.pairs_supported(q, k, cos, sin)
            rq, rk = rotary_kernel.rotary_pairs_qk(q, k, cos, sin)
            assert torch.equal(rq, ops.apply_rotary_pairs(q, cos, sin))
            assert torch.equal(rk, ops.apply_rotary_pairs(k, cos, sin))
        u = 3 * torch.randn(2, T, 2 * Fw, device=device).to(dtype)
        gate, up = u.chunk(2, dim=-1)
        assert ulp_gap(fused_kernels.swiglu(u), F.silu(gate) * up) == (0, 0)

        x, a = torch.randn(2, T, H, device=device).to(dtype), torch.randn(2, T, H, device=device).to(dtype)
        h, y = fused_kernels.rms_norm(x, norm.weight, norm.eps, a)
        assert torch.equal(h, x + a)
        for got, want in ((y, norm(x + a)), (fused_kernels.rms_norm(x, norm.weight, norm.eps), norm(x))):
            differing, ulps = ulp_gap(got, want)
            assert ulps <= 8 if dtype == torch.float32 else ulps <= 1 and differing <= got.numel() // 1000, (differing, ulps)
        alpha = (2 * 28) ** 0.5
        got = fused_kernels.add_layer_norm(a, x, alpha, ln.weight, ln.bias, ln.eps)
        differing, units = row_gap(got, ln(torch.add(a, x, alpha=alpha)))
        assert units <= 4 if dtype == torch.float32 else units <= 1 and differing <= got.numel() // 1000, (differing, units)


def _decode(model, prompt, gen, fast) -> list[int]:
    from chatglm_ft.generate import stream_tokens

    return [t for (t,) in stream_tokens(model, [prompt], gen, fast=fast)]


@pytest.mark.gpu
@pytest.mark.parametrize("dirs", [("golden_dir", "golden"), ("golden2_dir", "golden2"), ("golden3_dir", "golden3")])
def test_golden_models_on_cuda_with_fused_kernels(request, monkeypatch, dirs):
    """The tiny golden models on CUDA with the fused eager kernels: float32 prefill logits as THUDM's (1e-4),
    greedy ids as THUDM's in the eager loop and in `--compile graphs` (the eager step in CUDA graphs);
    float16 and bfloat16 give the same greedy ids with the kernels on and off."""
    from chatglm_ft import fused_kernels, rotary_kernel
    from chatglm_ft.api import load_model
    from chatglm_ft.fast import FastOptions
    from chatglm_ft.generate import GenerationConfig
    from chatglm_ft.options import KernelOptions

    ckpt, gold = (request.getfixturevalue(name) for name in dirs)
    calls: dict[str, int] = {}
    for module, name in ((fused_kernels, "rms_norm"), (fused_kernels, "add_layer_norm"), (fused_kernels, "swiglu"),
                         (rotary_kernel, "rotary_pairs_qk"), (rotary_kernel, "rotary_qk")):
        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    glm2 = dirs[0] != "golden_dir"
    case = gold["greedy"][0]
    gen = GenerationConfig(max_new_tokens=len(case["new_ids"]), **({"stop_token_ids": ()} if glm2 else {}))
    graphs = FastOptions(compile=False)  # on CUDA: the uncompiled step captured as CUDA graphs
    model = load_model(ckpt, dtype="float32", device="cuda").use_kernels(KernelOptions(new_kernels=True))
    for forward in gold["forward"]:
        with torch.no_grad():
            logits = model(torch.tensor([forward["input_ids"]], device="cuda")).logits[0].double().cpu()
        assert (logits[:, :8] - torch.tensor(forward["logits_first8_each_pos"])).abs().max() <= 1e-4
    assert _decode(model, case["input_ids"], gen, False) == case["new_ids"]
    assert _decode(model, case["input_ids"], gen, graphs) == case["new_ids"]
    expected = {"rms_norm", "swiglu", "rotary_pairs_qk"} if glm2 else {"add_layer_norm", "rotary_qk"}
    assert expected <= calls.keys(), calls
    teacher = torch.tensor([case["input_ids"] + case["new_ids"]], device="cuda")
    for dtype in ("float16", "bfloat16"):
        model = load_model(ckpt, dtype=dtype, device="cuda")
        ids, logits = {}, {}
        for fused in (True, False):
            model.use_kernels(KernelOptions(fused=fused, new_kernels=fused))
            ids[fused] = (_decode(model, case["input_ids"], gen, False), _decode(model, case["input_ids"], gen, graphs))
            with torch.no_grad():
                logits[fused] = model(teacher).logits[0].float()
        assert ids[True][0] == ids[True][1] and ids[False][0] == ids[False][1], dtype  # eager = graphs, each setting
        if dtype == "float16":
            assert ids[True] == ids[False]  # the kernels on and off: the same greedy ids
        else:  # bfloat16's 8-bit mantissa: the fused kernels round once where the PyTorch ops round at each op, and
            # near-tied greedy picks of the random tiny model can differ late in the answer; the logits agree
            scale = logits[False].abs().max()
            assert (logits[True] - logits[False]).abs().max() <= 0.03 * scale, dtype
