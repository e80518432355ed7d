"""The ingress: the same OpenAI app as `readmoe serve`, in front of N engine replicas.

It holds the tokenizer and the pre-gating router only (a few MB), pre-gates each
prompt, and sends the request with its expert histogram through a Ray Serve handle
whose request router (routers.py) picks the replica. A replica's events stream back
through the handle into the app's usual sink. A replica that dies mid-request ends
the request with a 503 (an error chunk when streaming); the client's retry goes to
a live replica while Ray Serve restarts the dead one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import torch

from ..serving.engine_thread import RequestOutput
from ..serving.request import SamplingParams, validate
from .affinity import histogram
from .replica import params_dict

log = logging.getLogger("readmoe.cluster")
LOST = "the replica serving this request stopped ({}); retry the request"


class RemoteEngines:
    """The server's backend (server.app.Backend) over a deployment handle to the engine replicas."""

    def __init__(self, handle, router, tok, info: dict, route: str):
        self.handle, self.router, self.tok, self.route = handle, router, tok, route
        self.max_len, self.vocab_size = info["max_len"], info["vocab_size"]
        self.num_experts, self._has_tok = info["num_experts"], info["has_tokenizer"]
        self.alive = True
        self.metrics = None
        self.lost = 0  # requests that ended because their replica went away

    def start(self):
        self.alive = True
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.alive = False

    def experts(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's expert histogram from the pre-gating router (the replica will route it the same way)."""
        with torch.no_grad():
            logits, _ = self.router(torch.tensor([prompt_ids]), None, None)
        return histogram(logits[0].argmax(-1).tolist(), self.num_experts)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink, stream: bool = True):
        """Send the request to the replica the router picks. Without `stream` the replica answers with one message
        at the end: a message per step and request cost the replicas about a quarter of their throughput."""
        validate(prompt_ids, params, self.max_len, self.vocab_size, self._has_tok)
        gen = self.handle.options(stream=True).generate.remote(prompt_ids, params_dict(params),
                                                               experts=self.experts(prompt_ids), stream=stream)
        task = asyncio.get_running_loop().create_task(self._pump(gen, sink, time.monotonic()))
        return gen, task

    async def _pump(self, stream, sink, t0: float) -> None:
        n = 0
        try:
            async for ev in stream:
                n += len(ev.new_ids)
                sink(ev)
                if ev.finished:
                    if self.metrics is not None and not ev.error:
                        self.metrics.finished(n, ev.finish_reason, time.monotonic() - t0)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the replica died or was restarted: a clean 503, never a hang
            log.warning("a request ended with its replica: %s", e)
            self.lost += 1
            sink(RequestOutput(None, finished=True, finish_reason="error", error=LOST.format(type(e).__name__),
                               error_code=503))
            return
        self.lost += 1  # the stream ended without a final event
        sink(RequestOutput(None, finished=True, finish_reason="error", error=LOST.format("stream ended"),
                           error_code=503))

    def cancel(self, ref) -> None:
        stream, task = ref
        stream.cancel()
        task.cancel()

    # ------------------------------------------------------------ metrics
    def attach_metrics(self, metrics) -> None:
        self.metrics = metrics
        metrics.registry.register(ReplicaCollector(metrics.model, self))

    def refresh_metrics(self, metrics) -> None:
        pass  # the collector reads the replicas' reports when scraped


class ReplicaCollector:
    """Prometheus collector: each replica's last report (label `replica`) and the router's decisions."""

    def __init__(self, model: str, backend: RemoteEngines):
        self.model, self.backend = model, backend

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .routers import LIVE

        reports, decisions = {}, Counter()
        for r in list(LIVE):
            reports.update(r.reports())
            decisions.update(r.decisions)
        lab = ["model_name", "replica"]
        gauges = {k: GaugeMetricFamily(f"readmoe:replica_{k}", doc, labels=lab) for k, doc in (
            ("num_requests_running", "Requests holding a KV cache at the replica (last report)."),
            ("num_requests_waiting", "Requests queued at the replica (last report)."),
            ("kv_cache_bytes", "KV cache bytes held at the replica (last report)."))}
        counters = {k: CounterMetricFamily(f"readmoe:replica_{k}", doc, labels=lab) for k, doc in (
            ("expert_cache_hits", "Routed-expert accesses served from the replica's resident memory."),
            ("expert_cache_misses", "Routed-expert accesses that needed a load at the replica."),
            ("requests", "Requests the replica took."),
            ("steps", "Engine steps the replica ran."),
            ("experts_touched", "Routed experts touched, summed over the replica's steps."))}
        src = {"num_requests_running": "running", "num_requests_waiting": "waiting", "kv_cache_bytes": "kv_bytes",
               "expert_cache_hits": "hits", "expert_cache_misses": "misses", "requests": "served", "steps": "steps",
               "experts_touched": "experts_touched"}
        for rid, rep in sorted(reports.items()):
            if not rep:
                continue
            for k, fam in {**gauges, **counters}.items():
                fam.add_metric([self.model, rid], float(rep.get(src[k], 0)))
        yield from gauges.values()
        yield from counters.values()
        d = CounterMetricFamily("readmoe:router_decisions", "Requests routed, by outcome: affinity (to the warm "
                                "replica), fallback (the warm one was too busy), cold (no warm replica), or the "
                                "policy's name for pow2 and round-robin.", labels=["model_name", "route", "outcome"])
        for outcome, n in sorted(decisions.items()):
            d.add_metric([self.model, self.backend.route, outcome], n)
        yield d
        lost = CounterMetricFamily("readmoe:requests_lost", "Requests ended by a replica that went away.",
                                   labels=["model_name"])
        lost.add_metric([self.model], self.backend.lost)
        yield lost


class Ingress:
    """Ray Serve deploys this with `serve.ingress()` (deploy.py); `__serve_build_asgi_app__` builds the app."""

    def __init__(self, engines, model: str, served_model_name: str, api_key: str | None, route: str):
        from ..modeling import load_router

        torch.set_num_threads(1)  # the router is tiny; leave the cores to the replicas
        self.engines, self.name, self.api_key, self.route = engines, served_model_name, api_key, route
        self.router, self.tok = load_router(model)

    async def __serve_build_asgi_app__(self):
        from ..server.app import build_app

        info = await self.engines.info.remote()
        backend = RemoteEngines(self.engines, self.router, self.tok, info, self.route)
        return build_app(backend, self.name, self.api_key)
