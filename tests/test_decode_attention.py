"""Decode attention kernel (issue 6): the Triton kernels of decode_attention.py (one head per program,
and grouped KV heads: ChatGLM2/3) against the PyTorch reference in Triton's interpreter on the CPU, the
masks the models really decode with, and the models' use of it (a custom op that torch.compile traces;
the switch back to PyTorch)."""
import textwrap

import pytest
import torch
from triton_interpreter import interpret  # tests/triton_interpreter.py

from chatglm_ft.positions import PrefixLayout, attention_mask_for

triton = pytest.importorskip("triton")

from chatglm_ft import decode_attention as da  # noqa: E402  (imports Triton)

# Interpreter runs of the kernel: each line prints the worst |kernel - reference| relative to the
# output's scale for one case. Runtime loop bounds need int(<1-element array>), which NumPy >= 2.3
# refuses: the shim gives the interpreter's scalars the __index__ they are meant to have. The
# interpreter keeps bfloat16 as its uint16 bits and its tl.dot multiplies those as integers: the
# shim widens bfloat16 operands to float32 first (exact), as the tensor cores read them.
INTERPRETER_SHIM = textwrap.dedent("""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp
    try:
        int(np.array([1]))
    except TypeError:
        _patch = interp._patch_lang_tensor

        def _patched(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interp._patch_lang_tensor = _patched

    _dot = interp.InterpreterBuilder.create_dot

    def _float32(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        return interp.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    interp.InterpreterBuilder.create_dot = lambda self, a, b, d, *rest: _dot(self, _float32(a), _float32(b), d, *rest)
""")

# One case of a kernel check, as the model calls the kernel: q a transposed view, the cache of nkv KV heads a
# strided view; mask kinds "none", "broadcast", "random", "prefix" (left-padded rows) and "late_start".
CHECK_CASE = textwrap.dedent("""
    import sys
    import torch
    from chatglm_ft.decode_attention import decode_attention, decode_attention_reference
    from chatglm_ft.positions import PrefixLayout, attention_mask_for

    torch.manual_seed(0)

    def case(name, dtype, B, nh, nkv, S, hd, mask_kind, layout="slice", **kw):
        q = torch.randn(B, 1, nh, hd).to(dtype).transpose(1, 2)
        if layout == "slice":  # the model's cache (B, nkv, S_max, hd): rows and columns of a larger one
            cache_k, cache_v = (torch.randn(B + 2, nkv, S + 7, hd).to(dtype) for _ in range(2))
            k, v = cache_k[1:B + 1, :, :S], cache_v[1:B + 1, :, :S]
        else:  # keys as projected (B, S, nkv, hd), heads strided by hd and columns by nkv * hd
            k, v = (torch.randn(B, S, nkv, hd).to(dtype).transpose(1, 2) for _ in range(2))
        if mask_kind == "none":
            mask = None
        elif mask_kind == "broadcast":  # one (1, 1, 1, S) mask for every row
            mask = torch.arange(S)[None, None, None, :] <= S // 2
        elif mask_kind == "random":  # not a range: the kernel reads the mask itself
            mask = torch.rand(B, 1, 1, S) < 0.5
            mask[..., 0] = True
        else:  # what the model decodes with: left-padded rows see [start, column]
            start = torch.randint(0, S // 2 + 1, (B,))
            column = torch.randint(S // 2, S + 3, (B,))  # past S: an idle engine slot at the scratch column
            if mask_kind == "late_start":  # a row that sees nothing of the first splits (only the last two columns)
                start[0] = S - 2
            layout_ = PrefixLayout(start=start, context=start + 1, mask=start)
            mask = attention_mask_for(layout_, column[:, None], S)
        out = decode_attention(q, k, v, mask, **kw)
        ref = decode_attention_reference(q.double(), k.double(), v.double(), mask)
        assert out.dtype == dtype and out.shape == (B, nh, 1, hd), (out.dtype, out.shape)
        print(name, str(dtype).split(".")[1], ((out.double() - ref).abs().max() / ref.abs().max()).item())
""")

# One KV head per query head (ChatGLM-6B: the one-head kernel).
KERNEL_CHECK = INTERPRETER_SHIM + CHECK_CASE + textwrap.dedent("""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case("engine", dtype, 3, 2, 2, 130, 64, "prefix")                        # auto: split, 3 x 2 programs too few
        case("split3", dtype, 3, 2, 2, 130, 32, "prefix", splits=3, block_s=16)  # several tiles per split
        case("nosplit", dtype, 2, 2, 2, 130, 32, "prefix", splits=1, block_s=16)
    case("tiny", torch.float32, 2, 3, 3, 1, 16, "prefix")
    case("late_start", torch.float32, 2, 2, 2, 96, 16, "late_start", splits=6, block_s=16)
    case("nomask", torch.float32, 2, 2, 2, 40, 16, "none", splits=2, block_s=16)
    case("broadcast", torch.float32, 3, 2, 2, 40, 16, "broadcast", block_s=16)
    case("random", torch.float32, 2, 2, 2, 70, 16, "random", splits=3, block_s=16)
    case("hd128", torch.float16, 1, 2, 2, 70, 128, "prefix")
""")

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}  # output rounding (bf16: 2**-8) plus float32 sums


def test_kernel_matches_reference_in_interpreter():
    lines = [line.split() for line in interpret(KERNEL_CHECK).splitlines()]
    assert len(lines) == 15
    for name, dtype, error in lines:
        assert float(error) < TOLERANCE[dtype], (name, dtype, error)


# Grouped KV heads (nkv < nh: each KV head serves nh / nkv query heads, one program per (row, KV head)):
# groups of 1 (the one-head kernel), 2 (the tiny ChatGLM2/3), 5 (padded to 16 rows) and 16 (ChatGLM2/3-6B),
# 32 (one KV head); automatic and forced splits, S not a multiple of the tile, rows that see nothing of
# the first splits, caches as strided views (a slice of a larger cache, or (B, S, nkv, hd) transposed).
GROUPED_CHECK = INTERPRETER_SHIM + CHECK_CASE + textwrap.dedent("""
    if sys.argv[1] == "dtypes":
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            case("g16_auto", dtype, 2, 32, 2, 200, 32, "prefix")                          # auto: a split per tile
            case("g16_split3", dtype, 2, 32, 2, 200, 32, "prefix", splits=3, block_s=32)  # several tiles per split
            case("g16_nosplit", dtype, 2, 32, 2, 200, 32, "prefix", splits=1, block_s=32)  # 200 = 6 tiles + 8
    else:
        case("g2_late_start", torch.float32, 2, 4, 2, 200, 16, "late_start", splits=6, block_s=16)
        case("g2_late_auto", torch.float16, 2, 4, 2, 200, 16, "late_start")
        case("g2_nomask", torch.float32, 2, 4, 2, 200, 16, "none", splits=2, block_s=32)
        case("g2_broadcast", torch.float32, 3, 4, 2, 150, 16, "broadcast", block_s=32)
        case("g5_random", torch.float16, 2, 10, 2, 200, 16, "random", splits=3, block_s=16)
        case("g32_mqa", torch.float16, 1, 32, 1, 200, 16, "prefix")
        case("g16_projected", torch.float32, 2, 32, 2, 130, 16, "prefix", layout="projected", splits=2, block_s=16)
        case("g1_slice", torch.float16, 2, 4, 4, 200, 32, "prefix")  # nkv == nh: the one-head kernel
        case("g1_projected", torch.float32, 2, 4, 4, 130, 16, "late_start", layout="projected", splits=3, block_s=16)
""")


@pytest.mark.parametrize("cases", ["dtypes", "features"])
def test_grouped_kernel_matches_reference_in_interpreter(cases):
    lines = [line.split() for line in interpret(GROUPED_CHECK, cases).splitlines()]
    assert len(lines) == 9
    for name, dtype, error in lines:
        assert float(error) < TOLERANCE[dtype], (name, dtype, error)


# The golden model decoding through the (interpreted) kernel wherever a GPU would use it: the
# left-padded batch of `generate` and the engine's bucketed step (slots as cache views, idle rows
# at the scratch column). Prints whether the tokens equal the golden ids, the kernel's calls, and
# those with grouped KV heads and with cache views that are not contiguous.
GOLDEN_DECODE = INTERPRETER_SHIM + textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from chatglm_ft import decode_attention, load, ops
    from chatglm_ft.engine import Engine
    from chatglm_ft.generate import GenerationConfig, generate

    eager_attend, calls = ops.attend, []

    def attend(q, k, v, mask, options=ops.DEFAULT_KERNELS, **kw):
        if not isinstance(mask, ops.PromptMask) and decode_attention.supported(q, k, v, mask):
            calls.append((k.shape[1] < q.shape[1], not k.is_contiguous()))
            return decode_attention.decode_attention(q, k, v, mask)
        return eager_attend(q, k, v, mask, options, **kw)

    ops.attend = attend  # the kernel on CPU tensors (interpreted) where a GPU would use it; a separate process
    golden_dir = Path(sys.argv[1])
    golden = json.loads((golden_dir / "golden.json").read_text())
    model, tokenizer = load(golden_dir, dtype="float32", device="cpu")
    gen = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    prompts, expected = [c["input_ids"] for c in golden["greedy"]], [c["new_ids"][:6] for c in golden["greedy"]]
    batched = [r.token_ids for r in generate(model, None, prompts, gen)]
    engine = Engine(model, tokenizer, max_batch=len(prompts) + 1, max_context=256, decode="graphs").start()
    served = [h.result(300).token_ids for h in [engine.submit(p, gen) for p in prompts]]
    engine.stop()
    print(batched == expected, served == expected, len(calls), sum(g for g, _ in calls), sum(s for _, s in calls))
""")


@pytest.mark.parametrize("checkpoint", ["golden_dir", "golden2_dir"])
def test_golden_decoding_through_the_kernel_in_interpreter(request, checkpoint):
    """ChatGLM-6B (one KV head per query head) and ChatGLM2 (2 KV heads for 4 query heads: the grouped kernel)."""
    flags = interpret(GOLDEN_DECODE, str(request.getfixturevalue(checkpoint))).split()
    assert flags[:2] == ["True", "True"] and int(flags[2]) >= 4 * 5  # 5 decode steps x 2 layers x 2 paths at least
    grouped, strided = int(flags[3]), int(flags[4])
    assert grouped == (int(flags[2]) if checkpoint == "golden2_dir" else 0)
    assert strided >= 4 * 5  # the cache's first kv_length columns (and the engine's slots) as views, never copied


def test_split_choice_fills_the_gpu_only_when_rows_do_not():
    sms = 132
    splits, split_len = da.num_splits(1 * 32, 2048, 64, sms)  # batch 1 at 2k context: 32 (row, head) pairs
    assert splits >= 8 and split_len % 64 == 0
    assert (splits - 1) * split_len < 2048 <= splits * split_len  # every split has keys, all keys covered
    assert da.num_splits(128 * 32, 256, 64, sms) == (1, 256)  # 4096 pairs: one program each
    assert da.num_splits(32, 40, 64, sms) == (1, 64)  # one tile: nothing to split
    # grouped KV heads count (row, KV head) programs: ChatGLM2/3-6B at batch 1 has 2 of them
    per_sm = da.GROUPED_PROGRAMS_PER_SM
    splits, split_len = da.num_splits(1 * 2, 2048, da.GROUPED_BLOCK_S, sms, per_sm)
    assert splits == 2048 // da.GROUPED_BLOCK_S and split_len == da.GROUPED_BLOCK_S  # a split per tile: still few
    assert da.num_splits(128 * 2, 256, da.GROUPED_BLOCK_S, sms, per_sm) == (1, 256)  # 256 pairs fill 132 SMs


def test_supported_inputs():
    q = torch.zeros(2, 4, 1, 128, dtype=torch.float16)
    k = torch.zeros(2, 4, 300, 128, dtype=torch.float16)
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    assert da.supported(q, k, k, mask) and da.supported(q, k, k, None) and da.supported(q, k, k, mask[:1])
    assert not da.supported(q, k, k, mask.float())  # an additive mask is not ours
    assert not da.supported(q, k.float(), k.float(), mask)
    assert not da.supported(torch.zeros(2, 4, 1, 96), torch.zeros(2, 4, 300, 96), torch.zeros(2, 4, 300, 96), None)
    assert not da.supported(torch.zeros(2, 4, 3, 128, dtype=torch.float16), k, k, None)  # several queries
    assert da.supported(q, k[:, :2], k[:, :2], mask) and da.supported(q, k[:, :1], k[:, :1], None)  # grouped KV heads
    assert not da.supported(q, k[:, :3], k[:, :3], mask)  # 4 query heads do not divide among 3 KV heads
    wide = torch.zeros(2, 8, 300, 128, dtype=torch.float16)
    assert not da.supported(q, wide, wide, mask)  # more KV heads than query heads
    assert not da.supported(q, k[:, :2], k, mask)  # k and v differ
    grad_q = q.clone().requires_grad_()
    assert not da.supported(grad_q, k, k, mask)  # the op has no backward
    with torch.no_grad():
        assert da.supported(grad_q, k, k, mask)


def test_decoding_masks_are_what_the_kernel_expects():
    """A generated token at column i of a row starting at `start` sees exactly [start, i] (SPEC.md
    section 3), whatever its <sop> column; an idle engine slot at the scratch column sees everything."""
    start, context = torch.tensor([0, 3, 0]), torch.tensor([5, 9, 1])
    layout = PrefixLayout(start=start, context=context, mask=context - 1)
    column = torch.tensor([[7], [12], [40]])  # the third: the scratch column, past the 16 attended columns
    mask = attention_mask_for(layout, column, 16)[:, 0, 0]
    j = torch.arange(16)
    assert torch.equal(mask[0], j <= 7) and torch.equal(mask[1], (j >= 3) & (j <= 12)) and mask[2].all()


def test_cpu_op_and_fake_agree_with_reference():
    torch.manual_seed(0)
    q = torch.randn(3, 2, 1, 16)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    mask = torch.rand(3, 1, 1, 20) < 0.7
    mask[..., 0] = True
    torch.testing.assert_close(torch.ops.chatglm_ft.decode_attention(q, k, v, mask),
                               da.decode_attention_reference(q, k, v, mask))
    torch.library.opcheck(torch.ops.chatglm_ft.decode_attention.default, (q, k, v, mask),
                          test_utils=("test_schema", "test_faketensor"))
    grouped_q = torch.randn(3, 4, 1, 16)  # 4 query heads over the 2 KV heads of k and v
    out = torch.ops.chatglm_ft.decode_attention(grouped_q, k, v, mask)
    assert out.shape == (3, 4, 1, 16)
    torch.testing.assert_close(out[:, 2:3], da.decode_attention_reference(grouped_q[:, 2:3], k[:, 1:], v[:, 1:], mask))
    torch.library.opcheck(torch.ops.chatglm_ft.decode_attention.default, (grouped_q, k, v, mask),
                          test_utils=("test_schema", "test_faketensor"))


def test_model_decode_step_traces_the_op_and_the_option_turns_it_off():
    """What fast.py compiles on a GPU: dynamo traces `ops.attend` into the custom op with no graph break
    (fake CUDA tensors, so it runs on CPU-only machines), with the cache slice and mask the decode step
    passes; KernelOptions(decode_attention="torch") keeps the PyTorch path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from chatglm_ft.ops import attend, decode_kernel_applies
    from chatglm_ft.options import KernelOptions

    with FakeTensorMode(), torch.no_grad():
        q = torch.empty_strided((4, 2, 1, 128), (256, 128, 256, 1), device="cuda", dtype=torch.float16)
        k = torch.empty_strided((4, 2, 33, 128), (2 * 65 * 128, 65 * 128, 128, 1), device="cuda", dtype=torch.float16)
        mask = torch.empty(4, 1, 1, 33, device="cuda", dtype=torch.bool)
        graph, _ = torch._dynamo.export(attend)(q, k, k, mask)
        assert "torch.ops.chatglm_ft.decode_attention" in graph.code
        assert decode_kernel_applies(q, k, k, mask, KernelOptions())
        assert not decode_kernel_applies(q, k, k, mask, KernelOptions(decode_attention="torch"))

        # ChatGLM2/3's step: q (B, 32, 1, 128) from the projection, the cache (B, 2, S_max, 128) sliced to kv_length
        q = torch.empty_strided((4, 32, 1, 128), (4096, 128, 4096, 1), device="cuda", dtype=torch.float16)
        k = torch.empty_strided((4, 2, 33, 128), (2 * 65 * 128, 65 * 128, 128, 1), device="cuda", dtype=torch.float16)
        graph, _ = torch._dynamo.export(attend)(q, k, k, mask)  # the grouped kernel, on by default
        assert "torch.ops.chatglm_ft.decode_attention" in graph.code
        assert decode_kernel_applies(q, k, k, mask, KernelOptions())
        assert not decode_kernel_applies(q, k, k, mask, KernelOptions(new_kernels=False))  # the A/B switch
        assert not decode_kernel_applies(q, k, k, mask, KernelOptions(decode_attention="torch", new_kernels=True))


@pytest.mark.gpu
@pytest.mark.parametrize("nkv", [32, 2], ids=["heads", "grouped"])  # ChatGLM-6B; ChatGLM2/3-6B's 2 KV heads
@pytest.mark.parametrize("B, S", [(1, 2048), (128, 256), (8, 1000)])
def test_cuda_kernel_matches_reference_and_is_captured(B, S, nkv):
    torch.manual_seed(0)
    nh, hd = 32, 128
    cache_k, cache_v = (torch.randn(B, nkv, S + 1, hd, device="cuda", dtype=torch.float16) for _ in range(2))
    q = torch.randn(B, 1, nh, hd, device="cuda", dtype=torch.float16).transpose(1, 2)
    start = torch.randint(0, 4, (B,), device="cuda")
    column = torch.randint(S // 2, S, (B, 1), device="cuda")
    mask = attention_mask_for(PrefixLayout(start=start, context=start + 1, mask=start), column, S)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    ref = da.decode_attention_reference(q, k, v, mask).float()
    out = torch.ops.chatglm_ft.decode_attention(q, k, v, mask)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 2e-3
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.chatglm_ft.decode_attention(q, k, v, mask)  # warm-up (compiles) outside the capture
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.chatglm_ft.decode_attention(q, k, v, mask)
    torch.cuda.current_stream().wait_stream(stream)
    q.normal_()
    graph.replay()
    torch.testing.assert_close(captured, torch.ops.chatglm_ft.decode_attention(q, k, v, mask))


@pytest.mark.gpu
def test_cuda_decoding_matches_with_and_without_the_kernel(golden_dir, golden):
    """A left-padded batch of the golden prompts on the GPU: the eager loop and the compiled, captured
    fast path with the kernel against the eager PyTorch attention."""
    from chatglm_ft import load
    from chatglm_ft.generate import GenerationConfig, stream_tokens
    from chatglm_ft.options import KernelOptions

    model, _ = load(golden_dir, dtype="float16", device="cuda")
    prompts = [c["input_ids"] for c in golden["greedy"]]
    gen = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    model.use_kernels(KernelOptions(decode_attention="torch"))
    reference = list(stream_tokens(model, prompts, gen, fast=False))
    model.use_kernels(KernelOptions())
    for fast in (False, None):  # eager, then compiled + CUDA graphs
        steps = list(stream_tokens(model, prompts, gen, fast=fast))
        assert steps[:2] == reference[:2]  # float16 near-ties may flip later tokens


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_grouped_decoding_gives_the_golden_ids(ckpt_dir, gold, dtype):
    """The tiny ChatGLM2/3 (4 query heads over 2 KV heads) on CUDA through the grouped kernel: the eager
    loop (kernel calls counted) and the compiled, captured fast path give THUDM's greedy ids in float32,
    and the tokens of the PyTorch attention path in 16-bit (near-ties may flip later tokens there)."""
    from chatglm_ft.api import load_model
    from chatglm_ft.generate import GenerationConfig, stream_tokens
    from chatglm_ft.options import KernelOptions

    model = load_model(ckpt_dir, dtype=dtype, device="cuda")
    model.use_kernels(KernelOptions(new_kernels=True))  # explicit (the default too)
    case, batch = gold["greedy"][-1], gold["batch"][0]
    batch_prompts = [[t for t, keep in zip(row, m) if keep]
                     for row, m in zip(batch["input_ids"], batch["attention_mask"])]  # the left padding removed

    def tokens(prompts, n, fast):
        steps = list(stream_tokens(model, prompts, GenerationConfig(max_new_tokens=n, stop_token_ids=()), fast=fast))
        return [list(row) for row in zip(*steps)]

    eager, calls = da.decode_attention, []

    def counted(q, k, v, mask, **kw):
        calls.append(k.shape[1] < q.shape[1])
        return eager(q, k, v, mask, **kw)

    n, nb = len(case["new_ids"]), len(batch["new_ids"][0])
    reference = [case["new_ids"]], batch["new_ids"]  # THUDM's float32 greedy ids
    if dtype != "float32":  # 16-bit: the PyTorch attention path's tokens
        model.use_kernels(KernelOptions(decode_attention="torch"))
        reference = tokens([case["input_ids"]], n, False), tokens(batch_prompts, nb, False)
        model.use_kernels(KernelOptions(new_kernels=True))
    da.decode_attention = counted  # what the custom op calls (eager decoding: one call per layer and step)
    try:
        single = tokens([case["input_ids"]], n, False)
    finally:
        da.decode_attention = eager
    assert calls and all(calls) and len(calls) >= model.config.num_layers * (n - 1)
    for fast in (False, None):  # eager, then compiled + CUDA graphs
        got = single if fast is False else tokens([case["input_ids"]], n, fast)
        got_batch = tokens(batch_prompts, nb, fast)
        if dtype == "float32":
            assert got == reference[0] and got_batch == reference[1]
        else:
            assert got[0][:2] == reference[0][0][:2] and [r[:2] for r in got_batch] == [r[:2] for r in reference[1]]

