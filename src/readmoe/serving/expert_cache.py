"""Expert memory: routed experts live in a store and at most `capacity` per layer are resident.

The store reads one (layer, expert) at a time: from the checkpoint's safetensors
file (one tensor per projection, so a read touches only that expert), or from host
memory feeding an accelerator. The shared expert, attention and embeddings stay
resident. Eviction policies: `lru`, `lfu`, `random`, and `belady`, which evicts the
expert whose next use is furthest away, as told by the pre-gated queues and the
scheduler's lookahead (`future`). `min_hits` is Belady's offline MIN over a recorded
access sequence: the optimum any policy could reach.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Sequence, get_args

import torch

from ..checkpoint import MapPool
from ..rounding import cast
from .expert_copy import resolve_copy
from .packed_linear import PackMode, pack as pack_weight
from .stacked import stack_rows

PROJ = ("gate_proj", "up_proj", "down_proj")
Policy = Literal["lru", "lfu", "random", "belady"]
Store = Literal["disk", "host"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
STORES: tuple[Store, ...] = get_args(Store)


def check_cache(capacity: int | None = None, policy: str | None = None, store: str | None = None,
                num_experts: int | None = None, name: str = "capacity", buffer: int | None = None) -> None:
    """The one validation of expert-cache settings: the engine, the cache, the benchmark and the CLI (before it
    loads anything) all call it. `capacity` None means every expert resident; `buffer` is the prefetch buffer."""
    from ..errors import UserError

    if policy is not None and policy not in POLICIES:
        raise UserError(f"unknown `policy` '{policy}': use one of {', '.join(POLICIES)}")
    if store is not None and store not in STORES:
        raise UserError(f"unknown `store` '{store}': use one of {', '.join(STORES)}")
    if capacity is not None and (capacity < 1 or (num_experts is not None and capacity > num_experts)):
        raise UserError(f"`{name}` must lie in [1, {num_experts if num_experts is not None else 'experts'}], got {capacity}")
    if buffer is not None and buffer < 0:
        raise UserError(f"`prefetch_buffer` must be >= 0, got {buffer}")


def wait_until(t: float) -> None:
    """Sleep until perf_counter() reaches t (a transfer's arrival), off the cores."""
    dt = t - time.perf_counter()
    if dt > 0:
        time.sleep(dt)


class InFlight:
    """A prefetched expert behind the emulated link: copied when the prefetch was issued, usable at `ready`."""

    __slots__ = ("ws", "ready")

    def __init__(self, ws: tuple, ready: float):
        self.ws, self.ready = ws, ready


def expert_key(layer: int, expert: int, proj: str) -> str:
    return f"backbone.model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


class ExpertStore:
    """Where non-resident experts live. `disk`: read per expert from the checkpoint's safetensors (single or
    sharded); `host`: CPU tensors (the model's own on a CPU: gate and up stacked in place, no copy; or a
    prepacked copy, `pack`). `reloads`: whether experts are loaded again while serving (a capacity below the expert
    count), which is what a copy in the serving dtype (`copy`, expert_copy.py) speeds up."""

    def __init__(self, model, checkpoint: str | Path | None = None, kind: str = "disk", device="cpu",
                 link_gbps: float | None = None, copy: PackMode = "auto", reloads: bool = True):
        self.kind, self.device = kind, torch.device(device)
        self.dtype = next(model.parameters()).dtype  # experts are served in the model's dtype
        # Emulated host->accelerator link: a load takes at least bytes / link_gbps, waited off the compute cores.
        # The link is what an offloading GPU server (the paper's setting) pays, and what prefetching can hide;
        # its copy engine needs no core. So a host store on a CPU hands out the host tensors themselves (they
        # are where the compute reads them: a memcpy would charge the cores with the copy engine's work, 0.12 ms
        # an expert of the demo against the link's 0.73) and only the link's time runs (`transfer` returns the
        # arrival); prepacked once at start where the engine packs its weights (`pack`). A disk store still
        # reads on the calling thread: that is the CPU's own work.
        self.link_gbps = link_gbps
        self.num_layers, self.num_experts = len(model.moe_layers()), model.num_experts
        self._ckpt = None
        self.copy_reason = "no disk store"
        self._host: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        if kind == "disk":
            from ..checkpoint import Checkpoint, is_checkpoint

            if checkpoint is None or not is_checkpoint(checkpoint):
                raise ValueError("a disk expert store needs the checkpoint directory with its safetensors weights")
            self._ckpt = Checkpoint(checkpoint)  # single-file or sharded; read without a memory map
            keys = [expert_key(l, e, p) for l in range(self.num_layers) for e in range(self.num_experts) for p in PROJ]
            where, self.copy_reason = resolve_copy(copy, checkpoint, self._ckpt, keys, self.dtype, reloads)
            if where is not None:  # the experts in the serving dtype: half the bytes read, no cast (expert_copy.py)
                self._ckpt.close()
                self._ckpt = Checkpoint(where)
            self._maps = MapPool()  # where loaded experts live on a CPU: maps an evicted expert left are reused
        elif kind == "host":
            for l, m in enumerate(model.moe_layers()):
                for e, ex in enumerate(m.experts):
                    ws = (stack_rows([ex.gate_proj, ex.up_proj])[0], ex.down_proj.weight.detach())
                    if self.device.type != "cpu":  # pinned host copies, for copies that overlap compute
                        ws = tuple(w.to("cpu").contiguous().pin_memory() for w in ws)
                    self._host[l, e] = ws
        else:
            check_cache(store=kind)
        self.nbytes = {(l, e): sum(math.prod(s) for s in self._shapes(l, e)) * self.dtype.itemsize
                       for l in range(self.num_layers) for e in range(self.num_experts)}
        self.bytes_loaded = 0
        self._link_free = 0.0  # when the emulated link has delivered every transfer queued on it
        self._lock = threading.Lock()
        self.packed = False

    def packed_bytes(self) -> int:
        """What `pack()` would add to memory: a copy of every non-empty expert in host memory on a CPU (0 for a
        disk store, or a host store feeding an accelerator, which `pack()` leaves alone)."""
        if self.kind != "host" or self.device.type != "cpu" or self.packed:
            return 0
        return sum(self.nbytes.values())

    @torch.no_grad()
    def pack(self) -> None:
        """Hand out the host experts prepacked for oneDNN (packed_linear.py), made once here: a plain bf16 weight
        is reordered on every matmul, which at serving batch sizes costs as much as the matmul, so an expert
        behind the link would run at half speed where a resident one runs packed. Host memory holds experts in
        the layout the compute reads, as an offloading server keeps them in its kernels' layout; the link
        charges the same bytes. A disk store stays plain: packing costs a load 0.9 ms, against 60 µs a call."""
        if self.packed_bytes():
            self._host = {k: tuple(map(pack_weight, ws)) for k, ws in self._host.items()}
            self.packed = True

    def _shapes(self, layer: int, expert: int) -> list[tuple[int, ...]]:
        if self._ckpt is not None:
            return [self._ckpt.shape(expert_key(layer, expert, p)) for p in PROJ]
        return [tuple(w.shape) for w in self._host[layer, expert]]  # gate and up stacked, down

    def _read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """From the checkpoint: gate and up read straight into the two halves of one buffer, down into another
        (pinned when an accelerator copies from them), then cast or moved only if the serving dtype or device
        differs. The file is not memory-mapped, so nothing read stays in the resident set after the cache evicts it;
        the weights' own maps are recycled (MapPool: a fresh map's page faults cost more than the read)."""
        keys = [expert_key(layer, expert, p) for p in PROJ]
        (n, h), down = self._ckpt.shape(keys[0]), self._ckpt.shape(keys[2])
        stored = self._ckpt.dtype(keys[0])
        if self.device.type == "cuda":
            empty = lambda shape: torch.empty(shape, dtype=stored, pin_memory=True)  # noqa: E731
        elif stored == self.dtype:  # the buffers are the cached weights: memory maps, recycled (MapPool)
            empty = lambda shape: self._maps.empty(shape, stored)  # noqa: E731
        else:  # read, then cast into the weights' own mapping
            empty = lambda shape: torch.empty(shape, dtype=stored)  # noqa: E731
        gu = empty((2 * n, h))
        self._ckpt.read(keys[0], gu[:n])
        self._ckpt.read(keys[1], gu[n:])
        d = self._ckpt.read(keys[2], empty(down))
        if stored == self.dtype:
            return gu.to(self.device, non_blocking=True), d.to(self.device, non_blocking=True)
        # cast as the model loader does (rounding.cast: stochastic for fp32 -> bf16/fp16, seeded by the tensor's name)
        if self.device.type == "cpu":
            out = self._maps.empty
        else:
            gu, d = gu.to(self.device, non_blocking=True), d.to(self.device, non_blocking=True)
            out = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=self.device)  # noqa: E731
        gw, dw = out(gu.shape, self.dtype), out(d.shape, self.dtype)
        cast(gu[:n], self.dtype, keys[0], gw[:n])
        cast(gu[n:], self.dtype, keys[1], gw[n:])
        return gw, cast(d, self.dtype, keys[2], dw)

    def transfer(self, layer: int, expert: int, count: bool = True) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
        """Copy the expert now; returns its weights and when (perf_counter) they have arrived.

        Behind the emulated link, transfers queue on it one after another, each taking at least bytes / link_gbps
        (its copy overlaps its own link time): a copy engine's FIFO. Without a link they have arrived at once."""
        t0 = time.perf_counter()
        if self._ckpt is not None:
            ws = self._read(layer, expert)
        elif self.device.type == "cpu":
            ws = self._host[layer, expert]
        else:
            ws = tuple(w.to(self.device, self.dtype, non_blocking=True) for w in self._host[layer, expert])
        ready = time.perf_counter()
        if count:
            n = self.nbytes[layer, expert]
            with self._lock:
                self.bytes_loaded += n
                if self.link_gbps:
                    self._link_free = max(t0, self._link_free) + n / (self.link_gbps * 1e9)
                    ready = max(ready, self._link_free)
        return ws, ready

    def load(self, layer: int, expert: int, count: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's weights on the compute device (gate and up stacked [2 * size, hidden], down), once arrived."""
        ws, ready = self.transfer(layer, expert, count)
        wait_until(ready)
        return ws

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()


class ExpertCache:
    """Per layer, at most `capacity` resident routed experts, evicted by `policy`.

    `ahead` is the predicted access order after the current step (the scheduler's lookahead over the
    pre-gated queues); `belady` puts the current step's remaining accesses in front of it. With `prefetch`,
    `prefetch(layer, experts)` starts loading without blocking (a transfer on the link, or a loader thread);
    `get` then waits only for what is still in flight.

    `buffer`: where a copy engine does the transfers (a link, a GPU), up to this many experts per layer may be
    in flight or arrived beyond `capacity`, for a step that needs more experts than fit. Without it the extra
    expert's transfer can start only once the layer has used an expert it can replace, so it is waited for
    inside the layer; with it, the transfer starts `prefetch_depth` layers ahead like any other. The layer
    shrinks back to `capacity` as soon as the step has used an expert it can drop, so at most
    (prefetch_depth + 1) x buffer experts are held beyond capacity at any time (a double buffer)."""

    def __init__(self, store: ExpertStore, capacity: int, policy: str = "lru", prefetch: bool = False, seed: int = 0,
                 buffer: int = 2):
        check_cache(capacity, policy, buffer=buffer)
        self.store, self.capacity, self.policy = store, capacity, policy
        L = store.num_layers
        self.resident: list[dict[int, Future | InFlight | tuple]] = [dict() for _ in range(L)]
        self.last_use: list[dict[int, int]] = [dict() for _ in range(L)]
        self.uses: list[dict[int, int]] = [dict() for _ in range(L)]
        self.clock = 0
        self.rng = random.Random(seed)
        self.ahead: Sequence[int] = []
        self._upcoming: Sequence[int] = []
        # How a prefetch overlaps compute: behind a link, the transfer is issued at once and waited for at use
        # (InFlight); otherwise a loader thread copies (a GPU's copy engine does the work; on CPU cores it competes)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch and not store.link_gbps else None
        self.can_prefetch = bool(prefetch)
        copy_engine = prefetch and (bool(store.link_gbps) or store.device.type == "cuda")
        self.buffer = buffer if copy_engine else 0  # a loader thread on the compute cores gains nothing from it
        self.buffered = 0  # prefetches that went into the buffer (the layer was full of experts the step needs)
        self.enabled = bool(prefetch)  # False: loads happen on demand, inline (switched per step)
        self.hits = self.misses = 0
        self.load_s = 0.0  # time spent copying experts (in the loader thread or inline)
        self.inline_s = 0.0  # of which inline, on the compute thread
        self.wait_s = 0.0  # time the compute thread spent blocked on loads
        self.prefetched: list[set[int]] = [set() for _ in range(L)]  # loaded ahead for an access not yet made
        self.early_loads = 0  # of those, started within the layer, over an expert the step had just used

    # -------------------------------------------------------------- policy
    def _victim(self, layer: int, keep: set[int]) -> int:
        cands = [e for e in self.resident[layer] if e not in keep] or list(self.resident[layer])
        if self.policy == "lru":
            return min(cands, key=lambda e: self.last_use[layer].get(e, -1))
        if self.policy == "lfu":
            return min(cands, key=lambda e: (self.uses[layer].get(e, 0), self.last_use[layer].get(e, -1)))
        if self.policy == "random":
            return self.rng.choice(sorted(cands))
        ahead = list(self._upcoming) + list(self.ahead)
        first: dict[int, int] = {}
        for i, e in enumerate(ahead):
            first.setdefault(e, i)
        never = len(ahead) + 1  # not needed in sight: evict first (least recently used among those)
        return max(cands, key=lambda e: (first.get(e, never), -self.last_use[layer].get(e, -1)))

    def _timed_load(self, layer: int, expert: int):
        t = time.perf_counter()
        ws = self.store.load(layer, expert)
        self.load_s += time.perf_counter() - t
        return ws

    def _issue(self, layer: int, expert: int) -> InFlight:
        """Start a transfer over the link; the store's CPU work (a disk read) runs now, on this thread, as an
        on-demand load's would."""
        t = time.perf_counter()
        ws, ready = self.store.transfer(layer, expert)
        copy_s = time.perf_counter() - t
        self.load_s += max(copy_s, self.store.nbytes[layer, expert] / (self.store.link_gbps * 1e9))  # queueing aside
        self.inline_s += copy_s
        return InFlight(ws, ready)

    def _evict(self, layer: int, keep: set[int], size: int, must: bool) -> None:
        """Evict by policy until the layer holds at most `size`, experts in `keep` last: `must` evicts them too if
        nothing else is left (a load needs the slot); otherwise it stops there."""
        res = self.resident[layer]
        while len(res) > size and (must or any(x not in keep for x in res)):
            victim = self._victim(layer, keep)
            del res[victim]
            self.prefetched[layer].discard(victim)

    def _start(self, layer: int, expert: int) -> None:
        """Load `expert` into `layer`: in the loader thread or over the link when prefetching, else inline."""
        res = self.resident[layer]
        if self.enabled and self.pool is not None:
            res[expert] = self.pool.submit(self._timed_load, layer, expert)
        elif self.enabled and self.can_prefetch:
            res[expert] = self._issue(layer, expert)
        else:
            t = time.perf_counter()
            res[expert] = self._timed_load(layer, expert)
            self.inline_s += time.perf_counter() - t

    def _admit(self, layer: int, expert: int, keep: set[int]):
        self._evict(layer, keep, self.capacity - 1, must=True)
        self._start(layer, expert)

    # -------------------------------------------------------------- use
    def resident_first(self, order: Sequence[int]) -> list[int]:
        """The step's experts with the resident ones first (each group in its given order).

        A layer runs its experts one after another, so the order decides what a load evicts: in a fixed order, a
        step over more experts than fit loads one over an expert it has yet to use and then loads that one back
        (3 experts cycling through 2 slots: 1.5 loads a step). Resident first, it loads only what is missing, each
        over an expert it has used, and the policy picks which. Every layer makes the same accesses and, under
        every policy but `random`, the same evictions, so layer 0's residents stand for all."""
        res = self.resident[0] if self.resident else {}
        return [e for e in order if e in res] + [e for e in order if e not in res]

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Start loading the step's `experts` of `layer`, in access order, without blocking.

        Into free slots or over experts this step does not need, so prefetching never evicts what the step is
        about to use and makes exactly the loads on-demand loading would make, earlier. When every slot holds
        an expert the step needs, the rest go into the transfer buffer (`buffer`), if there is one."""
        if not self.enabled or layer >= len(self.resident):
            return
        res, needed = self.resident[layer], set(experts)
        self._upcoming = list(experts)
        for e in experts:
            if e in res:
                continue
            if len(res) >= self.capacity and all(x in needed for x in res):
                if len(res) >= self.capacity + self.buffer:
                    break
                self._start(layer, e)
                self.buffered += 1
            else:
                self._admit(layer, e, needed)
            self.prefetched[layer].add(e)

    def get(self, layer: int, expert: int, keep: Sequence[int] = ()) -> tuple[torch.Tensor, ...]:
        """The expert's weights, loading it if needed (a miss); `keep` are the experts this step still needs
        (this one first)."""
        self.clock += 1
        self._upcoming = rest = list(keep)[1:]
        res = self.resident[layer]
        if expert in self.prefetched[layer]:  # a miss whose load started early: counts as a miss
            self.prefetched[layer].discard(expert)
            self.misses += 1
        elif expert in res:
            self.hits += 1
        else:
            self.misses += 1
            self._admit(layer, expert, set(keep) | {expert})
        self.last_use[layer][expert] = self.clock
        self.uses[layer][expert] = self.uses[layer].get(expert, 0) + 1
        ws = res[expert]
        if isinstance(ws, (Future, InFlight)):
            t = time.perf_counter()
            if isinstance(ws, Future):
                ws = ws.result()
            else:
                wait_until(ws.ready)
                ws = ws.ws
            self.wait_s += time.perf_counter() - t
            res[expert] = ws
        self._evict(layer, set(keep) | {expert}, self.capacity, must=False)  # the buffer drains once it can
        if self.enabled and rest and rest[0] not in res and len(res) >= self.capacity:
            # The step needs more experts than fit and `prefetch` stopped at capacity: start the next one's load
            # now, over this expert (its weights are in the caller's hands) or one not needed, so it overlaps
            # this expert's compute. The same victim on-demand loading would pick at the next `get`.
            self._admit(layer, rest[0], set(rest))
            self.prefetched[layer].add(rest[0])
            self.early_loads += 1
        return ws

    def warm(self, pack: bool = False) -> None:
        """Load every expert of every layer (capacity permitting) without counting hits, misses or bytes;
        `pack`: keep them prepacked for oneDNN (packed_linear.py), which replaces the loaded copy."""
        for l, res in enumerate(self.resident):
            for e in range(min(self.capacity, self.store.num_experts)):
                ws = self.store.load(l, e, count=False)
                res[e] = tuple(map(pack_weight, ws)) if pack else ws
                self.last_use[l][e] = 0

    def resident_bytes(self) -> int:
        return sum(self.store.nbytes[l, e] for l, res in enumerate(self.resident) for e in res)

    @property
    def blocked_s(self) -> float:
        """Time the compute thread has spent on loads: waiting for the loader, or loading inline without one."""
        return self.wait_s + self.inline_s

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.store.close()
        for res in self.resident:
            res.clear()


def simulate(policy: str, accesses: Sequence[Sequence[int]], capacity: int, lookahead: int | None = None,
             seed: int = 0) -> float:
    """Hit ratio of `policy` on one layer's access sequence (a list of per-step expert lists), no real loads.
    `belady` sees `lookahead` steps ahead (None: the whole future)."""

    class _Null:
        num_layers, num_experts = 1, 1 + max((e for s in accesses for e in s), default=0)

        def load(self, layer, expert, count=True):
            return ()

        def close(self):
            pass

    cache = ExpertCache(_Null(), capacity, policy, seed=seed)
    cache.store.nbytes = {}
    for t, step in enumerate(accesses):
        ahead = [e for s in accesses[t + 1:(None if lookahead is None else t + 1 + lookahead)] for e in s]
        cache.ahead = ahead
        for j, e in enumerate(step):
            cache.get(0, e, keep=step[j:])
    return cache.hit_ratio


def min_hits(accesses: Sequence[Sequence[int]], capacity: int) -> tuple[int, int]:
    """Belady's MIN on the flattened access sequence: (hits, accesses) of the offline optimum."""
    flat = [e for step in accesses for e in step]
    nxt = [0] * len(flat)
    last: dict[int, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        nxt[i] = last.get(flat[i], len(flat) + 1)
        last[flat[i]] = i
    resident: dict[int, int] = {}  # expert -> its next use
    hits = 0
    for i, e in enumerate(flat):
        if e in resident:
            hits += 1
        elif len(resident) >= capacity:
            del resident[max(resident, key=lambda x: resident[x])]
        resident[e] = nxt[i]
    return hits, len(flat)
