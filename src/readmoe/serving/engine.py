"""The engine: requests in, pre-gated token queues, scheduled flat batches, sampled tokens out.

The router pre-gates every prompt token when the request arrives and every
generated token right after it is sampled, so the expert of every queued token is
known before the backbone runs: the scheduler batches by expert and the expert
cache prefetches exactly what the batch needs. Time is a virtual clock advanced by
the measured wall time of each step (and of pre-gating), jumping over idle gaps,
so a benchmark measures real compute without waiting for arrivals.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .expert_cache import ExpertCache, ExpertStore
from .request import Request, SamplingParams
from .step_runner import Segment, StepRunner, first_use_order
from .scheduler import lookahead, make_scheduler


@dataclass
class EngineConfig:
    scheduler: str = "expert-aware"
    token_budget: int = 16  # tokens per step
    max_running: int = 16  # requests holding a KV cache at once; above token_budget the aging bound
    # loosens to max_wait + ceil(max_running / token_budget) steps
    max_wait: int = 8  # aging bound, in steps
    capacity: int | None = None  # resident routed experts per layer; None: all of them, loaded before the run
    policy: str = "belady"
    prefetch: bool = True
    store: str = "disk"  # "disk" (the checkpoint's safetensors) or "host"; host when no checkpoint is given
    lookahead: int = 16  # scheduler steps simulated for belady
    prefetch_depth: int = 2  # layers loaded ahead of the one computing
    link_gbps: float | None = None  # emulate a host->accelerator link of this bandwidth for expert loads


@dataclass
class StepStats:
    step: int
    tokens: int
    experts: list[int]
    seconds: float
    left: int = 0  # queued tokens that did not fit in this step


@dataclass
class EngineStats:
    steps: list[StepStats] = field(default_factory=list)
    router_s: float = 0.0
    busy_s: float = 0.0


class Engine:
    def __init__(self, moe, config: EngineConfig | None = None, checkpoint: str | Path | None = None, eos_token_id=None,
                 tokenizer=None):
        self.cfg = cfg = config or EngineConfig()
        if moe.layerwise:
            raise UserError("the engine serves pre-gated models; a layer-wise routed model cannot route ahead")
        self.moe, self.tok = moe.eval(), tokenizer
        self.sched = make_scheduler(cfg.scheduler, cfg.token_budget, cfg.max_wait)
        if cfg.capacity is not None and not 1 <= cfg.capacity <= moe.num_experts:
            raise UserError(f"--capacity must lie in [1, {moe.num_experts}]")
        kind = cfg.store if checkpoint is not None else "host"
        store = ExpertStore(moe, checkpoint, kind, device=next(moe.parameters()).device, link_gbps=cfg.link_gbps)
        self.cache = ExpertCache(store, cfg.capacity or moe.num_experts, cfg.policy,
                                 prefetch=cfg.prefetch and cfg.capacity is not None)
        if cfg.capacity is None:
            self.cache.warm()  # every expert resident: no loads while serving
        self.runner = StepRunner(moe, self._expert)
        if self.cache.pool is not None:
            depth = cfg.prefetch_depth
            self.runner.on_layer = lambda l, order: self.cache.prefetch(l + depth, order)
        self.eos = eos_token_id
        self.max_len = self.runner.max_len
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.done: list[Request] = []
        self.now = 0.0
        self.step_no = 0
        self.stats = EngineStats()
        self._ahead: list[int] = []
        self._next_id = 0
        self.access_log: list[list[int]] = []  # per step: the routed experts in the order layers use them

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, arrival_s: float | None = None) -> Request:
        params = params or SamplingParams()
        if not prompt_ids:
            raise UserError("empty prompt: give at least one token")
        if self.max_len and len(prompt_ids) >= self.max_len:
            raise UserError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context window of "
                            f"{self.max_len} tokens; shorten it")
        if params.max_tokens < 1:
            raise UserError("max_tokens must be >= 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")
        vocab = self.moe.config.text_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise UserError(f"prompt token ids must lie in [0, {vocab})")
        r = Request(self._next_id, list(prompt_ids), params, self.now if arrival_s is None else arrival_s)
        self._next_id += 1
        if params.temperature > 0:
            r.generator = torch.Generator().manual_seed(params.seed)
        t = time.perf_counter()
        with torch.no_grad():  # pre-gate the whole prompt on arrival
            logits, r.router_cache = self.moe.router(torch.tensor([r.prompt_ids]), None, None)
        self._router_time(time.perf_counter() - t)
        r.pending, r.pending_experts = list(r.prompt_ids), logits[0].argmax(-1).tolist()
        self.waiting.append(r)
        return r

    def cancel(self, rid: int) -> bool:
        """Stop a request now and free its KV cache."""
        for q in (self.waiting, self.running):
            for r in q:
                if r.rid == rid:
                    q.remove(r)
                    self._finish(r, "cancelled")
                    return True
        return False

    def kv_bytes(self) -> int:
        return sum(r.kv.nbytes for r in self.running if r.kv is not None)

    # ------------------------------------------------------------------ the loop
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Request]:
        """Admit, schedule, run one batch, sample; returns the requests that finished in this step."""
        finished_before = len(self.done)
        while self.waiting and len(self.running) < self.cfg.max_running:
            r = self.waiting.pop(0)
            r.kv = self.runner.new_kv()
            self.running.append(r)
        chunks = self.sched.schedule(self.running)
        if not chunks:
            return []
        left_before = sum(len(r.pending) for r in self.running) + sum(len(r.pending) for r in self.waiting)
        t0 = time.perf_counter()
        segs, reqs = [], []
        for c in chunks:
            toks, exps = c.req.take(c.n)
            segs.append(Segment(c.req.kv, toks, exps))
            reqs.append(c.req)
        ran = {r.rid for r in reqs}
        for r in self.running:
            r.waited = 0 if r.rid in ran else (r.waited + 1 if r.pending else 0)
        n_tokens = sum(len(s.tokens) for s in segs)
        order = first_use_order(segs)
        self.access_log.append(order)
        if self.cache.policy == "belady" and self.cfg.capacity is not None:
            ahead = lookahead(self.sched, self.running, self.cfg.lookahead)
            self._ahead = [e for s in ahead for e in sorted(s)]
        self.cache.ahead = self._ahead
        for l in range(self.cfg.prefetch_depth + 1):  # a no-op without a prefetcher
            self.cache.prefetch(l, order)
        logits = self.runner.step(segs)
        firsts = []
        for i, (r, seg) in enumerate(zip(reqs, segs)):
            r.processed += len(seg.tokens)
            if r.pending:  # more prompt to go
                continue
            if not r.output_ids:
                firsts.append(r)
            self._emit(r, self._sample(r, logits[i]))
        dt = time.perf_counter() - t0
        self.now += dt
        for r in firsts:
            r.first_token_s = self.now
        self.stats.busy_s += dt
        self.stats.steps.append(StepStats(self.step_no, n_tokens, order, dt, left_before - n_tokens))
        for r in [r for r in self.running if r.finished]:
            self.running.remove(r)
        self.step_no += 1
        for r in self.done[finished_before:]:
            if r.finish_s is None:
                r.finish_s = self.now
        return self.done[finished_before:]

    def _expert(self, layer: int, expert: int, rest: list[int]):
        return self.cache.get(layer, expert, keep=rest)

    def _router_time(self, dt: float) -> None:
        self.now += dt
        self.stats.router_s += dt
        self.stats.busy_s += dt

    def _sample(self, r: Request, logits: torch.Tensor) -> int:
        p = r.params
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / p.temperature, -1)
        if p.top_p < 1:
            sp, si = probs.sort(descending=True)
            cut = (sp.cumsum(0) - sp) >= p.top_p  # keep the smallest prefix with mass >= top_p
            sp[cut] = 0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=r.generator))

    def _emit(self, r: Request, token: int) -> None:
        r.output_ids.append(token)
        p = r.params
        stops = set(p.stop_token_ids) | ({self.eos} if self.eos is not None else set())
        if token in stops:
            return self._finish(r, "stop")
        if p.stop and self.tok is not None:
            text = self.tok.decode(r.output_ids, skip_special_tokens=True)
            if any(s in text for s in p.stop):
                return self._finish(r, "stop")
        if len(r.output_ids) >= p.max_tokens or (self.max_len and r.processed + 1 >= self.max_len):
            return self._finish(r, "length")
        t = time.perf_counter()
        with torch.no_grad():  # pre-gate the new token at once
            logits, r.router_cache = self.moe.router(torch.tensor([[token]]), None, r.router_cache)
        self._router_time(time.perf_counter() - t)
        r.pending.append(token)
        r.pending_experts.append(int(logits[0, -1].argmax()))

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.kv = None  # frees the KV cache
        r.router_cache = None
        self.done.append(r)

    # ------------------------------------------------------------------ whole runs
    def run(self, arrivals: list[tuple[float, list[int], SamplingParams]]) -> list[Request]:
        """Serve a workload: (arrival_s, prompt_ids, params) in arrival order. Returns the finished requests."""
        arrivals = sorted(arrivals, key=lambda a: a[0])
        i = 0
        self.now = arrivals[0][0] if arrivals else 0.0
        reqs = []
        while i < len(arrivals) or self.has_work():
            if not self.has_work() and i < len(arrivals):
                self.now = max(self.now, arrivals[i][0])  # idle: jump to the next arrival
            while i < len(arrivals) and arrivals[i][0] <= self.now:
                a, ids, params = arrivals[i]
                reqs.append(self.submit(ids, params, arrival_s=a))
                i += 1
            before = self.step_no
            self.step()
            if self.step_no == before and self.has_work() and i >= len(arrivals):
                raise RuntimeError("engine made no progress with work queued")
        return reqs

    def write_access_log(self, path: Path) -> None:
        """JSONL, one line per step and layer: the routed experts that layer needed in that step."""
        from ..errors import atomic_write_text

        L = len(self.runner.layers)
        atomic_write_text(path, "".join(json.dumps({"step": s, "layer": l, "experts": sorted(order)}) + "\n"
                                        for s, order in enumerate(self.access_log) for l in range(L)))

    def resident_bytes(self) -> int:
        """Weights that must stay resident: everything but the routed experts, plus the cache's experts."""
        routed = {id(getattr(ex, p).weight) for m in self.moe.moe_layers() for ex in m.experts
                  for p in ("gate_proj", "up_proj", "down_proj")}
        fixed = sum(t.numel() * t.element_size() for t in {id(t): t for t in self.moe.parameters()}.values()
                    if id(t) not in routed)
        return fixed + self.cache.resident_bytes()

    def close(self) -> None:
        self.cache.close()
