"""The fast decode path: static KV cache, compiled decode step, CUDA graphs, tokens kept on the GPU.

Batch-1 decoding reads every weight once per token, so on a GPU its speed is set by memory
bandwidth as long as nothing else shows: no Python or kernel-launch gaps (the whole step is one
CUDA graph replay), no host round trip per token (the next step reads the token where the last
one wrote it; the host reads each token one step behind, from pinned memory), and no wasted
bytes (attention reads a bucket of the cache just long enough for the context).

One step = `decode_logits` (the model on one token per row, compiled once per batch size with the
attention length dynamic, when the decoder is made) + `pick_greedy` or `pick_sampled` (compiled;
sampling stays on the GPU). For each attention bucket (256, 512, ... max_sequence_length columns)
and sampling mode the step runs directly twice (lazy initialisation on the capture stream), then
is captured as a CUDA graph and replayed. The model is called as an ordinary nn.Module, so
quantized layers and adapters go through the same step. Prefill stays eager unless asked
($CHATGLM_FT_COMPILE_PREFILL=1): its shapes vary and its large matmuls dominate.

`stream_tokens` in generate.py uses this by default on CUDA (`CHATGLM_FT_COMPILE=0` turns it
off); on the CPU it runs only when asked (`fast=True`: compiled, without graphs), for tests.
Compiled code is cached on disk by inductor ($TORCHINDUCTOR_CACHE_DIR, default
/tmp/torchinductor_$USER), so a second process compiles much faster.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from .errors import ChatGLMError
from .multigpu import is_split
from .model import PromptMask
from .positions import PrefixLayout, attention_mask_for, position_ids_for, prefix_layout

log = logging.getLogger("chatglm_ft.fast")

ENV = "CHATGLM_FT_COMPILE"  # 0: eager; 1 (default): compile + CUDA graphs; graphs: graphs only; nographs: compile only
ENV_GEMV = "CHATGLM_FT_GEMV"  # kernel (default): ours (kernels.py); cublas: cuBLAS matmuls; triton: inductor's reductions
ENV_PREFILL = "CHATGLM_FT_COMPILE_PREFILL"  # 1: also compile the prefill of single prompts (dynamic length)
NAN_GUARD_TOKEN_ID = 5  # the original replaces bad logits by zeros with 5e4 at id 5 (as generate.py)
FIRST_BUCKET = 256
WARMUP_RUNS = 2  # direct runs of a step before it is captured


@dataclass(frozen=True)
class FastOptions:
    compile: bool = True
    cuda_graphs: bool = True  # ignored off CUDA
    # "kernel" (default): one-token matmuls run our Triton skinny matmul (model.SKINNY_ROWS); "cublas":
    # cuBLAS calls; "triton": inductor turns them into tuned reductions (docs/benchmarks.md has the A/B).
    gemv: str = "kernel"
    compile_prefill: bool = False  # single unpadded prompts only; fuses the elementwise work between matmuls

    @classmethod
    def from_env(cls) -> "FastOptions | None":
        """Options from $CHATGLM_FT_COMPILE / $CHATGLM_FT_GEMV; None when the fast path is turned off."""
        value = os.environ.get(ENV, "1").strip().lower()
        modes = {"1": cls(), "true": cls(), "on": cls(), "graphs": cls(compile=False), "nographs": cls(cuda_graphs=False)}
        if value in ("0", "false", "off", "no", "eager"):
            return None
        if value not in modes:
            raise ChatGLMError(f"{ENV}={value!r}: use 0 (eager), 1 (compile + CUDA graphs), graphs or nographs")
        gemv = os.environ.get(ENV_GEMV, "kernel").strip().lower()
        if gemv not in ("triton", "cublas", "kernel"):
            raise ChatGLMError(f"{ENV_GEMV}={gemv!r}: use cublas, triton or kernel")
        compile_prefill = os.environ.get(ENV_PREFILL, "0").strip().lower() in ("1", "true", "on")
        return replace(modes[value], gemv=gemv, compile_prefill=compile_prefill and modes[value].compile)


def fast_options(model, fast: "bool | FastOptions | None") -> FastOptions | None:
    """The options `stream_tokens` decodes with, or None for the eager loop.

    None (auto): the fast path on CUDA unless $CHATGLM_FT_COMPILE=0; True: also on the CPU
    (compiled, no graphs); False: eager.
    """
    if fast is False or model.training or is_split(model):  # graphs and compiled steps stay on one device
        return None
    if isinstance(fast, FastOptions):
        return fast
    if fast is True:
        return FastOptions.from_env() or FastOptions()
    return FastOptions.from_env() if model.device.type == "cuda" else None


def kv_buckets(max_length: int) -> list[int]:
    """Attention lengths a decode step is compiled/captured for: 256, 512, ... and max_length."""
    buckets, size = [], FIRST_BUCKET
    while size < max_length:
        buckets.append(size)
        size *= 2
    return buckets + [max_length]


def prefill_logits(model, input_ids: torch.Tensor, layout: PrefixLayout, prompt_mask: PromptMask | None = None) -> torch.Tensor:
    """Run the prompt (B, T) into cache columns 0..T-1; float32 logits (B, V) of its last position.
    Eager in both loops: its length varies, and its large matmuls leave little overhead to remove."""
    T = input_ids.shape[1]
    columns = torch.arange(T, device=input_ids.device)
    return model(
        input_ids,
        position_ids_for(layout, columns),
        prompt_mask if prompt_mask is not None else attention_mask_for(layout, columns, T),
        cache_columns=slice(0, T),
        kv_length=T,
        last_logits_only=True,
    ).logits[:, -1].float()


def prefill_prompt(model, input_ids: torch.Tensor, layout: PrefixLayout, context: int) -> torch.Tensor:
    """prefill_logits for a PromptMask prompt, with the context length an argument (compiled with
    dynamic shapes, so one graph serves every prompt length)."""
    return prefill_logits(model, input_ids, layout, PromptMask(context=context))


# -- the step functions (compiled) ---------------------------------------------------------------
def decode_logits(model, token: torch.Tensor, column: torch.Tensor, start: torch.Tensor, context: torch.Tensor,
                  mask: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
    """Run `token` (B, 1) at cache `column` (1,), attending over the first len(kv_positions) cache
    columns; advance `column`; return float32 logits (B, V)."""
    layout = PrefixLayout(start=start, context=context, mask=mask)
    kv_length = kv_positions.shape[0]
    logits = model(
        token,
        position_ids_for(layout, column),
        attention_mask_for(layout, column, kv_length),  # (B, 1, 1, S): the static-shape stand-in for slicing
        cache_columns=column,
        kv_length=kv_length,
        last_logits_only=True,
    ).logits
    column.add_(1)
    return logits[:, -1].float()


def guarded_scores(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """generate.process_logits before sampling, with the settings as tensors (one graph for all values).
    A penalty of 1 leaves every value exactly as it is."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits = torch.where(seen, penalised, logits)
    bad = ~torch.isfinite(chunked(logits)).all(dim=-1).all(dim=-1, keepdim=True)  # (B, 1)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    guard = torch.where(vocab == min(NAN_GUARD_TOKEN_ID, logits.shape[-1] - 1), 5e4, 0.0)  # (V,)
    return torch.where(bad, guard, logits)


def chunked(x: torch.Tensor, chunks: int = 32) -> torch.Tensor:
    """(B, V) as (B, chunks, V / chunks): a reduction over the vocabulary in two stages, so the compiled
    kernel spreads one row over `chunks` programs (one program per row took 35 us of a 3.8 ms token)."""
    B, V = x.shape
    return x.view(B, chunks, V // chunks) if V % chunks == 0 else x.view(B, 1, V)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of (B, V) (the first maximum, as torch.argmax), in two stages."""
    parts = chunked(x)
    values, index = parts.max(dim=-1)  # (B, chunks): first maximum of each chunk
    best = values.argmax(dim=-1, keepdim=True)  # the first chunk holding the row maximum
    return (index.gather(1, best) + best * parts.shape[-1]).squeeze(1)


def pick_greedy(logits: torch.Tensor, token: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """Write the argmax token of each row into `token` (B, 1) and mark it in `seen`."""
    chosen = argmax_rows(guarded_scores(logits, seen, penalty))  # (B,)
    token.copy_(chosen[:, None])
    seen.scatter_(1, token, True)


def sampled_choice(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p, then a draw, all on the device: (B, V) scores -> (B,) token ids.

    Works in sorted order (one sort serves top-k and top-p) and draws by an exponential race:
    argmax(p / E) with E ~ Exp(1) picks i with probability p_i / sum(p), without a host sync.
    """
    vocab = scores.shape[-1]
    ranked, order = torch.sort(scores / temperature, dim=-1, descending=True)  # (B, V)
    rank = torch.arange(vocab, device=scores.device)
    in_top_k = rank < torch.where(top_k > 0, top_k, vocab)  # (V,)
    probs = ranked.masked_fill(~in_top_k, float("-inf")).softmax(dim=-1)
    # as transformers: drop a token once the more likely ones already reach top_p (the first is always kept)
    keep = in_top_k & (((probs.cumsum(dim=-1) - probs) < top_p) | (top_p >= 1.0))
    race = torch.where(keep, probs, 0.0) / noise.clamp_min(1e-20)
    return order.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)


def pick_sampled(logits: torch.Tensor, token: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor,
                 temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, noise: torch.Tensor) -> None:
    chosen = sampled_choice(guarded_scores(logits, seen, penalty), temperature, top_k, top_p, noise)
    token.copy_(chosen[:, None])
    seen.scatter_(1, token, True)


def inductor_options(device: torch.device, gemv: str = "kernel") -> dict | None:
    """torch.compile options of the decode steps (fast.py's and the server's)."""
    if device.type != "cuda":
        return None
    # coordinate_descent_tuning also makes inductor turn one-row matmuls into reductions it tunes and
    # fuses (the gpt-fast recipe); unique kernel names make profiles readable.
    options = {"coordinate_descent_tuning": gemv == "triton", "triton.unique_kernel_names": True}
    from .kernels import pdl_supported

    if hasattr(torch._inductor.config.triton, "enable_pdl") and pdl_supported(device.index or 0):
        options["triton.enable_pdl"] = True  # inductor's kernels launch early too (kernels.pdl_supported)
    return options


def _compiled(fn, options: FastOptions, device: torch.device):
    if not options.compile:
        return fn
    return torch.compile(fn, dynamic=False, options=inductor_options(device, options.gemv))


def _step_functions(options: FastOptions, device: torch.device) -> tuple:
    key = (options, device.type)
    if key not in _STEP_FUNCTIONS:
        # one compiled graph per model, batch size and dtype: allow more than dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # Sampling stays eager: inductor (torch 2.11, CUDA) cannot generate the fused cumsum + reduction of
        # top-p ("NYI TritonSplitDimKernel reductions"); its eager kernels are captured in the CUDA graph anyway.
        _STEP_FUNCTIONS[key] = (_compiled(decode_logits, options, device), _compiled(pick_greedy, options, device),
                                pick_sampled)
    return _STEP_FUNCTIONS[key]


_STEP_FUNCTIONS: dict = {}


def _compiled_prefill(options: FastOptions, device: torch.device):
    key = ("prefill", options, device.type)
    if key not in _STEP_FUNCTIONS:
        _STEP_FUNCTIONS[key] = torch.compile(prefill_prompt, dynamic=True)
    return _STEP_FUNCTIONS[key]


# -- host reads one step behind --------------------------------------------------------------------
class TokenReader:
    """Copies each step's tokens (B, 1) into pinned host memory without waiting; `pop` waits only
    for the oldest copy, so the GPU is already running the next step while the host handles it."""

    def __init__(self, token: torch.Tensor, depth: int = 2):
        self.token = token
        cuda = token.device.type == "cuda"
        self.host = [torch.empty(token.shape, dtype=token.dtype, pin_memory=cuda) for _ in range(depth)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(depth)]
        self.pushed = self.popped = 0

    def push(self) -> None:
        slot = self.pushed % len(self.host)
        self.host[slot].copy_(self.token, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        self.pushed += 1

    def pop(self) -> list[int]:
        slot = self.popped % len(self.host)
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        self.popped += 1
        return self.host[slot].view(-1).tolist()


# -- the decoder -----------------------------------------------------------------------------------
def model_signature(model) -> tuple:
    """What a captured graph depends on: every parameter's and buffer's storage, dtype and shape
    (but the KV cache: each generation puts the decoder's own back)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return tuple((name, t.data_ptr(), t.dtype, tuple(t.shape)) for name, t in tensors if not name.startswith("kv_caches."))


class FastDecoder:
    """Static state, compiled steps and captured graphs for one model and batch size."""

    def __init__(self, model, batch_size: int, options: FastOptions):
        config = model.config
        device = model.device
        self.model_ref = weakref.ref(model)  # the model owns this decoder (see decoder_for)
        self.batch_size = batch_size
        self.options = options
        self.cuda = device.type == "cuda"
        self.cuda_graphs = options.cuda_graphs and self.cuda
        self.max_length = config.max_sequence_length
        # One column more than any bucket: were a bucket the whole cache, dynamo would specialise on it.
        model.setup_caches(batch_size, self.max_length + 1)
        self.caches = model.kv_caches
        B, V = batch_size, config.vocab_size
        longs = dict(dtype=torch.long, device=device)
        floats = dict(dtype=torch.float32, device=device)
        self.token = torch.zeros(B, 1, **longs)
        self.column = torch.zeros(1, **longs)
        self.start, self.context, self.mask = (torch.zeros(B, **longs) for _ in range(3))
        self.seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        self.penalty, self.temperature, self.top_p = (torch.ones((), **floats) for _ in range(3))
        self.top_k = torch.zeros((), **longs)
        self.noise = torch.ones(B, V, **floats)
        self.kv_positions = {}
        for size in kv_buckets(self.max_length):
            self.kv_positions[size] = torch.arange(size, **longs)
            torch._dynamo.mark_dynamic(self.kv_positions[size], 0, min=2, max=self.max_length)
        self.decode_fn, self.greedy_fn, self.sample_fn = _step_functions(options, device)
        self.prefill_fn = _compiled_prefill(options, device) if options.compile_prefill else None
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.direct_runs: dict[tuple[int, bool], int] = {}
        self.picked: set = set()  # sampling modes (and "prefill") whose first, compiling run is done
        if self.cuda_graphs:
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()
        self.signature = model_signature(model)
        self.stats = {"compile_seconds": 0.0, "capture_seconds": 0.0, "graphs": 0}
        if options.compile:
            self.compile_decode()

    @property
    def model(self):
        return self.model_ref()

    def bucket_for(self, length: int) -> int:
        return next(size for size in self.kv_positions if size >= length)

    # -- one step ------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, layout: PrefixLayout, prompt_mask: PromptMask | None) -> torch.Tensor:
        """prefill_logits, compiled for single prompts when the options ask for it."""
        if self.prefill_fn is None or prompt_mask is None:
            return prefill_logits(self.model, input_ids, layout, prompt_mask)
        if "prefill" in self.picked:
            return self.prefill_fn(self.model, input_ids, layout, prompt_mask.context)
        self.picked.add("prefill")
        return self._timed_first_run(self.prefill_fn, self.model, input_ids, layout, prompt_mask.context)

    def _pick(self, logits: torch.Tensor, sample: bool) -> None:
        if sample:
            self.sample_fn(logits, self.token, self.seen, self.penalty, self.temperature, self.top_k, self.top_p, self.noise)
        else:
            self.greedy_fn(logits, self.token, self.seen, self.penalty)

    def _step(self, size: int, sample: bool) -> None:
        logits = self.decode_fn(self.model, self.token, self.column, self.start, self.context, self.mask,
                                self.kv_positions[size])
        self._pick(logits, sample)

    def _timed_first_run(self, fn, *args):
        """A run that may compile: timed separately (bench reports compile time on its own)."""
        if self.cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        self.stats["compile_seconds"] += time.perf_counter() - began
        return result

    def compile_decode(self) -> None:
        """Compile the decode step now, at the longest bucket: kernels are tuned for the sizes seen on
        first use, and long contexts are where attention's share of the step is largest."""
        args = (self.model, self.token, self.column, self.start, self.context, self.mask, self.kv_positions[max(self.kv_positions)])
        self.column.zero_()  # throwaway state: writes cache column 0, which every prefill rewrites
        if self.cuda_graphs:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self._timed_first_run(self.decode_fn, *args)
            torch.cuda.current_stream().wait_stream(self.stream)
        else:
            self._timed_first_run(self.decode_fn, *args)

    def decode(self, size: int, sample: bool) -> None:
        """One decode step over `size` cache columns: a graph replay once warmed up."""
        key = (size, sample)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        runs = self.direct_runs.get(key, 0)
        if not self.cuda_graphs:
            if runs == 0:
                self._timed_first_run(self._step, size, sample)
            else:
                self._step(size, sample)
            self.direct_runs[key] = runs + 1
            return
        if runs < WARMUP_RUNS:
            # on the capture stream, so its lazily created handles and workspaces exist before capture
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                if runs == 0:
                    self._timed_first_run(self._step, size, sample)
                else:
                    self._step(size, sample)
            torch.cuda.current_stream().wait_stream(self.stream)
            self.direct_runs[key] = runs + 1
            return
        began = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # capture records the step without running it; the state it reads is untouched
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            self._step(size, sample)
        self.graphs[key] = graph
        self.stats["capture_seconds"] += time.perf_counter() - began
        self.stats["graphs"] = len(self.graphs)
        graph.replay()

    # -- a whole generation ----------------------------------------------------------------------
    def steps(self, input_ids: torch.Tensor, budget: int, gen, prompt_mask: PromptMask | None) -> Iterator[list[int]]:
        """Prefill `input_ids` (B, T), then yield `budget` steps of tokens (one per row), one step behind the GPU."""
        model = self.model
        config = model.config
        B, T = input_ids.shape
        if B < self.batch_size:  # fill the decoder's rows with copies of the last prompt; their tokens are dropped
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(self.batch_size - B, -1)])
        model.kv_caches = self.caches
        layout = prefix_layout(input_ids, config)
        self.start.copy_(layout.start)
        self.context.copy_(layout.context)
        self.mask.copy_(layout.mask)
        self.column.fill_(T)
        self.seen.zero_()
        if gen.repetition_penalty != 1.0:
            self.seen.scatter_(1, input_ids, input_ids != config.pad_token_id)
        self.penalty.fill_(gen.repetition_penalty)
        self.temperature.fill_(gen.temperature)
        self.top_k.fill_(gen.top_k)
        self.top_p.fill_(gen.top_p)
        sample = gen.do_sample
        rng = None
        if sample:
            rng = torch.Generator(device=input_ids.device)
            rng.manual_seed(gen.seed if gen.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

        logits = self.prefill(input_ids, layout, prompt_mask)
        if sample:
            self.noise.exponential_(generator=rng)
        if sample in self.picked:
            self._pick(logits, sample)
        else:
            self._timed_first_run(self._pick, logits, sample)
            self.picked.add(sample)
        reader = TokenReader(self.token)
        reader.push()
        for step in range(budget):
            if step + 1 < budget:
                if sample:
                    self.noise.exponential_(generator=rng)
                self.decode(self.bucket_for(T + step + 1), sample)  # the input token sits at column T + step
                reader.push()
            yield reader.pop()[:B]


def decoder_for(model, batch_size: int, options: FastOptions) -> FastDecoder:
    """The model's decoder for these options and `batch_size` rows, one at a time: a new batch size
    frees the old static cache and graphs (compiled code stays cached by torch.compile). A batch of
    2+ rows runs on a wider decoder if there is one (an evaluation's last, smaller batch: no compile)."""
    decoder = _DECODERS.get(model)
    fits = decoder is not None and (decoder.batch_size == batch_size or 1 < batch_size <= decoder.batch_size)
    if not fits or decoder.options != options or decoder.signature != model_signature(model):
        compiled = (batch_size, model.dtype, model.device.type, options)
        if options.compile and compiled not in _COMPILED:
            _COMPILED.add(compiled)
            log.warning("compiling the decode step for batch size %d: the first tokens wait for it "
                        "(set %s=0 to decode without compiling)", batch_size, ENV)
        _DECODERS.pop(model, None)
        model.kv_caches = None  # free the old static cache before allocating the new one
        decoder = FastDecoder(model, batch_size, options)
        _DECODERS[model] = decoder
    return decoder


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COMPILED: set = set()


def prompt_mask_for(rows: list[list[int]], config) -> PromptMask | None:
    """PromptMask for a batch of one unpadded prompt whose only <sop> is its last token, else None."""
    if len(rows) != 1:
        return None
    ids = rows[0]
    if len(ids) < 2 or ids[0] == config.pad_token_id or ids[-1] != config.bos_token_id or config.bos_token_id in ids[:-1]:
        return None
    return PromptMask(context=len(ids) - 1)
