"""AsyncLLMEngine: one thread owns the LLMEngine and steps it while requests come and go.

The asyncio side (the HTTP server) hands requests in through a lock-guarded inbox and gets
each request's `RequestDelta`s back on an asyncio.Queue of its choosing, delivered with
`loop.call_soon_threadsafe`, once per engine iteration. Aborts go in the same way. The
thread sleeps on a condition while there is nothing to do, so an idle server burns no CPU.
A failing step (`StepError`) ends only the requests it names, with finish_reason "error";
anything worse fails every open request and the loop goes on serving new ones."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from parspec.engine.llm_engine import LLMEngine, RequestError, StepError
from parspec.sampling import SamplingParams
from parspec.sequence import RequestDelta

log = logging.getLogger("parspec.serve")


class QueueFull(RuntimeError):
    """The bounded waiting queue is full; the server answers 503."""


class EngineStopped(RuntimeError):
    """The engine loop has stopped (shut down or failed to start); the server answers 503."""


@dataclass
class RequestRejected:
    """Put on a request's queue instead of deltas when the engine refuses it at admission
    (a malformed request the server's own checks let through): the server answers 400."""

    request_id: str
    message: str


@dataclass
class _NewRequest:
    request_id: str
    prompt: str | dict
    params: SamplingParams
    sink: asyncio.Queue
    arrival: float


@dataclass
class _Tracked:
    """A request the engine thread has admitted: where its deltas go and its timings."""

    request: _NewRequest
    open: set[int]  # completion indexes not finished yet
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    reasons: list[str] = field(default_factory=list)


def _finish_reason(reasons: list[str]) -> str:
    """One reason per request (n completions): an error or an abort wins, else the last."""
    for worst in ("error", "abort"):
        if worst in reasons:
            return worst
    return reasons[-1] if reasons else "abort"


class AsyncLLMEngine:
    """Serves an LLMEngine from one thread. ``max_queue_len``: completions allowed to wait
    beyond the ``max_num_seqs`` that run; past that ``add_request`` raises QueueFull.
    ``metrics`` (optional) receives the request and engine observations (see ServerMetrics)."""

    def __init__(self, engine: LLMEngine, max_queue_len: int = 1024, metrics=None):
        if not isinstance(max_queue_len, int) or max_queue_len < 0:
            raise ValueError(f"max_queue_len must be an integer >= 0, got {max_queue_len!r}")
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.cfg.max_num_seqs + max_queue_len
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[_NewRequest] = deque()
        self._aborts: deque[str] = deque()
        self._active = 0  # completions submitted and not finished (guarded by the lock)
        self._stopping = False
        self._tracked: dict[str, _Tracked] = {}  # the engine thread's own
        self._outbox: list[tuple[asyncio.Queue, object]] = []  # the engine thread's own
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None  # set when the loop died; /health turns 503
        self.iterations = 0  # engine-loop passes: they stop while idle (the thread sleeps, no spin)

    # --- the asyncio side -------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; deltas are delivered on ``loop`` (default: the running one)."""
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="parspec-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_active(self) -> int:
        return self._active

    def add_request(self, request_id: str, prompt: str | dict, params: SamplingParams,
                    sink: asyncio.Queue) -> None:
        """Queue a request; its deltas (or a RequestRejected) arrive on ``sink``."""
        request = _NewRequest(request_id, prompt, params, sink, time.monotonic())
        with self._lock:
            if not self.is_running:
                raise EngineStopped(self.error or "the engine is not running")
            if self._active + params.n > self.capacity:
                raise QueueFull(f"the server is at capacity: {self._active} completions running or waiting, "
                                f"limit {self.capacity} (max_num_seqs + max_queue_len); retry later")
            self._active += params.n
            self._inbox.append(request)
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request (a client went away); a request already finished is left alone."""
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything still open (each gets a final "abort" delta) and end the thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as e:  # the loop itself broke: say so on /health, fail every request
            self.error = f"the engine loop failed: {type(e).__name__}: {e}"
            log.exception("engine loop failed")
            self._fail_all(self.error)
        finally:
            self._shutdown()

    def _iterate(self) -> bool:
        """One pass: admit, abort, step once, deliver. Returns False when told to stop."""
        with self._lock:
            while not (self._stopping or self._inbox or self._aborts or self.engine.has_unfinished_requests()):
                self._wake.wait()
            if self._stopping:
                return False
            self.iterations += 1
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        try:
            for request in new:
                self._admit(request)
            for request_id in aborts:
                self.engine.abort_request(request_id)
            if self.engine.has_unfinished_requests():
                self._step()
            self._publish(self.engine.pop_deltas())
        except Exception as e:  # noqa: BLE001 - keep serving: fail what was open, go on
            log.exception("engine iteration failed")
            self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
        self._observe_engine()
        self._flush()
        return True

    def _admit(self, request: _NewRequest) -> None:
        try:
            self.engine.add_request(request.prompt, request.params, request.request_id)
        except (RequestError, ValueError) as e:
            self._release(request.params.n)
            self._outbox.append((request.sink, RequestRejected(request.request_id, str(e))))
            return
        self._tracked[request.request_id] = _Tracked(request, set(range(request.params.n)))

    def _step(self) -> None:
        try:
            self.engine.step()
        except StepError as e:
            # It ended the requests it names (their error deltas come from pop_deltas) and left
            # the engine consistent; the loop goes on with everyone else.
            log.error("a step failed for requests %s: %s", list(e.request_ids), e)

    def _publish(self, deltas: list[RequestDelta]) -> None:
        now = time.monotonic()
        stepped: set[str] = set()
        for delta in deltas:
            tracked = self._tracked.get(delta.request_id)
            if tracked is None:
                continue
            self._outbox.append((tracked.request.sink, delta))
            tracked.num_prompt_tokens = delta.num_prompt_tokens
            if delta.new_token_ids:
                tracked.num_output_tokens += len(delta.new_token_ids)
                self._observe_tokens(tracked, len(delta.new_token_ids), now, delta.request_id not in stepped)
                stepped.add(delta.request_id)
            if delta.finished:
                tracked.open.discard(delta.index)
                tracked.reasons.append(delta.finish_reason or "abort")
                if not tracked.open:
                    self._finish(tracked, now)

    def _observe_tokens(self, tracked: _Tracked, num_new: int, now: float, first_this_step: bool) -> None:
        """vLLM's counting: TTFT once per request, one inter-token interval per request per step."""
        if self.metrics is None:
            tracked.first_token = tracked.first_token or now
            return
        if tracked.first_token is None:
            tracked.first_token = now
            self.metrics.observe_first_token(now - tracked.request.arrival, tracked.num_prompt_tokens)
        elif first_this_step:
            self.metrics.observe_inter_token(now - tracked.last_token)
        self.metrics.observe_generation_tokens(num_new)
        tracked.last_token = now

    def _finish(self, tracked: _Tracked, now: float) -> None:
        del self._tracked[tracked.request.request_id]
        self._release(tracked.request.params.n)
        if self.metrics is None:
            return
        decode = (now - tracked.first_token) if tracked.first_token is not None else None
        self.metrics.observe_finished(_finish_reason(tracked.reasons), e2e=now - tracked.request.arrival,
                                      decode_time=decode, num_prompt_tokens=tracked.num_prompt_tokens,
                                      num_generation_tokens=tracked.num_output_tokens,
                                      max_tokens=tracked.request.params.max_tokens, n=tracked.request.params.n)

    def _release(self, n: int) -> None:
        with self._lock:
            self._active -= n

    def _fail_all(self, message: str) -> None:
        """Free every open request and end each with an "error" delta carrying ``message``."""
        try:
            self.engine.abort_all()
            self.engine.pop_deltas()  # the abort deltas: replaced by the error deltas below
        except Exception:  # noqa: BLE001 - the engine is broken; its requests still get answers
            log.exception("abort_all failed")
        errors = []
        for tracked in list(self._tracked.values()):
            for index in sorted(tracked.open):
                errors.append(RequestDelta(
                    request_id=tracked.request.request_id, index=index, new_token_ids=[], new_text="",
                    new_logprobs=None, finished=True, finish_reason="error", stop_reason=None,
                    num_prompt_tokens=tracked.num_prompt_tokens, num_output_tokens=0, error=message))
        self._publish(errors)

    def _observe_engine(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            pending = len(self._inbox)
        try:
            self.metrics.observe_engine(self.engine, pending)
        except Exception:  # noqa: BLE001 - metrics never take the engine down
            log.exception("metrics update failed")

    def _flush(self) -> None:
        """Hand this iteration's deltas to the event loop in one call."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self._loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _shutdown(self) -> None:
        """Stopped: abort what runs, reject what waits, deliver it all, refuse what comes."""
        with self._lock:
            self._stopping = True
            new, self._inbox = list(self._inbox), deque()
        for request in new:
            self._release(request.params.n)
            self._outbox.append((request.sink, RequestRejected(request.request_id, "the server is shutting down")))
        try:
            self.engine.abort_all()
            self._publish(self.engine.pop_deltas())
        except Exception:  # noqa: BLE001
            log.exception("abort at shutdown failed")
            self._fail_all("the server is shutting down")
        self._observe_engine()
        self._flush()


def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for sink, item in batch:
        sink.put_nowait(item)
