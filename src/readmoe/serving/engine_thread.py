"""The engine on the wall clock, driven by one thread (the server's engine loop).

The engine is not thread-safe and does not need to be: only this thread touches it.
Callers (the asyncio side of the server) hand requests and cancellations over
through a lock-protected inbox and get events back through a `sink` callable,
called in the engine thread once per step for every request that produced a token
or finished, so each token reaches its stream as soon as it is sampled. With no
work the thread sleeps on a condition variable instead of spinning.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .engine import Engine
from .request import Logprob, Request, SamplingParams


log = logging.getLogger("readmoe.serving")


class QueueFull(Exception):
    """The engine's queue holds `max_queued` requests already: try again later (HTTP 503)."""


@dataclass
class RequestOutput:
    """What one step did for one request: its new tokens (with logprobs if asked), and whether it finished."""

    request: Request | None  # None when the request never reached the engine (cancelled in the inbox)
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[Logprob] = field(default_factory=list)
    new_experts: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None  # the engine failed: the request ends with this message
    error_code: int = 500  # its HTTP status: 500 a failed step, 503 a lost replica or a full queue (retry)
    text: str | None = None  # when finished: the whole output text, cut before a stop string
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)  # in the request's first event
    replica: str | None = None  # which engine replica served it (scale-out; None for a single engine)
    gaps: list[float] = field(default_factory=list)  # seconds between the token-carrying steps folded into it

    def merge(self, later: "RequestOutput", gap: float | None = None) -> "RequestOutput":
        """Fold a later event of the same request into this one (a response built from several steps). `gap`: the
        seconds between this event's last token and `later`'s first, kept so the receiver can still observe
        inter-token latencies."""
        if gap is not None and self.new_ids and later.new_ids:
            self.gaps.append(gap)
        self.gaps += later.gaps
        self.request = later.request or self.request
        self.new_ids += later.new_ids
        self.new_logprobs += later.new_logprobs
        self.new_experts += later.new_experts
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.finished, self.finish_reason, self.text = later.finished, later.finish_reason, later.text
        self.error, self.error_code = later.error or self.error, later.error_code if later.error else self.error_code
        self.replica = later.replica or self.replica
        return self

    def detached(self, replica: str | None = None) -> "RequestOutput":
        """A copy without the engine's Request, small enough to send to another process."""
        return RequestOutput(None, self.new_ids, self.new_logprobs, self.new_experts, self.finished,
                             self.finish_reason, self.error, self.error_code, self.text, self.prompt_logprobs, replica,
                             list(self.gaps))


Sink = Callable[[RequestOutput], None]


class Handle:
    """A caller's reference to a submitted request; pass it to `cancel`."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Sink):
        self.prompt_ids, self.params, self.sink = prompt_ids, params, sink
        self.req: Request | None = None
        self.sent = 0  # tokens already delivered to the sink
        self.cancelled = False


class EngineThread:
    def __init__(self, engine: Engine, max_queued: int | None = None,
                 on_step: Callable[[Engine], None] | None = None, on_finish: Callable[[Request], None] | None = None):
        self.engine, self.max_queued, self.on_step, self.on_finish = engine, max_queued, on_step, on_finish
        self._cond = threading.Condition()
        self._inbox: list[Handle] = []
        self._cancels: list[Handle] = []
        self._live: dict[int, Handle] = {}  # engine rid -> handle
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="readmoe-engine", daemon=True)

    # ------------------------------------------------------------ caller side (any thread)
    def start(self) -> "EngineThread":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # what the HTTP server needs to know of the engine behind it (the Ray ingress answers the same)
    @property
    def tok(self):
        return self.engine.tok

    @property
    def max_len(self) -> int | None:
        return self.engine.max_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def num_experts(self) -> int:
        return self.engine.moe.num_experts

    def attach_metrics(self, metrics) -> None:
        """Have the engine thread update the server's Prometheus metrics after every step and finished request."""
        self.on_step, self.on_finish = metrics.on_step, metrics.on_finish

    def refresh_metrics(self, metrics) -> None:
        metrics.refresh(self.engine)

    def num_waiting(self) -> int:
        """Requests not yet holding a KV cache (read without the engine's cooperation: approximate by a step)."""
        return len(self._inbox) + len(self.engine.waiting)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, stream: bool = True) -> Handle:
        """Validate (a UserError names the problem), then queue; QueueFull when `max_queued` are waiting. `stream`
        is the server backend's hint that the client wants tokens as they come; in-process every step's event is
        delivered anyway (it costs nothing)."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        self.engine.validate(prompt_ids, params)
        h = Handle(list(prompt_ids), params, sink)
        with self._cond:
            if self.max_queued is not None and self.num_waiting() >= self.max_queued:
                raise QueueFull(f"{self.num_waiting()} requests are queued already (--max-queued {self.max_queued})")
            self._inbox.append(h)
            self._cond.notify()
        return h

    def cancel(self, h: Handle) -> None:
        """Stop the request and free its KV cache within one engine step; a no-op once it finished."""
        with self._cond:
            h.cancelled = True
            self._cancels.append(h)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop; requests still in flight end as cancelled."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or self._stop or eng.has_work()):
                        self._cond.wait()
                    if self._stop:
                        break
                    new, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                eng.now = time.monotonic()
                for h in new:
                    if h.cancelled:
                        h.sink(RequestOutput(None, finished=True, finish_reason="cancelled"))
                        continue
                    try:
                        h.req = eng.submit(h.prompt_ids, h.params, arrival_s=eng.now)
                    except UserError as e:  # validated on submit already; kept for safety
                        h.sink(RequestOutput(None, finished=True, error=str(e)))
                        continue
                    self._live[h.req.rid] = h
                for h in cancels:
                    if h.req is not None and not h.req.finished:
                        eng.cancel(h.req.rid)
                if eng.has_work():
                    eng.now = time.monotonic()
                    try:
                        eng.step()
                    except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
                        log.exception("engine step failed")
                        self._fail_running(f"the engine step failed: {type(e).__name__}: {e}")
                    if self.on_step is not None:
                        self.on_step(eng)
                self._deliver()
                # a server runs for days: keep only the last step of the benchmark's history
                eng.done.clear()
                del eng.access_log[:-1], eng.stats.steps[:-1]
        except BaseException as e:  # noqa: BLE001 - a dead engine must fail its requests, not hang them
            self.error = e
            for h in list(self._live.values()) + self._inbox:
                h.sink(RequestOutput(h.req, finished=True, error=f"the engine failed: {type(e).__name__}: {e}"))
            self._live.clear()
            return
        for h in list(self._live.values()):  # stopped: everything still in flight is cancelled
            if h.req is not None and not h.req.finished:
                eng.cancel(h.req.rid)
        self._deliver()
        for h in self._inbox:
            h.sink(RequestOutput(None, finished=True, finish_reason="cancelled"))

    def _fail_running(self, message: str) -> None:
        """End every running request with an error: a failed step may have left their KV caches half-written."""
        for r in list(self.engine.running):
            self.engine.cancel(r.rid)
            h = self._live.pop(r.rid, None)
            if h is not None:
                h.sink(RequestOutput(r, r.output_ids[h.sent:], finished=True, finish_reason="error", error=message,
                                     prompt_logprobs=r.prompt_logprobs if h.sent == 0 else []))
            if self.on_finish is not None:
                self.on_finish(r)

    def _deliver(self) -> None:
        for rid, h in list(self._live.items()):
            r = h.req
            n = len(r.output_ids)
            if n == h.sent and not r.finished:
                continue
            text = self.engine.text(r) if r.finished and self.engine.tok is not None else None
            h.sink(RequestOutput(r, r.output_ids[h.sent:n], r.output_logprobs[h.sent:n], r.output_experts[h.sent:n],
                                 r.finished, r.finish_reason, text=text,
                                 prompt_logprobs=r.prompt_logprobs if h.sent == 0 else []))
            h.sent = n
            if r.finished:
                del self._live[rid]
                if self.on_finish is not None:
                    self.on_finish(r)
