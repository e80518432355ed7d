"""`readmoe serve` under load, measured with guidellm (the vLLM project's load tester) as the client.

For each variant (the MoE with all experts resident, the MoE at capacity 2 with
Belady, the dense parent on the same engine) it starts `readmoe serve` on
127.0.0.1, finds the saturated throughput (guidellm's `throughput` profile: every
request at once), then sweeps Poisson rates below it; it also serves the same
workload in-process (`Engine.run`, no HTTP) and overloads the server at twice the
saturating rate with a small queue to count the 503s. Every server it starts is
stopped by its process id. Writes OUT/report.json, report.md and report.png.

    python benchmarks/load.py --model runs/demo/model --out runs/load [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve_process import BIN, Server


def workload(out: Path, n: int, output_tokens: int, name: str = "prompts.jsonl") -> Path:
    """Mixed-domain prompts from the embedded corpora (the hub is unreachable), round-robin over domains."""
    from readmoe.corpus import Corpus

    c = Corpus("embedded")
    per = [c.texts(d, "validation") for d in c.domains]
    rows = [{"prompt": (t := per[i % len(per)])[(i // len(per)) % len(t)][:400], "output_tokens_count": output_tokens}
            for i in range(n)]
    path = out / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def guidellm(srv: Server, model: Path, data: Path, profile: str, constraint: str, out: Path) -> dict:
    """One guidellm run; returns its benchmark summary."""
    cmd = [str(BIN / "guidellm"), "run",
           "--backend", f"kind=openai_http,target={srv.url},model={model.resolve()},request_format=/v1/completions",
           "--profile", profile, "--constraint", constraint, "--data", f"kind=json_file,path={data}",
           "--output", f"kind=json,path={out}", "--disable-console"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"guidellm failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    b = json.loads(out.read_text())["benchmarks"][0]
    m = b["metrics"]

    def pct(key, p):
        s = m[key]["successful"]
        return s["percentiles"][p] if s.get("count") else None

    tot = m["request_totals"]
    return {"profile": profile, "duration_s": b["duration"],
            "completed": tot["successful"], "errored": tot["errored"], "incomplete": tot["incomplete"],
            "output_tokens_per_s": m["output_token_count"]["successful"]["total_sum"] / b["duration"],
            "requests_per_s": tot["successful"] / b["duration"],
            "ttft_ms_p50": pct("time_to_first_token_ms", "p50"), "ttft_ms_p95": pct("time_to_first_token_ms", "p95"),
            "itl_ms_p50": pct("inter_token_latency_ms", "p50"), "itl_ms_p95": pct("inter_token_latency_ms", "p95")}


def in_process(model: Path, data: Path, args: list[str], output_tokens: int) -> float:
    """The same prompts served by the engine without HTTP, all arriving at once: output tokens/s."""
    from readmoe import backbone
    from readmoe.serving import Engine, EngineConfig, SamplingParams

    backbone.env_threads()
    cfg = EngineConfig(capacity=int(args[args.index("--capacity") + 1]) if "--capacity" in args else None)
    with Engine.from_pretrained(model, cfg) as eng:
        prompts = [eng.tok(json.loads(l)["prompt"])["input_ids"] for l in data.read_text().splitlines()]
        p = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
        t = time.perf_counter()
        reqs = eng.run([(0.0, ids, p) for ids in prompts])
        wall = time.perf_counter() - t
    return sum(len(r.output_ids) for r in reqs) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/model"))
    ap.add_argument("--out", type=Path, default=Path("runs/load"))
    ap.add_argument("--requests", type=int, default=24, help="requests per guidellm run")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--rates", default="0.25,0.5,0.75", help="Poisson rates as fractions of the saturating rate")
    ap.add_argument("--quick", action="store_true", help="one rate, no capacity-2 variant")
    ap.add_argument("--interleaved", type=int, default=0, metavar="N",
                    help="instead of the sweep: N rounds of MoE over HTTP, MoE in-process and dense over HTTP, each "
                         "at saturation, interleaved; medians and spread (the ratios this noisy machine can support)")
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        sys.exit(f"error: no model at {a.model}: run `make demo` first, or pass --model DIR")
    if a.quick:
        a.rates = "0.5"
    a.out.mkdir(parents=True, exist_ok=True)
    data = workload(a.out, a.requests, a.output_tokens)
    if a.interleaved:
        return interleaved(a, data)
    variants = {"moe": [], "moe-capacity-2": ["--capacity", "2", "--policy", "belady"], "dense": ["--dense"]}
    if a.quick:
        del variants["moe-capacity-2"]
    fractions = [float(x) for x in a.rates.split(",")]
    report: dict = {"requests": a.requests, "output_tokens": a.output_tokens, "variants": {}}
    for name, args in variants.items():
        print(f"[{name}] serving", flush=True)
        srv = Server(a.model, args, a.out / f"server-{name}.log")
        try:
            sat = guidellm(srv, a.model, data, f"kind=throughput,max_concurrency={a.requests}",
                           f"kind=max_requests,count={a.requests}", a.out / f"{name}-saturated.json")
            print(f"[{name}] saturated: {sat['output_tokens_per_s']:.1f} output tok/s", flush=True)
            sweep = []
            for f in fractions:
                rate = max(0.01, f * sat["requests_per_s"])
                r = guidellm(srv, a.model, data, f"kind=poisson,rate={rate:.4f}", f"kind=max_requests,count={a.requests}",
                             a.out / f"{name}-rate-{f}.json")
                r["rate"], r["fraction"] = rate, f
                sweep.append(r)
                print(f"[{name}] rate {rate:.3f}/s: ttft p50 {r['ttft_ms_p50']:.0f} ms, itl p50 {r['itl_ms_p50']:.0f} ms",
                      flush=True)
            report["variants"][name] = {"args": args, "saturated": sat, "sweep": sweep, "peak_rss_bytes": srv.peak_rss(),
                                        "unique_experts_per_step": unique_experts(srv)}
        finally:
            srv.stop()
    print("[moe] in-process", flush=True)
    report["in_process_output_tokens_per_s"] = in_process(a.model, data, [], a.output_tokens)
    n = 3 * a.requests
    print(f"[moe] overload: {n} requests at 2x the saturating rate, --max-running 4 --max-queued 4", flush=True)
    srv = Server(a.model, ["--max-running", "4", "--max-queued", "4"], a.out / "server-overload.log")
    try:
        rate = 2 * report["variants"]["moe"]["saturated"]["requests_per_s"]
        many = workload(a.out, n, a.output_tokens, "overload.jsonl")
        r = guidellm(srv, a.model, many, f"kind=constant,rate={rate:.4f}", f"kind=max_requests,count={n}",
                     a.out / "overload.json")
        r.update(rate=rate, sent=n, rejected_503=srv.metric('readmoe:request_rejected_total{model_name='),
                 peak_rss_bytes=srv.peak_rss(), healthy_after=httpx.get(f"{srv.url}/health").status_code == 200)
        report["overload"] = r
    finally:
        srv.stop()
    write(report, a.out)


def saturated(a, data: Path, args: list[str], tag: str) -> float:
    srv = Server(a.model, args, a.out / f"server-{tag}.log")
    try:
        return guidellm(srv, a.model, data, f"kind=throughput,max_concurrency={a.requests}",
                        f"kind=max_requests,count={a.requests}", a.out / f"{tag}.json")["output_tokens_per_s"]
    finally:
        srv.stop()


def interleaved(a, data: Path) -> None:
    import statistics

    from readmoe.atomic import atomic_write_json, atomic_write_text

    runs: dict[str, list[float]] = {"moe_http": [], "moe_in_process": [], "dense_http": []}
    for i in range(a.interleaved):
        runs["moe_http"].append(saturated(a, data, [], f"moe-http-{i}"))
        runs["moe_in_process"].append(in_process(a.model, data, [], a.output_tokens))
        runs["dense_http"].append(saturated(a, data, ["--dense"], f"dense-http-{i}"))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
    ratios = {"http_vs_in_process": [h / p for h, p in zip(runs["moe_http"], runs["moe_in_process"])],
              "moe_vs_dense_http": [m / d for m, d in zip(runs["moe_http"], runs["dense_http"])]}
    summ = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
            for k, v in {**runs, **ratios}.items()}
    atomic_write_json(a.out / "interleaved.json", {"requests": a.requests, "output_tokens": a.output_tokens,
                                                     "rounds": a.interleaved, "output_tokens_per_s": summ})
    md = (f"# Saturated output tokens/s, {a.interleaved} interleaved rounds ({a.requests} requests, "
          f"{a.output_tokens} output tokens)\n\n| | median | min | max |\n|---|---|---|---|\n"
          + "".join(f"| {k} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |\n" for k, v in summ.items()))
    atomic_write_text(a.out / "interleaved.md", md)
    print(md)


def unique_experts(srv: Server) -> float | None:
    s = srv.metric("readmoe:unique_experts_per_step_sum")
    n = srv.metric("readmoe:unique_experts_per_step_count")
    return s / n if n else None


def goals(rep: dict) -> list[tuple[str, bool, str]]:
    v = rep["variants"]
    moe, dense = v["moe"]["saturated"]["output_tokens_per_s"], v["dense"]["saturated"]["output_tokens_per_s"]
    inproc = rep["in_process_output_tokens_per_s"]
    ov = rep["overload"]
    return [
        ("HTTP saturated tok/s >= 90 % of in-process", moe >= 0.9 * inproc, f"{moe:.1f} vs {inproc:.1f} ({moe / inproc:.0%})"),
        ("2x saturating rate: zero failed requests besides counted 503s",
         ov["errored"] == ov["rejected_503"] and ov["healthy_after"],
         f"{ov['completed']} completed, {ov['errored']} errored, {ov['rejected_503']:.0f} rejected with 503"),
        ("MoE saturated tok/s >= dense parent's", moe >= dense, f"{moe:.1f} vs {dense:.1f} ({moe / dense:.2f}x)"),
    ]


def write(rep: dict, out: Path) -> None:
    from readmoe.atomic import atomic_write_json, atomic_write_text
    from readmoe.report import markdown_table

    rep["goals"] = [{"goal": g, "met": ok, "measured": m} for g, ok, m in goals(rep)]
    atomic_write_json(out / "report.json", rep)
    rows = []
    for name, v in rep["variants"].items():
        for r in [dict(v["saturated"], rate="saturated")] + v["sweep"]:
            rows.append([name, r["rate"] if isinstance(r["rate"], str) else f"{r['rate']:.3f}", r["completed"],
                         r["ttft_ms_p50"], r["ttft_ms_p95"], r["itl_ms_p50"], r["itl_ms_p95"], r["output_tokens_per_s"]])
    md = (f"# Load benchmark (guidellm against `readmoe serve`)\n\n{rep['requests']} requests per run, "
          f"{rep['output_tokens']} output tokens each, mixed-domain prompts from the embedded corpora.\n\n"
          + markdown_table(["variant", "rate req/s", "completed", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms",
                            "ITL p95 ms", "output tok/s"], rows)
          + f"\nIn-process engine, same prompts, all at once: {rep['in_process_output_tokens_per_s']:.1f} output tok/s.\n"
          + "\n## Goals\n\n" + "\n".join(f"- {'met' if g['met'] else 'MISSED'}: {g['goal']} — {g['measured']}"
                                         for g in rep["goals"]) + "\n")
    atomic_write_text(out / "report.md", md)
    plot(rep, out / "report.png")
    print(md)


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for name, v in rep["variants"].items():
        pts = [(r["rate"], r) for r in v["sweep"]] + [(v["saturated"]["requests_per_s"], v["saturated"])]
        x = [p for p, _ in pts]
        for i, key in enumerate(("ttft_ms_p50", "itl_ms_p50", "output_tokens_per_s")):
            ax[i].plot(x, [r[key] for _, r in pts], marker="o", label=name)
            ax[i].set_xlabel("request rate (req/s)")
            ax[i].set_title(key)
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
