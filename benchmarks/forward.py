"""Forward latency of the carved MoE vs its dense parent, on the same HF code path.

Measures prefill (one sequence of --prefill tokens) and one decode step with a
KV cache of --context tokens, at batch 1 and batch 16; at batch 16 the tokens
either all use one expert or are spread over all experts. Writes
report.json / report.md under --out. Run: `make bench` or
`python benchmarks/forward.py --model runs/demo/model --out runs/bench`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from readmoe import backbone, report
from readmoe.carve import param_summary


def timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def decode_step(model, batch: int, context: int, vocab: int, expert_ids=None, warmup=3, iters=15) -> float:
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (batch, context), generator=g)
    kw = {} if expert_ids is None else {"expert_ids": expert_ids if isinstance(expert_ids, int) else expert_ids[:, :context]}
    cache = DynamicCache(config=model.config.get_text_config())
    model(input_ids=prefix, past_key_values=cache, use_cache=True, **kw)
    nxt = torch.randint(0, vocab, (batch, 1), generator=g)
    step_kw = {} if expert_ids is None else {"expert_ids": expert_ids if isinstance(expert_ids, int) else expert_ids[:, context:]}

    def step():
        model(input_ids=nxt, past_key_values=cache, use_cache=True, **step_kw)
        cache.crop(-1)

    return timed(step, warmup, iters)


@torch.inference_mode()
def prefill(model, length: int, vocab: int, expert_ids=None, iters=3) -> float:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(1))
    kw = {} if expert_ids is None else {"expert_ids": expert_ids}
    return timed(lambda: model(input_ids=ids, use_cache=False, **kw), 1, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/model", help="readmoe checkpoint (default: the demo's)")
    ap.add_argument("--dense", default=None, help="dense parent (default: recorded in the checkpoint)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--iters", type=int, default=15)
    a = ap.parse_args()
    from readmoe.modeling import load_readme

    backbone.env_threads()
    moe, _ = load_readme(a.model)
    dense, _ = backbone.load_dense(a.dense or moe.config.parent_model)
    V, E = moe.config.text_config.vocab_size, moe.num_experts
    mixed = (torch.arange(16 * (a.context + 1)) % E).view(16, a.context + 1)  # every expert present in each step
    rows = []

    def add(name, d, m, note=""):
        rows.append({"case": name, "dense_ms": 1000 * d, "moe_ms": 1000 * m, "speedup": d / m, "note": note})
        print(f"{name:36s} dense {1000 * d:8.1f} ms   moe {1000 * m:8.1f} ms   x{d / m:.2f}", flush=True)

    add(f"prefill {a.prefill} tok, batch 1", prefill(dense, a.prefill, V), prefill(moe, a.prefill, V, 0), "one expert")
    add("decode step, batch 1", decode_step(dense, 1, a.context, V, iters=a.iters),
        decode_step(moe, 1, a.context, V, 0, iters=a.iters), "expert 0")
    add("decode step, batch 1, router", decode_step(dense, 1, a.context, V, iters=a.iters),
        decode_step(moe, 1, a.context, V, None, iters=a.iters), "router picks")
    d16 = decode_step(dense, 16, a.context, V, iters=a.iters)
    add("decode step, batch 16, one expert", d16, decode_step(moe, 16, a.context, V, 0, iters=a.iters), "all tokens expert 0")
    add(f"decode step, batch 16, {E} experts", d16, decode_step(moe, 16, a.context, V, mixed, iters=a.iters),
        "tokens spread over all experts")
    ids = torch.randint(0, V, (1, 1))
    with torch.inference_mode():
        router_ms = 1000 * timed(lambda: moe.router(ids, cache=None), 3, a.iters)
    params = param_summary(moe)
    data = {"model": a.model, "threads": torch.get_num_threads(), "context": a.context, "rows": rows,
            "router_ms_per_token": router_ms, "params": params}
    md = ("# Forward latency: MoE vs dense parent\n\n"
          f"{torch.get_num_threads()} threads, KV context {a.context} tokens, median of {a.iters} runs.\n\n"
          + report.markdown_table(["case", "dense ms", "MoE ms", "speed-up", "note"],
                                  [[r["case"], r["dense_ms"], r["moe_ms"], f"{r['speedup']:.2f}x", r["note"]] for r in rows])
          + f"\nRouter alone: {router_ms:.2f} ms per token.\n")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    report.write(Path(a.out) / "report.json", data, md)
    print(md)


if __name__ == "__main__":
    main()
