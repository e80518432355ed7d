"""Would `torch.compile` make the batch-1 decode step 1.3x faster than the dense parent's? MoE against dense.

The engine's step is eager PyTorch: at batch 1 it spends about as long outside its matmuls as in them (see
`benchmarks/matmul_bound.py`). This builds the same lone-request decode step in gpt-fast's style for each model
(one token, a fixed KV cache of `--context` positions written in place, q/k/v and gate/up as one matmul each,
the MoE's shared and routed expert merged as a one-expert engine step runs them) from the checkpoint's weights,
then times it eager and compiled by inductor with freezing (weights become constants and are prepacked for
oneDNN, as the engine packs them). Interleaved rounds, medians. `--breakdown` also times compiled variants
without the KV writes and without attention (wrong outputs, for the cost split only).
Run: `python benchmarks/compiled_decode.py --model runs/demo/model --out runs/compiled-decode` (about 5 min).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from readmoe import backbone, report
from readmoe import dtype as dtypes
from readmoe.atomic import atomic_write_text
from readmoe.backbone import load_dense
from readmoe.modeling import load_readme


class Decode(nn.Module):
    """One decode token of a Llama-style decoder: embeddings, per layer norm -> qkv -> rotary -> KV write ->
    attention -> o -> norm -> gate/up -> down, then the lm_head. `skip` drops "kv" writes or "attention"."""

    def __init__(self, model, expert: int | None, context: int, skip: str = ""):
        super().__init__()
        bb = getattr(model, "backbone", model)
        m, tc = bb.model, bb.config
        self.heads, self.kv_heads = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // self.heads
        self.eps, self.skip, self.n = tc.rms_norm_eps, skip, len(m.layers)
        frozen = lambda w: nn.Parameter(w.detach().contiguous(), requires_grad=False)  # noqa: E731
        ws = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            parts = [mlp] if expert is None else [mlp.shared, mlp.experts[expert]]
            gu = torch.cat([p.gate_proj.weight for p in parts] + [p.up_proj.weight for p in parts])
            down = torch.cat([p.down_proj.weight for p in parts], 1)
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            ws += [layer.input_layernorm.weight, qkv, a.o_proj.weight, layer.post_attention_layernorm.weight, gu, down]
        self.ws = nn.ParameterList([frozen(w) for w in ws])
        self.embed, self.norm_w, self.lm_head = frozen(m.embed_tokens.weight), frozen(m.norm.weight), frozen(bb.lm_head.weight)
        dt = self.lm_head.dtype
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(self.n, 1, self.kv_heads, context, self.head_dim, dtype=dt))
        pos = torch.arange(context)[None]
        cos, sin = m.rotary_emb(torch.zeros(1, context, 1, dtype=dt), pos)
        self.register_buffer("cos", cos[0].to(dt))
        self.register_buffer("sin", sin[0].to(dt))
        self.register_buffer("positions", torch.arange(context))

    def _norm(self, x, w):
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @staticmethod
    def _rope(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.embedding(token, self.embed)  # [1, 1, hidden]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        mask = (self.positions <= pos)[None, None]
        nq, nk, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        for l in range(self.n):
            ln1, qkv_w, o_w, ln2, gu_w, down_w = self.ws[6 * l:6 * l + 6]
            qkv = F.linear(self._norm(x, ln1), qkv_w)
            q = self._rope(qkv[..., :nq].view(1, 1, self.heads, d), cos, sin).transpose(1, 2)
            k = self._rope(qkv[..., nq:nq + nk].view(1, 1, self.kv_heads, d), cos, sin).transpose(1, 2)
            v = qkv[..., nq + nk:].view(1, 1, self.kv_heads, d).transpose(1, 2)
            if "kv" not in self.skip:
                self.k[l].index_copy_(2, pos, k)
                self.v[l].index_copy_(2, pos, v)
            if "attention" in self.skip:
                y = q
            else:
                y = F.scaled_dot_product_attention(q, self.k[l], self.v[l], attn_mask=mask, enable_gqa=True)
            x = x + F.linear(y.transpose(1, 2).reshape(1, 1, nq), o_w)
            g, u = F.linear(self._norm(x, ln2), gu_w).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, down_w)
        return F.linear(self._norm(x, self.norm_w), self.lm_head)


@torch.no_grad()
def step_ms(fn, context: int, tokens: int = 24) -> float:
    """Median ms of `tokens` decode steps at positions in the second half of the context."""
    start, ts = context // 2, []
    for p in range(start, start + tokens):
        t = time.perf_counter()
        fn(torch.tensor([[11]]), torch.tensor([p]))
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--out", default="runs/compiled-decode")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--breakdown", action="store_true", help="also time the compiled MoE step without KV writes / attention")
    a = ap.parse_args()
    backbone.env_threads()
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights as constants, prepacked for oneDNN
    dt = dtypes.resolve("auto")
    moe, _ = load_readme(a.model, dt)
    dense = load_dense(moe.config.parent_model, dt)[0]
    variants = {"moe": Decode(moe, 0, a.context).eval(), "dense": Decode(dense, None, a.context).eval()}
    if a.breakdown:
        variants["moe, no KV writes"] = Decode(moe, 0, a.context, skip="kv").eval()
        variants["moe, no KV writes or attention"] = Decode(moe, 0, a.context, skip="kv,attention").eval()
    fns, compile_s, check = {}, {}, {}
    with torch.no_grad():
        for name, mod in variants.items():
            t = time.time()
            c = torch.compile(mod, dynamic=False)
            c(torch.tensor([[5]]), torch.tensor([0]))
            compile_s[name] = round(time.time() - t, 1)
            fns[name, "eager"], fns[name, "compiled"] = mod, c
            if not mod.skip:  # outputs of the full steps: compiled against eager
                e, cc = mod(torch.tensor([[7]]), torch.tensor([1])), c(torch.tensor([[7]]), torch.tensor([1]))
                check[name] = {"max_abs_diff": float((e.float() - cc.float()).abs().max()), "same_argmax": bool(e.argmax() == cc.argmax())}
            print(f"compiled {name} in {compile_s[name]} s", flush=True)
    times = {k: [] for k in fns}
    for _ in range(a.rounds):
        for k, f in fns.items():
            times[k].append(step_ms(f, a.context))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {mode: [d / m for m, d in zip(times["moe", mode], times["dense", mode])] for mode in ("eager", "compiled")}
    out = {"dtype": dtypes.name(dt), "threads": torch.get_num_threads(), "context": a.context, "rounds": a.rounds,
           "ms": {f"{n} {mode}": v for (n, mode), v in med.items()}, "compile_s": compile_s, "compiled_vs_eager": check,
           "dense_over_moe": {mode: {"median": statistics.median(r), "min": min(r), "max": max(r)} for mode, r in ratios.items()}}
    h = ["step", "eager ms", "compiled ms"]
    rows = [[n, med[n, "eager"], med[n, "compiled"]] for n in variants]
    rows += [["dense / MoE", *(f"{statistics.median(ratios[m]):.2f}x ({min(ratios[m]):.2f}-{max(ratios[m]):.2f})" for m in ("eager", "compiled"))]]
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outdir / "report.json", json.dumps(out, indent=1))
    title = f"batch-1 decode, gpt-fast style, {out['dtype']}, context {a.context}, {a.rounds} interleaved rounds (medians)"
    report.print_table(title, h, rows)
    atomic_write_text(outdir / "report.md", f"# {title}\n\n" + report.markdown_table(h, rows) + "\n")


if __name__ == "__main__":
    main()
