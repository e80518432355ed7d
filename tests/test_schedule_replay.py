"""benchmarks/schedule_replay.py: the engine on a modelled clock is deterministic and charges what it models."""

import random

from helpers import tiny_moe

from readmoe.serving import EngineConfig, SamplingParams
from readmoe.serving import engine as engine_mod
from readmoe.serving import expert_cache as cache_mod
from readmoe.serving import step_runner as runner_mod
from schedule_replay import COSTS, run


def _workload(n=10, gap=0.05):
    rng = random.Random(1)
    return [(i * gap, [rng.randrange(1, 250) for _ in range(rng.randrange(3, 30))],
             SamplingParams(max_tokens=rng.randrange(4, 16), ignore_eos=True)) for i in range(n)]


def test_replay_is_deterministic_charges_loads_and_restores_the_clock(tmp_path):
    """Two replays of a capacity-2 cell give the same latencies to the last bit (real timing would not); loads
    from disk cost their bytes over the bandwidth, so a slower disk makes the same schedule slower by exactly
    the bytes it loaded; afterwards the engine and the cache keep real time."""
    moe = tiny_moe()
    moe.save_pretrained(tmp_path)
    cap = EngineConfig(scheduler="expert-aware", capacity=2, store="disk")
    a, b = (run(moe, tmp_path, cap, _workload(), COSTS) for _ in range(2))
    keys = ("mean_norm_latency_s", "p95_norm_latency_s", "mean_ttft_s", "steps", "bytes_loaded")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys} and a["bytes_loaded"] > 0
    # every request at once: arrivals cannot move, so the schedule is the same and only the disk's time differs
    at_once = [(0.0, ids, p) for _, ids, p in _workload()]
    fast, slow = (run(moe, tmp_path, EngineConfig(scheduler="decode-first", capacity=2, store="disk"), at_once,
                      dict(COSTS, disk_gbps=g)) for g in (1.0, 0.5))
    assert fast["steps"] == slow["steps"] and fast["bytes_loaded"] == slow["bytes_loaded"]
    span = lambda r: r["generated_tokens"] / r["tokens_per_s"]  # noqa: E731
    assert abs((span(slow) - span(fast)) - fast["bytes_loaded"] / 1e9) < 1e-6
    assert all(m.time.__name__ == "time" for m in (engine_mod, cache_mod, runner_mod))
