"""Continuous batching: one worker thread owns the model and decodes every running sequence in
one forward per step, admitting new requests between steps.

Each request holds a KV-cache slot (a row of `model.setup_caches(max_batch, max_context + 1)`).
Its prompt sits at columns 0..n-1 of that row, so a slot's prefix layout is start=0,
context=<sop>, mask=[gMASK] whatever the other rows hold. One iteration of the worker:
  1. admit queued requests into free slots and prefill them together (one forward, rows padded
     on the left but written to columns 0..n-1; the padding lands in columns the row overwrites
     before it ever attends to them);
  2. decode every slot in [0, hi) in one forward: slots are handed out lowest first so that
     range is dense, and the model uses it in place (`cache_rows=slice(0, hi)`, no copy); idle
     rows write into a scratch column (the extra `+ 1`) that no one reads. On CUDA the step is
     a CUDA graph replay, with hi and the attention length rounded up to captured sizes;
  3. read back the tokens of the forwards launched one iteration earlier: the GPU is already
     busy with this iteration's work while Python detokenizes, checks stops and wakes clients.
A sequence that ended is therefore decoded one step too many (that token is dropped); the GPU
never waits for Python, and there is one host sync per iteration.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import torch

from .batching import DecodeGraphs, batch_bucket, decode_step
from .errors import ChatGLMError, PromptTooLongError
from .generate import GenerationConfig, TextStream, new_token_budget
from .multigpu import is_split
from .ops import skinny_rows
from .ptuning import refresh_prefix_cache
from .sampling import RowSettings, argmax_rows, choose, guarded_scores, mark_seen, request_seed
from .steps import prefill
from .tokenizer import ChatGLMTokenizer

log = logging.getLogger("chatglm_ft.engine")
COMPILE_SWITCH_INTERVAL = 1e-4  # seconds: the GIL switch interval while a background compile runs

class QueueFullError(ChatGLMError):
    """The request queue is at --max-queue: try again later (HTTP 429)."""


class EngineClosedError(ChatGLMError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


# -- results and the client's handle ---------------------------------------------------------------
@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (<eop> or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    error: str | None = None
    queued_seconds: float = 0.0  # submit -> prefill
    first_token_seconds: float = 0.0  # submit -> first token
    seconds: float = 0.0  # submit -> end
    token_times: list[float] = field(default_factory=list, repr=False)  # time.perf_counter() as each token was read

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Chunk:
    text: str  # new text since the previous chunk (may be empty while a character or stop string is incomplete)
    tokens: int  # new tokens since the previous chunk
    done: Completion | None = None  # set on the last chunk


class RequestHandle:
    """The client's side of one request: iterate its chunks (threads or asyncio), wait, or cancel.

    The worker appends under a lock and wakes the reader; a slow reader gets the text of several
    steps in one chunk instead of falling behind.
    """

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop | None):
        self._engine = engine
        self._lock = threading.Lock()
        self._text: list[str] = []
        self._tokens = 0
        self._done: Completion | None = None
        self._taken_done = False
        self.loop = loop
        self._async_wake = asyncio.Event() if loop is not None else None
        self._thread_wake = threading.Event()
        self._thread_streaming = False  # a thread iterates the chunks: wake it every step (else only at the end)
        self._request: _Request | None = None

    # worker side
    def _put(self, text: str, tokens: int, done: Completion | None = None) -> None:
        with self._lock:
            if text:
                self._text.append(text)
            self._tokens += tokens
            if done is not None:
                self._done = done

    def _wake_thread(self) -> None:
        # A thread waiting in result() needs the end only: waking it per token would make every waiting
        # thread take the GIL at every step for nothing.
        if self._thread_streaming or self._done is not None:
            self._thread_wake.set()

    # client side
    @property
    def finished(self) -> bool:
        return self._done is not None

    def _take(self) -> Chunk | None:
        with self._lock:
            if self._taken_done:
                return None
            chunk = Chunk("".join(self._text), self._tokens, self._done)
            self._text, self._tokens = [], 0
            self._taken_done = self._done is not None
            return chunk

    def _next(self) -> tuple[Chunk | None, bool]:
        """(the chunk to hand out, if it carries anything; whether the request has ended) after a wake-up."""
        chunk = self._take()
        if chunk is None:
            return None, True
        return (chunk if chunk.text or chunk.tokens or chunk.done else None), bool(chunk.done)

    def __iter__(self) -> Iterator[Chunk]:
        self._thread_streaming = True
        while True:  # take first: what arrived before streaming began was not announced
            chunk, ended = self._next()
            if chunk is not None:
                yield chunk
            if ended:
                return
            self._thread_wake.wait()
            self._thread_wake.clear()

    async def chunks(self) -> AsyncIterator[Chunk]:
        if self._async_wake is None:
            raise RuntimeError("submit(..., loop=...) to read a request from asyncio")
        while True:
            await self._async_wake.wait()
            self._async_wake.clear()  # clear before taking: a later put sets it again
            chunk, ended = self._next()
            if chunk is not None:
                yield chunk
            if ended:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends (threads)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._done is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("request still running")
            self._thread_wake.wait(left)
            self._thread_wake.clear()
        return self._done

    async def wait(self, timeout: float | None = None) -> Completion | None:
        """Wait (asyncio) until the request ends or `timeout` passes; the Completion or None."""
        if self._async_wake is None:
            raise RuntimeError("submit(..., loop=...) to wait for a request from asyncio")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._done is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                await asyncio.wait_for(self._async_wake.wait(), left)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                return None
            self._async_wake.clear()
        return self._done

    def cancel(self) -> None:
        """Stop generating (a client went away): the slot is freed at the next step. Idempotent."""
        if self._request is not None and self._done is None:
            self._engine._cancel(self._request)


# -- metrics --------------------------------------------------------------------------------------
class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense (written by the worker only)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, n in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += n
            out.append((bound, running))
        return out


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class EngineStats:
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0})
    rejected: int = 0  # queue full
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of decode batch sizes
    prefill_forwards: int = 0
    request_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    first_token_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    token_seconds: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))  # per output token, per request


# -- the engine -----------------------------------------------------------------------------------
_ids = itertools.count()


class _Request:
    """Worker-side state of one request."""

    def __init__(self, prompt_ids: list[int], gen: GenerationConfig, budget: int, state: list[int],
                 stop_ids: frozenset[int], text: TextStream | None, handle: RequestHandle):
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.gen = gen
        self.budget = budget
        self.state = state  # the slot's layout state (model.slot_layout: ChatGLM-6B's <sop> and [gMASK] columns)
        self.stop_ids = stop_ids
        self.text = text
        self.handle = handle
        self.seed = request_seed(gen)  # the same tokens as `generate` with this seed, in any batch
        self.slot = -1
        self.launched = 0  # tokens whose forward has been launched
        self.token_ids: list[int] = []
        self.finished = False
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.started = 0.0
        self.first_token = 0.0
        self.token_times: list[float] = []


@dataclass
class _Step:
    """A launched forward whose sampled tokens have not been read yet."""

    rows: list[tuple[_Request, int]]  # (request, index of its token in `tokens`)
    tokens: torch.Tensor


DECODE_MODES = ("auto", "eager", "graphs", "compile")
DECODE_ALIASES = {"off": "eager", "on": "compile"}  # the --compile spellings


class Engine:
    """Continuous-batching generation on one model. Thread-safe `submit`; one worker thread.

    `decode`: "eager" runs each step as plain PyTorch at its exact size; "graphs" replays CUDA
    graphs of bucketed sizes (DecodeGraphs); "compile" compiles that step (on CUDA three compiles:
    about a minute or two the first time, ~30 s once inductor's disk cache has them); "auto" is
    compile on one GPU and eager elsewhere. With `compile_in_background` (the default) the engine
    serves at once with the uncompiled graphs while another thread compiles, and switches to the
    compiled step between two iterations once it is ready (`compile_done` is set then); without it
    `start` compiles first. The engine owns the model's KV cache while it runs: do not call
    `generate` on the same model object meanwhile.
    """

    def __init__(self, model, tokenizer: ChatGLMTokenizer | None, *, max_batch: int = 8, max_queue: int = 64,
                 max_context: int | None = None, prefill_tokens: int = 16384, decode: str = "auto",
                 compile_in_background: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise ChatGLMError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        decode = DECODE_ALIASES.get(decode, decode)
        if decode not in DECODE_MODES:
            raise ChatGLMError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        on_one_gpu = model.device.type == "cuda" and not is_split(model)
        self.decode_mode = ("compile" if on_one_gpu else "eager") if decode == "auto" else decode
        self.compile_in_background = compile_in_background
        self.warm_up_seconds = 0.0  # spent in `start` before serving (compiling there when not in the background)
        self.compile_seconds = 0.0  # the background compile's, once done
        self.compile_error: str | None = None  # why the background compile failed (serving goes on uncompiled)
        self.compile_done = threading.Event()  # the compiled step serves (or its compile ended); set at once without one
        self._graphs: DecodeGraphs | None = None
        self._compiled_graphs: DecodeGraphs | None = None  # handed from the compile thread to the worker
        self._compiler: threading.Thread | None = None
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = model.device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_context = min(max_context or self.config.max_sequence_length, self.config.max_sequence_length)
        self.prefill_tokens = max(prefill_tokens, self.max_context)  # any single prompt must fit one prefill
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._free_slots = list(range(max_batch))  # a heap: lowest first keeps [0, hi) dense
        self._thread: threading.Thread | None = None
        self._closing = False
        self._touched: dict[int, RequestHandle] = {}
        self._last_token: torch.Tensor | None = None  # (max_batch,) the token each slot feeds back next
        self._kv_positions: torch.Tensor | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._lock:
            if self._thread is not None:
                return self
            self._closing = False
            with torch.inference_mode():  # the worker writes these in inference mode
                self.model.setup_caches(self.max_batch, self.max_context + 1)  # + the scratch column of idle rows
                self._last_token = torch.full((self.max_batch,), self.config.pad_token_id, dtype=torch.long,
                                              device=self.device)
                # tokens each slot has seen (prompt and answer), for the repetition penalty
                self._seen = torch.zeros(self.max_batch, self.config.vocab_size, dtype=torch.bool, device=self.device)
            self._kv_positions = torch.arange(self.max_context + 1, device=self.device)
            self._graphs = self._compiled_graphs = None
            self.compile_done.clear()
            compile = self.decode_mode == "compile"
            background = compile and self.compile_in_background
            if self.decode_mode != "eager":
                self._graphs = self._decode_graphs(compile=compile and not background)
                if compile and not background and self.device.type == "cuda":
                    log.warning("compiling the decode steps for batch sizes %s (cached on disk for the next start)",
                                self._compile_sizes())
                    with torch.inference_mode():
                        self.warm_up_seconds = self._graphs.warm_up(self._compile_sizes())
                    log.warning("decode steps ready in %.1f s", self.warm_up_seconds)
            self._thread = threading.Thread(target=self._worker, name="chatglm-engine", daemon=True)
            self._thread.start()
            if background:
                log.warning("serving now; compiling the decode steps for batch sizes %s in the background (the"
                            " first minute or two decodes slower; cached on disk for the next start)",
                            self._compile_sizes())
                self._compiler = threading.Thread(target=self._compile, args=(self._thread,), name="chatglm-compile",
                                                  daemon=True)
                self._compiler.start()
            else:
                self.compile_done.set()
        return self

    def _decode_graphs(self, *, compile: bool) -> DecodeGraphs:
        return DecodeGraphs(self.model, self._last_token, self.max_batch, self.max_context, compile=compile,
                            gemv=self.model.kernels.gemv)

    def _compile_sizes(self) -> list[int]:
        """One batch size per compiled range (1; 2 up to the skinny kernel's rows; more): the other buckets
        reuse the compiled code and only capture a graph."""
        sizes = {1, min(2, self.max_batch)}
        skinny = skinny_rows(self.model.kernels)
        if skinny and self.max_batch > skinny:
            sizes.add(batch_bucket(skinny + 1, self.max_batch))
        return sorted(sizes)

    def _compile(self, worker: threading.Thread) -> None:
        """The compile thread: compile the step for each range by one run of idle rows (they write only the
        scratch column, so the worker's rows are untouched), then hand it to `worker` (not to the worker of a
        later `start`: its buffers are new). Capturing its graphs is left to the worker, as for any new bucket."""
        try:
            with _short_gil_switch(), torch.inference_mode():
                graphs = self._decode_graphs(compile=True)
                self.compile_seconds = graphs.warm_up(self._compile_sizes(), capture=False)
            with self._lock:
                if self._closing or self._thread is not worker:
                    return
                self._compiled_graphs = graphs
                self._wakeup.notify_all()
            log.warning("decode steps compiled in %.1f s; serving with them from the next step", self.compile_seconds)
        except Exception as e:  # noqa: BLE001 - the uncompiled step keeps serving
            log.exception("compiling the decode step failed; serving goes on with the uncompiled step")
            if self._thread is worker:
                self.compile_error = f"{type(e).__name__}: {e}"
                self.compile_done.set()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain` finish the queued and running ones, else cancel them. With a
        `timeout`, also wait within it for a background compile in progress (it cannot be cut short; without
        one a compile thread ends with the process, unused)."""
        with self._lock:
            self._closing = True
            if not drain:
                for r in [*self._queue, *self._running]:
                    r.cancelled = True
            self._wakeup.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for which in ("_thread", "_compiler"):
            thread = getattr(self, which)
            if thread is not None and (which == "_thread" or deadline is not None):
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if not thread.is_alive():
                    setattr(self, which, None)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def decode_step_state(self) -> str:
        """What decodes now: "compiling" (the uncompiled step serves meanwhile), "compiled", "uncompiled"
        (graphs or eager mode, or a compile that failed: compile_error says why)."""
        if self._graphs is not None and self._graphs.compiled:
            return "compiled"
        if self.decode_mode == "compile" and not self.compile_done.is_set():
            return "compiling"
        return "uncompiled"

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._running)

    # -- submitting ------------------------------------------------------------------------------
    def check(self, prompt_ids: Sequence[int], gen: GenerationConfig) -> int:
        """The new-token budget of a request, or a ChatGLMError saying why it can never run."""
        gen.validate()
        n = len(prompt_ids)
        if n == 0:
            raise ChatGLMError("empty prompt: nothing to generate from")
        if n >= self.max_context:
            raise PromptTooLongError(f"the prompt has {n} tokens; this server's context is {self.max_context} tokens"
                                     " (prompt + answer): shorten it or drop history")
        if gen.max_new_tokens is not None and n + gen.max_new_tokens > self.max_context:
            raise PromptTooLongError(f"prompt ({n} tokens) + max_tokens ({gen.max_new_tokens}) exceeds this server's context"
                                     f" of {self.max_context} tokens; lower max_tokens to {self.max_context - n} or less")
        if gen.max_new_tokens is None and gen.max_length is not None and gen.max_length <= n:
            raise PromptTooLongError(f"max_length {gen.max_length} leaves no room after the {n}-token prompt")
        return new_token_budget(n, gen, self.max_context)

    def submit(self, prompt_ids: Sequence[int], gen: GenerationConfig, *,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises ChatGLMError (never fits), QueueFullError or EngineClosedError."""
        gen = gen.validate()
        prompt_ids = [int(i) for i in prompt_ids]
        budget = self.check(prompt_ids, gen)
        state = self.model.prompt_layout(torch.tensor([prompt_ids]), left_padded=False).slot_state()[0].tolist()
        stop_ids = frozenset(gen.stop_token_ids if gen.stop_token_ids is not None else (self.config.eos_token_id,))
        handle = RequestHandle(self, loop)
        text = TextStream(self.tokenizer, gen.stop_strings) if self.tokenizer is not None else None
        request = _Request(prompt_ids, gen, budget, state, stop_ids, text, handle)
        handle._request = request
        with self._lock:
            if self._closing or self._thread is None:
                raise EngineClosedError("the server is shutting down" if self._closing else "the engine is not started")
            if len(self._queue) - len(self._free_slots) >= self.max_queue:  # requests that get a slot next step don't wait
                self.stats.rejected += 1
                raise QueueFullError(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue}); retry later")
            self._queue.append(request)
            self._wakeup.notify()
        return handle

    def generate(self, prompt_ids: Sequence[int], gen: GenerationConfig, timeout: float | None = None) -> Completion:
        """Submit and wait (threads)."""
        return self.submit(prompt_ids, gen).result(timeout)

    def _cancel(self, request: _Request) -> None:
        with self._lock:
            request.cancelled = True
            self._wakeup.notify()

    # -- the worker ------------------------------------------------------------------------------
    def _worker(self) -> None:
        with torch.inference_mode():
            pending: list[_Step] = []
            while True:
                with self._lock:
                    while not (self._queue or self._running or pending or self._closing or self._compiled_graphs):
                        self._wakeup.wait()
                    if self._closing and not (self._queue or self._running or pending):
                        return
                    admitted = self._admit()
                    if self._compiled_graphs is not None:  # between iterations: no step of the old graphs is running
                        self._graphs, self._compiled_graphs = self._compiled_graphs, None
                        self.compile_done.set()
                try:
                    pending = self._iterate(admitted, pending)
                except Exception as e:  # noqa: BLE001 - a bug in bookkeeping fails the requests in flight, not the server
                    log.exception("engine step failed")
                    for r in [*self._running, *admitted, *(r for step in pending for r, _ in step.rows)]:
                        self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                    pending = []
                self._wake_clients()

    def _iterate(self, admitted: list[_Request], pending: list[_Step]) -> list[_Step]:
        """Launch this iteration's forwards, then read the previous iteration's tokens."""
        launched: list[_Step] = []
        self._drop_cancelled()
        fresh = [r for r in admitted if not r.finished]
        if fresh:
            launched += self._guarded(self._prefill, fresh)
        decoding = [r for r in self._running if not r.finished and r.launched < r.budget and r.launched > 0]
        if decoding:
            launched += self._guarded(self._decode, decoding)
        for step in pending:
            self._read(step)
        return launched

    def _admit(self) -> list[_Request]:
        """Pop queued requests into free slots, within the prefill token budget (lock held)."""
        if any(r.cancelled for r in self._queue):  # clients that left while waiting
            for r in [r for r in self._queue if r.cancelled]:
                self._queue.remove(r)
                self._finish(r, "cancelled")
        admitted: list[_Request] = []
        width = 0
        while self._queue and self._free_slots:
            r = self._queue[0]
            new_width = max(width, len(r.prompt_ids))
            if admitted and new_width * (len(admitted) + 1) > self.prefill_tokens:
                break
            self._queue.popleft()
            r.slot = heapq.heappop(self._free_slots)
            r.started = time.perf_counter()
            admitted.append(r)
            self._running.append(r)
            width = new_width
        return admitted

    def _drop_cancelled(self) -> None:
        for r in list(self._running):
            if r.cancelled and not r.finished:
                self._finish(r, "cancelled")

    def _guarded(self, launch, requests: list[_Request]) -> list[_Step]:
        """A failing forward fails its requests, never the worker."""
        try:
            return [launch(requests)]
        except Exception as e:  # noqa: BLE001 - reported to each client, logged here
            log.exception("forward failed for %d request(s)", len(requests))
            for r in requests:
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            return []

    def _to_device(self, rows: list[list[int]] | list[list[float]], dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(rows, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)  # no sync: the caching host allocator keeps it alive
        return t.to(self.device)

    def _choose(self, logits: torch.Tensor, requests: list[_Request], rows: list[int], seen: torch.Tensor | None
                ) -> torch.Tensor:
        """sampling.choose for a batch of logits (request i at row rows[i]; other rows idle, greedy)."""
        if not any(r.gen.do_sample or r.gen.repetition_penalty != 1.0 for r in requests):
            return argmax_rows(guarded_scores(logits))  # all greedy: no settings to upload
        configs: list[GenerationConfig | None] = [None] * logits.shape[0]
        seeds, steps = [0] * logits.shape[0], [0] * logits.shape[0]
        for r, row in zip(requests, rows):
            configs[row], seeds[row], steps[row] = r.gen, r.seed, r.launched  # the index of the token being chosen
        settings = RowSettings.of(configs, seeds, self.device)
        return choose(logits, settings, self._to_device(steps, torch.long), seen)

    def _prefill(self, requests: list[_Request]) -> _Step:
        """One forward over the new prompts; row i is left-padded but written to columns 0..n-1 of its slot."""
        width = max(len(r.prompt_ids) for r in requests)
        ids, columns = [], []
        for r in requests:
            n, pad = len(r.prompt_ids), width - len(r.prompt_ids)
            ids.append([self.config.pad_token_id] * pad + r.prompt_ids)
            columns.append(list(range(n, n + pad)) + list(range(n)))  # padding goes past the prompt, overwritten later
        slots = self._to_device([r.slot for r in requests], torch.long)
        state = self._to_device([r.state for r in requests], torch.long)
        input_ids = self._to_device(ids, torch.long)
        columns_t = self._to_device(columns, torch.long)  # (B, T)
        refresh_prefix_cache(self.model)  # a P-Tuning prefix changed since start() is written again
        logits = prefill(self.model, input_ids, self.model.slot_layout(state), columns=columns_t, cache_rows=slots)
        seen = None
        if _penalised(requests):
            seen = torch.zeros(len(requests), self.config.vocab_size, dtype=torch.bool, device=self.device)
            mark_seen(seen, input_ids, input_ids != self.config.pad_token_id)
        tokens = self._choose(logits, requests, list(range(len(requests))), seen)
        if seen is not None:
            mark_seen(seen, tokens[:, None])
            self._seen.index_copy_(0, slots, seen)
        self._last_token.index_copy_(0, slots, tokens)
        for r in requests:
            r.launched = 1
        self.stats.prefill_forwards += 1
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        return _Step([(r, i) for i, r in enumerate(requests)], tokens)

    def _decode(self, requests: list[_Request]) -> _Step:
        """One token for every slot in [0, rows): running slots feed back their last token, idle ones write the scratch column."""
        hi = max(r.slot for r in requests) + 1
        rows = hi if self._graphs is None else batch_bucket(hi, self.max_batch)
        idle = [self.max_context, *self.model.idle_slot_state()]
        meta = [idle for _ in range(rows)]  # the fed-back token's column, then the slot's layout state
        for r in requests:
            meta[r.slot] = [len(r.prompt_ids) + r.launched - 1, *r.state]
        kv_length = max(meta[r.slot][0] for r in requests) + 1
        meta_t = self._to_device(meta, torch.long)  # (rows, 1 + state)
        if self._graphs is None:
            logits = decode_step(self.model, self._last_token[:rows, None], meta_t, self._kv_positions[:kv_length])
        else:
            logits = self._graphs.run(meta_t, kv_length)
        seen = self._seen[:rows] if _penalised(requests) else None  # only penalised slots' `seen` is ever read
        tokens = self._choose(logits, requests, [r.slot for r in requests], seen)
        if seen is not None:
            mark_seen(seen, tokens[:, None])
        self._last_token[:rows] = tokens
        for r in requests:
            r.launched += 1
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(requests)
        return _Step([(r, r.slot) for r in requests], tokens)

    def _read(self, step: _Step) -> None:
        """Hand one launched step's tokens to their requests (the one host sync)."""
        try:
            values = step.tokens.tolist()
        except Exception as e:  # noqa: BLE001 - an asynchronous device error surfaces here
            log.exception("reading a step failed")
            for r, _ in step.rows:
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        for r, index in step.rows:
            if r.finished:
                continue  # ended at an earlier step: this token was computed one step too many
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            token = values[index]
            if not r.token_ids:
                r.first_token = now
            if token in r.stop_ids:
                self._finish(r, "stop")
                continue
            r.token_ids.append(token)
            r.token_times.append(now)
            self.stats.generated_tokens += 1
            try:
                delta = r.text.push(token) if r.text is not None else ""
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                log.exception("detokenizing failed")
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                continue
            if r.text is not None and r.text.stopped:
                self._finish(r, "stop", delta=delta, tokens=1)
            elif len(r.token_ids) >= r.budget:
                self._finish(r, "length", delta=delta, tokens=1)
            else:
                r.handle._put(delta, 1)
                self._touched[r.id] = r.handle

    def _finish(self, r: _Request, reason: str, *, delta: str = "", tokens: int = 0, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        if r.slot >= 0:
            heapq.heappush(self._free_slots, r.slot)
            r.slot = -1
        if r in self._running:
            self._running.remove(r)
        tail = r.text.finish() if r.text is not None and reason in ("stop", "length") else ""
        now = time.perf_counter()
        completion = Completion(
            text=r.text.text if r.text is not None else "",
            token_ids=r.token_ids,
            finish_reason=reason,
            prompt_tokens=len(r.prompt_ids),
            error=error,
            queued_seconds=(r.started or now) - r.submitted,
            first_token_seconds=(r.first_token or now) - r.submitted,
            seconds=now - r.submitted,
            token_times=r.token_times,
        )
        s = self.stats
        s.finished[reason] += 1
        if reason in ("stop", "length"):
            s.request_seconds.observe(completion.seconds)
            if r.token_ids:
                s.first_token_seconds.observe(completion.first_token_seconds)
            if len(r.token_ids) > 1:
                s.token_seconds.observe((now - r.first_token) / (len(r.token_ids) - 1))
        r.handle._put(delta + tail, tokens, completion)
        self._touched[r.id] = r.handle

    def _wake_clients(self) -> None:
        """Wake every reader that got something this iteration: one call per event loop, not per request."""
        if not self._touched:
            return
        handles, self._touched = list(self._touched.values()), {}
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        for h in handles:
            h._wake_thread()
            if h.loop is not None:
                by_loop.setdefault(h.loop, []).append(h._async_wake)
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # the loop is closed: its clients are gone
                for h in handles:
                    if h.loop is loop and h._request is not None:
                        h._request.cancelled = True


_switch = {"lock": threading.Lock(), "compiles": 0, "saved": 0.0}


@contextlib.contextmanager
def _short_gil_switch():
    """The GIL switch interval at COMPILE_SWITCH_INTERVAL while any background compile runs. Compiling is
    Python-heavy: at the default 5 ms the worker waits that long for the GIL at each of its few releases
    per step (measured on an H100: 77 ms per token instead of 5 while compiling)."""
    with _switch["lock"]:
        if _switch["compiles"] == 0:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch["saved"], COMPILE_SWITCH_INTERVAL))
        _switch["compiles"] += 1
    try:
        yield
    finally:
        with _switch["lock"]:
            _switch["compiles"] -= 1
            if _switch["compiles"] == 0:
                sys.setswitchinterval(_switch["saved"])


def _penalised(requests: list[_Request]) -> bool:
    return any(r.gen.repetition_penalty != 1.0 for r in requests)


def _set_all(events: list[asyncio.Event]) -> None:
    for e in events:
        e.set()
