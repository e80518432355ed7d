"""Whether to prefetch experts: decided by where loads can overlap compute, then by measurement.

Prefetch pays only where a copy runs beside compute: a GPU's copy engine, or a link whose
transfer time can be waited out. On a CPU with no link the loader's memcpy runs on the cores the
step needs, so `auto` stays off there. Behind the emulated link a prefetch only issues the transfer
earlier (a copy engine costs no core), so `auto` turns it on. On a GPU, whether it pays depends on
the machine and the load (the loader thread still takes the GIL), so `auto` measures: it alternates
windows of steps with prefetch on and off, keeps the one whose steps
ran faster relative to the step cost model's prediction for their size (tokens, experts), and
probes again every `every` steps, since load and batch mix drift. Normalising by the prediction
matters: a window that happens to hold prompt chunks has more tokens per step, and seconds per
token would credit that to the setting instead of the batch.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from ..errors import UserError


def resolve_prefetch(prefetch: bool | str, capacity: int | None, link_gbps: float | None,
                     device: torch.device) -> tuple[bool | str, str]:
    """(True, False or "measure", why). "measure": a loader thread is started and `PrefetchSwitch` decides."""
    if capacity is None:
        return False, "every expert is resident: nothing to load"
    if isinstance(prefetch, bool):
        return prefetch, "set explicitly"
    if prefetch != "auto":
        raise UserError(f"prefetch must be auto, on or off, not '{prefetch}'")
    if link_gbps is not None:
        return True, "auto: loads wait on a link whose copy engine needs no core; prefetching starts them earlier"
    if device.type == "cuda":
        return "measure", "auto: a GPU can copy experts while it computes; kept on while measured faster"
    return False, "auto: on CPU cores a loader thread competes with compute"


@dataclass
class PrefetchSwitch:
    """Explore-then-exploit over {on, off}: after `warmup` steps (the cost model fits), `rounds` windows of
    `window` steps each way, alternating, then the faster (median of measured / predicted step time) until the
    next probe `every` steps later."""

    window: int = 4
    rounds: int = 4
    every: int = 256
    warmup: int = 16
    on: bool = True
    decisions: list[dict] = field(default_factory=list)  # (step, choice, medians): the report's "why"
    _step: int = 0
    _probe_start: int = 0
    _samples: dict = field(default_factory=lambda: {True: [], False: []})

    def __post_init__(self):
        self._probe_start = self.warmup

    def _probing(self) -> bool:
        return 0 <= self._step - self._probe_start < 2 * self.rounds * self.window

    def next_step(self) -> bool:
        """Prefetch in the coming step?"""
        if self._probing():
            self.on = ((self._step - self._probe_start) // self.window) % 2 == 0
        return self.on

    def observe(self, seconds: float, predicted: float) -> None:
        """The step just run: its wall time (loads waited for included) and the cost model's prediction of its
        compute time from its size."""
        probing = self._probing()
        if probing and predicted > 0:
            self._samples[self.on].append(seconds / predicted)
        self._step += 1
        if probing and not self._probing():  # the probe just ended: decide
            med = {k: statistics.median(v) if v else float("inf") for k, v in self._samples.items()}
            self.on = med[True] < med[False]
            self.decisions.append({"step": self._step, "on": self.on, "on_vs_predicted": med[True],
                                   "off_vs_predicted": med[False]})
            self._samples = {True: [], False: []}
        elif not probing and self._step - self._probe_start >= self.every:  # probe again
            self._probe_start = self._step
