"""The serving engine, co-designed with pre-gating (DESIGN.md, "Serve").

Data flow: a request arrives -> the router pre-gates its prompt (request.py) -> the
scheduler picks a flat token batch by expert (scheduler.py) -> the expert cache makes
the batch's experts resident, prefetching layer l+1 while layer l computes
(expert_cache.py) -> the step runner runs the ragged batch (step_runner.py) -> sampled tokens are
pre-gated at once and queue again (engine.py). workload.py makes arrivals; bench.py
measures every scheduler x cache policy x capacity.
"""

from .engine import Engine, EngineConfig
from .request import Request, SamplingParams

__all__ = ["Engine", "EngineConfig", "Request", "SamplingParams"]
