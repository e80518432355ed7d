"""Carve experts out of the dense MLPs and assemble a ReadMEForCausalLM.

Domain mode (the paper): per domain and layer keep the top-`keep` neurons by
mean |activation|; the shared expert is their intersection over domains and
routed expert i is domain i's set minus the shared set, so expert i is one
path through all layers. Domain-free mode (MoEfication / LLaMA-MoE style): the
most active neurons form the shared expert and the rest are split into K
equal-size clusters of co-activating neurons (balanced k-means on the
activation sketches recorded by `calibrate`).
"""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig

from . import backbone
from .calibrate import Stats
from .errors import UserError
from .modeling import ReadMEConfig, ReadMEForCausalLM

Sets = tuple[list[torch.Tensor], list[list[torch.Tensor]]]  # shared[l], experts[l][e]: dense neuron indices


def check_keep(keep: float) -> None:
    if not (0.0 < keep <= 1.0):
        raise UserError(f"--keep must lie in (0, 1], got {keep}")


def domain_sets(mean: torch.Tensor, keep: float) -> Sets:
    """mean [D, L, I] -> shared = ∩ top-keep masks, expert d = mask d minus shared."""
    check_keep(keep)
    D, L, I = mean.shape
    k = max(1, round(keep * I))
    masks = torch.zeros(D, L, I, dtype=torch.bool)
    masks.scatter_(2, mean.topk(k, dim=2).indices, True)
    shared_mask = masks.all(0)
    shared = [shared_mask[l].nonzero().flatten() for l in range(L)]
    experts = [[(masks[d, l] & ~shared_mask[l]).nonzero().flatten() for d in range(D)] for l in range(L)]
    return shared, experts


def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Cluster rows of x (unit vectors) into k clusters of equal size (±1) by cosine similarity."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(n, generator=g)[:k]].clone()
    cap = [n // k + (1 if c < n % k else 0) for c in range(k)]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ cent.T  # [n, k]
        # greedy balanced assignment: strongest (neuron, cluster) affinities first
        order = torch.argsort(sim.flatten(), descending=True).tolist()
        left, taken, assign_new = list(cap), torch.zeros(n, dtype=torch.bool), torch.empty(n, dtype=torch.long)
        todo = n
        for flat in order:
            i, c = divmod(flat, k)
            if not taken[i] and left[c]:
                taken[i] = True
                assign_new[i] = c
                left[c] -= 1
                todo -= 1
                if not todo:
                    break
        if torch.equal(assign_new, assign):
            break
        assign = assign_new
        for c in range(k):
            cent[c] = torch.nn.functional.normalize(x[assign == c].mean(0), dim=0)
    return assign


def cluster_sets(stats: Stats, num_experts: int, keep: float) -> Sets:
    """Shared = most active neurons; the rest split into `num_experts` co-activation clusters.

    The shared share s solves s + (1 - s) / K = keep, so one token's active MLP is `keep` of the dense one."""
    check_keep(keep)
    K = num_experts
    if K < 2:
        raise UserError("--experts must be >= 2")
    if keep < 1.0 / K:
        raise UserError(f"--keep {keep} is below 1/--experts ({1 / K:.3f}): every neuron is in some expert in domain-free mode")
    s = (keep * K - 1) / (K - 1)
    mean = neuron_scores(stats)  # [L, I]
    L, I = mean.shape
    n_shared = round(s * I)
    shared, experts = [], []
    for l in range(L):
        order = torch.argsort(mean[l], descending=True)
        sh, rest = order[:n_shared].sort().values, order[n_shared:]
        feat = stats.sketch[l, rest] - mean[l, rest, None] * stats.sketch_sum[None]  # centred co-activation sketch
        feat = torch.nn.functional.normalize(feat.float(), dim=1)
        assign = balanced_kmeans(feat, K, seed=l)
        shared.append(sh)
        experts.append([rest[assign == c].sort().values for c in range(K)])
    return shared, experts


def text_config_of(dense):
    d = backbone.text_config(dense).to_dict()
    d.pop("quantization_config", None)
    return AutoConfig.for_model(**d)


def router_dims(hidden: int, dim: int | None) -> dict:
    dim = dim or (512 if hidden >= 2048 else 128)
    if dim % 8:
        raise UserError("--router-dim must be a multiple of 8")
    return {"router_dim": dim, "router_heads": 4, "router_layers": 1, "router_ffn_dim": int(math.ceil(dim * 8 / 3 / 32) * 32)}


@torch.no_grad()
def build_model(dense, sets: Sets, names: list[str], keep: float, mode: str, parent: str,
                router_dim: int | None = None, seed: int = 0, scores: torch.Tensor | None = None,
                routing: str = "pregate") -> ReadMEForCausalLM:
    """Deterministic: the same inputs give the same checkpoint (the router's random init is seeded).
    `scores` [L, I] (neuron importance) is stored for the pruned baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(dense, sets, names, keep, mode, parent, router_dim, routing)
    if scores is not None:
        model.neuron_scores.copy_(scores)
    return model.to(next(dense.parameters()).dtype)  # the router and buffers too: one dtype, as the parent's


def neuron_scores(stats: Stats) -> torch.Tensor:
    """[L, I] token-weighted mean |activation| over domains: one ranking of every layer's neurons."""
    w = torch.tensor(stats.tokens, dtype=torch.float32)
    return (stats.mean.float() * (w / w.sum())[:, None, None]).sum(0)


def _build_model(dense, sets: Sets, names, keep, mode, parent, router_dim, routing="pregate") -> ReadMEForCausalLM:
    shared, experts = sets
    tc = text_config_of(dense)
    cfg = ReadMEConfig(text_config=tc, expert_names=list(names), shared_sizes=[len(s) for s in shared],
                       expert_sizes=[[len(e) for e in ex] for ex in experts], keep=keep, carve_mode=mode,
                       parent_model=parent, parent_fingerprint=backbone.fingerprint(dense), routing=routing,
                       **router_dims(tc.hidden_size, router_dim))
    model = ReadMEForCausalLM(cfg)
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.backbone.load_state_dict(sd, strict=False)
    missing = [k for k in missing if ".mlp." not in k and k not in model.backbone.all_tied_weights_keys]
    if missing or unexpected:
        raise RuntimeError(f"backbone weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for l, (dm, mm) in enumerate(zip(backbone.mlps(dense), model.moe_layers())):
        _fill(mm.shared, dm, shared[l], down_bias=True)
        for e, idx in enumerate(experts[l]):
            _fill(mm.experts[e], dm, idx, down_bias=False)
    model.backbone.tie_weights()
    if model.router is not None:
        model.router.init_embedding_from(dense.get_input_embeddings().weight)
    model.eval()
    return model


def _fill(dst, src, idx: torch.Tensor, down_bias: bool) -> None:
    idx = idx.to(torch.long)
    dst.neuron_idx.copy_(idx)
    dst.gate_proj.weight.copy_(src.gate_proj.weight[idx])
    dst.up_proj.weight.copy_(src.up_proj.weight[idx])
    dst.down_proj.weight.copy_(src.down_proj.weight[:, idx])
    for name in ("gate_proj", "up_proj"):
        if getattr(src, name).bias is not None:
            getattr(dst, name).bias.copy_(getattr(src, name).bias[idx])
    if down_bias and src.down_proj.bias is not None:
        dst.down_proj.bias.copy_(src.down_proj.bias)


def param_summary(model: ReadMEForCausalLM) -> dict:
    """Total, active (shared + one routed expert of mean size per layer), router, and MoE parts."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    router = sum(p.numel() for p in model.router_parameters())
    routed = sum(sum(p.numel() for p in e.parameters()) for m in model.moe_layers() for e in m.experts)
    mean_routed = sum(sum(sum(p.numel() for p in e.parameters()) for e in m.experts) / max(len(m.experts), 1)
                      for m in model.moe_layers())
    return {"total": total, "active": int(total - routed + mean_routed), "router": router, "routed": routed}


def dense_params(dense) -> int:
    return sum(p.numel() for p in {id(p): p for p in dense.parameters()}.values())


def carve_table(model: ReadMEForCausalLM) -> list[dict]:
    rows = []
    inter = model.config.text_config.intermediate_size
    for l, (sh, ex) in enumerate(model.neuron_sets()):
        sizes = [len(e) for e in ex]
        covered = torch.unique(torch.cat([sh, *ex])).numel()
        rows.append({"layer": l, "shared_pct": 100 * len(sh) / inter, "routed_min_pct": 100 * min(sizes) / inter,
                     "routed_mean_pct": 100 * sum(sizes) / len(sizes) / inter, "routed_max_pct": 100 * max(sizes) / inter,
                     "covered_pct": 100 * covered / inter})
    return rows


def check_stats_match(stats: Stats, dense) -> None:
    fp = backbone.fingerprint(dense)
    L = len(backbone.mlps(dense))
    I = backbone.mlps(dense)[0].down_proj.in_features
    recorded = {stats.fingerprint, stats.meta.get("fingerprint_bf16")}
    if not backbone.same_model(recorded, dense) or tuple(stats.mean.shape[1:]) != (L, I):
        raise UserError(f"stats were computed on another model (shape {tuple(stats.mean.shape[1:])}, fingerprint "
                        f"{stats.fingerprint}) than this one ({(L, I)}, {fp}); re-run `readmoe calibrate` with this --model")
    if not stats.complete:
        raise UserError("stats file is incomplete (calibration was interrupted); re-run `readmoe calibrate` to finish it")
