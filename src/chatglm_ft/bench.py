"""Inference benchmark: load time, memory, prefill latency, batch-1 decode speed against the
memory-bandwidth roofline (SPEC.md section 8).

Batch-1 decoding reads every weight once per token plus the KV cache up to the current column,
so `bandwidth / (weight bytes + KV bytes)` is the fastest any implementation can decode; the
benchmark reports the fraction of it reached. Bytes are counted from the model's own tensors
(quantized ones included), so the roofline follows the model actually measured.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from .config import ChatGLMConfig
from .config_glm2 import ChatGLM2Config
from .fast import decoder_for, fast_options, prefill_logits, prompt_mask_for
from .generate import GenerationConfig, stream_tokens
from .graphs import WARMUP_RUNS
from .model import ChatGLMForConditionalGeneration

# -- building a model without a checkpoint -------------------------------------------------------
@torch.no_grad()
def random_model(config: ChatGLMConfig | ChatGLM2Config, *, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 tie_lm_head: bool = True) -> ChatGLMForConditionalGeneration:
    """A model of `config` (any ChatGLM generation) with small random weights, allocated directly on `device`.

    Built on `meta`, given storage with `to_empty` and filled in place, so a full-size model never
    exists on the host. ChatGLM-6B's lm_head is tied to the embeddings, as in the released checkpoint;
    ChatGLM2/3's output layer is its own weight, as in theirs.
    """
    from .api import model_class

    model = model_class(config)(config, device="meta").to(dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        fill_random_(name, p, generator)
    if tie_lm_head and hasattr(model, "tie_lm_head"):
        model.tie_lm_head()
    model.reset_buffers()
    return model.eval()


def fill_random_(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """The random value of one float parameter, in place: layernorm weights 1, biases 0, the rest N(0, 0.02)."""
    if name.endswith("layernorm.weight"):
        tensor.fill_(1.0)
    elif name.endswith(".bias") or "layernorm" in name:
        tensor.zero_()
    else:
        tensor.normal_(0.0, 0.02, generator=generator)  # in place: no temporary copy


RANDOM_BLOCK = 1 << 24  # float weights drawn at a time by random_quantized_model (64 MB of float32)


@torch.no_grad()
def random_quantized_model(config: ChatGLMConfig | ChatGLM2Config, scheme, *, dtype: torch.dtype,
                           device: torch.device, seed: int = 0, tie_lm_head: bool = True,
                           float16_embeddings: bool | None = None) -> ChatGLMForConditionalGeneration:
    """`quantize_model(random_model(...), scheme)` without the float model: the quantized skeleton is given
    storage on `device` and each weight is drawn a block of rows at a time and quantized into place, so the
    float working copy is one block (a full-size model that only fits quantized can be benchmarked).

    On the CPU the values are those of the two-step path (the generator draws the same numbers in blocks)."""
    from .quantize import (HalfStoredEmbedding, HalfStoredLinear, QuantScheme, QuantizedWeight, finish_loading,
                           keeps_float16_embeddings, quantize_tensor, quantized_skeleton, store_float16_embeddings)

    scheme = QuantScheme.parse(scheme)
    model, _ = quantized_skeleton(config, scheme, dtype=dtype)
    if keeps_float16_embeddings(scheme, float16_embeddings, device=device, dtype=dtype):
        store_float16_embeddings(model)
    tied = tie_lm_head and hasattr(model, "tie_lm_head")
    model = model.to_empty(device=device)  # integer weights, scales and float16 tables: the final sizes
    generator = torch.Generator(device=device).manual_seed(seed)
    # the order of random_model's draws: parameters in order, a tied lm_head last and shared afterwards
    for name, p in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if tied and module_name == "lm_head":
            continue
        if attr == "weight" and isinstance(module, (QuantizedWeight, HalfStoredEmbedding, HalfStoredLinear)):
            rows, cols = p.shape
            cols *= 2 if getattr(module, "bits", 8) == 4 else 1  # int4 packs two columns a byte
            step = max(1, RANDOM_BLOCK // cols)
            for start in range(0, rows, step):
                block = torch.empty(min(step, rows - start), cols, dtype=dtype, device=device)
                block.normal_(0.0, 0.02, generator=generator)
                if not isinstance(module, QuantizedWeight):
                    p[start:start + step].copy_(block)  # float16-stored: rounded as store_float16_embeddings does
                    continue
                stored = (module.weight, module.weight_scale, module.weight_zero)
                for target, value in zip(stored, quantize_tensor(block, scheme, device)):
                    if target is not None:
                        target[start:start + step].copy_(value)
        else:
            fill_random_(name, p, generator)
    if tied:
        model.tie_lm_head()  # finish_loading shares quantized embeddings' scales too
    finish_loading(model, scheme, dtype=dtype, device=device, source="random weights")
    return model.eval()


# -- sizes -----------------------------------------------------------------------------------------
def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter and buffer once (shared storage once), except the
    KV cache (counted per context) and an untied embedding table, of which a step reads one row."""
    caches = {id(t) for t in (model.kv_caches.buffers() if model.kv_caches is not None else ())}
    embeddings = model.transformer.word_embeddings
    head = {t.data_ptr() for t in list(model.lm_head.parameters()) + list(model.lm_head.buffers())}
    skip = {t.data_ptr() for t in list(embeddings.parameters()) + list(embeddings.buffers()) if t.data_ptr() not in head}
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in caches or t.data_ptr() in skip or t.numel() == 0:
            continue
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def kv_bytes_per_token(model, batch_size: int = 1) -> int:
    """Keys + values of one cache column across all layers, for `batch_size` rows: 2·L·G·d elements, where
    G is the key/value heads (all heads for ChatGLM-6B, the multi-query groups for ChatGLM2/3)."""
    c = model.config
    kv_width = getattr(c, "kv_heads", c.num_attention_heads) * c.head_dim
    return 2 * c.num_layers * kv_width * torch.empty((), dtype=model.dtype).element_size() * batch_size


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large same-device copy (read + write), the practical ceiling for decoding."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    runs = 10 if device.type == "cuda" else 3
    sync(device)
    began = time.perf_counter()
    for _ in range(runs):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * runs / (time.perf_counter() - began)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def random_prompt(config: ChatGLMConfig | ChatGLM2Config, length: int, generator: torch.Generator) -> list[int]:
    """`length` ids: random text ids, then [gMASK] <sop> as every ChatGLM-6B prompt ends (ChatGLM2/3
    prompts are plainly causal: text ids only)."""
    # ids below 20,000 (ChatGLM-6B's image tokens come first) and below a small model's vocabulary, never a special id
    high = min(20000, config.vocab_size)
    glm1 = isinstance(config, ChatGLMConfig)
    ends = [config.gmask_token_id, config.bos_token_id] if glm1 else []
    special = {config.eos_token_id, config.pad_token_id} | (
        {config.gmask_token_id, config.mask_token_id, config.bos_token_id} if glm1 else set())
    text = [i if i not in special else 5 for i in torch.randint(5, high, (max(0, length - len(ends)),), generator=generator).tolist()]
    return text + ends


# -- measurements --------------------------------------------------------------------------------
@dataclass
class DecodeResult:
    name: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    mean_context: float
    bytes_per_token: int
    roofline_tokens_per_second: float
    roofline_fraction: float


@dataclass
class BenchReport:
    device: str
    torch_version: str
    dtype: str
    quantize: str | None
    model: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    bandwidth: float  # bytes/s
    bandwidth_source: str  # "measured" or "given"
    load_seconds: float
    fast_path: dict | None
    prefill: list[dict] = field(default_factory=list)  # {"tokens", "seconds", "path"}
    decode: list[DecodeResult] = field(default_factory=list)
    eager_decode: list[DecodeResult] = field(default_factory=list)
    compile_seconds: float = 0.0
    capture_seconds: float = 0.0
    memory_after_load: int = 0
    peak_memory: int = 0
    profile: str | None = None
    prefill_profile: str | None = None  # of the longest prefill length

    def to_dict(self) -> dict:
        return asdict(self)


def prefill_runner(model, length: int, *, generator: torch.Generator, options=None):
    """A callable that prefills one random `length`-token prompt (cache writes and the last logits
    included) the way `stream_tokens` does with these fast-path options (None: the eager loop): through
    the decoder's prefill, so a short prompt is the padded, captured prefill users get."""
    config = model.config
    rows = [random_prompt(config, length, generator)]
    input_ids = torch.tensor(rows, device=model.device)
    layout = model.prompt_layout(input_ids)
    mask = prompt_mask_for(rows, config)
    if options is None:
        model.setup_caches(1, config.max_sequence_length + 1)
        prefill = partial(prefill_logits, model)
    else:
        decoder = decoder_for(model, 1, options)
        model.kv_caches = decoder.caches
        prefill = decoder.prefill
    return lambda: prefill(input_ids, layout, mask)


@torch.inference_mode()  # the decoder exists already (time_prefill made it), else it is made as stream_tokens makes it
def prefill_path(model, length: int, options=None) -> str:
    """How a `length`-token bench prompt is prefilled with these fast-path options, in words."""
    if options is None:
        return "eager"
    prompt = random_prompt(model.config, length, torch.Generator())  # only where its special ids sit matters
    return decoder_for(model, 1, options).prefill_path(length, prompt_mask_for([prompt], model.config))


# Untimed runs first: cuDNN/cuBLAS heuristics, the allocator and any step graphs.StepGraphs has yet to
# capture (on a key's third run) warm up, so the timed runs are what every later prompt gets.
PREFILL_WARMUP = WARMUP_RUNS + 1


@torch.inference_mode()
def time_prefill(model, length: int, *, repeats: int, generator: torch.Generator, options=None) -> float:
    """Median seconds to prefill one `length`-token prompt (see prefill_runner), after PREFILL_WARMUP runs."""
    run = prefill_runner(model, length, generator=generator, options=options)
    times = []
    for i in range(PREFILL_WARMUP + repeats):
        sync(model.device)
        began = time.perf_counter()
        run()
        sync(model.device)
        if i >= PREFILL_WARMUP:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.inference_mode()
def profile_prefill(model, length: int, *, generator: torch.Generator, options=None) -> str:
    """torch.profiler table of one warm `length`-token prefill (kernels by device time): what bounds it."""
    from torch.profiler import ProfilerActivity, profile

    run = prefill_runner(model, length, generator=generator, options=options)
    for _ in range(PREFILL_WARMUP):
        run()
    sync(model.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(model.device)
    sort = "self_device_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=20)


def time_decode(model, name: str, prompt: list[int], new_tokens: int, *, fast, bandwidth: float,
                weights: int) -> DecodeResult:
    """Batch-1 greedy decoding of `new_tokens` through `stream_tokens`: the path users get."""
    gen = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
    stamps = []
    for _ in stream_tokens(model, [prompt], gen, fast=fast):
        stamps.append(time.perf_counter())
    # from the first token (which carries the prefill) to the last: steady-state decode steps only
    steps = len(stamps) - 1
    seconds = stamps[-1] - stamps[0]
    rate = steps / seconds
    mean_context = len(prompt) + (new_tokens - 1) / 2
    per_token = weights + int(kv_bytes_per_token(model) * mean_context)
    return DecodeResult(
        name=name, prompt_tokens=len(prompt), new_tokens=len(stamps), seconds=seconds, tokens_per_second=rate,
        mean_context=mean_context, bytes_per_token=per_token, roofline_tokens_per_second=bandwidth / per_token,
        roofline_fraction=rate * per_token / bandwidth,
    )


def profile_decode(model, prompt: list[int], steps: int, *, fast) -> str:
    """torch.profiler table of `steps` decode steps (kernels by device time): what bounds decoding."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    gen = GenerationConfig(max_new_tokens=steps + 1, stop_token_ids=())
    tokens = stream_tokens(model, [prompt], gen, fast=fast)
    next(tokens)  # prefill outside the profile
    with profile(activities=activities) as prof:
        for _ in tokens:
            pass
        sync(model.device)
    sort = "self_device_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def run_bench(
    model,
    *,
    model_name: str,
    load_seconds: float,
    quantize: str | None = None,
    prefill_lengths: tuple[int, ...] = (128, 512, 2048),
    decode_tokens: int = 128,
    short_prompt: int = 16,
    bandwidth: float | None = None,
    fast=None,
    compare_eager: bool = False,
    profile_steps: int = 0,
    seed: int = 0,
) -> BenchReport:
    """Measure a loaded model; `fast` as for `stream_tokens` (None: the default for the device)."""
    device = model.device
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    memory_after_load = torch.cuda.memory_allocated(device) if device.type == "cuda" else peak_memory(device)
    measured = bandwidth is None
    bandwidth = measure_bandwidth(device) if measured else bandwidth
    weights = weight_bytes(model)
    options = fast_options(model, fast)
    report = BenchReport(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_version=torch.__version__, dtype=str(model.dtype).removeprefix("torch."), quantize=quantize,
        model=model_name, parameters=model.num_parameters(), weight_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(model), bandwidth=bandwidth,
        bandwidth_source="measured" if measured else "given", load_seconds=load_seconds,
        fast_path=None if options is None else {**asdict(options), "cuda_graphs": options.cuda_graphs and device.type == "cuda",
                                                "gemv": model.kernels.gemv},
        memory_after_load=memory_after_load,
    )

    for length in prefill_lengths:
        length = min(length, config.max_sequence_length)  # the cache has one column more
        seconds = time_prefill(model, length, repeats=3, generator=generator, options=options)
        report.prefill.append({"tokens": length, "seconds": seconds, "path": prefill_path(model, length, options)})

    # "2k context": ChatGLM-6B's whole window; ChatGLM2/3's 8k/32k windows are measured at 2k all the same
    context = min(config.max_sequence_length, 2048)
    new_tokens = min(decode_tokens, context - short_prompt)
    short = random_prompt(config, short_prompt, generator)
    long = random_prompt(config, context - new_tokens, generator)
    cases = [("short context", short), ("2k context", long)]
    # warm-up runs compile the step and capture the graphs each case needs (the decoder times that)
    for _, prompt in cases:
        time_decode(model, "warm-up", prompt, min(new_tokens, 8), fast=fast, bandwidth=bandwidth, weights=weights)
    if options is not None:
        stats = decoder_for(model, 1, options).stats
        report.compile_seconds, report.capture_seconds = stats["compile_seconds"], stats["capture_seconds"]
    for name, prompt in cases:
        report.decode.append(time_decode(model, name, prompt, new_tokens, fast=fast, bandwidth=bandwidth, weights=weights))
    if compare_eager:
        for name, prompt in cases:
            report.eager_decode.append(time_decode(model, name, prompt, new_tokens, fast=False, bandwidth=bandwidth,
                                                   weights=weights))
    if profile_steps:
        report.profile = profile_decode(model, short, profile_steps, fast=fast)
        longest = min(max(prefill_lengths), config.max_sequence_length) if prefill_lengths else 0
        if longest:
            report.prefill_profile = profile_prefill(model, longest, generator=generator, options=options)
    report.peak_memory = peak_memory(device)
    return report


# -- quantized against float, same run --------------------------------------------------------------
@dataclass
class ModeDecode:
    """Decode speed of one weight format over interleaved rounds (tokens/s, one per round)."""

    mode: str  # "float32", "int8", "int4"
    weight_bytes: int
    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def compare_formats(models: dict, *, new_tokens: int, rounds: int, prompt_tokens: int = 16, seed: int = 0,
                    fast=None) -> list[ModeDecode]:
    """Batch-1 greedy decode tokens/s of each (model, CPU kernels on) entry (the same weights in
    different formats), interleaved round by round so that a change in the machine's load touches
    all of them alike."""
    from . import cpu_quant

    first = next(iter(models.values()))[0]
    prompt = random_prompt(first.config, prompt_tokens, torch.Generator().manual_seed(seed))
    results = {name: ModeDecode(name, weight_bytes(m), []) for name, (m, _) in models.items()}
    for model, kernels in models.values():  # warm-up: kernels built and caches allocated outside the timing
        with cpu_quant.enabled(kernels):
            time_decode(model, "warm-up", prompt, 4, fast=fast, bandwidth=1.0, weights=1)
    for _ in range(rounds):
        for name, (model, kernels) in models.items():
            with cpu_quant.enabled(kernels):
                d = time_decode(model, name, prompt, new_tokens, fast=fast, bandwidth=1.0, weights=1)
            results[name].rates.append(d.tokens_per_second)
    return list(results.values())


def format_formats(results: list[ModeDecode], *, threads: int) -> str:
    base = results[0]
    lines = [f"decode, batch 1, short context, {threads} threads, {len(base.rates)} interleaved rounds:"]
    for r in results:
        rates = ", ".join(f"{x:.1f}" for x in r.rates)
        lines.append(f"  {r.mode:<20} weights {r.weight_bytes / 1e9:6.3f} GB  {r.median:7.2f} tokens/s median "
                     f"({rates})  {r.median / base.median:5.2f}x {base.mode}")
    return "\n".join(lines)


# -- printing ------------------------------------------------------------------------------------
def format_report(report: BenchReport) -> str:
    gb = 1e9
    fast = report.fast_path
    path = "eager" if fast is None else (
        ("compiled" if fast["compile"] else "not compiled") + (" + CUDA graphs" if fast["cuda_graphs"] else "")
        + f", gemv={fast['gemv']}")
    lines = [
        f"model        {report.model} ({report.parameters / 1e9:.3f}B parameters, {report.dtype}"
        + (f", {report.quantize}" if report.quantize else "") + f") on {report.device}, torch {report.torch_version}",
        f"decode path  {path}",
        f"load         {report.load_seconds:.1f} s; memory {report.memory_after_load / gb:.2f} GB after load, "
        f"{report.peak_memory / gb:.2f} GB peak",
        f"bytes/token  weights {report.weight_bytes / gb:.3f} GB + KV {report.kv_bytes_per_token / 1e6:.3f} MB per "
        f"context token; bandwidth {report.bandwidth / 1e12:.2f} TB/s ({report.bandwidth_source})",
        "compile      none (eager loop)" if fast is None else
        f"compile      {report.compile_seconds:.1f} s (+ {report.capture_seconds:.2f} s CUDA graph capture)",
    ]
    lines += [f"prefill      {p['tokens']:>5} tokens: {p['seconds'] * 1e3:8.1f} ms ({p['path']})" for p in report.prefill]
    for label, rows in (("decode", report.decode), ("eager decode", report.eager_decode)):
        for d in rows:
            lines.append(
                f"{label:<12} {d.name:<14} {d.tokens_per_second:7.1f} tokens/s ({1e3 / d.tokens_per_second:.2f} ms/token, "
                f"context {d.mean_context:.0f}): {d.roofline_fraction:5.1%} of the {d.roofline_tokens_per_second:.0f} "
                f"tokens/s roofline")
    if report.profile:
        lines += ["", "profile of decode steps (short context):", report.profile]
    if report.prefill_profile:
        lines += ["", f"profile of one {max(p['tokens'] for p in report.prefill)}-token prefill:", report.prefill_profile]
    return "\n".join(lines)
