"""Int8/int4 matmuls on the CPU that read the quantized weight as stored, never a float copy of it
(and the same for float16 weights: `half_linear`).

Decoding a token reads every weight once, so on the CPU its speed is set by the bytes read: the
float path (dequantize a block of rows, then BLAS) reads the integer weight AND writes and re-reads
a float32 copy, and is slower than float32 itself. These kernels stream the int8 (or packed int4)
rows once: 4x (8x) fewer bytes than a float32 weight.

How the input meets the weights (`INT8_ACTIVATIONS`, default on): each input row is quantized once
per matmul to int8 in blocks, x ~= q * d with d = max|x| / 127 over the block and q = round(x * (1 / d))
(float32, half to even); the blocks are 32 values for int8 weights and one int4 group (64-256 values)
for int4 weights. The kernels then take integer dot products (AVX2 vpmaddubsw), converting only each
block's integer sum to float: a few instructions per 32 weights instead of widening every weight to
float32, which left the kernels bound by arithmetic rather than by memory. The result is exactly the
float matmul of that rounded input with the dequantized weight (up to float32 summation order); the
rounding adds about 0.4-0.9% relative error per output (tests/test_quantize.py), as much as int8
weights' own rounding (0.8% on Gaussian weights) and a tenth of int4's (10%); greedy decoding of the
golden prompts gives the same tokens as the float path. With
it off, or where the blocks do not fit (int8: in_features % 32; int4: groups that are not 64, 128,
192 or 256 columns), the weights are widened to float32 and meet the float input: equal to the float
path up to summation order.

Float16 weights (`half_linear`): a quantized model on the CPU keeps its lm_head (and embeddings) in
float16, as released checkpoints store them (quantize.HalfStoredLinear); the kernel widens each weight
to float32 in registers (F16C) and meets the float input, so the lm_head costs half the bytes of a
float32 one per token with the float32 result (up to summation order).

The kernels are a small C++ file (cpu_quant.cpp) compiled on first use with the system's C++
compiler (`c++`), as THUDM's implementation compiles its CPU kernels with gcc; without a
compiler the dequantizing path is used (one warning). It reads the stored
layouts of quantize.py directly (int4 group halves: byte j of a group holds column j low and column
j + G/2 high, so each nibble plane meets a contiguous slice of the input), any even group size, so
nothing is repacked. The rows are split over torch's threads (the file is compiled with OpenMP, which
ATen's parallel_for needs); each output is summed by one thread in a fixed order, so results do not
depend on the thread count.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

# Token rows up to which the kernels run; more rows (prefill) take dequantize-then-BLAS, which reuses
# each dequantized block across the rows. The kernels' cost grows with the rows: on one AVX2 core
# (4096 x 1024) the float-input kernels broke even with it at 8-16 rows (int8) and 16-32 (int4), the
# int8-input ones at about 64 (int8: 12.7 vs 11.7 ms; int4 10.2 vs 14.9 ms at 64 rows).
MAX_ROWS = 8

SOURCE = Path(__file__).with_name("cpu_quant.cpp")
ENABLED = True  # False forces the dequantizing reference path (benchmarks compare both)
INT8_ACTIVATIONS = True  # False: the kernels meet the float input (weights widened to float32)
_loaded: bool | None = None  # None: not tried yet


def _flags(openmp: bool) -> list[str]:
    flags = ["-O3", "-ffp-contract=fast"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]  # what this CPU runs (the build is cached per flags)
    if openmp:  # ATen's parallel_for is inlined into the kernels: without OpenMP it runs on one thread
        flags.append("-fopenmp")
    return flags


def _build(openmp: bool = True) -> Path:
    """Compile cpu_quant.cpp against this torch into a cached shared library (one compiler call: no
    ninja or build system needed); the name hashes the source, flags and torch version."""
    from torch.utils.cpp_extension import include_paths, library_paths

    flags = _flags(openmp) + ["-std=c++17", "-shared", "-fPIC",
                              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, torch.__version__]).encode()).hexdigest()[:16]
    cache = Path.home() / ".cache" / "chatglm_ft"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir())
    library = cache / f"cpu_quant-{key}.so"
    if not library.exists():
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        compiler = shutil.which("c++") or shutil.which("g++") or "c++"
        command = [compiler, *flags, str(SOURCE), "-o", str(partial),
                   *(f"-I{p}" for p in include_paths()), *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
            raise RuntimeError(errors[0][:300])
        os.replace(partial, library)  # atomic: a process building beside this one never loads half a file
    return library


def available() -> bool:
    """Whether the kernels are built and loaded (compiled on first use, then cached under
    ~/.cache/chatglm_ft); False where they cannot be built (no C++ compiler: one warning)."""
    global _loaded
    if _loaded is None:
        try:
            try:
                library = _build(openmp=True)
            except RuntimeError as e:  # a compiler without OpenMP: the kernels run on one thread
                library = _build(openmp=False)
                warnings.warn(f"CPU int8/int4 kernels built without OpenMP ({e}): they use one thread", stacklevel=2)
            torch.ops.load_library(str(library))
            _register_shapes()
            _loaded = True
        except Exception as e:  # no compiler: the float path still works, just slower
            _loaded = False
            warnings.warn(f"CPU int8/int4 kernels unavailable ({type(e).__name__}: {e}); quantized layers on "
                          "the CPU dequantize instead (slower)", stacklevel=2)
    return _loaded


@contextmanager
def enabled(flag: bool):
    """Run a block with the kernels on or off (off: the dequantizing reference path)."""
    global ENABLED
    previous, ENABLED = ENABLED, flag
    try:
        yield
    finally:
        ENABLED = previous


@contextmanager
def int8_activations(flag: bool):
    """Run a block with the input quantized to int8 per block of 32 (True) or kept float32."""
    global INT8_ACTIVATIONS
    previous, INT8_ACTIVATIONS = INT8_ACTIVATIONS, flag
    try:
        yield
    finally:
        INT8_ACTIVATIONS = previous


def _few_cpu_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernels are on and x is a few float token rows, x and the weight on the CPU (what every op needs)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (ENABLED and x.device.type == "cpu" and weight.device.type == "cpu" and 0 < rows <= MAX_ROWS
            and x.is_floating_point())


def usable(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether `quantized_linear(x, weight, ...)` can run here: CPU, a few token rows, even int4 groups."""
    return _few_cpu_rows(x, weight) and scale.dtype == torch.float16 and available()


def _register_shapes() -> None:
    """The ops' output shapes for fake tensors, so that torch.compile traces each as one op."""
    def output(x, weight, *_):
        return x.new_empty(x.shape[0], weight.shape[0])

    torch.library.register_fake("chatglm_ft_cpu::int8_linear", output)
    torch.library.register_fake("chatglm_ft_cpu::int4_linear", output)
    torch.library.register_fake("chatglm_ft_cpu::half_linear", output)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequantize(weight).T + bias for a few CPU rows (see `usable`), in x's dtype."""
    if zero is None:
        return _on_rows(x, bias, weight.shape[0], lambda x2, b: torch.ops.chatglm_ft_cpu.int8_linear(
            x2, weight, scale, b, INT8_ACTIVATIONS))
    return _on_rows(x, bias, weight.shape[0], lambda x2, b: torch.ops.chatglm_ft_cpu.int4_linear(
        x2, weight, scale, zero, b, INT8_ACTIVATIONS))


def _on_rows(x: torch.Tensor, bias: torch.Tensor | None, out_features: int, op) -> torch.Tensor:
    """op(x as float32 rows (M, K), bias in float32) -> (M, N) float32, returned in x's dtype and shape."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    y = op(x2, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def half_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `half_linear(x, weight, ...)` can run here: a float16 weight, a few CPU token rows."""
    return _few_cpu_rows(x, weight) and weight.dtype == torch.float16 and available()


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight.T + bias for a float16 weight and a few CPU rows (see `half_usable`), in x's dtype:
    the weight is widened to float32 in registers, so no float32 copy of it is ever made (exact up to
    float32 summation order)."""
    return _on_rows(x, bias, weight.shape[0], lambda x2, b: torch.ops.chatglm_ft_cpu.half_linear(x2, weight, b))
