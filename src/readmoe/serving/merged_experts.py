"""Merged experts: the MoE MLP of a step in fewer, larger matmuls, when every expert is resident.

A token runs the shared expert plus its routed one, and a SwiGLU MLP is a sum over neurons, so
`MLP_shared(x) + MLP_e(x)` is one MLP over the union of their neurons. Two merged forms per layer:

- **one**: shared + expert e, for a step whose tokens all use e (every batch-1 decode step): 2 matmuls
  instead of 4; and in a step over several experts grouped by expert, for each expert's rows: 2 matmuls an
  expert instead of 2 for the shared expert over every row plus 2 an expert.
- **all**: shared + every routed expert in one MLP, each token's activations masked to its own neurons
  (shared and its expert's; the rest multiply by 0). A step over k experts runs 2 matmuls instead of
  2 + 2k, with no gather and scatter of rows, but reads every expert and computes every neuron for every
  row. On CPU cores at decode batch sizes the fixed cost of a matmul outweighs that: measured here on the
  demo model (30 layers, 16 rows, 4 experts), 20.8 ms of MLP instead of 31.7; at 64 rows and more the
  grouped path is faster.

Which way a step takes (all, or grouped by expert) depends on the machine, the rows and the experts, so
`WayChooser` measures: per (rows rounded up to a power of two, experts) it times the MLP both ways, then
keeps the faster, trying the other again now and then. Both merged forms are copies (the shared expert
once per routed expert, and every expert once more), so the engine merges only when every expert is
resident and the copies fit in memory (`resolve_merging`).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .packed_linear import AUTO_MEMORY_FRACTION, PackMode, available_bytes, pack

GROUPED, ALL = "grouped", "all"


class WayChooser:
    """For each (row bucket, experts): the MLP seconds of each way (an exponential mean); tries each way
    `explore` times (grouped first), then takes the faster, and tries the slower again every `retry` steps of
    that key. A row bucket does not try `all` once it lost at fewer rows with as many experts."""

    def __init__(self, explore: int = 2, retry: int = 64, decay: float = 0.8):
        self.explore, self.retry, self.decay = explore, retry, decay
        self.seen: dict[tuple[int, int], dict[str, tuple[int, float]]] = {}
        self.uses: dict[tuple[int, int], int] = {}

    @staticmethod
    def key(rows: int, experts: int) -> tuple[int, int]:
        return 1 << max(0, rows - 1).bit_length(), experts

    def choose(self, rows: int, experts: int) -> str:
        k = self.key(rows, experts)
        st = self.seen.setdefault(k, {})
        n = self.uses[k] = self.uses.get(k, 0) + 1
        if self._all_lost_below(*k):  # all computes every neuron of every row: if it lost with fewer rows, it loses
            return GROUPED
        for way in (GROUPED, ALL):
            if st.get(way, (0, 0.0))[0] < self.explore:
                return way
        best, other = sorted((GROUPED, ALL), key=lambda w: st[w][1])
        return other if n % self.retry == 0 else best

    def _all_lost_below(self, rows: int, experts: int) -> bool:
        for (r, e), st in self.seen.items():
            if e == experts and r < rows and len(st) == 2 and min(n for n, _ in st.values()) >= self.explore \
                    and st[ALL][1] > st[GROUPED][1]:
                return True
        return False

    def observe(self, rows: int, experts: int, way: str, seconds: float) -> None:
        st = self.seen.setdefault(self.key(rows, experts), {})
        n, mean = st.get(way, (0, seconds))
        st[way] = (n + 1, seconds if n == 0 else self.decay * mean + (1 - self.decay) * seconds)

    def as_dict(self) -> dict:
        """{"rows x experts": {way: mean ms}}, for reports."""
        return {f"{r}x{e}": {w: round(1000 * m, 3) for w, (_, m) in st.items()} for (r, e), st in sorted(self.seen.items())}


class MergedExperts:
    """Per layer: `one[l][e]` (gate+up, down) of shared + e, and `all[l]` (gate+up, down, mask [E, neurons])."""

    def __init__(self, shared_gu: list, shared_down: list, load, num_experts: int):
        """`load(layer, expert)` -> the expert's plain (gate+up stacked, down); shared weights plain too."""
        self.one: list[list[tuple | None]] = []
        self.all: list[tuple | None] = []
        for l, (sgu, sd) in enumerate(zip(shared_gu, shared_down)):
            if sgu is None:  # an MLP with biases runs as its own module
                self.one.append([None] * num_experts)
                self.all.append(None)
                continue
            g0, u0 = sgu.chunk(2)
            experts = [load(l, e) for e in range(num_experts)]
            if not any(gu.shape[0] for gu, _ in experts):  # no routed neurons here (a dense model on the engine)
                self.one.append([None] * num_experts)
                self.all.append(None)
                continue
            self.one.append([None if not gu.shape[0] else  # an empty expert: the plain path (shared alone)
                             (torch.cat([g0, gu.chunk(2)[0], u0, gu.chunk(2)[1]]), torch.cat([sd, d], 1))
                             for gu, d in experts])
            sizes = [g0.shape[0]] + [gu.shape[0] // 2 for gu, _ in experts]
            mask = torch.zeros(num_experts, sum(sizes), dtype=sd.dtype, device=sd.device)
            mask[:, :sizes[0]] = 1
            start = sizes[0]
            for e, n in enumerate(sizes[1:]):
                mask[e, start:start + n] = 1
                start += n
            self.all.append((torch.cat([g0] + [gu.chunk(2)[0] for gu, _ in experts] + [u0] + [gu.chunk(2)[1] for gu, _ in experts]),
                             torch.cat([sd] + [d for _, d in experts], 1), mask))
        self.chooser = WayChooser()

    @staticmethod
    def nbytes(shared_gu: list, shared_down: list, expert_bytes: dict[tuple[int, int], int]) -> int:
        """What merging adds to memory: per layer, each non-empty routed expert with a copy of the shared one
        (one), and every expert with the shared one once more (all)."""
        total = 0
        for l, (gu, d) in enumerate(zip(shared_gu, shared_down)):
            if gu is None:
                continue
            shared = (gu.numel() + d.numel()) * d.element_size()
            routed = [n for (layer, _), n in expert_bytes.items() if layer == l and n]
            total += sum(n + shared for n in routed) + sum(routed) + shared if routed else 0
        return total

    @torch.no_grad()
    def pack(self) -> None:
        """Prepack for oneDNN; the packed copy replaces the plain one."""
        self.one = [[m and (pack(m[0]), pack(m[1])) for m in row] for row in self.one]
        self.all = [a and (pack(a[0]), pack(a[1]), a[2]) for a in self.all]


def resolve_merging(mode: PackMode, capacity: int | None, extra_bytes: int) -> tuple[bool, str]:
    """(merge experts?, why) for the engine; `extra_bytes`: `MergedExperts.nbytes(...)`."""
    if mode not in (True, False, "auto"):
        raise UserError(f"merge_experts must be auto, on or off, not '{mode}'")
    if mode is True and capacity is not None:
        raise UserError("merged experts (--merge-experts on) need every expert resident: drop --capacity, or use auto")
    if mode != "auto":
        return bool(mode), "set explicitly"
    if capacity is not None:
        return False, "auto: experts are loaded on demand (capacity set); merged copies would multiply the loads"
    if not extra_bytes:
        return False, "auto: no routed expert to merge"
    avail = available_bytes()
    if extra_bytes > AUTO_MEMORY_FRACTION * avail:
        return False, (f"auto: the merged copies ({extra_bytes / 2**30:.1f} GiB) are over "
                       f"{AUTO_MEMORY_FRACTION:.0%} of the available memory ({avail / 2**30:.1f} GiB)")
    return True, f"auto: every expert resident; the merged copies take {extra_bytes / 2**20:.0f} MiB"
