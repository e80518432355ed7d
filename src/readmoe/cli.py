"""The `readmoe` command line: calibrate → carve → eval, and `demo` for all of it on the embedded default."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError
from .pipeline import carve_and_save, dense_on_engine, ensure_baselines, run_eval

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Refactor a dense LLM into a router-decoupled Mixture-of-Experts (Read-ME) and serve it.")

MODEL_HELP = "'embedded' (SmolLM2-135M), 'embedded:gemma3', a local HF checkpoint dir, a .gguf file, or a hub id"
DTYPE_HELP = "model dtype: auto (bf16 on CUDA and on CPUs with bf16 matrix units, else fp32), float32, bfloat16, float16"
CORPUS_HELP = "'embedded' (wiki, news, books, code, docs) or a directory with one sub-directory or file per domain"


def _dtype(value: str, device=None):
    """--dtype as a torch dtype; a bad value is a one-line error naming the flag."""
    from . import dtype

    try:
        return dtype.resolve(value, device)
    except ValueError:
        raise UserError(f"--dtype must be one of {', '.join(dtype.DTYPES)}, not '{value}'") from None


def _domains(arg: Optional[str]) -> Optional[list[str]]:
    return [d.strip() for d in arg.split(",") if d.strip()] if arg else None


@app.command()
def calibrate(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    corpus: str = typer.Option("embedded", help=CORPUS_HELP),
    out: Path = typer.Option(..., help="stats file to write (safetensors)"),
    samples: int = typer.Option(16, help="sequences per domain"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    domains: Optional[str] = typer.Option(None, help="comma-separated subset of the corpus's domains"),
    batch_size: int = typer.Option(4, help="sequences per forward"),
    dtype: str = typer.Option("float32", help=DTYPE_HELP + "; statistics accumulate in fp64 whatever it is"),
    device_map: Optional[str] = typer.Option(None, help="'auto': spread a parent larger than one GPU over GPUs, "
                                                        "CPU memory and disk (accelerate); default: one device"),
):
    """Record per-domain mean |activation| of every MLP neuron (the input of down_proj). Resumable."""
    from . import backbone
    from .calibrate import calibrate as run, check_sizes
    from .corpus import Corpus

    check_sizes(samples, seq_len)
    c = Corpus(corpus)
    names = c.select(_domains(domains))
    backbone.env_threads()
    if device_map not in (None, "auto", "cpu", "cuda"):
        raise UserError(f"--device-map must be auto, cpu or cuda, not '{device_map}'")
    dense, tok = backbone.load_dense(model, _dtype(dtype), device_map=device_map)
    st = run(dense, tok, c, names, samples, seq_len, out, batch_size=batch_size)
    typer.echo(f"wrote {out}: {len(st.domains)} domains, {sum(st.tokens):,} tokens")


@app.command()
def carve(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    stats: Path = typer.Option(..., help="stats file from `readmoe calibrate`"),
    out: Path = typer.Option(..., help="checkpoint directory to write"),
    keep: float = typer.Option(0.5, help="share of neurons each domain keeps per layer (0, 1]"),
    experts: Optional[int] = typer.Option(None, help="domain-free mode: K co-activation clusters instead of domains"),
    router_dim: Optional[int] = typer.Option(None, help="router width (default 128, 512 for hidden >= 2048)"),
    overwrite: bool = typer.Option(False, help="write into a directory holding other files, replacing only the files "
                                              "this command writes (unknown files are never deleted)"),
    dtype: str = typer.Option("float32", help=DTYPE_HELP + "; the checkpoint is written in it"),
):
    """Carve a shared expert + one routed expert per domain and write an HF checkpoint."""
    from . import backbone
    from .calibrate import load_stats
    from .carve import check_keep

    check_keep(keep)
    st = load_stats(stats)
    backbone.env_threads()
    carve_and_save(model, st, keep, out, experts, router_dim, overwrite=overwrite, dtype=_dtype(dtype))


@app.command("eval")
def eval_(
    model: Path = typer.Option(..., help="readmoe checkpoint directory"),
    corpus: str = typer.Option("embedded", help=CORPUS_HELP),
    out: Path = typer.Option(..., help="report JSON to write (.md and .png files are written beside it)"),
    seqs: int = typer.Option(4, help="validation sequences per domain"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    domains: Optional[str] = typer.Option(None, help="comma-separated subset of the corpus's domains"),
    dense: Optional[str] = typer.Option(None, help="dense parent (default: the one recorded at carve time); 'none' to skip"),
    baselines: str = typer.Option("none", help="'all', 'none' or a list of pruned,layerwise: trained with the model's "
                                              "own budget into MODEL/baselines/ (resumable), then evaluated"),
    mmlu: str = typer.Option("1000", help="MMLU questions (seeded subset) for dense, readme and pruned; 'all' or 'none'"),
    dtype: str = typer.Option("float32", help=DTYPE_HELP + " (default float32: the reference numbers)"),
):
    """The quality report: per-domain perplexity of the MoE against the dense parent and baselines, MMLU,
    router accuracy and cost, routing statistics, parameters."""
    from . import backbone
    from . import mmlu as mmlu_mod
    from .baselines import parse
    from .corpus import Corpus
    from .modeling import load_readme

    if seqs < 1 or seq_len < 2:
        raise UserError("--seqs must be >= 1 and --seq-len >= 2")
    wanted, n_mmlu = parse(baselines), mmlu_mod.parse_count(mmlu)
    c = Corpus(corpus)
    names = c.select(_domains(domains))
    backbone.env_threads()
    dt = _dtype(dtype)
    moe, tok = load_readme(str(model), dt)
    parent = dense or moe.config.parent_model
    dm = None
    if parent and parent != "none":
        dm, _ = backbone.load_dense(parent, dt)
    elif wanted:
        raise UserError("baselines are built from the dense parent: drop --dense none or --baselines")
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # evaluation runs on the best device
    moe.to(dev)
    if dm is not None:
        dm.to(dev)
    base = ensure_baselines(Path(model), moe, dm, tok, wanted)
    run_eval(moe, dm, tok, c, names, seqs, seq_len, out, baselines=base, mmlu_n=n_mmlu, model_dir=Path(model))


@app.command()
def train(
    model: Path = typer.Option(..., help="readmoe checkpoint directory (from `readmoe carve`)"),
    corpus: str = typer.Option("embedded", help=CORPUS_HELP),
    out: Path = typer.Option(..., help="directory for the trained checkpoint (resumes if it holds a partial run)"),
    budget: str = typer.Option("demo", help="demo (minutes on a CPU), full (about 30 min on 2 CPU cores), paper (the paper's recipe)"),
    rounds: Optional[int] = typer.Option(None, help="router/expert rounds"),
    router_steps: Optional[int] = typer.Option(None, help="router distillation steps per round"),
    expert_steps: Optional[int] = typer.Option(None, help="expert tuning steps per round"),
    router_lr: Optional[float] = typer.Option(None, help="router peak learning rate"),
    expert_lr: Optional[float] = typer.Option(None, help="expert peak learning rate"),
    lr_decay: Optional[float] = typer.Option(None, help="learning-rate factor per round"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per training sequence"),
    batch_tokens: Optional[int] = typer.Option(None, help="tokens per step"),
    domains: Optional[str] = typer.Option(None, help="comma-separated subset of the corpus's domains"),
    dense: Optional[str] = typer.Option(None, help="dense teacher (default: the parent recorded at carve time)"),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 / auto for bf16 autocast over fp32 master weights"),
):
    """Alternate router distillation from the dense parent and expert tuning; checkpoint after every phase."""
    from . import backbone
    from .corpus import Corpus
    from .modeling import load_readme
    from .targets import check_router
    from .train import check_pair, make_config, train as run
    import torch

    cfg = make_config(budget, rounds=rounds, router_steps=router_steps, expert_steps=expert_steps, router_lr=router_lr,
                      expert_lr=expert_lr, lr_decay=lr_decay, seq_len=seq_len, batch_tokens=batch_tokens)
    c = Corpus(corpus)
    names = c.select(_domains(domains))
    backbone.env_threads()
    moe, tok = load_readme(str(model))
    check_router(moe)
    dm, _ = backbone.load_dense(dense or moe.config.parent_model)
    check_pair(moe, dm, tok)
    hist = run(moe, dm, tok, c, names, cfg, out, precision="bf16" if _dtype(dtype) == torch.bfloat16 else "no")
    last = [h for h in hist if h["phase"] == "router"][-1:]
    typer.echo(f"wrote {out}" + (f" (last router accuracy {100 * last[0]['router_acc']:.1f} %)" if last else ""))


@app.command()
def generate(
    model: Path = typer.Option(..., help="readmoe checkpoint directory"),
    prompt: str = typer.Option(..., help="text to continue"),
    max_tokens: int = typer.Option(32, help="tokens to generate"),
    expert: Optional[str] = typer.Option(None, help="force one routed expert (name or index) instead of the router"),
    dtype: str = typer.Option("float32", help=DTYPE_HELP + " (default float32: batch-1 decoding is fastest in it here)"),
):
    """Greedy generation with the MoE (KV cache, router cache)."""
    import torch

    from . import backbone
    from .modeling import load_readme

    if max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    backbone.env_threads()
    moe, tok = load_readme(str(model), _dtype(dtype))
    kw = {}
    if expert is not None:
        names = list(moe.config.expert_names)
        if expert in names:
            kw["expert_ids"] = names.index(expert)
        elif expert.isdigit() and int(expert) < len(names):
            kw["expert_ids"] = int(expert)
        else:
            raise UserError(f"unknown expert '{expert}'; this model has: {', '.join(names)}")
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UserError("--prompt is empty; give some text to continue")
    with torch.no_grad():
        out = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id, **kw)
    typer.echo(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="directory for stats, checkpoints and reports"),
    model: str = typer.Option("embedded", help=MODEL_HELP),
    samples: int = typer.Option(12, help="calibration sequences per domain"),
    seq_len: int = typer.Option(512, help="tokens per calibration / evaluation sequence"),
    eval_seqs: int = typer.Option(2, help="validation sequences per domain"),
    keep: float = typer.Option(0.5, help="share of neurons each domain keeps"),
    budget: str = typer.Option("demo", help="training budget: demo, full, paper"),
    baselines: str = typer.Option("all", help="baselines to train and compare: 'all', 'none' or pruned,layerwise"),
    mmlu: str = typer.Option("150", help="MMLU questions for dense, readme and pruned (`readmoe eval` defaults to 1000)"),
    overwrite: bool = typer.Option(False, help="write into a directory holding other files, replacing only the files "
                                              "this command writes (unknown files are never deleted)"),
):
    """The whole pipeline on the embedded default: calibrate, carve, train, baselines, evaluate; prints the tables.

    Writes DIR/stats.safetensors, DIR/carved (the carved MoE), DIR/model (the trained MoE, its baselines under
    DIR/model/baselines) and DIR/report.json (+ .md and plots)."""
    from . import mmlu as mmlu_mod
    from .baselines import parse
    from . import backbone
    from .calibrate import calibrate as run_calibrate
    from .carve import check_keep
    import torch

    from .corpus import Corpus
    from .modeling import load_readme
    from .outdir import claim, mark, read_manifest
    from .train import make_config, train as run_train

    check_keep(keep)
    cfg = make_config(budget)
    wanted, n_mmlu = parse(baselines), mmlu_mod.parse_count(mmlu)
    claim(out, "demo", overwrite)
    if read_manifest(out) is None:
        mark(out, "demo", ["stats.safetensors", "carved", "model", "report.json", "report.md", "report.png",
                           "report_routing.png", "report_recovery.png"])
    t0 = time.time()
    backbone.env_threads()
    c = Corpus("embedded")
    dense, tok = backbone.load_dense(model)
    typer.echo(f"[{time.time() - t0:5.0f}s] loaded {model}")
    st = run_calibrate(dense, tok, c, c.domains, samples, seq_len, out / "stats.safetensors")
    typer.echo(f"[{time.time() - t0:5.0f}s] calibrated {len(st.domains)} domains")
    carve_and_save(model, st, keep, out / "carved", overwrite=overwrite, dtype=torch.float32, dense=dense)
    moe, _ = load_readme(str(out / "carved"))
    typer.echo(f"[{time.time() - t0:5.0f}s] carved")
    run_train(moe, dense, tok, c, c.domains, cfg, out / "model")
    typer.echo(f"[{time.time() - t0:5.0f}s] trained ({budget} budget)")
    base = ensure_baselines(out / "model", moe, dense, tok, wanted)
    if base:
        typer.echo(f"[{time.time() - t0:5.0f}s] trained baselines {', '.join(base)}")
    run_eval(moe, dense, tok, c, c.domains, eval_seqs, seq_len, out / "report.json", baselines=base, mmlu_n=n_mmlu,
             model_dir=out / "model")
    typer.echo(f"[{time.time() - t0:5.0f}s] done: {out}")


bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks that write reports.")
app.add_typer(bench_app, name="bench")


def _ints(arg: Optional[str], what: str) -> Optional[list[int]]:
    if not arg:
        return None
    try:
        return [int(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} takes comma-separated integers, not '{arg}'") from None


@bench_app.command("serve")
def bench_serve(
    model: Path = typer.Option(..., help="readmoe checkpoint directory (its safetensors file is the expert store)"),
    out: Path = typer.Option(Path("runs/serve"), help="directory for report.json/.md, access logs and plots"),
    quick: bool = typer.Option(False, help="a small workload and matrix (capacity 2, lru and belady; expert-aware's "
                                          "lru and belady also at capacities 3-4); with --sweep, 3 rates and 2 schedulers"),
    sweep: bool = typer.Option(False, help="the workload at rates from light to 2x saturation, per scheduler x "
                                          "{resident, capacity 2 on disk, capacity 2 behind a 2 GB/s link}"),
    schedulers: Optional[str] = typer.Option(None, help="comma list (default all: decode-first,prefill-first,expert-aware)"),
    policies: Optional[str] = typer.Option(None, help="comma list (default all: lru,lfu,random,belady)"),
    capacities: Optional[str] = typer.Option(None, help="comma list of resident experts per layer (default 1..E-1)"),
    requests: Optional[int] = typer.Option(None, help="requests in the synthetic workload (default 48, quick 16)"),
    rate: float = typer.Option(4.0, help="arrivals per second"),
    arrival: str = typer.Option("poisson", help="poisson or bursty"),
    trace: Optional[Path] = typer.Option(None, help="replay a JSONL trace (arrival_s, prompt, max_tokens) instead"),
    token_budget: int = typer.Option(128, help="tokens per step (the engine's default)"),
    max_running: int = typer.Option(16, help="requests holding a KV cache at once"),
    max_wait: int = typer.Option(8, help="aging bound: steps a queued token may wait"),
    store: str = typer.Option("disk", help="expert store: disk (safetensors reads) or host (memory)"),
    link_gbps: Optional[float] = typer.Option(None, help="emulate a host->accelerator link of this many GB/s for "
                                                        "expert loads (a CPU has none; prefetch hides it)"),
    corpus: str = typer.Option("embedded", help=CORPUS_HELP),
    dense: Optional[str] = typer.Option(None, help="dense parent to serve for comparison (default: recorded); 'none'"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    rounds: int = typer.Option(3, help="interleaved repeats of the all-resident runs (the report keeps medians); "
                                       "with --sweep the capacity-2 cells repeat too (at most twice with --quick)"),
):
    """Serve one workload with every scheduler x cache policy x capacity and write the report."""
    from . import backbone
    from .corpus import Corpus
    from .modeling import load_readme
    from .serving.bench import BenchConfig, bench
    from .serving.workload import WorkloadConfig

    n = requests if requests is not None else (16 if quick else 48)
    if sweep:
        from .serving import EngineConfig

        return _bench_sweep(model, out, quick, schedulers, requests, corpus, dense,
                            EngineConfig(token_budget=token_budget, max_running=max_running, max_wait=max_wait),
                            _dtype(dtype), rounds)
    cfg = BenchConfig(token_budget=token_budget, max_running=max_running, max_wait=max_wait, store=store, link_gbps=link_gbps,
                      workload=WorkloadConfig(requests=n, rate=rate, arrival=arrival), trace=str(trace) if trace else None,
                      rounds=rounds)
    if quick:
        cfg.capacities, cfg.policies = [2], ["lru", "belady"]
        cfg.belady_capacities = [] if capacities else [3, 4]  # the Belady goals average over capacities 2-4
    cfg.schedulers = _domains(schedulers) or cfg.schedulers
    cfg.policies = _domains(policies) or cfg.policies
    cfg.capacities = _ints(capacities, "--capacities") or cfg.capacities
    cfg.check()
    backbone.env_threads()
    dt = _dtype(dtype)
    moe, tok = load_readme(str(model), dt)
    from .backbone import check_supported

    check_supported(moe, serving=True)
    data = bench(moe, model, tok, Corpus(corpus), _parent_on_engine(moe, dense, dt), cfg, out)
    from . import report
    from .serving.bench import summary_rows

    from .serving.bench import verdicts

    h, rows = summary_rows(data)
    report.print_table("serving benchmark", h, rows)
    for goal, ok, measured in verdicts(data["goals"], link_gbps):
        typer.echo(f"{'met' if ok else 'missed'}: {goal} ({measured})")
    typer.echo(f"wrote {out}/report.json, report.md, access/*.jsonl and plots")


def _parent_on_engine(moe, dense: Optional[str], dtype):
    """The dense parent as a one-path engine model, or None when --dense none."""
    from . import backbone

    parent = dense or moe.config.parent_model
    if not parent or parent == "none":
        return None
    d, _ = backbone.load_dense(parent, dtype)
    return dense_on_engine(d, moe)


def _bench_sweep(model: Path, out: Path, quick: bool, schedulers: Optional[str], requests: Optional[int], corpus: str,
                 dense: Optional[str], engine, dtype, rounds: int = 3) -> None:
    from . import backbone, report
    from .corpus import Corpus
    from .modeling import load_readme
    from .backbone import check_supported
    from .serving.sweep import SweepConfig, sweep, table, verdicts

    cfg = SweepConfig.quick() if quick else SweepConfig()
    cfg.engine, cfg.rounds = engine, rounds
    cfg.schedulers = _domains(schedulers) or cfg.schedulers
    if requests is not None:
        cfg.workload.requests = requests
    cfg.check()
    backbone.env_threads()
    moe, tok = load_readme(str(model), dtype)
    check_supported(moe, serving=True)
    data = sweep(moe, model, tok, Corpus(corpus), _parent_on_engine(moe, dense, dtype), cfg, out)
    h, rows = table(data)
    report.print_table(f"serving sweep (saturating rate {data['saturating_rate']:.2f} req/s)", h, rows)
    for goal, ok, measured in verdicts(data["goals"]):
        typer.echo(f"{'met' if ok else 'missed'}: {goal} ({measured})")
    typer.echo(f"wrote {out}/report.json, report.md and plots")


@app.command()
def serve(
    model: Path = typer.Option(Path("runs/demo/model"), help="readmoe checkpoint directory (default: the demo's)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    served_model_name: Optional[str] = typer.Option(None, help="the model name clients send (default: the directory's name)"),
    api_key: Optional[str] = typer.Option(None, envvar="READMOE_API_KEY", help="require 'Authorization: Bearer KEY'"),
    max_queued: int = typer.Option(64, help="requests waiting for a KV cache before new ones get 503"),
    drain_timeout: float = typer.Option(30.0, help="on SIGTERM, seconds running requests get to finish"),
    dense: bool = typer.Option(False, help="serve the checkpoint's dense parent on the same engine instead (to compare)"),
    scheduler: str = typer.Option("expert-aware", help="expert-aware (cost-aware), expert-aware-strict (the paper's "
                                                     "Algorithm 1), decode-first or prefill-first"),
    capacity: Optional[int] = typer.Option(None, help="resident routed experts per layer (default: all)"),
    policy: str = typer.Option("belady", help="expert cache policy: lru, lfu, random, belady"),
    prefetch: str = typer.Option("auto", help="load the next layers' experts while a layer computes: auto (on for a "
                                              "GPU or a link, off on CPU cores), on, off"),
    pack_weights: str = typer.Option("auto", help="prepack bf16 weights for oneDNN's CPU kernels: auto (bf16 on CPU "
                                                  "when the packed copy fits in 10 % of free memory), on, off"),
    merge_experts: str = typer.Option("auto", help="fold the shared expert into each routed one, so a step whose "
                                                   "tokens use one expert runs 2 matmuls per MLP instead of 4: auto "
                                                   "(every expert resident and the copies fit in 10 % of free memory), "
                                                   "on, off"),
    expert_copy: str = typer.Option("auto", help="with --store disk, read experts from a copy in the serving dtype "
                                                 "kept in $READMOE_EXPERT_COPIES or $READMOE_CACHE (an fp32 "
                                                 "checkpoint served in bf16 otherwise reads and casts twice the bytes "
                                                 "at every load): auto (when it takes at most half the free disk "
                                                 "space), on, off"),
    token_budget: int = typer.Option(128, help="tokens per engine step (prompt chunks and decode tokens together)"),
    max_running: int = typer.Option(16, help="requests holding a KV cache at once"),
    max_wait: int = typer.Option(8, help="aging bound: steps a queued token may wait"),
    store: str = typer.Option("disk", help="expert store: disk (safetensors reads) or host (memory)"),
    link_gbps: Optional[float] = typer.Option(None, help="emulate a host->accelerator link of this many GB/s"),
    prefetch_buffer: int = typer.Option(2, help="experts per layer a copy engine (a link, a GPU) may hold in flight "
                                                "beyond --capacity, so a step that needs more experts than fit loads "
                                                "them ahead too; 0 waits for a slot"),
    max_model_len: int = typer.Option(4096, help="longest request (prompt + output) in tokens; each running request "
                                                 "reserves KV for this many (on CPU only the tokens held use memory)"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    replicas: int = typer.Option(1, help="engine replicas; above 1 they run on Ray Serve (local, or the cluster in "
                                         "RAY_ADDRESS) behind one ingress"),
    route: str = typer.Option("affinity", help="with --replicas > 1, how requests pick a replica: affinity (where "
                                               "their pre-gated experts are resident), pow2 (Ray's default), "
                                               "round-robin"),
    affinity_bound: int = typer.Option(2, help="affinity picks the warmest replica among those with at most this many "
                                               "more requests in flight than the least-loaded one"),
    num_cpus: float = typer.Option(1.0, help="Ray CPUs per engine replica"),
    num_gpus: float = typer.Option(0.0, help="Ray GPUs per engine replica"),
    threads: int = typer.Option(0, help="torch threads per engine (default: every core for one engine; --num-cpus, at "
                                        "least 1, per replica)"),
    emit_config: Optional[Path] = typer.Option(None, help="write a `serve deploy` YAML for these settings to this "
                                                          "file and exit (multi-node: see docs/scale-out.md)"),
):
    """Serve the MoE over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (SSE streaming),
    /v1/models, /health, /metrics (Prometheus), /tokenize, /detokenize."""
    from . import backbone
    from .server import build_app, serve as run_server
    from .serving import Engine, EngineConfig
    from .serving.engine_thread import EngineThread
    from .serving.expert_cache import check_cache
    from .backbone import check_supported

    if not (model / "config.json").is_file() and model == Path("runs/demo/model"):
        raise UserError("no model at runs/demo/model: run `make demo` first, or pass --model DIR")
    if not 0 <= port <= 65535:
        raise UserError("--port must lie in [0, 65535]")
    if max_queued < 1 or token_budget < 1 or max_running < 1 or max_wait < 1 or max_model_len < 2:
        raise UserError("--max-queued, --token-budget, --max-running and --max-wait must be >= 1, --max-model-len >= 2")
    if drain_timeout < 0:
        raise UserError("--drain-timeout must be >= 0")
    check_cache(policy=policy, store=store)
    if link_gbps is not None and link_gbps <= 0:
        raise UserError("--link-gbps must be > 0")
    if prefetch_buffer < 0:
        raise UserError("--prefetch-buffer must be >= 0")
    modes = {"auto": "auto", "on": True, "off": False}
    if prefetch not in modes:
        raise UserError(f"unknown --prefetch '{prefetch}': use auto, on or off")
    if pack_weights not in modes:
        raise UserError(f"unknown --pack-weights '{pack_weights}': use auto, on or off")
    if merge_experts not in modes:
        raise UserError(f"unknown --merge-experts '{merge_experts}': use auto, on or off")
    if expert_copy not in modes:
        raise UserError(f"unknown --expert-copy '{expert_copy}': use auto, on or off")
    if merge_experts == "on" and capacity is not None:
        raise UserError("--merge-experts on needs every expert resident: drop --capacity, or use auto")
    cfg = EngineConfig(scheduler=scheduler, token_budget=token_budget, max_running=max_running, max_wait=max_wait,
                       capacity=capacity, policy=policy, prefetch=modes[prefetch], store=store, link_gbps=link_gbps,
                       prefetch_buffer=prefetch_buffer, max_model_len=max_model_len, pack_weights=modes[pack_weights],
                       merge_experts=modes[merge_experts], expert_copy=modes[expert_copy])
    dt = _dtype(dtype)
    if replicas > 1 or emit_config is not None:
        if dense:
            raise UserError("--dense serves on one engine: drop --replicas and --emit-config")
        from dataclasses import asdict

        from .cluster.deploy import ClusterArgs

        args = ClusterArgs(str(model), replicas, route, served_model_name or model.resolve().name, api_key,
                           asdict(cfg), dtype, max_queued, threads, num_cpus, num_gpus, affinity_bound).check()
        if emit_config is not None:
            from .atomic import atomic_write_text
            from .cluster.deploy import config_yaml

            atomic_write_text(emit_config, config_yaml(args, host, port))
            typer.echo(f"wrote {emit_config}: on a Ray cluster, `serve deploy {emit_config}` (docs/scale-out.md)")
            return
        return _serve_replicas(args, host, port)
    if threads < 0:
        raise UserError("--threads must be >= 0")
    if threads:
        import torch

        torch.set_num_threads(threads)
    else:
        backbone.env_threads()
    if dense:
        from .modeling import load_readme
        from .serving.engine import eos_ids

        moe, tok = load_readme(str(model), dt)
        d, _ = backbone.load_dense(moe.config.parent_model, dt)
        dm = dense_on_engine(d, moe)
        del d
        check_supported(dm, serving=True)
        engine = Engine(dm, cfg, eos_token_id=eos_ids(moe, tok), tokenizer=tok)
    else:
        engine = Engine.from_pretrained(model, cfg, dtype=dt)
        check_supported(engine.moe, serving=True)
    name = served_model_name or (f"{model.resolve().name}-dense" if dense else model.resolve().name)
    app_ = build_app(EngineThread(engine, max_queued=max_queued), name, api_key)
    packed = ", weights prepacked for oneDNN" if engine.packed else ""
    packed += ", shared expert merged into each routed one" if engine.merged else ""
    typer.echo(f"serving {model} as '{name}' in {str(dt).removeprefix('torch.')}{packed} on http://{host}:{port}/v1 "
               "(metrics at /metrics); Ctrl-C or SIGTERM drains")
    if engine.cfg.capacity is not None and engine.cache.store.kind == "disk":
        typer.echo(f"experts on disk: {engine.cache.store.copy_reason}")
    run_server(app_, host, port, drain_timeout)
    typer.echo("drained; bye")


def _serve_replicas(args, host: str, port: int) -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError("--replicas > 1 needs Ray Serve: pip install 'readmoe[cluster]'")
    from .cluster.deploy import run

    typer.echo(f"deploying {args.replicas} engine replicas of {args.model} on Ray Serve (route: {args.route}) ...")
    run(args, host, port, on_ready=lambda: typer.echo(
        f"serving '{args.served_model_name}' on http://{host}:{port}/v1 (metrics at /metrics); Ctrl-C or SIGTERM "
        "stops the deployment"))
    typer.echo("stopped; bye")


def flag_speak(message: str) -> str:
    """A library message in the CLI's words: a parameter in backticks becomes its flag (`seq_len` -> --seq-len,
    `overwrite=True` -> --overwrite); backticked commands (`readmoe calibrate`) stay as they are."""
    return re.sub(r"`([a-z][a-z0-9_]*)(?:=True)?`", lambda m: "--" + m.group(1).replace("_", "-"), message)


def main() -> None:
    try:  # typer vendors click since 0.25; the exceptions are click's either way
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer on plain click
        from click import exceptions as cx

    from .backbone import quiet

    try:
        with quiet():  # the CLI's own progress bars and messages say what happens; HF's stay at error level
            code = app(standalone_mode=False)
    except UserError as e:
        print(f"error: {flag_speak(str(e))}", file=sys.stderr)
        sys.exit(2)
    except cx.NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except cx.UsageError as e:  # a bad flag or value: one line, like every other user error
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except PermissionError as e:
        print(f"error: cannot write {e.filename}: permission denied; choose another --out", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
