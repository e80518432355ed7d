"""How fast the batch-1 decode step could be if it were nothing but its matmuls: MoE against its dense parent.

Builds each model's engine at the defaults (bf16 on this CPU: prepacked, merged experts), then times only the
weight matmuls of one batch-1 decode step, in the order the step runs them and with the weights the step uses:
per layer q/k/v, o, and the MLP's gate+up and down (the MoE: its shared and one routed expert merged, as every
batch-1 MoE step runs; the dense parent: its whole MLP), then the lm_head. No norms, attention, rotary, KV
writes, router or Python bookkeeping. The ratio of the two is the most a batch-1 step can gain from the carve on
this machine; what the real step loses against it is the overhead both models share. Each round times both
models (interleaved), and the report gives medians and the spread of the ratio, next to the real engine step
measured in the same rounds (`readmoe.serving.bench.decode_step_ms`).
Run: `python benchmarks/matmul_bound.py --model runs/demo/model --out runs/matmul-bound`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from readmoe import backbone, report
from readmoe.atomic import atomic_write_text
from readmoe.backbone import load_dense
from readmoe import dtype as dtypes
from readmoe.modeling import load_readme
from readmoe.pipeline import dense_on_engine
from readmoe.serving.bench import decode_step_ms
from readmoe.serving.engine import Engine, EngineConfig


def matmuls(eng: Engine) -> list:
    """The weights of one batch-1 decode step's matmuls, in the step's order (plain tensors, or the runner's
    callable projections, packed or not)."""
    r = eng.runner
    out = []
    for l in range(len(r.layers)):
        one = r.merged.one[l][0] if r.merged is not None else None
        out += [r.qkv[l], r.o_proj[l], *(one if one is not None else (r.shared_gu[l], r.shared_down[l]))]
    return out + [r.lm_head]


def in_features(w) -> int:
    return w.shape[1] if isinstance(getattr(w, "shape", None), tuple) else w.weight.shape[1]


@torch.no_grad()
def matmul_ms(seq: list, dtype, reps: int = 30) -> float:
    """Median time of the whole sequence, each matmul on a fresh [1, in] row."""
    xs = [torch.randn(1, in_features(w), dtype=dtype) for w in seq]
    times = []
    for i in range(reps + 5):
        t = time.perf_counter()
        for w, x in zip(seq, xs):
            w(x) if callable(w) else F.linear(x, w)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


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
    prompt = list(range(100, 132))
    ms: dict[str, list[float]] = {k: [] for k in ("moe_matmuls", "dense_matmuls", "moe_step", "dense_step")}
    for _ in range(a.rounds):  # interleaved
        for name, model, ck in (("moe", moe, a.model), ("dense", dense, None)):
            with Engine(model, EngineConfig(max_running=1), checkpoint=ck) as eng:
                ms[f"{name}_matmuls"].append(matmul_ms(matmuls(eng), dt))
            ms[f"{name}_step"].append(decode_step_ms(model, ck, prompt))
    med = {k: statistics.median(v) for k, v in ms.items()}
    ratio = lambda d, m: [x / y for x, y in zip(ms[d], ms[m])]  # noqa: E731
    bound, real = ratio("dense_matmuls", "moe_matmuls"), ratio("dense_step", "moe_step")
    data = {"dtype": dtypes.name(dt), "threads": torch.get_num_threads(), "rounds": a.rounds, "ms": ms,
            "median_ms": med, "bound": statistics.median(bound), "bound_spread": [min(bound), max(bound)],
            "step_ratio": statistics.median(real), "step_ratio_spread": [min(real), max(real)],
            # what both steps could spend outside their matmuls for the MoE's to be 1.3x faster
            "overhead_ms_for_1_3x": (med["dense_matmuls"] - 1.3 * med["moe_matmuls"]) / 0.3,
            "overhead_ms_now": {m: med[f"{m}_step"] - med[f"{m}_matmuls"] for m in ("moe", "dense")}}
    h = ["", "MoE ms", "dense ms", "dense/MoE (min-max)"]
    rows = [["matmuls only", med["moe_matmuls"], med["dense_matmuls"],
             f"{data['bound']:.2f}x ({min(bound):.2f}-{max(bound):.2f})"],
            ["engine step", med["moe_step"], med["dense_step"],
             f"{data['step_ratio']:.2f}x ({min(real):.2f}-{max(real):.2f})"]]
    note = (f"\nOverhead outside the matmuls now: MoE {data['overhead_ms_now']['moe']:.1f} ms, dense "
            f"{data['overhead_ms_now']['dense']:.1f} ms. For a 1.3x step both would have to spend under "
            f"{data['overhead_ms_for_1_3x']:.1f} ms outside their matmuls.\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(data, indent=1))
    report.print_table(f"batch-1 decode, {data['dtype']}, {a.rounds} interleaved rounds (medians)", h, rows)
    print(note)
    atomic_write_text(out / "report.md", report.markdown_table(h, rows) + note)


if __name__ == "__main__":
    main()
