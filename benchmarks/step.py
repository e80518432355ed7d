"""Engine decode-step time at several batch sizes, MoE against its dense parent, interleaved rounds.

Each round builds a fresh engine per (model, batch), prefills `batch` prompts of --context
tokens, then times --tokens decode steps (all experts resident, decode-first). The report
gives each variant's median step time over rounds with the min-max spread, and the MoE/dense
ratio per round. Run: `python benchmarks/step.py --model runs/demo/model --out runs/step`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from readmoe import report
from readmoe.backbone import load_dense
from readmoe.modeling import load_readme
from readmoe.cli import dense_on_engine
from readmoe.serving.engine import Engine, EngineConfig
from readmoe.serving.request import SamplingParams


def decode_ms(model, checkpoint, batch: int, context: int, tokens: int, vocab: int) -> float:
    """Median decode-step time (ms) of `batch` requests decoding together, after their prefill."""
    g = torch.Generator().manual_seed(batch)
    with Engine(model, EngineConfig(scheduler="decode-first", token_budget=batch * context, max_running=batch),
                checkpoint=checkpoint) as eng:
        for _ in range(batch):
            eng.submit(torch.randint(0, vocab, (context,), generator=g).tolist(),
                       SamplingParams(max_tokens=tokens, ignore_eos=True))
        while eng.has_work():
            eng.step()
        times = [s.seconds for s in eng.stats.steps if s.tokens == batch and s.step > 1][2:]  # decode, warm
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--out", default="runs/step")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    moe, _ = load_readme(a.model, dtype)
    dense = dense_on_engine(load_dense(moe.config.parent_model, dtype)[0], moe).to(dtype)
    vocab = moe.config.text_config.vocab_size
    batches = [int(b) for b in a.batches.split(",")]
    ms: dict[str, list[float]] = {}
    for _ in range(a.rounds):  # interleaved: every variant once per round
        for b in batches:
            for name, m, ck in (("moe", moe, a.model), ("dense", dense, None)):
                ms.setdefault(f"{name}.b{b}", []).append(decode_ms(m, ck, b, a.context, a.tokens, vocab))
    rows, data = [], {"settings": vars(a) | {"threads": torch.get_num_threads()}, "ms": ms, "batches": {}}
    for b in batches:
        ratios = [d / m for m, d in zip(ms[f"moe.b{b}"], ms[f"dense.b{b}"])]
        data["batches"][b] = {"moe_ms": statistics.median(ms[f"moe.b{b}"]),
                              "dense_ms": statistics.median(ms[f"dense.b{b}"]),
                              "speedup": statistics.median(ratios), "speedup_min": min(ratios),
                              "speedup_max": max(ratios)}
        d = data["batches"][b]
        rows.append([b, d["moe_ms"], d["dense_ms"], f"{d['speedup']:.2f}x ({d['speedup_min']:.2f}-{d['speedup_max']:.2f})"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(data, indent=1))
    h = ["batch", "MoE step ms", "dense step ms", "dense/MoE (spread)"]
    report.print_table(f"decode step, {a.dtype}, context {a.context}, {a.rounds} interleaved rounds", h, rows)
    (out / "report.md").write_text(report.markdown_table(h, rows))


if __name__ == "__main__":
    main()
