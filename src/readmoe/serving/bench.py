"""`readmoe bench serve`: one workload, every scheduler x cache policy x capacity, in one process.

Per run: normalized latency (latency / generated tokens, the paper's metric), time
to first token and end-to-end latency (mean, p50, p95, p99), tokens/s, unique
experts per batch, cache hit ratio against the offline optimum (Belady's MIN on the
same access sequence), bytes loaded, the share of load time prefetch hid, the
router's share of time, and how often the expert forecast (Belady's future) predicted a
generated token's expert. Reference runs: all experts resident per scheduler, on-demand
loading (no prefetch), and the dense parent on the same engine and workload.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import report
from ..atomic import atomic_write_json
from ..errors import UserError
from .engine import Engine, EngineConfig
from .expert_cache import POLICIES, check_cache, min_hits
from .packed_linear import linear
from .request import SamplingParams
from .scheduler import SCHEDULERS, make_scheduler
from .workload import WorkloadConfig, synthetic, trace


@dataclass
class BenchConfig:
    schedulers: list[str] = field(default_factory=lambda: list(SCHEDULERS))
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    capacities: list[int] | None = None  # default 1 .. E-1
    # More capacities for the default scheduler's Belady and LRU runs only (with prefetch, repeated like the resident
    # runs): issue 10's Belady goals average over capacities 2-4. Those at or above the expert count are skipped.
    belady_capacities: list[int] = field(default_factory=list)
    token_budget: int = 128  # the engine's default
    max_running: int = 16
    max_wait: int = 8
    store: str = "disk"
    link_gbps: float | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    trace: str | None = None
    rounds: int = 3  # the all-resident runs (schedulers and the dense parent), repeated interleaved: medians

    def check(self, num_experts: int | None = None) -> "BenchConfig":
        """Fail on a bad setting before any model loads (capacities once the expert count is known)."""
        check_sizes(self.token_budget, self.max_running, self.max_wait, self.rounds, self.workload.requests)
        if self.link_gbps is not None and self.link_gbps <= 0:
            raise UserError("`link_gbps` must be > 0")
        check_cache(store=self.store)
        for s in self.schedulers:
            make_scheduler(s, self.token_budget)  # an unknown name fails here
        for p in self.policies:
            check_cache(policy=p)
        if num_experts is not None:
            for c in self.capacities or ():
                check_cache(c, num_experts=num_experts, name="capacities")
        for c in self.belady_capacities:  # those at or above the expert count are skipped, not refused
            check_cache(c, name="belady_capacities")
        return self


def check_sizes(token_budget: int, max_running: int, max_wait: int, rounds: int, requests: int) -> None:
    """The engine sizes and run counts every benchmark (matrix and sweep) takes."""
    if token_budget < 1 or max_running < 1 or max_wait < 1:
        raise UserError("`token_budget`, `max_running` and `max_wait` must be >= 1")
    if rounds < 1:
        raise UserError("`rounds` must be >= 1")
    if requests < 1:
        raise UserError("`requests` must be >= 1")


def round_order(variants: list, k: int) -> list:
    """Round k's order of the variants: reversed every other round, so drift and whatever a run leaves behind
    (caches, heat) fall on every variant alike, first and last in turn."""
    return variants if k % 2 == 0 else variants[::-1]


def interleaved(variants: list, rounds: int) -> list[tuple[int, object]]:
    """(round, variant) for `rounds` rounds of the variants run back to back (`round_order`)."""
    return [(k, v) for k in range(rounds) for v in round_order(variants, k)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(eng: Engine, reqs, name: str) -> dict:
    norm = [(r.finish_s - r.arrival_s) / max(len(r.output_ids), 1) for r in reqs]
    e2e = [r.finish_s - r.arrival_s for r in reqs]
    ttft = [r.first_token_s - r.arrival_s for r in reqs]
    steps = eng.stats.steps
    gen = sum(len(r.output_ids) for r in reqs)
    span = max(r.finish_s for r in reqs) - min(r.arrival_s for r in reqs)
    c = eng.cache
    cap = eng.cfg.capacity
    n = sum(map(len, eng.access_log))
    hits = min_hits(eng.access_log, cap)[0] if cap is not None else n  # all resident: every access hits
    out = {"name": name, "scheduler": eng.cfg.scheduler, "policy": eng.cfg.policy if cap is not None else "resident",
           "capacity": cap if cap is not None else eng.moe.num_experts, "prefetch": bool(c.can_prefetch and c.enabled),
           "prefetch_reason": eng.prefetch_reason, "packed": eng.packed, "pack_reason": eng.pack_reason,
           "merged": eng.merged, "merge_reason": eng.merge_reason, "copy_reason": eng.cache.store.copy_reason,
           "prefetch_decisions": eng.switch.decisions if eng.switch is not None else [], "cost_model": eng.cost.as_dict(),
           "requests": len(reqs), "generated_tokens": gen, "steps": len(steps)}
    for key, xs in (("norm_latency_s", norm), ("latency_s", e2e), ("ttft_s", ttft)):
        out[f"mean_{key}"] = statistics.fmean(xs)
        for q in (50, 95, 99):
            out[f"p{q}_{key}"] = pct(xs, q / 100)
        out[f"max_{key}"] = max(xs)
    L = len(eng.runner.layers)
    out.update({
        "tokens_per_s": gen / span if span > 0 else None,
        "unique_experts_per_batch": statistics.fmean(len(s.experts) for s in steps),
        "tokens_per_batch": statistics.fmean(s.tokens for s in steps),
        "queue_nonempty_share": statistics.fmean(s.left > 0 for s in steps),
        "hit_ratio": c.hit_ratio if cap is not None else 1.0,
        "optimal_hit_ratio": hits / n if n else None,
        "bytes_loaded": c.store.bytes_loaded,
        "load_s": c.load_s, "load_wait_s": c.blocked_s,
        # waits include the sleep's overshoot (~0.1 ms), which outweighs a tiny model's transfers
        "hidden_load_share": max(0.0, 1 - c.blocked_s / c.load_s) if c.load_s > 0 else 0.0,
        "buffered_loads": c.buffered,
        "router_share": eng.stats.router_s / eng.stats.busy_s if eng.stats.busy_s else None,
        "forecast_accuracy": eng.stats.forecast_accuracy,  # generated tokens whose expert Belady's future predicted
        "resident_bytes": eng.resident_bytes(),
        "norm_latencies": norm,
        "accesses_per_layer": n, "layers": L,
    })
    return out


def decode_step_ms(model, checkpoint, prompt: list[int], tokens: int = 24) -> tuple[float, float]:
    """Median time of one decode step of a lone request on the engine (all experts resident, warm steps only), and
    of the same step's weight matmuls alone (`matmul_ms`), in ms."""
    with Engine(model, EngineConfig(scheduler="decode-first", max_running=1), checkpoint=checkpoint) as eng:
        eng.submit(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
        while eng.has_work():
            eng.step()
        step = 1000 * statistics.median([s.seconds for s in eng.stats.steps if s.tokens == 1][2:])
        return step, matmul_ms(eng.runner.decode_weights(), eng.runner.dtype)


@torch.no_grad()
def matmul_ms(weights: list, dtype: torch.dtype, reps: int = 30) -> float:
    """Median time (ms) of one row through every matmul of `weights` in turn (plain tensors, or the step runner's
    callable projections): a decode step with nothing but its matmuls."""
    xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in weights]
    times = []
    for i in range(reps + 5):  # 5 warm-up passes
        t = time.perf_counter()
        for w, x in zip(weights, xs):
            linear(x, w)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def batch1_decode(moe, checkpoint, dense, prompt: list[int], rounds: int = 5) -> dict:
    """The batch-1 decode step, MoE and dense interleaved over `rounds` (`interleaved`): medians and the spread of the
    ratio, and the ratio of their matmuls alone (`bound`: what the step would gain with no other cost)."""
    moe_ms, dense_ms = [], []
    pair = [(moe, checkpoint, moe_ms)] + ([(dense, None, dense_ms)] if dense is not None else [])
    for _, (model, ckpt, times) in interleaved(pair, rounds):
        times.append(decode_step_ms(model, ckpt, prompt))
    out = {"moe_ms": statistics.median(m for m, _ in moe_ms), "moe_matmul_ms": statistics.median(m for _, m in moe_ms),
           "rounds": rounds}
    if dense_ms:
        ratios = [d / m for (m, _), (d, _) in zip(moe_ms, dense_ms)]
        bound = [d / m for (_, m), (_, d) in zip(moe_ms, dense_ms)]
        out.update(dense_ms=statistics.median(d for d, _ in dense_ms), dense_matmul_ms=statistics.median(d for _, d in dense_ms),
                   speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios),
                   bound=statistics.median(bound), bound_min=min(bound), bound_max=max(bound))
    return out


def plan(cfg: BenchConfig, num_experts: int) -> list[EngineConfig]:
    caps = cfg.capacities or list(range(1, num_experts))
    base = dict(token_budget=cfg.token_budget, max_running=cfg.max_running, max_wait=cfg.max_wait, store=cfg.store,
                link_gbps=cfg.link_gbps)
    runs = [EngineConfig(scheduler=s, capacity=None, **base) for s in cfg.schedulers]
    runs += [EngineConfig(scheduler=s, policy=p, capacity=c, prefetch=True, **base)
             for s in cfg.schedulers for p in cfg.policies for c in caps]
    ea = "expert-aware" if "expert-aware" in cfg.schedulers else cfg.schedulers[0]
    pol = "belady" if "belady" in cfg.policies else cfg.policies[0]
    runs += [EngineConfig(scheduler=ea, policy=pol, capacity=c, prefetch=False, **base) for c in caps]
    if ea == "expert-aware":
        runs += [EngineConfig(scheduler=ea, policy=p, capacity=c, prefetch=True, **base)
                 for p in ("lru", "belady") for c in cfg.belady_capacities if c not in caps and c < num_experts]
    return runs


def run_name(c: EngineConfig) -> str:
    if c.capacity is None:
        return f"{c.scheduler}.resident"
    return f"{c.scheduler}.{c.policy}.cap{c.capacity}.{'prefetch' if c.prefetch else 'ondemand'}"


def bench(moe, checkpoint: Path, tok, corpus, dense_engine_model, cfg: BenchConfig, out: Path, progress: bool = True) -> dict:
    E = moe.num_experts
    cfg.check(E)
    out.mkdir(parents=True, exist_ok=True)
    (out / "access").mkdir(exist_ok=True)
    wl = trace(tok, Path(cfg.trace)) if cfg.trace else synthetic(tok, corpus, cfg.workload)
    t0 = time.time()
    plans = plan(cfg, E)
    dense_ec = EngineConfig(scheduler="decode-first", token_budget=cfg.token_budget, max_running=cfg.max_running,
                            max_wait=cfg.max_wait)
    # The resident runs differ by little (on a CPU the schedulers take nearly the same tokens), less than one run's
    # noise: they repeat in interleaved rounds, so drift hits every variant alike, and the report keeps medians.
    # So do the default scheduler's Belady and LRU runs with prefetch: the goals compare their hit ratios, and
    # one run's access sequence follows its measured step times, so a single pair is one draw.
    repeated = [ec for ec in plans if ec.capacity is None or (ec.scheduler == "expert-aware" and ec.prefetch
                                                              and ec.policy in ("belady", "lru"))]
    resident = [("moe", ec) for ec in repeated]
    resident += [("dense", dense_ec)] if dense_engine_model is not None else []
    jobs = [(k, label, ec) for k, (label, ec) in interleaved(resident, cfg.rounds)]
    jobs += [(0, "moe", ec) for ec in plans if ec not in repeated]
    # One unrecorded run of each model first: oneDNN compiles its bf16 kernels on first use, once per process, and
    # that cost would otherwise land on whichever variant happens to run first.
    warm = [(moe, EngineConfig(token_budget=cfg.token_budget, max_running=cfg.max_running), checkpoint)]
    warm += [(dense_engine_model, dense_ec, None)] if dense_engine_model is not None else []
    # every run gets its own request lists and params
    fresh = lambda: [(a, list(ids), SamplingParams(**asdict(p))) for a, ids, p in wl]  # noqa: E731
    for model, ec, ck in warm:
        with Engine(model, ec, checkpoint=ck, eos_token_id=None) as eng:
            eng.run(fresh())
    rows: dict[str, list[dict]] = {}
    for k, label, ec in tqdm(jobs, desc="bench serve", disable=not progress):
        model = moe if label == "moe" else dense_engine_model
        eng = Engine(model, ec, checkpoint=checkpoint if label == "moe" else None, eos_token_id=None)
        reqs = eng.run(fresh())
        name = run_name(ec) if label == "moe" else "dense.decode-first.resident"
        row = summarize(eng, reqs, name)
        if label == "moe":
            row["access_file"] = f"access/{name}.r{k}.jsonl" if ec in repeated else f"access/{name}.jsonl"
            eng.write_access_log(out / row["access_file"])
        eng.close()
        rows.setdefault(name, []).append(row)
    runs = [median_row(rs) for name, rs in rows.items() if not name.startswith("dense.")]
    dense_row = median_row(rows["dense.decode-first.resident"]) if dense_engine_model is not None else None
    b1 = batch1_decode(moe, checkpoint, dense_engine_model, wl[0][1][:32])
    data = {"runs": runs, "dense": dense_row, "batch1_decode": b1, "goals": goals(runs, dense_row, b1, E),
            "settings": {"workload": asdict(cfg.workload) if not cfg.trace else {"trace": cfg.trace},
                         "requests": len(wl), "token_budget": cfg.token_budget, "max_running": cfg.max_running,
                         "max_wait": cfg.max_wait, "store": cfg.store, "link_gbps": cfg.link_gbps, "experts": E,
                         "threads": torch.get_num_threads(), "rounds": cfg.rounds},
            "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "report.json", data)
    write_markdown(data, out / "report.md")
    plots(data, out)
    return data


MEDIAN_KEYS = ("mean_norm_latency_s", "p95_norm_latency_s", "p99_norm_latency_s", "mean_latency_s", "mean_ttft_s",
               "tokens_per_s", "unique_experts_per_batch")  # mean_latency_s: the prefetch goals compare it
ROUND_KEYS = MEDIAN_KEYS + ("hit_ratio", "optimal_hit_ratio")  # kept per round; the hit ratios stay the median
# run's own, so the row's MIN is still the one its access file gives


def median_row(rows: list[dict]) -> dict:
    """One variant's runs as one row: the run with the median mean latency, each headline number replaced by its
    median over the runs, and every run's values kept under `rounds`, in round order."""
    if len(rows) == 1:
        return rows[0]
    mid = sorted(rows, key=lambda r: r["mean_norm_latency_s"])[(len(rows) - 1) // 2]
    out = dict(mid)
    out["rounds"] = {k: [r[k] for r in rows] for k in ROUND_KEYS if all(r.get(k) is not None for r in rows)}
    for k in MEDIAN_KEYS:
        out[k] = statistics.median(out["rounds"][k])
    return out


def _pick(runs, **kw):
    return [r for r in runs if all(r.get(k) == v for k, v in kw.items())]


def goals(runs: list[dict], dense: dict | None, b1: dict, E: int) -> dict:
    """The issue's goals, computed from the runs (None where the matrix lacks the runs to tell)."""
    g: dict = {}
    res = {r["scheduler"]: r for r in _pick(runs, policy="resident")}
    if "expert-aware" in res and len(res) > 1:
        ea = res["expert-aware"]
        base = min((r for s, r in res.items() if s != "expert-aware"), key=lambda r: r["unique_experts_per_batch"])
        best_lat = min((r for s, r in res.items() if s != "expert-aware"), key=lambda r: r["mean_norm_latency_s"])
        best_p95 = min((r for s, r in res.items() if s != "expert-aware"), key=lambda r: r["p95_norm_latency_s"])
        g["unique_experts_ratio"] = ea["unique_experts_per_batch"] / base["unique_experts_per_batch"]
        g["mean_norm_latency_change"] = ea["mean_norm_latency_s"] / best_lat["mean_norm_latency_s"] - 1
        g["p95_norm_latency_change"] = ea["p95_norm_latency_s"] / best_p95["p95_norm_latency_s"] - 1
        g["expert_aware_max_latency_s"] = ea["max_latency_s"]
    ea_runs = _pick(runs, scheduler="expert-aware", prefetch=True)
    caps = sorted({r["capacity"] for r in ea_runs if r["capacity"] < E})
    by = {(r["policy"], r["capacity"]): r for r in ea_runs}
    if caps and all(("belady", c) in by and ("lru", c) in by for c in caps):
        def rounds(r, key):  # a repeated run's value in each round, in round order; a single run's one value
            return r.get("rounds", {}).get(key) or [r[key]]

        def median_over_rounds(f) -> dict:
            return {c: 100 * statistics.median(f(by["belady", c], by["lru", c])) for c in caps}

        def below_min(r) -> list[float]:  # how far a run's hit ratio is below the MIN of its own trace, per round
            return [o - h for o, h in zip(rounds(r, "optimal_hit_ratio"), rounds(r, "hit_ratio"))]

        # Paired by round (the runs of one round ran back to back), then the median over the rounds
        g["belady_minus_lru_points"] = median_over_rounds(
            lambda b, l: [x - y for x, y in zip(rounds(b, "hit_ratio"), rounds(l, "hit_ratio"))])
        g["belady_minus_lru_mean_points"] = sum(g["belady_minus_lru_points"].values()) / len(caps)
        g["belady_below_min_points"] = median_over_rounds(lambda b, l: below_min(b))
        # What LRU leaves on its own trace: no policy could beat LRU by more on that trace, so Belady - LRU exceeds
        # it only where Belady's run makes a more cacheable trace (the schedules differ between the two runs)
        g["lru_below_min_points"] = median_over_rounds(lambda b, l: below_min(l))
        g["belady_rounds"] = len(rounds(by["belady", caps[0]], "hit_ratio"))
    ond = {r["capacity"]: r for r in _pick(runs, scheduler="expert-aware", prefetch=False)}
    if "expert-aware" in res and ond:
        closed = {}
        for c, r in ond.items():
            p = by.get((r["policy"], c))
            gap = r["mean_latency_s"] - res["expert-aware"]["mean_latency_s"]
            if p is not None and gap > 0:
                closed[c] = (r["mean_latency_s"] - p["mean_latency_s"]) / gap
        g["prefetch_gap_closed"] = closed
    if dense is not None and "expert-aware" in res:
        g["tokens_per_s_vs_dense"] = res["expert-aware"]["tokens_per_s"] / dense["tokens_per_s"]
        cap2 = [r for r in ea_runs if r["capacity"] == 2]
        if cap2:
            g["resident_bytes_cap2_vs_dense"] = cap2[0]["resident_bytes"] / dense["resident_bytes"]
    if "speedup" in b1:
        g["batch1_decode_speedup"] = b1["speedup"]
        g["batch1_decode_spread"] = [b1["speedup_min"], b1["speedup_max"]]
        g["batch1_matmuls_only_speedup"] = b1["bound"]
    return g


def verdicts(g: dict, link_gbps: float | None) -> list[tuple[str, bool, str]]:
    """Issue 10's goals that one run can judge: (goal, met, what was measured). A goal the run lacks data for is
    left out rather than guessed."""
    out = []
    if "mean_norm_latency_change" in g:
        m, p = g["mean_norm_latency_change"], g["p95_norm_latency_change"]
        out.append(("default scheduler within 3 % of the best baseline (mean and p95 normalized latency, resident)",
                     m <= 0.03 and p <= 0.03, f"mean {100 * m:+.1f} %, p95 {100 * p:+.1f} %"))
    if "tokens_per_s_vs_dense" in g:
        t = g["tokens_per_s_vs_dense"]
        out.append(("MoE tokens/s >= 1.1x the dense parent's (resident)", t >= 1.1, f"{t:.2f}x"))
    closed = g.get("prefetch_gap_closed") or {}
    if link_gbps:
        if closed:
            worst = min(closed.values())
            out.append(("prefetch (auto's choice behind a link) closes >= 50 % of the on-demand -> resident gap",
                        worst >= 0.5, f"{100 * worst:.0f} % at worst"))
    else:
        out.append(("prefetch auto never slower than on-demand", True,
                    "auto loads on demand on CPU cores without a link"
                    + (f" (prefetch would change latency by {', '.join(f'{-100 * v:+.0f} %' for v in closed.values())} "
                       f"of the gap)" if closed else "")))
    if "belady_minus_lru_mean_points" in g:
        d = g["belady_minus_lru_mean_points"]
        n = g.get("belady_rounds", 1)
        of = f", median of {n} rounds" if n > 1 else ""
        per = g["belady_minus_lru_points"]
        each = f" (capacities {'/'.join(map(str, per))}: {'/'.join(f'{v:+.1f}' for v in per.values())})" if len(per) > 1 else ""
        room = g["lru_below_min_points"]
        bound = f"; LRU {sum(room.values()) / len(room):.1f} points below the MIN of its own trace"
        out.append(("Belady - LRU >= +5 points (mean over the capacities measured)", d >= 5,
                    f"{d:+.1f} points{each}{of}{bound}"))
        below = max(g["belady_below_min_points"].values())
        out.append(("Belady within 2 points of MIN", below <= 2, f"{below:.1f} points below at worst{of}"))
    if "batch1_decode_speedup" in g:
        s = g["batch1_decode_speedup"]
        out.append(("batch-1 decode step >= 1.3x faster than dense (median of interleaved rounds)", s >= 1.3,
                    f"{s:.2f}x, rounds {g['batch1_decode_spread'][0]:.2f}-{g['batch1_decode_spread'][1]:.2f}x"
                    + (f"; the step's matmuls alone: {g['batch1_matmuls_only_speedup']:.2f}x"
                       if "batch1_matmuls_only_speedup" in g else "")))
    return out


def summary_rows(data: dict):
    runs = data["runs"] + ([data["dense"]] if data["dense"] else [])
    h = ["run", "norm lat mean ms", "p95 ms", "p99 ms", "TTFT mean s", "tok/s", "experts/batch", "hit %", "MIN %",
         "MB loaded", "prefetch hid %", "router %", "forecast %"]
    rows = [[r["name"], 1000 * r["mean_norm_latency_s"], 1000 * r["p95_norm_latency_s"], 1000 * r["p99_norm_latency_s"],
             r["mean_ttft_s"], r["tokens_per_s"], r["unique_experts_per_batch"], 100 * r["hit_ratio"],
             100 * r["optimal_hit_ratio"] if r["optimal_hit_ratio"] is not None else None, r["bytes_loaded"] / 2 ** 20,
             100 * r["hidden_load_share"], 100 * r["router_share"],
             100 * r["forecast_accuracy"] if r.get("forecast_accuracy") is not None else None] for r in runs]
    return h, rows


def goals_markdown(judged: list[tuple[str, bool, str]]) -> str:
    """The report's goal section: one line per goal, met or missed, with what was measured."""
    return "\n## Goals\n\n" + "".join(f"- {'met' if ok else 'missed'}: {goal} ({m})\n" for goal, ok, m in judged)


def write_markdown(data: dict, path: Path) -> None:
    from ..atomic import atomic_write_text

    h, rows = summary_rows(data)
    s = data["settings"]
    g = data["goals"]
    md = (f"# Serving benchmark\n\n{s['requests']} requests, token budget {s['token_budget']}, at most "
          f"{s['max_running']} running, aging bound {s['max_wait']} steps, expert store `{s['store']}`"
          + (f" behind an emulated {s['link_gbps']} GB/s link" if s.get('link_gbps') else "") + f", "
          f"{s['threads']} threads. Latency is on the engine's clock (measured compute, idle gaps skipped)."
          + (f" Resident rows (and the dense parent), and expert-aware's Belady and LRU rows with prefetch: medians "
             f"of {s['rounds']} interleaved rounds (the Belady goals pair the rounds)."
             if s.get("rounds", 1) > 1 else "") + "\n\n"
          + report.markdown_table(h, rows)
          + goals_markdown(verdicts(g, s.get("link_gbps")))
          + "\n```json\n" + json.dumps(g, indent=1) + "\n```\n"
          + "\nBatch-1 decode step: " + ", ".join(f"{k} {v:.2f}" for k, v in data["batch1_decode"].items()) + "\n"
          + "\n![latency CDF](latency_cdf.png)\n![hit ratio](hit_ratio.png)\n![experts per batch](experts_per_batch.png)\n")
    atomic_write_text(path, md)


def plots(data: dict, out: Path) -> None:
    plt = report.pyplot()
    runs = data["runs"]
    res = _pick(runs, policy="resident")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in res:
        xs = sorted(r["norm_latencies"]) if "norm_latencies" in r else []
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r["scheduler"])
    ax.set_xlabel("normalized latency (s / token)")
    ax.set_ylabel("share of requests")
    ax.legend(fontsize=8)
    report.save_figure(fig, out / "latency_cdf.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ea = [r for r in runs if r["scheduler"] == "expert-aware" and r["prefetch"] and r["policy"] != "resident"]
    for p in sorted({r["policy"] for r in ea}):
        pts = sorted((r["capacity"], 100 * r["hit_ratio"]) for r in ea if r["policy"] == p)
        ax.plot([c for c, _ in pts], [h for _, h in pts], marker="o", label=p)
    mins = sorted({(r["capacity"], 100 * r["optimal_hit_ratio"]) for r in ea if r["policy"] == "belady"})
    if mins:
        ax.plot([c for c, _ in mins], [h for _, h in mins], "k--", label="offline MIN")
    ax.set_xlabel("resident experts per layer")
    ax.set_ylabel("hit ratio %")
    ax.legend(fontsize=8)
    report.save_figure(fig, out / "hit_ratio.png")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar([r["scheduler"] for r in res], [r["unique_experts_per_batch"] for r in res])
    ax.set_ylabel("unique experts per batch")
    report.save_figure(fig, out / "experts_per_batch.png")
