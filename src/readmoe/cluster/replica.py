"""One engine replica: an `Engine` on its own `EngineThread`, inside a Ray Serve replica actor.

`generate` streams a request's events back to the ingress as they are sampled, or, when
the client does not stream, sends its whole output as one message. After
every engine step the thread takes a snapshot of what the router needs (the resident
experts, the queue) and of the engine's counters for the ingress's /metrics; Ray Serve
collects it through `record_routing_stats`. The snapshot is a new dict each time, so
the actor's event loop never reads the engine while it steps.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..serving.engine_thread import EngineThread, QueueFull, RequestOutput
from ..serving.request import SamplingParams


def snapshot(engine, totals: dict) -> dict:
    """The replica's state as plain data: routing inputs and cumulative counters."""
    c = engine.cache
    L = max(1, len(c.resident))
    resident = [sum(e in res for res in c.resident) / L for e in range(engine.moe.num_experts)]
    return dict(totals, pid=os.getpid(), queue=len(engine.running) + len(engine.waiting), running=len(engine.running),
                waiting=len(engine.waiting), resident=resident, hits=c.hits, misses=c.misses,
                bytes_loaded=c.store.bytes_loaded, kv_bytes=engine.kv_bytes(), time=time.time())


class EngineReplica:
    """Ray Serve deploys this class (deploy.py adds the options); each replica loads the checkpoint once."""

    def __init__(self, model: str, engine_config: dict, dtype: str = "auto", max_queued: int = 64, threads: int = 0):
        import torch

        from ..dtype import resolve
        from ..serving import Engine, EngineConfig

        if threads:
            torch.set_num_threads(threads)
        self.engine = Engine.from_pretrained(Path(model), EngineConfig(**engine_config), dtype=resolve(dtype))
        # cumulative: requests taken, engine steps, tokens run, and routed experts touched summed over steps
        self.totals = {"served": 0, "steps": 0, "tokens": 0, "experts_touched": 0}
        self.stats = snapshot(self.engine, self.totals)
        self.et = EngineThread(self.engine, max_queued=max_queued, on_step=self._after_step)
        self.et.start()
        try:
            from ray import serve

            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Ray (tests of the class itself)
            self.name = f"pid{os.getpid()}"

    def _after_step(self, engine) -> None:
        if engine.stats.steps:
            last, t = engine.stats.steps[-1], self.totals
            t["steps"], t["tokens"], t["experts_touched"] = t["steps"] + 1, t["tokens"] + last.tokens, \
                t["experts_touched"] + len(last.experts)
        self.stats = snapshot(engine, self.totals)

    def info(self) -> dict:
        """Fixed facts the ingress validates requests against."""
        e = self.engine
        return {"max_len": e.max_len, "vocab_size": e.vocab_size, "num_experts": e.moe.num_experts,
                "has_tokenizer": e.tok is not None, "replica": self.name}

    async def generate(self, prompt_ids: list[int], params: dict, experts: list[int] | None = None,
                       stream: bool = True):
        """A request's events (each a `RequestOutput` without the engine's Request). Streaming, the events queued
        since the last message go as one; otherwise one message carries the whole output, with the gaps between
        its steps for the ingress's inter-token latency. `experts` is the ingress's pre-gated histogram: the router
        reads it; the engine pre-gates again on arrival."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            h = self.et.submit(prompt_ids, SamplingParams(**params),
                               lambda ev: loop.call_soon_threadsafe(q.put_nowait, (time.monotonic(), ev)))
        except QueueFull as e:
            yield RequestOutput(None, finished=True, finish_reason="error", error=str(e), error_code=503,
                                replica=self.name)
            return
        except (UserError, RuntimeError) as e:  # RuntimeError: the engine thread died
            yield RequestOutput(None, finished=True, finish_reason="error", error=str(e),
                                error_code=400 if isinstance(e, UserError) else 503, replica=self.name)
            return
        self.totals["served"] += 1
        finished, out, last = False, None, 0.0  # last: when `out` got its last token
        try:
            while not finished:
                t, ev = await q.get()
                ev = ev.detached(self.name)
                if out is None:
                    out, last = ev, t
                else:
                    out.merge(ev, gap=t - last)
                    last = t if ev.new_ids else last
                finished = out.finished
                if finished or (stream and q.empty()):
                    yield out
                    out = None
        finally:
            if not finished:  # the client went away (Ray cancels this generator): free the KV cache
                self.et.cancel(h)

    def record_routing_stats(self) -> dict:
        """Called by Ray Serve every `request_routing_stats_period_s`; the router reads it as `routing_stats`."""
        return dict(self.stats, queue=self.et.num_waiting() + len(self.engine.running))

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine thread died."""
        if not self.et.alive:
            raise RuntimeError(f"the engine thread is not running: {self.et.error!r}")

    def __del__(self):
        et = getattr(self, "et", None)
        if et is not None:
            et.stop(timeout=5)


def params_dict(params: SamplingParams) -> dict:
    """SamplingParams as plain data for the trip to a replica."""
    return asdict(params)
