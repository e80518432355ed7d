"""A parent-size run on this machine: memory and time of every stage for a random-weight Llama of a real shape.

    python benchmarks/scale.py --shape llama-2-7b --out runs/scale-7b     # about 20 min, 24 GiB machine
    python benchmarks/scale.py --shape 1b --out runs/scale-1b             # a few minutes

Stages, each in its own process so its peak resident memory is its own (`peak_rss_bytes`: the process's peak
above its resident set after imports):
  build      a Llama with the shape in benchmarks/shapes/SHAPE.json, random bf16 weights written tensor by
             tensor into safetensors shards (no model object, no slow initialisation)
  calibrate  `readmoe calibrate` on 2 x 128 tokens per embedded domain (byte-level tokenizer)
  carve      `readmoe carve` (streaming: neither model is ever in memory whole)
  serve      the engine at each --capacity, experts read from the carved checkpoint on disk, on --requests
             short requests

Random weights say nothing about quality: this measures memory and time only. Writes OUT/report.json and
OUT/report.md; the models themselves go to OUT/work and are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = Path(__file__).parent / "shapes"
NOTE = "random weights: memory and time only, nothing about quality"


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------- the stages


def byte_tokenizer():
    """Every byte one token: the corpus tokenizes without a hub download, and ids stay far below any vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split("", "isolated")])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def build(shape: str, work: Path) -> dict:
    """The parent checkpoint, written layer by layer: std 0.02 linear weights, unit norms."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from readmoe.checkpoint import ShardWriter

    cfg = AutoConfig.for_model(**json.loads((SHAPES / f"{shape}.json").read_text()))
    cfg.dtype = torch.bfloat16
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    tied = set(getattr(skeleton, "all_tied_weights_keys", {}) or {})
    names = [(k, tuple(p.shape)) for k, p in skeleton.state_dict().items() if k not in tied]
    out = work / "parent"
    writer = ShardWriter(out)
    g = torch.Generator().manual_seed(0)
    group, layer = {}, None
    for k, shp in names:
        this = k.split(".")[2] if k.startswith("model.layers.") else None
        if this != layer and group:
            writer.add(group)
            group = {}
        layer = this
        t = torch.empty(shp, dtype=torch.bfloat16)
        group[k] = t.fill_(1.0) if "norm" in k else t.normal_(0.0, 0.02, generator=g)
    writer.add(group)
    writer.close()
    cfg.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    dense_bytes = sum(math.prod(s) for _, s in names) * 2
    return {"dense_bytes": dense_bytes, "dense_params": dense_bytes // 2, "tensors": len(names)}


def cli(*args: str) -> None:
    from readmoe import cli as readmoe_cli

    sys.argv = ["readmoe", *args]
    try:
        readmoe_cli.main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"readmoe {' '.join(args)} exited with {e.code}") from None


def calibrate(work: Path, samples: int, seq_len: int) -> dict:
    from readmoe.calibrate import load_stats

    t = time.perf_counter()
    cli("calibrate", "--model", str(work / "parent"), "--out", str(work / "stats.safetensors"), "--samples", str(samples),
        "--seq-len", str(seq_len), "--dtype", "bfloat16", "--batch-size", str(samples))
    st = load_stats(work / "stats.safetensors")
    return {"tokens": sum(st.tokens), "tokens_per_s": round(sum(st.tokens) / (time.perf_counter() - t), 1),
            "domains": st.domains}


def carve(work: Path) -> dict:
    cli("carve", "--model", str(work / "parent"), "--stats", str(work / "stats.safetensors"), "--out", str(work / "moe"),
        "--dtype", "bfloat16")
    rep = json.loads((work / "moe" / "carve_report.json").read_text())
    files = [p for p in (work / "moe").iterdir() if p.suffix == ".safetensors"]
    rows = rep["layers"]
    return {"moe_bytes": sum(p.stat().st_size for p in files), "shards": len(files), "streamed": rep.get("streamed"),
            "shared_pct": round(sum(r["shared_pct"] for r in rows) / len(rows), 1),
            "routed_mean_pct": round(sum(r["routed_mean_pct"] for r in rows) / len(rows), 1),
            "params": rep["params"]}


def serve(work: Path, capacity: int, requests: int, prompt_len: int, max_tokens: int) -> dict:
    """The engine from the carved checkpoint with `capacity` experts per layer resident, everything else loaded."""
    import torch

    from readmoe.serving import Engine, EngineConfig, SamplingParams

    t0 = time.perf_counter()
    eng = Engine.from_pretrained(work / "moe", EngineConfig(capacity=capacity), dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    vocab = eng.vocab_size
    work_items = [(0.0, torch.randint(3, min(vocab, 256), (prompt_len,), generator=g).tolist(),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for _ in range(requests)]
    t = time.perf_counter()
    done = eng.run(work_items)
    wall = time.perf_counter() - t
    tokens = sum(len(r.output_ids) for r in done)
    fixed = eng.resident_bytes() - eng.cache.resident_bytes()  # non-expert weights + shared experts
    per_layer = [sorted((eng.cache.store.nbytes[l, e] for e in range(eng.moe.num_experts)), reverse=True)
                 for l in range(eng.cache.store.num_layers)]
    experts_bytes = sum(sum(p[:capacity]) for p in per_layer)  # the largest `capacity` experts of every layer
    kv = requests * (prompt_len + max_tokens) * eng.runner.kv.token_bytes  # every request's KV, all held at the end
    out = {"capacity": capacity, "tokens_per_s": round(tokens / wall, 2), "tokens": tokens, "requests": requests,
           "run_s": round(wall, 1), "load_s": round(load_s, 1), "hit_ratio": round(eng.cache.hit_ratio, 3),
           "bytes_loaded": eng.cache.store.bytes_loaded, "prefetch": eng.prefetch_reason,
           "arithmetic_bytes": fixed + experts_bytes + kv, "fixed_bytes": fixed, "experts_bytes": experts_bytes,
           "kv_bytes": kv}
    eng.close()
    return out


def run_stage(name: str, args) -> None:
    """Entry of a stage's own process: imports first, then the baseline, then the stage; result as JSON."""
    import torch  # noqa: F401  (imported before the baseline: it is not the stage's memory)
    import transformers  # noqa: F401

    import readmoe.cli  # noqa: F401
    import readmoe.serving  # noqa: F401

    work = Path(args.work)
    base = rss_now()
    t = time.perf_counter()
    if name == "build":
        res = build(args.shape, work)
    elif name == "calibrate":
        res = calibrate(work, args.samples, args.seq_len)
    elif name == "carve":
        res = carve(work)
    else:
        res = serve(work, int(name.split(":")[1]), args.requests, args.prompt_len, args.max_tokens)
    res.update(seconds=round(time.perf_counter() - t, 1), peak_rss_bytes=max(0, peak_rss() - base),
               baseline_rss_bytes=base)
    Path(args.result).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------- the driver


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def goals(rep: dict) -> list[tuple[bool, str]]:
    dense = rep["dense_bytes"]
    st, out = rep["stages"], []
    carve = st["carve"]["peak_rss_bytes"]
    out.append((carve <= 1.2 * dense, f"carve's peak RSS <= 1.2x the dense bf16 size ({carve / dense:.2f}x)"))
    for s in rep["serve_runs"]:
        peak, cap = s["peak_rss_bytes"], s["capacity"]
        if cap == 1:
            out.append((peak <= 0.75 * dense, f"serving at capacity 1: peak RSS <= 0.75x the dense bf16 size "
                                              f"({peak / dense:.2f}x; {s['tokens_per_s']} tokens/s)"))
        if cap == 2:
            rel = peak / s["arithmetic_bytes"] - 1
            out.append((abs(rel) <= 0.10, f"serving at capacity 2: peak RSS within 10 % of non-expert weights + "
                                          f"shared + 2 experts/layer + KV ({rel:+.1%}: {gib(peak)} vs "
                                          f"{gib(s['arithmetic_bytes'])})"))
    return out


def markdown(rep: dict) -> str:
    rows = ["| stage | seconds | peak RSS above baseline | x dense bf16 |", "|---|---|---|---|"]
    for name, s in rep["stages"].items():
        rows.append(f"| {name} | {s['seconds']} | {gib(s['peak_rss_bytes'])} | {s['peak_rss_bytes'] / rep['dense_bytes']:.2f} |")
    serve = ["| capacity | tokens/s | peak RSS | arithmetic | hit ratio | expert bytes loaded |", "|---|---|---|---|---|---|"]
    for s in rep["serve_runs"]:
        serve.append(f"| {s['capacity']} | {s['tokens_per_s']} | {gib(s['peak_rss_bytes'])} | {gib(s['arithmetic_bytes'])} "
                     f"| {s['hit_ratio']:.2f} | {gib(s['bytes_loaded'])} |")
    c = rep["carve"]
    return (f"# Scale run: {rep['shape']} ({rep['dtype']})\n\n{NOTE}.\n\n"
            f"Dense parent {rep['dense_params'] / 1e9:.2f} B parameters, {gib(rep['dense_bytes'])} in bf16. "
            f"Calibration: {rep['calibrate']['tokens']} tokens at {rep['calibrate']['tokens_per_s']} tokens/s. "
            f"Carved MoE: {gib(c['moe_bytes'])} in {c['shards']} shards; per layer the shared expert holds "
            f"{c['shared_pct']} % of the MLP's neurons and a routed expert {c['routed_mean_pct']} % on average.\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(serve) + "\n\n"
            + "\n".join(f"{'met' if ok else 'missed'}: {text}" for ok, text in rep["goals"]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", help="a config in benchmarks/shapes: llama-2-7b, 1b, tiny")
    ap.add_argument("--out", type=Path, default=None, help="report directory (default runs/scale-SHAPE)")
    ap.add_argument("--capacity", default="1", help="serve stage's experts per layer; a comma list runs each")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2, help="calibration sequences per domain")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the parent and MoE checkpoints in OUT/work")
    ap.add_argument("--reuse", action="store_true", help="run only the serve stages, on OUT/work from a --keep run")
    ap.add_argument("--report-only", action="store_true", help="write the report from OUT/work's stage results")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return run_stage(args.stage, args)
    if not (SHAPES / f"{args.shape}.json").is_file():
        sys.exit(f"error: --shape must be one of {', '.join(sorted(p.stem for p in SHAPES.glob('*.json')))}")
    try:
        caps = [int(c) for c in args.capacity.split(",")]
    except ValueError:
        sys.exit(f"error: --capacity must be integers separated by commas, not '{args.capacity}'")
    out = args.out or Path("runs") / f"scale-{args.shape}"
    work = out / "work"
    stages, results = ["build", "calibrate", "carve"] + [f"serve:{c}" for c in caps], {}
    if args.reuse or args.report_only:
        if args.reuse and not (work / "moe").is_dir():
            sys.exit(f"error: --reuse needs {work}/moe from an earlier run with --keep")
        done = stages if args.report_only else stages[:3]
        results = {s: json.loads((work / f"{s.replace(':', '-')}.json").read_text()) for s in done}
        stages = [s for s in stages if s not in done]
    else:
        if work.exists():
            shutil.rmtree(work)  # our own scratch space from an earlier run, never the user's files
        work.mkdir(parents=True)
    t0 = time.time()
    try:
        for name in stages:
            res_file = work / f"{name.replace(':', '-')}.json"
            cmd = [sys.executable, __file__, "--stage", name, "--work", str(work), "--result", str(res_file),
                   "--shape", args.shape, "--requests", str(args.requests), "--prompt-len", str(args.prompt_len),
                   "--max-tokens", str(args.max_tokens), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
            print(f"[{time.time() - t0:6.0f}s] {name}", flush=True)
            subprocess.run(cmd, check=True)
            results[name] = json.loads(res_file.read_text())
            print(f"[{time.time() - t0:6.0f}s] {name}: {results[name]['seconds']} s, peak "
                  f"{gib(results[name]['peak_rss_bytes'])}", flush=True)
    finally:
        if not (args.keep or args.reuse or args.report_only):
            for d in ("parent", "moe"):
                shutil.rmtree(work / d, ignore_errors=True)
    b = results["build"]
    serve_runs = [dict(results[f"serve:{c}"]) for c in caps]
    rep = {"shape": args.shape, "dtype": "bfloat16", "dense_bytes": b["dense_bytes"], "dense_params": b["dense_params"],
           "stages": {k: {"seconds": results[k]["seconds"], "peak_rss_bytes": results[k]["peak_rss_bytes"]}
                      for k in ("build", "calibrate", "carve")}, "note": NOTE,
           "calibrate": results["calibrate"], "carve": results["carve"],
           "serve": {"capacity": caps[0], "tokens_per_s": serve_runs[0]["tokens_per_s"]}, "serve_runs": serve_runs,
           "machine": {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}}
    rep["stages"]["serve"] = {"seconds": serve_runs[0]["seconds"], "peak_rss_bytes": serve_runs[0]["peak_rss_bytes"]}
    rep["goals"] = goals(rep)
    from readmoe.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", markdown(rep))
    print(markdown(rep))


if __name__ == "__main__":
    main()
