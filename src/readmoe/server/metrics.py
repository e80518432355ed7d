"""Prometheus metrics: vLLM's names under a `readmoe:` prefix, plus the MoE side no peer exports.

Request metrics (latency histograms, token and finish counters) are observed on the
asyncio side, on the wall clock a client sees. Engine metrics (queue gauges, expert
cache, router time, the expert forecast's hits, KV bytes) are updated by the engine thread
after every step.
Each server has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str, num_experts: int):
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.model = model_name
        self.running = Gauge("readmoe:num_requests_running", "Requests holding a KV cache.", lab, registry=r)
        self.waiting = Gauge("readmoe:num_requests_waiting", "Requests queued for a KV cache.", lab, registry=r)
        self.prompt_tokens = Counter("readmoe:prompt_tokens", "Prompt tokens of admitted requests.", lab, registry=r)
        self.generation_tokens = Counter("readmoe:generation_tokens", "Generated tokens.", lab, registry=r)
        self.success = Counter("readmoe:request_success", "Finished requests by finish reason.",
                               lab + ["finished_reason"], registry=r)
        self.rejected = Counter("readmoe:request_rejected", "Requests refused before reaching the engine.",
                                lab + ["reason"], registry=r)
        self.ttft = Histogram("readmoe:time_to_first_token_seconds", "Time to first token.", lab, buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("readmoe:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             lab, buckets=_LATENCY, registry=r)
        self.e2e = Histogram("readmoe:e2e_request_latency_seconds", "Arrival to last token.", lab, buckets=_LATENCY,
                             registry=r)
        # the MoE side
        self.hits = Counter("readmoe:expert_cache_hits", "Routed-expert accesses served from resident memory.", lab,
                            registry=r)
        self.misses = Counter("readmoe:expert_cache_misses", "Routed-expert accesses that needed a load.", lab, registry=r)
        self.bytes_loaded = Counter("readmoe:expert_bytes_loaded", "Bytes of expert weights loaded.", lab, registry=r)
        self.hidden = Counter("readmoe:expert_load_hidden_seconds",
                              "Expert load time overlapped with compute by prefetching.", lab, registry=r)
        self.experts_per_step = Histogram("readmoe:unique_experts_per_step", "Routed experts one engine step touches.",
                                          lab, buckets=tuple(range(1, num_experts + 1)), registry=r)
        self.queued = Gauge("readmoe:queued_tokens", "Pre-gated tokens waiting to run, per routed expert.",
                            lab + ["expert"], registry=r)
        self.router_s = Counter("readmoe:router_seconds", "Time spent pre-gating (the router).", lab, registry=r)
        self.forecast_tokens = Counter("readmoe:expert_forecast_tokens",
                                       "Generated tokens routed (the forecast's attempts).", lab, registry=r)
        self.forecast_hits = Counter("readmoe:expert_forecast_hits", "Generated tokens whose routed expert the "
                                     "forecast behind Belady's future had predicted.", lab, registry=r)
        self.kv_bytes = Gauge("readmoe:kv_cache_bytes", "Bytes of KV cache held by running requests.", lab, registry=r)
        self._last = {"hits": 0, "misses": 0, "bytes": 0, "hidden": 0.0, "router": 0.0, "ftok": 0, "fhit": 0}

    def on_finish(self, r) -> None:
        """Called by the engine thread when a request ends, whether or not its client is still reading."""
        self.finished(len(r.output_ids), r.finish_reason, None if r.finish_s is None else r.finish_s - r.arrival_s)

    def finished(self, tokens: int, reason: str, seconds: float | None) -> None:
        self.generation_tokens.labels(self.model).inc(tokens)
        self.success.labels(self.model, reason).inc()
        if seconds is not None:
            self.e2e.labels(self.model).observe(seconds)

    def refresh(self, engine) -> None:
        """The gauges, also between steps (a cancelled request frees its KV without a step)."""
        self.running.labels(self.model).set(len(engine.running))
        self.waiting.labels(self.model).set(len(engine.waiting))
        self.kv_bytes.labels(self.model).set(engine.kv_bytes())

    def on_step(self, engine) -> None:
        """Called by the engine thread after every step."""
        m, c, last = self.model, engine.cache, self._last
        self.refresh(engine)
        hidden = max(0.0, c.load_s - c.blocked_s)
        for key, value, counter in (("hits", c.hits, self.hits), ("misses", c.misses, self.misses),
                                    ("bytes", c.store.bytes_loaded, self.bytes_loaded), ("hidden", hidden, self.hidden),
                                    ("router", engine.stats.router_s, self.router_s),
                                    ("ftok", engine.stats.forecast_tokens, self.forecast_tokens),
                                    ("fhit", engine.stats.forecast_hits, self.forecast_hits)):
            if value > last[key]:
                counter.labels(m).inc(value - last[key])
            last[key] = value
        if engine.access_log:
            self.experts_per_step.labels(m).observe(len(engine.access_log[-1]))
        for e, n in enumerate(engine.queued_tokens_per_expert()):
            self.queued.labels(m, str(e)).set(n)
