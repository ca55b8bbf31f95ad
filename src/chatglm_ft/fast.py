"""The fast decode path: static KV cache, compiled decode step, CUDA graphs, tokens kept on the GPU.

Batch-1 decoding reads every weight once per token, so on a GPU its speed is set by memory
bandwidth as long as nothing else shows: no Python or kernel-launch gaps (the whole step is one
CUDA graph replay), no host round trip per token (the next step reads the token where the last
one wrote it; the host reads each token one step behind, from pinned memory), and no wasted
bytes (attention reads a bucket of the cache just long enough for the context).

One step = `decode_logits` (steps.decode_one_token, compiled once per batch size with the
attention length dynamic, when the decoder is made) + `pick_greedy` (compiled) or `pick_sampled`
(sampling.choose, on the GPU). For each attention bucket (256, 512, ... max_sequence_length
columns) and sampling mode graphs.StepGraphs warms the step up, captures it and replays it. The
model is called as an ordinary nn.Module, so quantized layers and adapters go through the same
step.

Prefill of a short prompt is bound by the host too: ~400 kernels launched from Python take far
longer than their GPU work (a 128-token prefill of ChatGLM-6B on an H100: ~18 ms eager, ~2 ms of GPU work). So
prompts up to PREFILL_BUCKETS[-1] tokens are right-padded to a length bucket (16, 32, ... 512) and
prefilled by one captured step per bucket (FastOptions.prefill_graphs; steps.prefill with `last`
says why right padding is exact), captured when the decoder is made. Longer prompts, and batches
of more than PREFILL_GRAPH_TOKENS padded tokens, are GPU-bound and stay eager (compiled with
dynamic shapes when DecodeOptions.compile_prefill asks).

`stream_tokens` in generate.py uses this by default on CUDA (`--compile off` turns it off); on
the CPU it runs only when asked (`fast=True`: compiled, without graphs), for tests.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch

from .graphs import StepGraphs, compile_step, inductor_options  # noqa: F401  (inductor_options: gpu/ scripts)
from .model import PromptMask
from .multigpu import is_split
from .options import DecodeOptions
from .ptuning import refresh_prefix_cache
from .sampling import RowSettings, argmax_rows, choose, guarded_scores, mark_seen, row_seeds
from .steps import Layout, copy_layout, decode_one_token, prefill, static_layout

log = logging.getLogger("chatglm_ft.fast")

FIRST_BUCKET = 256
# Prompt lengths a captured prefill is padded to (FastOptions.prefill_graphs); longer prompts prefill eagerly.
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
# Rows x bucket at most: more tokens keep the GPU busy for longer than launching their kernels takes (and
# a graph keeps the activation memory of its largest prefill for good).
PREFILL_GRAPH_TOKENS = 2048


@dataclass(frozen=True)
class FastOptions:
    """The fast loop's settings (resolved from DecodeOptions by `fast_options`). The kernels its step
    runs are the model's (model.use_kernels), including what inductor is told about one-row matmuls."""

    compile: bool = True
    cuda_graphs: bool = True  # ignored off CUDA
    compile_prefill: bool = False  # single unpadded prompts only; fuses the elementwise work between matmuls
    # Prompts up to PREFILL_BUCKETS[-1] tokens padded to a length bucket, their prefill a captured step: a CUDA
    # graph where cuda_graphs applies, a direct run otherwise (how the CPU tests check it; fast_options turns
    # it off on the CPU, where padding only costs time).
    prefill_graphs: bool = False


def fast_options(model, fast: "bool | FastOptions | DecodeOptions | None") -> FastOptions | None:
    """The options `stream_tokens` decodes with, or None for the eager loop.

    None or DecodeOptions(compile="auto"): the fast path on one GPU, eager elsewhere; "off" or False:
    eager; "graphs": CUDA graphs of the uncompiled step; "on" or True: compiled (with CUDA graphs on a GPU).
    """
    if fast is False or model.training or is_split(model):  # graphs and compiled steps stay on one device
        return None
    if isinstance(fast, FastOptions):
        return fast
    if fast is True:
        return FastOptions()
    options = (fast or getattr(model, "decode_options", None) or DecodeOptions()).validate()
    if options.compile == "off" or (options.compile == "auto" and model.device.type != "cuda"):
        return None
    return FastOptions(compile=options.compile != "graphs",
                       compile_prefill=options.compile_prefill and options.compile != "graphs",
                       prefill_graphs=options.prefill_graphs and model.device.type == "cuda")


def kv_buckets(max_length: int) -> list[int]:
    """Attention lengths a decode step is compiled/captured for: 256, 512, ... and max_length."""
    buckets, size = [], FIRST_BUCKET
    while size < max_length:
        buckets.append(size)
        size *= 2
    return buckets + [max_length]


def prefill_logits(model, input_ids: torch.Tensor, layout: Layout, prompt_mask: PromptMask | None = None) -> torch.Tensor:
    """steps.prefill into cache columns 0..T-1. Eager in both loops unless asked: its length varies, and
    its large matmuls leave little overhead to remove."""
    return prefill(model, input_ids, layout, prompt_mask=prompt_mask)


def prefill_prompt(model, input_ids: torch.Tensor, layout: Layout, context: int) -> torch.Tensor:
    """prefill_logits for a PromptMask prompt, with the context length an argument (compiled with
    dynamic shapes, so one graph serves every prompt length)."""
    return prefill(model, input_ids, layout, prompt_mask=PromptMask(context=context))


def prefill_padded(model, input_ids: torch.Tensor, layout: Layout, last: torch.Tensor) -> torch.Tensor:
    """steps.prefill of prompts right-padded to a bucket's length (B, Tb) into cache columns 0..Tb-1; the
    logits (B, V) of column `last` ((1,) long: T - 1 for T real columns), the same as an unpadded prefill's.
    The step a captured prefill replays: every input a tensor whose shape is fixed by the bucket."""
    return prefill(model, input_ids, layout, last=last)


# -- the step functions (compiled) ---------------------------------------------------------------
def decode_logits(model, token: torch.Tensor, column: torch.Tensor, layout: Layout,
                  kv_positions: torch.Tensor) -> torch.Tensor:
    """steps.decode_one_token of `token` (B, 1) at cache `column` (1,), attending over the first
    len(kv_positions) cache columns (a tensor, so the compiled step keeps it dynamic); advance `column`.
    `layout` is the decoder's static one (steps.static_layout): the same tensors every call."""
    logits = decode_one_token(model, token, column, layout, kv_positions.shape[0])
    column.add_(1)
    return logits


def pick_greedy(logits: torch.Tensor, token: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """Write the argmax token of each row into `token` (B, 1) and mark it in `seen` (sampling.choose for
    greedy rows, in the form inductor fuses)."""
    chosen = argmax_rows(guarded_scores(logits, seen, penalty))  # (B,)
    token.copy_(chosen[:, None])
    seen.scatter_(1, token, True)


def pick_sampled(logits: torch.Tensor, token: torch.Tensor, seen: torch.Tensor, rows: RowSettings,
                 step: torch.Tensor) -> None:
    """sampling.choose on the device (draw number `step`, then advanced); the chosen token into `token`."""
    token.copy_(choose(logits, rows, step, seen, sample=True)[:, None])
    seen.scatter_(1, token, True)
    step.add_(1)


def _step_functions(options: FastOptions, device: torch.device, gemv: str) -> tuple:
    key = (options, device.type, gemv)
    if key not in _STEP_FUNCTIONS:
        if options.compile:
            # Sampling stays eager: inductor (torch 2.11, CUDA) cannot generate the fused cumsum + reduction of
            # top-p ("NYI TritonSplitDimKernel reductions"); its eager kernels are captured in the CUDA graph anyway.
            _STEP_FUNCTIONS[key] = (compile_step(decode_logits, device, gemv),
                                    compile_step(pick_greedy, device, gemv), pick_sampled)
        else:
            _STEP_FUNCTIONS[key] = (decode_logits, pick_greedy, pick_sampled)
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
    """Static state, compiled steps and captured graphs (graphs.StepGraphs) for one model and batch size."""

    def __init__(self, model, batch_size: int, options: FastOptions):
        config = model.config
        device = model.device
        self.model_ref = weakref.ref(model)  # the model owns this decoder (see decoder_for)
        self.batch_size = batch_size
        self.options = options
        self.cuda = device.type == "cuda"
        self.max_length = config.max_sequence_length
        # One column more than any bucket: were a bucket the whole cache, dynamo would specialise on it.
        model.setup_caches(batch_size, self.max_length + 1)
        self.caches = model.kv_caches
        B, V = batch_size, config.vocab_size
        longs = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(B, 1, **longs)
        self.column = torch.zeros(1, **longs)
        self.layout = static_layout(model, B, device)  # the model's layout in static tensors
        self.seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        self.rows = RowSettings.empty(B, device)
        self.draw_step = torch.zeros(B, **longs)
        self.kv_positions = {}
        for size in kv_buckets(self.max_length):
            self.kv_positions[size] = torch.arange(size, **longs)
            # maybe_: a backend may still specialise on the length (inductor on the CPU does beyond 4096
            # columns, ChatGLM2/3's 32k context); that costs one more compile instead of an error
            torch._dynamo.maybe_mark_dynamic(self.kv_positions[size], 0)
        self.kernels = model.kernels
        self.decode_fn, self.greedy_fn, self.sample_fn = _step_functions(options, device, model.kernels.gemv)
        self.prefill_fn = _compiled_prefill(options, device) if options.compile_prefill else None
        self.pad_token_id = config.pad_token_id
        self.prefill_ids: dict[int, torch.Tensor] = {}  # bucket -> (B, bucket) right-padded prompt
        self.last = torch.zeros(1, **longs)  # the prompt's last real column
        # a captured prefill's logits (B x V float32: 33 MB for an evaluation's 64 rows; only when padded prefill is on)
        self.prefill_out = torch.zeros(B, V, dtype=torch.float32, device=device) if options.prefill_graphs else None
        self.machine = StepGraphs(device, cuda_graphs=options.cuda_graphs)
        self.stats = self.machine.stats
        self.picked: set = set()  # sampling modes (and "prefill") whose first, compiling run is done
        self.signature = model_signature(model)
        if options.compile:
            self.compile_decode()
        if options.prefill_graphs and self.machine.capture:
            self.capture_prefill()

    @property
    def model(self):
        return self.model_ref()

    @property
    def graphs(self) -> dict:
        return self.machine.graphs

    def bucket_for(self, length: int) -> int:
        return next(size for size in self.kv_positions if size >= length)

    def prefill_bucket(self, length: int) -> int | None:
        """The length a `length`-token prompt is padded to for a captured prefill; None: it prefills eagerly."""
        if not self.options.prefill_graphs:
            return None
        return next((size for size in PREFILL_BUCKETS if length <= size <= self.max_length
                     and self.batch_size * size <= PREFILL_GRAPH_TOKENS), None)

    def prefill_path(self, length: int, prompt_mask: PromptMask | None) -> str:
        """How `prefill` runs a `length`-token prompt, in words (bench reports it)."""
        size = self.prefill_bucket(length)
        if size is not None:
            return f"CUDA graph ({size}-token bucket)" if self.machine.capture else f"padded to {size} tokens"
        return "compiled" if self.prefill_fn is not None and prompt_mask is not None else "eager"

    # -- one step ------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, layout: Layout, prompt_mask: PromptMask | None) -> torch.Tensor:
        """Prefill prompts (B, T) into cache columns 0..T-1; float32 logits (B, V) of their last column. Short
        prompts: padded to a bucket, a graph replay once warmed up (the logits are then the decoder's static
        buffer, valid until the next prefill); longer ones prefill_logits, compiled for single prompts when
        the options ask for it. `layout` is copied into the decoder's static one when it is another."""
        size = self.prefill_bucket(input_ids.shape[1])
        if size is not None:
            return self._prefill_padded(input_ids, layout, size)
        if self.prefill_fn is None or prompt_mask is None:
            return prefill_logits(self.model, input_ids, layout, prompt_mask)
        if "prefill" in self.picked:
            return self.prefill_fn(self.model, input_ids, layout, prompt_mask.context)
        self.picked.add("prefill")
        return self.machine.timed(self.prefill_fn, self.model, input_ids, layout, prompt_mask.context)

    def capture_prefill(self) -> None:
        """Warm up and capture the prefill of every bucket now: a chat's prompt grows with its history and
        meets each bucket only a few times, so capturing on a bucket's first uses would leave most turns
        eager. These runs prefill pad tokens into cache columns that each prompt's prefill rewrites."""
        self.last.zero_()
        for size in PREFILL_BUCKETS:
            if self.prefill_bucket(size) == size:
                self._prefill_input(size)
                for _ in range(self.machine.warmup_runs + 1):  # the warm-up runs, then the capture
                    self.machine.run(("prefill", size), partial(self._prefill_step, size))

    def _prefill_input(self, size: int) -> torch.Tensor:
        """The static (B, size) prompt buffer of a bucket."""
        if size not in self.prefill_ids:
            self.prefill_ids[size] = torch.full((self.batch_size, size), self.pad_token_id, dtype=torch.long,
                                                device=self.token.device)
        return self.prefill_ids[size]

    def _prefill_padded(self, input_ids: torch.Tensor, layout: Layout, size: int) -> torch.Tensor:
        T = input_ids.shape[1]
        ids = self._prefill_input(size)
        ids[:, :T].copy_(input_ids)
        ids[:, T:].fill_(self.pad_token_id)  # a longer prompt may have left its tokens there
        self.last.fill_(T - 1)
        if layout is not self.layout:
            copy_layout(self.layout, layout)
        self.machine.run(("prefill", size), partial(self._prefill_step, size))
        return self.prefill_out

    def _prefill_step(self, size: int) -> None:
        self.prefill_out.copy_(prefill_padded(self.model, self.prefill_ids[size], self.layout, self.last))

    def _pick(self, logits: torch.Tensor, sample: bool) -> None:
        if sample:
            self.sample_fn(logits, self.token, self.seen, self.rows, self.draw_step)
        else:
            self.greedy_fn(logits, self.token, self.seen, self.rows.penalty)

    def _step(self, size: int, sample: bool) -> None:
        logits = self.decode_fn(self.model, self.token, self.column, self.layout, self.kv_positions[size])
        self._pick(logits, sample)

    def compile_decode(self) -> None:
        """Compile the decode step now, at the longest bucket: kernels are tuned for the sizes seen on
        first use, and long contexts are where attention's share of the step is largest."""
        args = (self.model, self.token, self.column, self.layout, self.kv_positions[max(self.kv_positions)])
        self.column.zero_()  # throwaway state: writes cache column 0, which every prefill rewrites
        self.machine.on_capture_stream(self.decode_fn, *args, timed=True)

    def decode(self, size: int, sample: bool) -> None:
        """One decode step over `size` cache columns: a graph replay once warmed up."""
        self.machine.run((size, sample), partial(self._step, size, sample))

    # -- a whole generation ----------------------------------------------------------------------
    @torch.no_grad()  # as in decoder_for: a first run compiles, and must not trace gradients
    def steps(self, input_ids: torch.Tensor, budget: int, gen, prompt_mask: PromptMask | None,
              seeds: list[int] | None = None) -> Iterator[list[int]]:
        """Prefill `input_ids` (B, T), then yield `budget` steps of tokens (one per row), one step behind the GPU."""
        model = self.model
        config = model.config
        B, T = input_ids.shape
        if B < self.batch_size:  # fill the decoder's rows with copies of the last prompt; their tokens are dropped
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(self.batch_size - B, -1)])
        model.kv_caches = self.caches
        refresh_prefix_cache(model)  # a P-Tuning prefix changed since the decoder was built is written again
        layout = model.prompt_layout(input_ids)
        copy_layout(self.layout, layout)
        self.column.fill_(T)
        self.seen.zero_()
        if gen.repetition_penalty != 1.0:
            mark_seen(self.seen, input_ids, input_ids != config.pad_token_id)
        seeds = seeds if seeds is not None else row_seeds(gen, B)
        self.rows.fill([gen] * self.batch_size, seeds + seeds[-1:] * (self.batch_size - B))
        self.draw_step.zero_()
        sample = gen.do_sample

        logits = self.prefill(input_ids, self.layout, prompt_mask)
        if sample in self.picked:
            self._pick(logits, sample)
        else:
            self.machine.timed(self._pick, logits, sample)
            self.picked.add(sample)
        reader = TokenReader(self.token)
        reader.push()
        for step in range(budget):
            if step + 1 < budget:
                self.decode(self.bucket_for(T + step + 1), sample)  # the input token sits at column T + step
                reader.push()
            yield reader.pop()[:B]


def decoder_for(model, batch_size: int, options: FastOptions) -> FastDecoder:
    """The model's decoder for these options and `batch_size` rows, one at a time: a new batch size
    frees the old static cache and graphs (compiled code stays cached by torch.compile). A batch of
    2+ rows runs on a wider decoder if there is one (an evaluation's last, smaller batch: no compile)."""
    decoder = _DECODERS.get(model)
    fits = decoder is not None and (decoder.batch_size == batch_size or 1 < batch_size <= decoder.batch_size)
    if (not fits or decoder.options != options or decoder.kernels != model.kernels
            or decoder.signature != model_signature(model)):
        compiled = (batch_size, model.dtype, model.device.type, options)
        if options.compile and compiled not in _COMPILED:
            _COMPILED.add(compiled)
            log.warning("compiling the decode step for batch size %d: the first tokens wait for it "
                        "(--compile off decodes without compiling)", batch_size)
        _DECODERS.pop(model, None)
        model.kv_caches = None  # free the old static cache before allocating the new one
        with torch.no_grad():  # decoding never needs gradients: compiling with them enabled traces a backward graph
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
