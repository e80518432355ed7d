"""Expert-affinity routing: send a request to the replica whose expert cache already holds its experts.

Read-ME's router is tiny and reads token ids only, so a front end knows a request's
expert histogram before any replica sees it. A replica is "warm" for an expert by
what the router itself has sent it lately (exact) and by what it reported it holds
(its resident set, a few hundred ms old). The score of a replica is the share of
the request's tokens whose expert is warm there. Affinity never overloads one replica:
when the preferred replica's queue exceeds the least-loaded one's by more than `bound`
requests, the request goes to the warmest replica within that bound (a fallback).

Pure Python, no Ray: the Ray Serve `RequestRouter` (routers.py) and the scale-out
simulation (simulate.py) share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Literal, Sequence

Route = Literal["affinity", "pow2", "round-robin"]
ROUTES: tuple[str, ...] = ("affinity", "pow2", "round-robin")
Outcome = Literal["affinity", "fallback", "cold"]  # cold: no replica is warm for the request's experts


def histogram(experts: Sequence[int], num_experts: int) -> list[int]:
    """Tokens per expert."""
    counts = [0] * num_experts
    for e in experts:
        counts[e] += 1
    return counts


@dataclass
class ReplicaView:
    """What the router knows of one replica."""

    queue: int = 0  # requests running or waiting there
    resident: list[float] = field(default_factory=list)  # per expert: share of layers holding it (last report)


class AffinityPolicy:
    def __init__(self, num_experts: int, bound: int = 2, decay: float = 0.8):
        if bound < 0:
            raise ValueError("`affinity_bound` must be >= 0")
        self.num_experts, self.bound, self.decay = num_experts, bound, decay
        self.traffic: dict[Hashable, list[float]] = {}

    def warmth(self, view: ReplicaView, key: Hashable) -> list[float]:
        """Per expert in [0, 1]: mostly what the replica was sent lately (exact, and what its cache converges to),
        partly what it reported holding (a snapshot: at small capacity it flips with every batch)."""
        sent = self.traffic.get(key) or [0.0] * self.num_experts
        top = max(sent, default=0.0) or 1.0
        held = view.resident or [0.0] * self.num_experts
        return [0.25 * h + 0.75 * s / top for h, s in zip(held, sent)]

    def score(self, hist: Sequence[int], view: ReplicaView, key: Hashable) -> float:
        n = sum(hist)
        if not n:
            return 0.0
        return sum(c * w for c, w in zip(hist, self.warmth(view, key))) / n

    def choose(self, hist: Sequence[int] | None, views: dict[Hashable, ReplicaView]) -> tuple[Hashable, Outcome]:
        """The replica for a request of expert histogram `hist`, and why: the warmest replica among those whose
        queue is within `bound` of the shortest. Ties go to the shorter queue, so an unknown request (no histogram)
        or a cold start is least-loaded routing."""
        if not views:
            raise ValueError("no replicas to route to")
        # least loaded; among equals the one sent the least lately, so new kinds of requests spread out
        least = min(views, key=lambda k: (views[k].queue, sum(self.traffic.get(k, ())), str(k)))
        if not hist or not any(hist):
            return least, "cold"
        scored = {k: round(self.score(hist, v, k), 6) for k, v in views.items()}

        def rank(k):
            return scored[k], -views[k].queue, str(k)

        warmest = max(views, key=rank)
        if scored[warmest] <= 0.0:
            return least, "cold"
        eligible = [k for k in views if views[k].queue <= views[least].queue + self.bound]
        best = max(eligible, key=rank)
        return best, "affinity" if scored[best] >= scored[warmest] else "fallback"

    def routed(self, key: Hashable, hist: Sequence[int] | None) -> None:
        """Record that a request of histogram `hist` went to `key`: its experts will be loaded there."""
        t = self.traffic.setdefault(key, [0.0] * self.num_experts)
        for e in range(self.num_experts):
            t[e] = self.decay * t[e] + (hist[e] if hist else 0)

    def forget(self, key: Hashable) -> None:
        """A replica left (died, scaled down)."""
        self.traffic.pop(key, None)
