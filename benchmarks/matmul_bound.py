"""How fast the batch-1 decode step could be if it were nothing but its matmuls: MoE against its dense parent.

For each model at the engine's defaults (bf16 on this CPU: prepacked, merged experts) it times a lone request's
decode step, then the same step's weight matmuls alone, in the step's order with the step's own weights
(`StepRunner.decode_weights`): per layer q/k/v, o, and the MLP (the MoE: its shared and one routed expert merged,
as every batch-1 MoE step runs; the dense parent: its whole MLP), then the lm_head. No norms, attention, rotary,
KV writes, router or Python bookkeeping. The matmuls' ratio is the most a batch-1 step can gain from the carve on
this machine; what the real step loses against it is the overhead both models share. This is the measurement
`readmoe bench serve` makes for its batch-1 goal (`batch1_decode`), with the overhead spelled out.
Run: `python benchmarks/matmul_bound.py --model runs/demo/model --out runs/matmul-bound`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from readmoe import backbone, report
from readmoe import dtype as dtypes
from readmoe.atomic import atomic_write_text
from readmoe.backbone import load_dense
from readmoe.modeling import load_readme
from readmoe.pipeline import dense_on_engine
from readmoe.serving.bench import batch1_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--out", default="runs/matmul-bound")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    backbone.env_threads()
    dt = dtypes.resolve("auto")
    moe, _ = load_readme(a.model, dt)
    dense = dense_on_engine(load_dense(moe.config.parent_model, dt)[0], moe)
    b = batch1_decode(moe, a.model, dense, list(range(100, 132)), a.rounds)
    b.update(dtype=dtypes.name(dt), threads=torch.get_num_threads(),
             overhead_ms={"moe": b["moe_ms"] - b["moe_matmul_ms"], "dense": b["dense_ms"] - b["dense_matmul_ms"]},
             # what both steps could spend outside their matmuls for the MoE's to be 1.3x faster
             overhead_ms_for_1_3x=(b["dense_matmul_ms"] - 1.3 * b["moe_matmul_ms"]) / 0.3)
    h = ["", "MoE ms", "dense ms", "dense/MoE (min-max)"]
    rows = [["matmuls only", b["moe_matmul_ms"], b["dense_matmul_ms"], f"{b['bound']:.2f}x ({b['bound_min']:.2f}-{b['bound_max']:.2f})"],
            ["engine step", b["moe_ms"], b["dense_ms"], f"{b['speedup']:.2f}x ({b['speedup_min']:.2f}-{b['speedup_max']:.2f})"]]
    note = (f"\nOverhead outside the matmuls now: MoE {b['overhead_ms']['moe']:.1f} ms, dense {b['overhead_ms']['dense']:.1f} ms. "
            f"For a 1.3x step both would have to spend under {b['overhead_ms_for_1_3x']:.1f} ms outside their matmuls.\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(b, indent=1))
    report.print_table(f"batch-1 decode, {b['dtype']}, {a.rounds} interleaved rounds (medians)", h, rows)
    print(note)
    atomic_write_text(out / "report.md", report.markdown_table(h, rows) + note)


if __name__ == "__main__":
    main()
