"""The kernel seam (ops.py): the gemv choice reaches float and quantized layers alike. Traced with fake
CUDA tensors, so it runs on CPU-only machines: what a GPU run would call is in the traced graph."""
import pytest
import torch
from torch import nn

from chatglm_ft import ops
from chatglm_ft.options import KernelOptions

pytest.importorskip("triton")


def traced(layer, options):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        x = torch.empty(1, 1, 128, device="cuda", dtype=torch.float16)
        def run(x):
            return ops.linear(layer, x, options)

        graph, _ = torch._dynamo.export(run)(x)
    return graph.code


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_gemv_choice_is_honoured_by_every_layer_type(kind):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from chatglm_ft.quantize import Int4Linear, Int8Linear

    if kind == "float":
        layer = nn.Linear(128, 256, device="meta", dtype=torch.float16)
    else:
        layer = (Int8Linear if kind == "int8" else Int4Linear)(128, 256, device="meta", dtype=torch.float16)
    with FakeTensorMode():  # the same parameters and buffers as fake CUDA tensors
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            fake = torch.empty(t.shape, dtype=t.dtype, device="cuda")
            setattr(layer, name, nn.Parameter(fake, requires_grad=False) if isinstance(t, nn.Parameter) else fake)
    assert "chatglm_ft.gemv" in traced(layer, KernelOptions(gemv="kernel"))
    assert "chatglm_ft.gemv" not in traced(layer, KernelOptions(gemv="cublas"))


def test_attend_takes_fewer_kv_heads_than_query_heads():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 16)
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril(diagonal=2)
    out = ops.attend(q, k, v, mask)
    expected = ops.attend(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), mask)
    torch.testing.assert_close(out, expected)
    one = ops.attend(q[:, :, :1], k, v, mask[:, :, :1])  # the decoding path
    torch.testing.assert_close(one, expected[:, :, :1])
