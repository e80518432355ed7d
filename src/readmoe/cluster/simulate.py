"""N replicas without engines: the expert-cache hit ratio each routing policy would get.

Input is what a run recorded per request: the pre-gated expert of every prompt token
and of every generated token. Each simulated replica runs up to `max_running`
requests per step (a prompt in one step, then one token per step) and keeps
`capacity` experts under LRU; since Read-ME routes every layer alike, one layer's
hits are every layer's. Arrivals are Poisson at `load` times the replicas' token
capacity, so queues and fallbacks behave as under real load. Routing uses the same
`AffinityPolicy` as the Ray router, fed the simulated caches as its reports.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

from .affinity import AffinityPolicy, ReplicaView, histogram


@dataclass
class SimRequest:
    prompt: list[int]  # pre-gated expert per prompt token
    output: list[int]  # pre-gated expert per generated token


@dataclass
class _Replica:
    capacity: int
    cache: OrderedDict = field(default_factory=OrderedDict)
    running: list = field(default_factory=list)  # [request, position]: position 0 = prompt not run yet
    waiting: list = field(default_factory=list)
    hits: int = 0
    accesses: int = 0

    def access(self, experts: list[int]) -> None:
        """One step's experts, resident ones first, as the engine runs them (`ExpertCache.resident_first`): a
        step over more experts than fit then loads only what it lacks, instead of cycling them through the slots."""
        step = list(dict.fromkeys(experts))
        for e in [e for e in step if e in self.cache] + [e for e in step if e not in self.cache]:
            self.accesses += 1
            if e in self.cache:
                self.hits += 1
                self.cache.move_to_end(e)
            else:
                if len(self.cache) >= self.capacity:
                    self.cache.popitem(last=False)
                self.cache[e] = True

    def step(self, max_running: int) -> None:
        while self.waiting and len(self.running) < max_running:
            self.running.append([self.waiting.pop(0), 0])
        used = []
        for item in self.running:
            r, pos = item
            used += r.prompt if pos == 0 else [r.output[pos - 1]]
            item[1] += 1
        self.access(used)
        self.running = [it for it in self.running if it[1] <= len(it[0].output)]


def simulate(requests: list[SimRequest], replicas: int, route: str, num_experts: int, capacity: int = 2,
             max_running: int = 16, load: float = 0.7, bound: int = 4, seed: int = 0) -> dict:
    """Hit ratio (and fallbacks) of `route` over `replicas` simulated replicas."""
    rng = random.Random(seed)
    reps = [_Replica(capacity) for _ in range(replicas)]
    policy = AffinityPolicy(num_experts, bound)
    mean_steps = sum(1 + len(r.output) for r in requests) / max(1, len(requests))
    rate = load * replicas * max_running / mean_steps  # arrivals per step
    queue, turn, fallbacks = list(requests), 0, 0
    next_arrival = rng.expovariate(rate)
    step = 0
    while queue or any(r.running or r.waiting for r in reps):
        while queue and next_arrival <= step:
            req = queue.pop(0)
            hist = histogram(req.prompt, num_experts)
            if route == "affinity":
                views = {i: ReplicaView(len(r.running) + len(r.waiting),
                                        [1.0 if e in r.cache else 0.0 for e in range(num_experts)])
                         for i, r in enumerate(reps)}
                i, outcome = policy.choose(hist, views)
                fallbacks += outcome == "fallback"
                policy.routed(i, hist)
            elif route == "pow2":
                a, b = rng.sample(range(replicas), 2) if replicas > 1 else (0, 0)
                i = min((a, b), key=lambda k: len(reps[k].running) + len(reps[k].waiting))
            elif route == "round-robin":
                i, turn = turn % replicas, turn + 1
            else:
                raise ValueError(f"unknown route '{route}'")
            reps[i].waiting.append(req)
            next_arrival += rng.expovariate(rate)
        for r in reps:
            r.step(max_running)
        step += 1
    hits, acc = sum(r.hits for r in reps), sum(r.accesses for r in reps)
    return {"replicas": replicas, "route": route, "hit_ratio": hits / acc if acc else 0.0, "accesses": acc,
            "fallbacks": fallbacks, "steps": step}


def remap(requests: list[SimRequest], num_experts: int, seed: int = 0) -> list[SimRequest]:
    """The same requests over `num_experts` experts: each request's experts relabelled by its own random injective
    map, so every request keeps its concentration (how dominant its top expert is) while the dominant experts
    spread uniformly over the larger set. A stand-in for a model carved into more experts."""
    rng = random.Random(seed)
    out = []
    for r in requests:
        used = sorted(set(r.prompt) | set(r.output))
        if len(used) > num_experts:
            raise ValueError(f"a request uses {len(used)} experts; remap to at least that many, not {num_experts}")
        m = dict(zip(used, rng.sample(range(num_experts), len(used))))
        out.append(SimRequest([m[e] for e in r.prompt], [m[e] for e in r.output]))
    return out
