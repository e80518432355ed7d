"""What an engine step costs, fitted online from the engine's own measured steps.

    step seconds ≈ fixed + per_token · tokens + per_expert · experts + loads

`fixed` is what every step pays whatever it holds (on a CPU: the lm_head, the
attention loop, per-op overhead); `per_expert` what one more routed expert adds
when resident (its weights read, its matmuls launched); loads are measured apart,
from the store's bandwidth and the cache's state, because they depend on which
experts are resident, not on how many. The cost-aware scheduler asks it one
question: does adding this expert to the step cost the batch more than deferring
its tokens by a step costs them? (The step's length prices the deferral; only the
expert's load is on the other side: `deferrable_s`.)
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np


class StepCostModel:
    def __init__(self, fixed: float = 0.03, per_token: float = 0.002, per_expert: float = 0.002, window: int = 512,
                 refit_every: int = 16):
        self.fixed, self.per_token, self.per_expert = fixed, per_token, per_expert  # priors until fitted
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.fitted = False
        self.load_s: Callable[[int], float] = lambda expert: 0.0  # set by the engine: time to make it resident

    def observe(self, tokens: int, experts: int, compute_s: float) -> None:
        """One step's size and its compute time (load waits excluded)."""
        self.samples.append((tokens, experts, compute_s))
        if len(self.samples) % self.refit_every == 0:
            self.refit()

    def refit(self) -> None:
        """Least squares over the window; a coefficient the data cannot pin down keeps its prior."""
        if len(self.samples) < 8:
            return
        x = np.array([(1.0, t, e) for t, e, _ in self.samples])
        y = np.array([s for _, _, s in self.samples])
        cols = [0] + [j for j in (1, 2) if np.ptp(x[:, j]) > 0]
        coef = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
        fit = dict(zip(cols, coef))
        self.fixed = max(0.0, float(fit.get(0, self.fixed)))
        if 1 in fit:
            self.per_token = max(0.0, float(fit[1]))
        if 2 in fit:
            self.per_expert = max(0.0, float(fit[2]))
        self.fitted = True

    def step_s(self, tokens: int, experts: int) -> float:
        return self.fixed + self.per_token * tokens + self.per_expert * experts

    def deferrable_s(self, expert: int) -> float:
        """What holding an expert's tokens back a step can spare the batch: the expert's load, not its compute.
        The compute is paid in whichever step the tokens run, and the requests of that batch wait for it just
        the same (a decode request needs its expert at every token), so only a load can be saved: the expert may
        be resident by then. Resident experts cost nothing to add, so with every expert resident the cost-aware
        scheduler batches exactly as decode-first does."""
        return self.load_s(expert)

    def as_dict(self) -> dict:
        return {"fixed_s": self.fixed, "per_token_s": self.per_token, "per_expert_s": self.per_expert,
                "fitted": self.fitted, "steps_seen": len(self.samples)}
