"""The schedulers on a modelled clock: what a rule decides, without this machine's timing noise.

`readmoe bench serve --sweep` times real steps, so the same cell spreads 10-20 % between rounds on this
machine, and its 3 % goals sit inside that spread. This replays the sweep's cells on the real engine (real
model, router, scheduler, expert cache, Belady's lookahead and the emulated link) with one change: time is a
model. A step costs fixed + per_token x tokens + per_expert x experts, paced layer by layer so a transfer behind
the link overlaps the layers it should; a load from disk costs its bytes over the disk's bandwidth, inline (as on
CPU cores, where prefetch is off). The costs default to the medians of the fits a sweep report holds
(`cost_model` of each run, and its disk cells' bytes over load time). A replay then repeats to the last bit, within
a process and across processes, so two schedulers differ only where their decisions do, and several workloads
(seeds) show how far a rule's gain depends on which requests share a step. Router time is left out (2 % of a
step).
Run: `python benchmarks/schedule_replay.py --model runs/demo/model --out runs/schedule-replay` (about 8 min).
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from readmoe import dtype as dtypes
from readmoe import report
from readmoe.atomic import atomic_write_text
from readmoe.corpus import Corpus
from readmoe.modeling import load_readme
from readmoe.serving import engine as engine_mod
from readmoe.serving import expert_cache as cache_mod
from readmoe.serving import step_runner as runner_mod
from readmoe.serving.bench import summarize
from readmoe.serving.engine import Engine, EngineConfig
from readmoe.serving.sweep import MEMORY, _scaled
from readmoe.serving.workload import WorkloadConfig, synthetic

# This CPU's fits in a bf16 sweep at normal speed (used when no sweep report is given)
COSTS = {"fixed_s": 0.030, "per_token_s": 0.0006, "per_expert_s": 0.011, "per_loaded_expert_s": 0.028,
         "disk_gbps": 0.6}


class ModelledClock:
    """perf_counter() = compute progress + stalls; sleeping (a wait for the link) is a stall."""

    def __init__(self):
        self.base = self.stall = 0.0

    def perf_counter(self) -> float:
        return self.base + self.stall

    def sleep(self, dt: float) -> None:
        self.stall += max(0.0, dt)


@contextmanager
def modelled_time(costs: dict):
    """The engine, the expert cache and the step runner on a modelled clock (the runner times its MLP to choose
    between its ways of computing it, whose results differ in the last bits); disk reads cost their bytes over
    the bandwidth."""
    clock = ModelledClock()
    saved = engine_mod.time, cache_mod.time, runner_mod.time, cache_mod.wait_until, cache_mod.ExpertStore._read
    read = cache_mod.ExpertStore._read

    def _read(store, layer, expert):
        ws = read(store, layer, expert)
        clock.stall += store.nbytes[layer, expert] / (costs["disk_gbps"] * 1e9)
        return ws

    engine_mod.time = cache_mod.time = runner_mod.time = clock
    cache_mod.wait_until = lambda t: clock.sleep(t - clock.perf_counter())
    cache_mod.ExpertStore._read = _read
    try:
        yield clock
    finally:
        engine_mod.time, cache_mod.time, runner_mod.time, cache_mod.wait_until, cache_mod.ExpertStore._read = saved


def run(moe, checkpoint, ec: EngineConfig, wl, costs: dict) -> dict:
    """One engine run of `wl` on the modelled clock; the bench's summary row."""
    with modelled_time(costs) as clock, Engine(moe, ec, checkpoint=checkpoint) as eng:
        r = eng.runner
        per_expert = costs["per_expert_s"] if ec.capacity is None else costs["per_loaded_expert_s"]
        step_start, step_cost, layers = [0.0], [0.0], len(r.layers)

        def pace(layer):  # compute reaches this layer's share of the step
            clock.base = max(clock.base, step_start[0] + step_cost[0] * layer / layers)

        def paced(fn):
            def call(layer, *args):
                pace(layer)
                return fn(layer, *args)
            return call

        r.expert_fn = paced(r.expert_fn)
        if r.on_layer is not None:
            r.on_layer = paced(r.on_layer)
        real_step = r.step

        def step(segs, order=None):
            step_start[0] = clock.base
            step_cost[0] = (costs["fixed_s"] + costs["per_token_s"] * sum(len(s.tokens) for s in segs)
                            + per_expert * len({e for s in segs for e in s.experts}))
            out = real_step(segs, order)
            clock.base = step_start[0] + step_cost[0]
            return out

        r.step = step
        reqs = eng.run(wl)
        row = summarize(eng, reqs, ec.scheduler)
    row.pop("norm_latencies", None)
    return row


def costs_from(path: Path) -> dict:
    """Medians of a sweep report's fitted step costs (resident cells, capacity-2 cells) and its disk bandwidth."""
    runs = json.loads(path.read_text())["runs"]
    moe = [r for r in runs if r.get("model") == "moe" and r.get("cost_model", {}).get("fitted")]
    res = [r["cost_model"] for r in moe if r["memory"] == "resident"]
    cap = [r["cost_model"] for r in moe if r["memory"] != "resident"]
    disk = [r["bytes_loaded"] / r["load_s"] for r in moe if r["memory"] == "cap2-disk" and r["load_s"] > 0]
    if not (res and cap and disk):
        raise SystemExit(f"{path}: no fitted resident, capacity-2 and disk runs; give a `readmoe bench serve --sweep` report")
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    return {"fixed_s": med(res, "fixed_s"), "per_token_s": med(res, "per_token_s"), "per_expert_s": med(res, "per_expert_s"),
            "per_loaded_expert_s": med(cap, "per_expert_s"), "disk_gbps": statistics.median(disk) / 1e9}


def seed_runs(args) -> list[dict]:
    """Every cell of one workload (seed), in one process with one thread: the results do not depend on --jobs."""
    model, seed, requests, rates, memory, schedulers, costs = args
    torch.set_num_threads(1)
    moe, tok = load_readme(model, dtypes.resolve("auto"))
    wl = synthetic(tok, Corpus("embedded"), WorkloadConfig(requests=requests, rate=1.0, seed=seed))
    base = EngineConfig()
    at_once = run(moe, model, base, [(0.0, ids, p) for _, ids, p in _scaled(wl, 1.0)], costs)
    sat = len(wl) / (at_once["generated_tokens"] / at_once["tokens_per_s"])  # requests over the span
    rows = []
    for m in memory:
        for f in rates:
            for s in schedulers:
                row = run(moe, model, replace(base, scheduler=s, **MEMORY[m]), _scaled(wl, f * sat), costs)
                rows.append({"seed": seed, "memory": m, "rate_factor": f, "rate": f * sat, "scheduler": s,
                             **{k: row[k] for k in ("mean_norm_latency_s", "p95_norm_latency_s", "mean_ttft_s",
                                                    "tokens_per_s", "unique_experts_per_batch", "bytes_loaded")}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--out", default="runs/schedule-replay")
    ap.add_argument("--costs", default=None, help="a sweep report to take the costs from (default: "
                    "runs/sweep-quick/report.json where it exists, else 'builtin'); "
                    "'builtin' for this CPU's usual fits")
    ap.add_argument("--seeds", default="0,1,2,3", help="workloads (the sweep's is seed 0)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rates", default="0.25,0.5,1,2", help="multiples of the saturating rate")
    ap.add_argument("--memory", default="cap2-disk,cap2-link")
    ap.add_argument("--schedulers", default="decode-first,expert-aware", help="the first is the baseline")
    ap.add_argument("--jobs", type=int, default=2, help="workloads replayed at once (one core each)")
    a = ap.parse_args()
    if a.costs is None:
        a.costs = "runs/sweep-quick/report.json" if Path("runs/sweep-quick/report.json").exists() else "builtin"
    if a.costs != "builtin" and not Path(a.costs).is_file():
        raise SystemExit(f"--costs: no report at {a.costs}; run `make bench-quick` or pass 'builtin'")
    costs = dict(COSTS) if a.costs == "builtin" else costs_from(Path(a.costs))
    seeds, rates = [int(x) for x in a.seeds.split(",")], [float(x) for x in a.rates.split(",")]
    memory, schedulers = a.memory.split(","), a.schedulers.split(",")
    bad = [m for m in memory if m not in MEMORY]
    if bad:
        raise SystemExit(f"--memory: unknown setting '{bad[0]}'; use {', '.join(MEMORY)}")
    jobs = [(a.model, s, a.requests, rates, memory, schedulers, costs) for s in seeds]
    # each workload in a fresh process, so its result does not depend on what its worker replayed before
    with ProcessPoolExecutor(max_workers=max(1, a.jobs), max_tasks_per_child=1) as pool:
        rows = [r for rs in pool.map(seed_runs, jobs) for r in rs]
    base, h = schedulers[0], ["memory", "rate"]
    cells, table = {}, []
    for r in rows:
        cells.setdefault((r["memory"], r["rate_factor"]), {}).setdefault(r["seed"], {})[r["scheduler"]] = r
    for s in schedulers[1:]:
        h += [f"{s} vs {base}: mean % (per seed)", "p95 % (per seed)"]
    for (m, f), by_seed in cells.items():
        line = [m, f"{f:g}x"]
        for s in schedulers[1:]:
            for k in ("mean_norm_latency_s", "p95_norm_latency_s"):
                d = [100 * (v[s][k] / v[base][k] - 1) for v in by_seed.values()]
                line.append(f"{statistics.median(d):+.1f} ({', '.join(f'{x:+.1f}' for x in d)})")
        table.append(line)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps({"costs": costs, "seeds": seeds, "requests": a.requests,
                                                       "rows": rows}, indent=1))
    title = (f"schedulers on a modelled clock: medians over {len(seeds)} workloads of {a.requests} requests "
             f"(per workload in brackets), normalized latency against {base}")
    report.print_table(title, h, table)
    note = ("\nCosts: " + ", ".join(f"{k} {v:.4g}" for k, v in costs.items()) + f" (from {a.costs}).\n")
    print(note)
    atomic_write_text(out / "report.md", f"# {title}\n\n" + report.markdown_table(h, table) + note)


if __name__ == "__main__":
    main()
