"""Ray Serve request routers for engine replicas: `affinity`, `pow2` (Ray's default), `round-robin`.

Each runs inside the process that holds the deployment handle (the ingress). All three
register themselves in `LIVE`, so the ingress's /metrics can show every replica's last
report and the router's decisions whatever the policy.
"""

from __future__ import annotations

import collections
import importlib
import itertools
import weakref
from typing import List, Optional

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .affinity import AffinityPolicy, ReplicaView

LIVE: "weakref.WeakSet[ReplicaReports]" = weakref.WeakSet()


class ReplicaReports:
    """Mixin: decision counters, and the replicas' reports, for /metrics."""

    policy_name = "?"

    def _register(self) -> None:
        self.decisions: collections.Counter = collections.Counter()
        self._seen: collections.OrderedDict = collections.OrderedDict()  # recent request ids, to count each once
        # Ray ships router classes pickled by value, their functions with a private copy of this module's
        # globals; the process's one registry is the imported module's
        importlib.import_module(__name__).LIVE.add(self)

    def first_try(self, pending_request: Optional[PendingRequest]) -> bool:
        """True the first time the router chooses for this request (Ray retries a choice when a replica is full)."""
        if pending_request is None:
            return False
        rid = pending_request.metadata.internal_request_id
        if rid in self._seen:
            return False
        self._seen[rid] = None
        if len(self._seen) > 10_000:
            self._seen.popitem(last=False)
        return True

    def reports(self) -> dict[str, dict]:
        """Replica id -> its last `record_routing_stats` dict (empty until the first report)."""
        return {rid.unique_id: dict(r.routing_stats or {}) for rid, r in self.curr_replicas.items()}

    def queue(self, r: RunningReplica) -> int:
        """Requests at a replica: Ray's cached count (kept while it sends) where it has one, else the report."""
        q = self.replica_queue_len_cache.get(r.replica_id)
        return int(q) if q is not None else int((r.routing_stats or {}).get("queue", 0))


class ExpertAffinityRouter(ReplicaReports, RequestRouter):
    """Prefer the replica whose experts are warm for the request (`affinity.AffinityPolicy`); the rest of the
    replicas, least loaded first, are the second rank, taken only when the first is full."""

    policy_name = "affinity"

    def initialize_state(self, num_experts: int, bound: int = 2, **kwargs) -> None:
        self.policy = AffinityPolicy(num_experts, bound)
        # requests in flight per replica, counted here: Ray's queue-length cache expires within seconds, and a
        # burst routed on stale reports would all go to one replica
        self.inflight: collections.Counter = collections.Counter()
        self._sent: dict[str, object] = {}
        self._register()

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        key = self._sent.pop(internal_request_id, None)
        if key is not None:
            self.inflight[key] -= 1

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        hist = pending_request.kwargs.get("experts") if pending_request is not None else None
        views = {r.replica_id: ReplicaView(self.inflight[r.replica_id],
                                           list((r.routing_stats or {}).get("resident", [])))
                 for r in candidate_replicas}
        key, outcome = self.policy.choose(hist, views)
        if hist is not None and self.first_try(pending_request):
            # Ray calls on_request_routed only with strict queue limits, so the choice is recorded here: the first
            # rank is taken unless that replica is at max_ongoing_requests
            self.decisions[outcome] += 1
            self.policy.routed(key, hist)
            self.inflight[key] += 1
            self._sent[pending_request.metadata.internal_request_id] = key
        chosen = next(r for r in candidate_replicas if r.replica_id == key)
        rest = sorted((r for r in candidate_replicas if r is not chosen), key=lambda r: self.inflight[r.replica_id])
        return [[chosen], rest] if rest else [[chosen]]

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id)
        self.inflight.pop(replica_id, None)


class Pow2Router(ReplicaReports, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default, power of two choices, with decisions counted."""

    policy_name = "pow2"

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**{k: v for k, v in kwargs.items() if k not in ("num_experts", "bound")})
        self._register()

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None and "experts" in pending_request.kwargs and self.first_try(pending_request):
            self.decisions["pow2"] += 1
        return await super().choose_replicas(candidate_replicas, pending_request)


class RoundRobinRouter(ReplicaReports, RequestRouter):
    """Each replica in turn (a full replica is skipped for the next)."""

    policy_name = "round-robin"

    def initialize_state(self, **kwargs) -> None:
        self._turn = itertools.count()
        self._register()

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if pending_request is not None and "experts" in pending_request.kwargs and self.first_try(pending_request):
            self.decisions["round-robin"] += 1
        i = next(self._turn) % len(ordered)
        return [[r] for r in ordered[i:] + ordered[:i]]


ROUTER_CLASSES = {"affinity": ExpertAffinityRouter, "pow2": Pow2Router, "round-robin": RoundRobinRouter}
