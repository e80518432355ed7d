"""Engine decode-step time at several batch sizes: MoE against its dense parent, fp32 against bf16.

A dtype `bfloat16:plain` runs bf16 without prepacked weights (the engine's `pack_weights=False`), to
show what packing for oneDNN gives; plain `bfloat16` is the engine's default (packed on CPU cores).
Each round builds a fresh engine per (dtype, model, batch), prefills `batch` prompts of --context
tokens, then times --tokens decode steps (all experts resident, decode-first). Every variant runs
once per round (interleaved), and the report gives each variant's median step time over rounds,
and the median and min-max of the per-round ratios: dense/MoE per dtype, fp32/bf16 per model.
Run: `python benchmarks/step.py --model runs/demo/model --out runs/step`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from readmoe import report
from readmoe.atomic import atomic_write_text
from readmoe.backbone import load_dense
from readmoe.modeling import load_readme
from readmoe.pipeline import dense_on_engine
from readmoe.serving.engine import Engine, EngineConfig
from readmoe.serving.request import SamplingParams


def decode_ms(model, checkpoint, batch: int, context: int, tokens: int, vocab: int, pack="auto") -> float:
    """Median decode-step time (ms) of `batch` requests decoding together, after their prefill."""
    g = torch.Generator().manual_seed(batch)
    with Engine(model, EngineConfig(scheduler="decode-first", token_budget=batch * context, max_running=batch,
                                    pack_weights=pack), checkpoint=checkpoint) as eng:
        for _ in range(batch):
            eng.submit(torch.randint(0, vocab, (context,), generator=g).tolist(),
                       SamplingParams(max_tokens=tokens, ignore_eos=True))
        while eng.has_work():
            eng.step()
        times = [s.seconds for s in eng.stats.steps if s.tokens == batch and s.step > 1][2:]  # decode, warm
    return 1000 * statistics.median(times)


def torch_dtype(spec: str) -> torch.dtype:
    """`bfloat16:plain` -> torch.bfloat16."""
    return getattr(torch, spec.split(":")[0])


def ratio(num: list[float], den: list[float]) -> dict:
    r = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--out", default="runs/step")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16,bfloat16:plain")
    a = ap.parse_args()
    dtypes = a.dtypes.split(",")
    models = {}
    for dt in dtypes:
        torch_dt = torch_dtype(dt)
        same = [v for d, v in models.items() if torch_dtype(d) == torch_dt]
        if same:  # same weights, other engine settings
            models[dt] = same[0]
            continue
        moe, _ = load_readme(a.model, torch_dt)
        models[dt] = {"moe": (moe, a.model), "dense": (dense_on_engine(load_dense(moe.config.parent_model,
                                                                                  torch_dt)[0], moe), None)}
    vocab = moe.config.text_config.vocab_size
    batches = [int(b) for b in a.batches.split(",")]
    ms: dict[str, list[float]] = {}
    for _ in range(a.rounds):  # interleaved: every variant once per round
        for b in batches:
            for dt in dtypes:
                for name, (m, ck) in models[dt].items():
                    pack = False if dt.endswith(":plain") else "auto"
                    ms.setdefault(f"{dt}.{name}.b{b}", []).append(decode_ms(m, ck, b, a.context, a.tokens, vocab, pack))
    data = {"settings": vars(a) | {"threads": torch.get_num_threads()}, "ms": ms, "rows": []}
    rows = []
    for b in batches:
        for dt in dtypes:
            moe_ms, dense_ms = ms[f"{dt}.moe.b{b}"], ms[f"{dt}.dense.b{b}"]
            row = {"batch": b, "dtype": dt, "moe_ms": statistics.median(moe_ms), "dense_ms": statistics.median(dense_ms),
                   "dense_over_moe": ratio(dense_ms, moe_ms)}
            if dt != "float32" and "float32" in dtypes:
                row["moe_fp32_over_this"] = ratio(ms[f"float32.moe.b{b}"], moe_ms)
                row["dense_fp32_over_this"] = ratio(ms[f"float32.dense.b{b}"], dense_ms)
            data["rows"].append(row)
            fmt = lambda r: f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else ""  # noqa: E731
            rows.append([b, dt, row["moe_ms"], row["dense_ms"], fmt(row["dense_over_moe"]),
                         fmt(row.get("moe_fp32_over_this")), fmt(row.get("dense_fp32_over_this"))])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(data, indent=1))
    h = ["batch", "dtype", "MoE step ms", "dense step ms", "dense/MoE", "MoE fp32/this", "dense fp32/this"]
    report.print_table(f"decode step, context {a.context}, {a.rounds} interleaved rounds (median, min-max)", h, rows)
    atomic_write_text(out / "report.md", report.markdown_table(h, rows))


if __name__ == "__main__":
    main()
