"""Scale-out on Ray Serve: expert-affinity routing against Ray's power-of-two-choices and round-robin.

Each variant is `readmoe serve` as a child process on 127.0.0.1 (stopped by its process id): 2 engine replicas on
Ray Serve, 1 CPU and 1 torch thread each, capacity 2 per replica (the store on disk), and, for the throughput
ratio, one plain server with 1 torch thread pinned to 1 CPU (a replica's share); the same server unpinned,
its HTTP side free to use the second CPU, is reported beside it. The workload is mixed-domain prompts from the
embedded corpora (greedy, EOS ignored), sent by the official `openai` client:
- burst: `--burst` requests (default 2 x `--requests`) at once; tokens/s over the makespan is the saturated
  throughput, and each round's 2-replica throughput over that round's one-replica run is the scaling. The burst
  is at least 3x the slots (16 running requests per replica) of every variant: a burst of 1.5x the slots, as 48
  requests are for 2 replicas, spends a tenth of its makespan draining (one engine alone: 31.0 tok/s on 24
  requests, 34.6 on 48, 34.3 on 96), which would measure the tail, not the throughput;
- poisson: the same requests at each of `--loads` (default 0.5 and 0.8) times a base rate: the request rate
  Ray's default routing (pow2) sustained in the first round's burst, or `--rate`. Normalized latency (end-to-end /
  output tokens), and, from /metrics, the replicas' expert-cache hit ratio and unique experts per engine step.
  Goals are checked at every load: a light and a heavy one, not one operating point.
Variants are interleaved over `--repeats` rounds; the report gives medians and their spread. The recorded
per-request expert sequences then drive `readmoe.cluster.simulate` at 1-8 replicas, for the 5 experts of the
demo and remapped to 8.

    python benchmarks/scaleout.py --model runs/demo/model --out runs/scaleout [--requests 48] [--burst 96]
        [--repeats 3] [--simulate-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

from serve_process import Server

ROUTES = ("affinity", "pow2", "round-robin")
SINGLE = ("single", "single-unpinned")  # one plain server: on 1 CPU (the baseline), and free to use both


def workload(model: Path, n: int, seed: int = 0):
    """Token-id prompts from the five embedded domains (shuffled), each with its pre-gated expert sequence."""
    import torch

    from readmoe.corpus import Corpus
    from readmoe.modeling import load_router
    from readmoe.serving.workload import WorkloadConfig, synthetic

    router, tok = load_router(model)
    reqs = synthetic(tok, Corpus("embedded"), WorkloadConfig(requests=n, rate=1.0, mmlu_share=0.0, seed=seed,
                                                            prompt_tokens=(32, 160), output_tokens=(16, 48)))
    out = []
    with torch.no_grad():
        for _, ids, p in reqs:
            logits, _ = router(torch.tensor([ids]), None, None)
            out.append({"prompt": ids, "max_tokens": p.max_tokens, "prompt_experts": logits[0].argmax(-1).tolist()})
    return out


def counters(srv: Server, replicas: bool) -> dict:
    """Cumulative hits, misses, engine steps and experts touched (summed over replicas)."""
    import httpx

    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    names = ({"hits": "readmoe:replica_expert_cache_hits_total", "misses": "readmoe:replica_expert_cache_misses_total",
              "steps": "readmoe:replica_steps_total", "touched": "readmoe:replica_experts_touched_total"} if replicas else
             {"hits": "readmoe:expert_cache_hits_total", "misses": "readmoe:expert_cache_misses_total",
              "steps": "readmoe:unique_experts_per_step_count", "touched": "readmoe:unique_experts_per_step_sum"})
    out = {k: 0.0 for k in names}
    for line in text.splitlines():
        for k, name in names.items():
            if line.startswith(name + "{") or line.startswith(name + " "):
                out[k] += float(line.split()[-1])
    out["decisions"] = {l.split('outcome="')[1].split('"')[0]: float(l.split()[-1]) for l in text.splitlines()
                        if l.startswith("readmoe:router_decisions_total")}
    return out


async def send(srv: Server, reqs: list[dict], arrivals: list[float]) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.monotonic()

    async def one(r, at):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        start = time.monotonic()
        resp = await client.completions.create(model=srv.name, prompt=r["prompt"], max_tokens=r["max_tokens"],
                                               temperature=0, extra_body={"ignore_eos": True, "return_experts": True})
        ch = resp.choices[0].model_dump()
        return {"start": start - t0, "end": time.monotonic() - t0, "tokens": resp.usage.completion_tokens,
                "experts": ch.get("experts") or [], "replica": ch.get("replica")}

    try:
        return await asyncio.gather(*(one(r, a) for r, a in zip(reqs, arrivals)))
    finally:
        await client.close()


def phase(srv: Server, reqs, arrivals, replicas: bool) -> dict:
    before = counters(srv, replicas)
    t = time.monotonic()
    res = asyncio.run(send(srv, reqs, arrivals))
    makespan = time.monotonic() - t
    after = counters(srv, replicas)
    d = {k: after[k] - before[k] for k in ("hits", "misses", "steps", "touched")}
    norm = sorted((x["end"] - x["start"]) / max(1, x["tokens"]) * 1000 for x in res)
    dec = {k: after["decisions"].get(k, 0) - before["decisions"].get(k, 0) for k in after["decisions"]}
    # how specialised the replicas became: the share of each replica's generated tokens on its top 2 experts
    per: dict = {}
    for x in res:
        for e in x["experts"]:
            per.setdefault(x["replica"], {}).setdefault(e, 0)
            per[x["replica"]][e] += 1
    top2 = [sum(sorted(h.values())[-2:]) / sum(h.values()) for h in per.values() if h]
    return {"tokens_per_s": sum(x["tokens"] for x in res) / makespan, "makespan_s": makespan,
            "mean_norm_ms": statistics.fmean(norm), "p95_norm_ms": norm[min(len(norm) - 1, int(0.95 * len(norm)))],
            "hit_ratio": d["hits"] / max(1, d["hits"] + d["misses"]),
            "experts_per_step": d["touched"] / max(1, d["steps"]), "decisions": dec,
            "top2_share": statistics.fmean(top2) if top2 else 0.0,
            "per_replica": {str(k): sum(1 for x in res if x["replica"] == k) for k in {x["replica"] for x in res}},
            "results": res}


def run_variant(model: Path, name: str, reqs, burst_reqs, base: float | None, loads: list[float], out: Path,
                seed: int) -> dict:
    """One server session: a burst, then (2 replicas) a Poisson run at each load x the base rate (default: this
    burst's request rate)."""
    common = ["--capacity", "2", "--threads", "1", "--max-queued", str(len(burst_reqs))]  # the burst is never refused
    single = name in SINGLE
    args = common + (["--replicas", "2", "--route", name, "--num-cpus", "1"] if not single else [])
    srv = Server(model, args, out / f"{name}.log", cpus={0} if name == "single" else None)
    srv.name = str(model.resolve())
    try:
        warm = asyncio.run(send(srv, reqs[:2], [0.0, 0.0]))  # first calls pay imports and page faults
        del warm
        burst = phase(srv, burst_reqs, [0.0] * len(burst_reqs), not single)
        base = base or len(burst_reqs) / burst["makespan_s"]
        poisson = {}
        for i, load in enumerate(loads if not single else []):
            rng = random.Random(seed * 100 + i)
            t, arrivals = 0.0, []
            for _ in reqs:
                t += rng.expovariate(load * base)
                arrivals.append(t)
            poisson[str(load)] = phase(srv, reqs, arrivals, True)
    finally:
        srv.stop()
    return {"burst": burst, "poisson": poisson, "base_rate": base}


def median_spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def simulation(reqs: list[dict], outputs: list[list[int]]) -> dict:
    from readmoe.cluster.simulate import SimRequest, remap, simulate

    sim = [SimRequest(r["prompt_experts"], o) for r, o in zip(reqs, outputs)]
    num = 1 + max(e for s in sim for e in s.prompt + s.output)
    table = {}
    for label, rs, E in (("5 experts (recorded)", sim, num), ("8 experts (remapped)", remap(sim * 4, 8), 8)):
        rows = []
        for n in (1, 2, 4, 8):
            for route in ROUTES:
                rows.append(simulate(rs * (4 if label.startswith("5") else 1), n, route, E, capacity=2))
        table[label] = rows
    return table


def offline_outputs(model: Path, reqs: list[dict]) -> list[list[int]]:
    """The pre-gated expert of every generated token, from one local engine (greedy, EOS ignored): the same sequences
    the servers return with `return_experts`, without starting them."""
    from readmoe import dtype
    from readmoe.serving.engine import Engine
    from readmoe.serving.request import SamplingParams

    with Engine.from_pretrained(model, dtype=dtype.resolve("auto")) as eng:  # the servers' default dtype
        done = eng.run([(0.0, r["prompt"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True)) for r in reqs])
    return [r.output_experts for r in done]


def simulation_markdown(sim: dict) -> list[str]:
    lines = ["## Simulated hit ratio (capacity 2 per replica, load 0.7)", "",
             "| experts | replicas | " + " | ".join(ROUTES) + " |", "|---|---|" + "---|" * len(ROUTES)]
    for label, rows in sim.items():
        for n in sorted({r["replicas"] for r in rows}):
            hr = {r["route"]: r["hit_ratio"] for r in rows if r["replicas"] == n}
            lines.append(f"| {label} | {n} | " + " | ".join(f"{100 * hr[k]:.1f} %" for k in ROUTES) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/model"))
    ap.add_argument("--out", type=Path, default=Path("runs/scaleout"))
    ap.add_argument("--requests", type=int, default=48, help="requests per Poisson run")
    ap.add_argument("--burst", type=int, default=None, help="requests in the burst (default: 2 x --requests)")
    ap.add_argument("--rate", type=float, default=None,
                    help="base request rate, requests/s, that --loads scale (default: pow2's first burst)")
    ap.add_argument("--loads", default="0.5,0.8", help="Poisson rates as fractions of the base rate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--simulate-only", action="store_true",
                    help="only the simulated replicas, on expert sequences from a local engine (under a minute, no servers)")
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        raise SystemExit(f"no model at {a.model}: run `make demo` first, or pass --model DIR")
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        loads = [float(x) for x in a.loads.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--loads must be comma-separated numbers, got '{a.loads}'") from None
    if not loads or any(x <= 0 for x in loads):
        raise SystemExit("--loads needs at least one fraction > 0")
    burst = a.burst or 2 * a.requests
    if a.requests < 1 or burst < 1:
        raise SystemExit("--requests and --burst must be >= 1")
    pool = workload(a.model, max(a.requests, burst), a.seed)
    reqs, burst_reqs = pool[:a.requests], pool[:burst]
    if a.simulate_only:
        from readmoe.atomic import atomic_write_text

        outputs = offline_outputs(a.model, burst_reqs)
        sim = simulation(burst_reqs, outputs)
        atomic_write_text(a.out / "simulation.json", json.dumps({"burst": burst, "simulation": sim}, indent=1))
        text = "\n".join(simulation_markdown(sim)) + "\n"
        atomic_write_text(a.out / "simulation.md", text)
        print(text)
        return
    runs: dict[str, list[dict]] = {v: [] for v in ROUTES + SINGLE}
    rate = a.rate
    variants = ("pow2",) + tuple(v for v in ROUTES + SINGLE if v != "pow2")  # pow2 first: the base rate is its burst
    for rep in range(a.repeats):
        order = list(variants[rep % len(variants):] + variants[:rep % len(variants)])  # rotated, so drift spreads
        for v in order:
            print(f"round {rep + 1}/{a.repeats}: {v} ...", flush=True)
            r = run_variant(a.model, v, reqs, burst_reqs, rate, loads, a.out, a.seed + rep)
            rate = rate or r["base_rate"]
            runs[v].append(r)
    keys = ("mean_norm_ms", "p95_norm_ms", "hit_ratio", "experts_per_step", "top2_share", "tokens_per_s")
    summary = {}
    for v, rs in runs.items():
        s = {"tokens_per_s": median_spread([r["burst"]["tokens_per_s"] for r in rs])}
        if v not in SINGLE:
            s["poisson"] = {str(x): {k: median_spread([r["poisson"][str(x)][k] for r in rs]) for k in keys}
                            for x in loads}
            s["decisions"] = rs[-1]["poisson"][str(loads[-1])]["decisions"]
            s["per_replica"] = rs[-1]["poisson"][str(loads[-1])]["per_replica"]
        summary[v] = s
    for v in ROUTES:  # the machine drifts between rounds: each round's ratio against its own one-replica run
        for base, key in (("single", "scaling"), ("single-unpinned", "scaling_unpinned")):
            summary[v][key] = median_spread([r["burst"]["tokens_per_s"] / one["burst"]["tokens_per_s"]
                                             for r, one in zip(runs[v], runs[base])])
    outputs = [x["experts"] for x in runs["affinity"][0]["burst"]["results"]]
    sim = simulation(burst_reqs, outputs)
    goals = []
    for x in loads:
        aff, p2 = ({k: m["median"] for k, m in summary[v]["poisson"][str(x)].items()} for v in ("affinity", "pow2"))
        at = f"load {x} ({x * rate:.2f} req/s)"
        goals += [
            (f"{at}: affinity hit ratio >= pow2's + 10 points", aff["hit_ratio"] - p2["hit_ratio"] >= 0.10,
             f"{100 * aff['hit_ratio']:.1f} % vs {100 * p2['hit_ratio']:.1f} %"),
            (f"{at}: affinity mean normalized latency <= pow2's", aff["mean_norm_ms"] <= p2["mean_norm_ms"],
             f"{aff['mean_norm_ms']:.1f} vs {p2['mean_norm_ms']:.1f} ms/token"),
            (f"{at}: affinity p95 <= 1.05x pow2's", aff["p95_norm_ms"] <= 1.05 * p2["p95_norm_ms"],
             f"{aff['p95_norm_ms']:.1f} vs {p2['p95_norm_ms']:.1f} ms/token"),
        ]
    sc = summary["affinity"]["scaling"]
    goals.append(("2 replicas (affinity, the default) >= 1.6x one replica's tokens/s (1 CPU each)", sc["median"] >= 1.6,
                  f"{sc['median']:.2f}x, median of the rounds' ratios; {sc['min']:.2f}-{sc['max']:.2f}x"))
    report = {"requests": a.requests, "burst": burst, "repeats": a.repeats, "base_rate": rate, "loads": loads,
              "summary": summary, "simulation": sim,
              "goals": [{"goal": g, "met": bool(ok), "measured": m} for g, ok, m in goals],
              "workload": [{k: r[k] for k in ("max_tokens", "prompt_experts")} | {"output_experts": o}
                           for r, o in zip(burst_reqs, outputs)],
              "runs": runs}
    from readmoe.atomic import atomic_write_text

    atomic_write_text(a.out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(a.out / "report.md", markdown(report))
    print(markdown(report))
    for g in report["goals"]:
        print(f"{'met' if g['met'] else 'missed'}: {g['goal']} ({g['measured']})")


def markdown(rep: dict) -> str:
    def f(x, scale=1.0, nd=1):
        return f"{scale * x['median']:.{nd}f} ({scale * x['min']:.{nd}f}-{scale * x['max']:.{nd}f})"

    lines = [f"# Scale-out: {rep['requests']} mixed-domain requests per Poisson run, a burst of {rep['burst']}, "
             f"{rep['repeats']} interleaved rounds, "
             f"Poisson loads {', '.join(str(x) for x in rep['loads'])} x {rep['base_rate']:.2f} req/s "
             "(pow2's saturated rate); medians (min-max)", "",
             "| route | load | hit ratio % | experts/step | top-2 expert share % | mean norm. ms/token | p95 norm. ms/token |",
             "|---|---|---|---|---|---|---|"]
    for x in rep["loads"]:
        for v in ROUTES:
            q = rep["summary"][v]["poisson"][str(x)]
            lines.append(f"| {v} | {x} ({x * rep['base_rate']:.2f}/s) | {f(q['hit_ratio'], 100)} | "
                         f"{f(q['experts_per_step'], nd=2)} | {f(q['top2_share'], 100)} | {f(q['mean_norm_ms'])} | "
                         f"{f(q['p95_norm_ms'])} |")
    lines += ["", "| route | saturated tok/s | × one replica |", "|---|---|---|"]
    for v, s in rep["summary"].items():
        if v == "single":
            lines.append(f"| one replica (1 thread, pinned to 1 CPU) | {f(s['tokens_per_s'])} | 1 |")
        elif v == "single-unpinned":
            lines.append(f"| one replica (1 torch thread, its HTTP side free to use the 2nd CPU) | "
                         f"{f(s['tokens_per_s'])} | |")
        else:
            lines.append(f"| {v} | {f(s['tokens_per_s'])} | {f(s['scaling'], nd=2)} |")
    lines += ["", "Against the unpinned one-replica server: " + ", ".join(
        f"{v} {f(rep['summary'][v]['scaling_unpinned'], nd=2)}x" for v in ROUTES)]
    lines += ["", "Router decisions (last round, heaviest load): " + "; ".join(f"{v}: {rep['summary'][v]['decisions']}"
                                                            for v in ROUTES), ""] + simulation_markdown(rep["simulation"])
    lines += ["", "## Goals", ""] + [f"- {'met' if g['met'] else 'missed'}: {g['goal']} ({g['measured']})"
                                     for g in rep["goals"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
