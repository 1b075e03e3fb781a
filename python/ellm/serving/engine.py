"""Continuous batching: one engine thread owns the model's KV slots and runs a ragged step at a time.

Each step takes one token of every request that is generating, then prompt chunks of requests
that are still reading their prompt, up to a token budget. Requests join and leave between
steps; a cancelled request (its client gone) gives its slot back at the next step.

Results do not depend on what else is running: rows of a step never mix (every kernel computes a
row, and attention a slot, on its own), and a prompt is always cut into chunks on the same grid of
positions, whatever the budget left, so a request's numbers are those it gets alone. A new prompt
reuses the cached positions of a finished one it starts like (prefix reuse), but only whole grid
chunks that were computed as prompt chunks, since only those are what it would compute itself.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..batch_rules import check_token_ids
from ..errors import EllmError
from ..generation import StopStringFilter
from .. import ops
from ..sampling import apply_logit_bias, apply_penalties, apply_repetition_penalty, log_softmax
from ..tokenizer import IncrementalDecoder
from .params import SamplingParams


class QueueFullError(EllmError):
    """The engine's queue of waiting requests is full; try again later."""


class ContextLengthError(EllmError, ValueError):
    """A prompt that leaves no room to generate within the model's context."""


class EngineClosedError(EllmError):
    """The engine was closed, or its model failed, before the request finished."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely ids at that position, best first


@dataclass
class Event:
    """What one step produced for a request: text (cut before a stop string, whole UTF-8 characters
    only), the ids chosen, and where the request ended, the reason ("stop" or "length")."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class Request:
    """A submitted request. Iterate it for its events (blocking), or give `submit` an `on_event`
    callback; `cancel()` stops it at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None] | None,
                 decoder: IncrementalDecoder) -> None:
        self.id = next(Request._ids)
        self.prompt = prompt
        self.params = params
        self._queue: queue.Queue[Event] | None = None if on_event else queue.Queue()
        self._on_event = on_event or self._queue.put
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        # engine-side state
        self.slot: int | None = None
        self.fed = 0  # prompt positions in the cache
        self.rng = np.random.default_rng(params.seed)
        self.counts: dict[int, int] = {}
        self.decoder = decoder
        self.stops = StopStringFilter(params.stop)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise TypeError("this request delivers its events to its on_event callback")
        while True:
            event = self._queue.get()
            if event.error is not None:
                raise event.error
            yield event
            if event.finish_reason is not None:
                return

    def _emit(self, event: Event) -> None:
        if event.finish_reason is not None or event.error is not None:
            self.finish_reason = event.finish_reason
            self.finished.set()
        self._on_event(event)


class Engine:
    """Continuous batching over a `Transformer`'s KV slots (one per request running at once).

    `chunk` is the prompt chunk (and prefix-reuse) grid, `token_budget` the tokens per step (a
    step always takes at least one chunk), `max_queue` the requests that may wait for a slot."""

    def __init__(self, model, tokenizer, stop_ids: list[int], *, chunk: int = 128, token_budget: int = 512,
                 max_queue: int = 64) -> None:
        if chunk < 1 or token_budget < 1 or max_queue < 0:
            raise ValueError("chunk and token_budget must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.chunk = chunk
        self.token_budget = token_budget
        self.max_queue = max_queue
        self.max_seq_len = model.model_args.max_seq_len
        self.vocab_size = model.model_args.vocab_size
        n = model.num_slots
        self._slot_tokens: list[list[int]] = [[] for _ in range(n)]  # what each slot's cache holds
        self._slot_reusable = [0] * n  # leading positions computed as whole prompt chunks
        self._slot_used = [0.0] * n    # when each slot was last given to a request
        self._free = set(range(n))
        self._epoch = model.cache_epoch
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._lock = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        # figures for /metrics
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.requests_total = 0
        self.steps_total = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated by a step)
        self._thread = threading.Thread(target=self._loop, name="ellm-engine", daemon=True)
        self._thread.start()

    # ----- the public side (any thread) -----

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request; raises ContextLengthError for a prompt that leaves no room, QueueFullError
        when `max_queue` requests already wait, EngineClosedError after `close`."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        check_token_ids(prompt, self.vocab_size)
        if len(prompt) >= self.max_seq_len:
            raise ContextLengthError(f"this model's maximum context length is {self.max_seq_len} tokens; the prompt "
                                     f"has {len(prompt)}, leaving no room to generate")
        request = Request(prompt, params, on_event, IncrementalDecoder(self.tokenizer, skip_special_tokens=True))
        with self._lock:
            if self._closed:
                raise EngineClosedError(f"the engine is closed{self._reason()}")
            if len(self._waiting) - len(self._free) >= self.max_queue:  # free slots take some at the next step
                raise QueueFullError(f"{self.max_queue} requests are already waiting for a slot")
            self._waiting.append(request)
            self.requests_total += 1
            self._lock.notify()
        return request

    def close(self) -> None:
        """Stop the engine thread; requests still queued or running end with EngineClosedError."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stats(self) -> dict[str, float]:
        """Requests running and waiting, slots in use, generated tokens per second (last 10 s), totals."""
        with self._lock:
            now = time.perf_counter()
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()
            rate = sum(n for _, n in self._recent) / 10.0
            return {"requests_running": len(self._running), "requests_waiting": len(self._waiting),
                    "slots_in_use": self.model.num_slots - len(self._free), "slots_total": self.model.num_slots,
                    "tokens_per_second": rate, "prompt_tokens_total": self.prompt_tokens_total,
                    "generated_tokens_total": self.generated_tokens_total, "requests_total": self.requests_total,
                    "steps_total": self.steps_total}

    def _reason(self) -> str:
        return f" (the model failed: {self._error})" if self._error else ""

    # ----- the engine thread -----

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._closed and not self._waiting and not self._running:
                        self._lock.wait()
                    if self._closed:
                        break
                    self._drop_cancelled()
                    self._admit()
                if self._running:
                    self._step()
        except BaseException as exc:  # the model failed: every request learns why, nothing hangs
            self._error = exc
        with self._lock:
            self._closed = True
            error = EngineClosedError(f"the engine stopped{self._reason()}")
            for request in [*self._running, *self._waiting]:
                request._emit(Event("", [], error=error))
            self._running.clear()
            self._waiting.clear()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request._emit(Event("", [], finish_reason="cancelled"))
        for request in [r for r in self._running if r.cancelled.is_set()]:
            self._finish(request, "cancelled", emit=True)

    def _admit(self) -> None:
        """Give free slots to waiting requests, each the slot whose cache it can reuse most of."""
        if self.model.cache_epoch != self._epoch:  # forward/generate wrote the free slots meanwhile
            self._epoch = self.model.cache_epoch
            for slot in self._free:
                self._slot_tokens[slot], self._slot_reusable[slot] = [], 0
        while self._waiting and self._free:
            request = self._waiting.popleft()
            slot, reuse = max(((s, self._reusable(s, request.prompt)) for s in self._free),
                              key=lambda sr: (sr[1], -self._slot_used[sr[0]]))
            try:
                self.model.allocate_slot(slot)
            except ValueError:  # someone else's step user holds it
                self._free.discard(slot)
                self._waiting.appendleft(request)
                continue
            self._free.remove(slot)
            self._slot_used[slot] = time.perf_counter()
            request.slot = slot
            self._running.append(request)  # first, so a model failing below still tells this request
            self.model.truncate_slot(slot, reuse)
            request.fed = reuse

    def _reusable(self, slot: int, prompt: list[int]) -> int:
        held = self._slot_tokens[slot]
        limit = min(self._slot_reusable[slot], len(held), len(prompt) - 1)
        same = 0
        while same < limit and held[same] == prompt[same]:
            same += 1
        return same - same % self.chunk

    def _step(self) -> None:
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        wanted: list[bool] = []
        takers: list[Request] = []  # the request of each row whose logits are wanted
        # one token for every request that is generating
        prefilling = []
        for request in self._running:
            if request.fed < len(request.prompt):
                prefilling.append(request)
                continue
            pos = len(request.prompt) + len(request.generated) - 1
            tokens.append(request.generated[-1])
            slots.append(request.slot)
            positions.append(pos)
            wanted.append(True)
            takers.append(request)
        # then prompt chunks on the grid, in arrival order, while the budget lasts
        budget = self.token_budget - len(tokens)
        took_chunk = False
        for request in prefilling:
            start = request.fed
            end = min(len(request.prompt), (start // self.chunk + 1) * self.chunk)
            if took_chunk and end - start > budget:
                break
            tokens.extend(request.prompt[start:end])
            slots.extend([request.slot] * (end - start))
            positions.extend(range(start, end))
            last = end == len(request.prompt)
            wanted.extend([False] * (end - start - 1) + [last])
            if last:
                takers.append(request)
            request.fed = end
            budget -= end - start
            took_chunk = True
            self.prompt_tokens_total += end - start
        logits = self.model.step(np.array(tokens), np.array(slots), np.array(positions), np.array(wanted))
        self.steps_total += 1
        for request, token, logprobs in zip(takers, *self._choose(takers, logits)):
            self._next_token(request, token, logprobs)
        with self._lock:
            self._recent.append((time.perf_counter(), len(takers)))

    def _choose(self, takers: list[Request], logits: np.ndarray) -> tuple[list[int], list[list[TokenLogprob]]]:
        """The next token of every taker (row i of `logits` is taker i's), drawn in one call for all
        rows, each with its own sampling settings and generator; and the logprobs of those that asked."""
        if not logits.flags.writeable:
            logits = logits.copy()
        n = len(takers)
        u, temperature = np.zeros(n), np.zeros(n, dtype=np.float32)
        top_p, top_k = np.ones(n), np.zeros(n, dtype=np.int64)
        raw_logprobs = [None] * n
        for i, request in enumerate(takers):
            p = request.params
            if p.logprobs is not None:
                raw_logprobs[i] = log_softmax(logits[i])
            apply_logit_bias(logits[i], p.logit_bias, in_place=True)
            apply_penalties(logits[i], request.counts, p.presence_penalty, p.frequency_penalty, in_place=True)
            if p.repetition_penalty != 1.0:
                logits[i] = apply_repetition_penalty(logits[i][None], [np.array(request.prompt + request.generated)],
                                                     p.repetition_penalty)[0]
            if p.temperature > 0:  # greedy rows draw nothing from their generator
                u[i], temperature[i], top_p[i], top_k[i] = request.rng.random(), p.temperature, p.top_p, p.top_k or 0
        tokens = [int(t) for t in ops.sample(logits, u, temperature=temperature, top_p=top_p, top_k=top_k)]
        logprobs = []
        for token, request, lp in zip(tokens, takers, raw_logprobs):
            if lp is None:
                logprobs.append([])
                continue
            top = np.argsort(-lp, kind="stable")[:request.params.logprobs]
            logprobs.append([TokenLogprob(token, float(lp[token]), [(int(t), float(lp[t])) for t in top])])
        return tokens, logprobs

    def _next_token(self, request: Request, token: int, logprobs: list[TokenLogprob]) -> None:
        p = request.params
        request.generated.append(token)
        request.counts[token] = request.counts.get(token, 0) + 1
        self.generated_tokens_total += 1
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            text = request.stops.feed(request.decoder.flush()) + request.stops.flush()
            self._finish(request, "stop", Event(text, [token], logprobs, "stop"))
            return
        text = request.stops.feed(request.decoder.push(token))
        if request.stops.stopped:
            self._finish(request, "stop", Event(text, [token], logprobs, "stop"))
            return
        full = len(request.prompt) + len(request.generated) >= self.max_seq_len
        if len(request.generated) >= p.max_tokens or full:
            text += request.stops.feed(request.decoder.flush()) + request.stops.flush()
            self._finish(request, "length", Event(text, [token], logprobs, "length"))
            return
        request._emit(Event(text, [token], logprobs))

    def _finish(self, request: Request, reason: str, event: Event | None = None, emit: bool = False) -> None:
        """Take a request off its slot, which keeps its cache for prefix reuse."""
        slot = request.slot
        held = request.fed + max(len(request.generated) - 1, 0)  # the last token chosen was never fed
        self._slot_tokens[slot] = (request.prompt + request.generated)[:held]
        # prompt chunks end on the grid but for the prompt's last: the whole grid chunks fed are reusable
        self._slot_reusable[slot] = request.fed - request.fed % self.chunk
        self.model.free_slot(slot)
        with self._lock:
            self._running.remove(request)
            self._free.add(slot)
        if event is not None:
            request._emit(event)
        elif emit:
            request._emit(Event("", [], finish_reason=reason))
