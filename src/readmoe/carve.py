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

import functools
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from . import backbone, rounding
from .calibrate import Stats
from .errors import UserError
from .modeling import ReadMEConfig, ReadMEForCausalLM

Sets = tuple[list[torch.Tensor], list[list[torch.Tensor]]]  # shared[l], experts[l][e]: dense neuron indices


def check_keep(keep: float) -> None:
    if not (0.0 < keep <= 1.0):
        raise UserError(f"`keep` must lie in (0, 1], got {keep}")


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
        raise UserError("`experts` must be >= 2")
    if keep < 1.0 / K:
        raise UserError(f"`keep` {keep} is below 1/`experts` ({1 / K:.3f}): every neuron is in some expert in domain-free mode")
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
        raise UserError("`router_dim` must be a multiple of 8")
    return {"router_dim": dim, "router_heads": 4, "router_layers": 1, "router_ffn_dim": int(math.ceil(dim * 8 / 3 / 32) * 32)}


@torch.no_grad()
def build_model(dense, sets: Sets, names: list[str], keep: float, mode: str, parent: str,
                router_dim: int | None = None, seed: int = 0, scores: torch.Tensor | None = None,
                routing: str = "pregate") -> ReadMEForCausalLM:
    """Deterministic: the same inputs give the same checkpoint (the router's random init is seeded).
    `scores` [L, I] (neuron importance) is stored for the pruned baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(dense, sets, names, keep, mode, parent, router_dim, routing, seed)
    if scores is not None:
        model.neuron_scores.copy_(scores)
    return model.to(next(dense.parameters()).dtype)  # the router and buffers too: one dtype, as the parent's


def neuron_scores(stats: Stats) -> torch.Tensor:
    """[L, I] token-weighted mean |activation| over domains: one ranking of every layer's neurons."""
    w = torch.tensor(stats.tokens, dtype=torch.float32)
    return (stats.mean.float() * (w / w.sum())[:, None, None]).sum(0)


def readme_config(tc, sets: Sets, names, keep, mode, parent, fingerprint: str, router_dim, routing) -> ReadMEConfig:
    shared, experts = sets
    return ReadMEConfig(text_config=tc, expert_names=list(names), shared_sizes=[len(s) for s in shared],
                        expert_sizes=[[len(e) for e in ex] for ex in experts], keep=keep, carve_mode=mode,
                        parent_model=parent, parent_fingerprint=fingerprint, routing=routing,
                        **router_dims(tc.hidden_size, router_dim))


@torch.no_grad()
def init_router(model: ReadMEForCausalLM, embedding: torch.Tensor, seed: int) -> None:
    """The router's initial weights from `seed` alone, whatever else was initialised before, so the in-memory
    and the streaming carve give the same router; its embedding starts from the parent's."""
    if model.router is None:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.router.apply(model._init_weights)
        model.router.init_embedding_from(embedding)


def _build_model(dense, sets: Sets, names, keep, mode, parent, router_dim, routing="pregate", seed=0) -> ReadMEForCausalLM:
    shared, experts = sets
    cfg = readme_config(text_config_of(dense), sets, names, keep, mode, parent, backbone.fingerprint(dense), router_dim,
                        routing)
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
    init_router(model, dense.get_input_embeddings().weight, seed)
    model.eval()
    return model


class NotStreamable(Exception):
    """The parent's checkpoint names its tensors differently from its model class: carve it in memory."""


class ParentCheckpoint:
    """A dense parent on disk, read tensor by tensor: what streaming carve needs, and its identity."""

    def __init__(self, directory: str | Path):
        from transformers import AutoConfig

        from .checkpoint import Checkpoint

        self.dir = Path(directory)
        full = AutoConfig.from_pretrained(str(self.dir))
        d = (full.get_text_config() if hasattr(full, "get_text_config") else full).to_dict()
        for k in ("quantization_config", "_name_or_path"):
            d.pop(k, None)
        self.text_config = AutoConfig.for_model(**d)
        self.ckpt = Checkpoint(self.dir)
        tc = self.text_config
        self.layers, self.intermediate = tc.num_hidden_layers, tc.intermediate_size
        for l in range(self.layers):
            for p in ("gate_proj", "up_proj", "down_proj"):
                if self.mlp_key(l, p) not in self.ckpt:
                    raise NotStreamable(f"no tensor '{self.mlp_key(l, p)}' in {self.dir}")

    @staticmethod
    def mlp_key(layer: int, proj: str, kind: str = "weight") -> str:
        return f"model.layers.{layer}.mlp.{proj}.{kind}"

    @functools.cached_property
    def fingerprint_pair(self) -> tuple[str, str]:
        """(its fingerprint, its bf16 one), each sampled down_proj read from disk once."""
        read: dict[int, torch.Tensor] = {}
        down = lambda l: read.setdefault(l, self.ckpt.read(self.mlp_key(l, "down_proj")))  # noqa: E731
        return backbone.fingerprint_from(self.text_config, down), backbone.fingerprint_from(self.text_config, down, True)

    def fingerprints(self) -> set[str]:
        return set(self.fingerprint_pair)

    def params(self) -> int:
        return sum(math.prod(self.ckpt.shape(k)) for k in self.ckpt.keys())

    def close(self) -> None:
        self.ckpt.close()


@torch.no_grad()
def carve_streaming(parent: ParentCheckpoint, sets: Sets, names: list[str], keep: float, mode: str, parent_spec: str,
                    out: Path, dtype: torch.dtype, router_dim: int | None = None, seed: int = 0,
                    scores: torch.Tensor | None = None, max_shard_bytes: int = 1 << 30,
                    progress: bool = True) -> ReadMEForCausalLM:
    """`build_model` + `save_pretrained` without either model in memory: the parent is read a tensor at a time and
    the MoE written layer by layer into safetensors shards, so the peak is one parent layer, its carved experts
    and one shard being filled. The checkpoint equals the in-memory carve's, tensor for tensor.

    Returns the MoE's skeleton: shapes on the meta device, neuron indices real (what the carve report needs)."""
    from accelerate import init_empty_weights

    from .checkpoint import ShardWriter
    from .router import PreGatingRouter

    shared, experts = sets
    cfg = readme_config(parent.text_config, sets, names, keep, mode, parent_spec, parent.fingerprint_pair[0], router_dim,
                        "pregate")
    with init_empty_weights():
        model = ReadMEForCausalLM(cfg)
    model.router = PreGatingRouter(cfg.router_config())
    emb_key = "model.embed_tokens.weight"
    init_router(model, parent.ckpt.read(emb_key), seed)
    if scores is not None:
        model.neuron_scores.copy_(scores)
    tied = set(model.all_tied_weights_keys)
    todo = [k for k in model.state_dict() if k not in tied]
    missing = [k[len("backbone."):] for k in todo
               if k.startswith("backbone.") and ".mlp." not in k and k[len("backbone."):] not in parent.ckpt]
    if missing:  # checked before anything is written
        raise NotStreamable(f"no tensor '{missing[0]}' in {parent.dir}")
    cast = lambda k, t: rounding.cast(t, dtype, k) if t.is_floating_point() else t  # noqa: E731
    writer = ShardWriter(out, max_shard_bytes)
    for l, mm in enumerate(tqdm(model.moe_layers(), desc="carve", unit="layer", disable=not progress)):
        prefix = f"backbone.model.layers.{l}."
        group = {k: cast(k, parent.ckpt.read(k[len("backbone."):])) for k in todo if k.startswith(prefix) and ".mlp." not in k}
        dense_mlp = {f"{p}.{kind}": parent.ckpt.read(parent.mlp_key(l, p, kind))
                     for p in ("gate_proj", "up_proj", "down_proj") for kind in ("weight", "bias")
                     if parent.mlp_key(l, p, kind) in parent.ckpt}
        for name, idx, down_bias in [("shared", shared[l], True)] + [(f"experts.{e}", idx, False) for e, idx in enumerate(experts[l])]:
            idx = idx.to(torch.long)
            mm.get_submodule(name).neuron_idx.copy_(idx)
            p = f"{prefix}mlp.{name}."
            group[p + "neuron_idx"] = idx.clone()
            group.update({p + k: cast(p + k, t) for k, t in expert_tensors(dense_mlp, idx, down_bias).items()})
        writer.add(group)
        del dense_mlp, group
    rest = {}
    state = model.state_dict()
    for k in todo:
        if k.startswith("backbone.model.layers."):
            continue
        if k.startswith("backbone."):
            rest[k] = cast(k, parent.ckpt.read(k[len("backbone."):]))
        else:  # the router and the neuron scores: made here, not read
            rest[k] = cast(k, state[k].detach())
    writer.add(rest)
    writer.close()
    cfg.dtype, cfg.architectures = dtype, [ReadMEForCausalLM.__name__]
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return model


def expert_tensors(dense_mlp: dict[str, torch.Tensor], idx: torch.Tensor, down_bias: bool) -> dict[str, torch.Tensor]:
    """The expert over neurons `idx` of a dense MLP given as {"gate_proj.weight": ..., "up_proj.bias": ...}: rows of
    gate and up, columns of down; the down bias only for the shared expert (it is added once per token)."""
    out = {"gate_proj.weight": dense_mlp["gate_proj.weight"][idx], "up_proj.weight": dense_mlp["up_proj.weight"][idx],
           "down_proj.weight": dense_mlp["down_proj.weight"][:, idx]}
    for name in ("gate_proj.bias", "up_proj.bias"):
        if name in dense_mlp:
            out[name] = dense_mlp[name][idx]
    if down_bias and "down_proj.bias" in dense_mlp:
        out["down_proj.bias"] = dense_mlp["down_proj.bias"]
    return out


def _fill(dst, src, idx: torch.Tensor, down_bias: bool) -> None:
    idx = idx.to(torch.long)
    dst.neuron_idx.copy_(idx)
    dense_mlp = {k: v for k, v in src.state_dict(keep_vars=True).items() if v is not None}
    for name, t in expert_tensors(dense_mlp, idx, down_bias).items():
        dst.get_parameter(name).copy_(t)


def param_summary(model: ReadMEForCausalLM) -> dict:
    """Total, active (shared + one routed expert of mean size per layer), router, and MoE parts."""
    total = backbone.num_params(model)
    router = sum(p.numel() for p in model.router_parameters())
    routed = sum(backbone.num_params(e) for m in model.moe_layers() for e in m.experts)
    mean_routed = sum(sum(backbone.num_params(e) for e in m.experts) / max(len(m.experts), 1) for m in model.moe_layers())
    return {"total": total, "active": int(total - routed + mean_routed), "router": router, "routed": routed}


def dense_params(dense) -> int:
    return backbone.num_params(dense)


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


def check_stats_match(stats: Stats, fingerprints: set[str], shape: tuple[int, int]) -> None:
    """The stats were computed on this parent: `fingerprints` are its own and its bf16 one, `shape` (layers,
    MLP width)."""
    recorded = {stats.fingerprint, stats.meta.get("fingerprint_bf16")} - {None}
    if not recorded & set(fingerprints) or tuple(stats.mean.shape[1:]) != tuple(shape):
        raise UserError(f"stats were computed on another model (shape {tuple(stats.mean.shape[1:])}, fingerprint "
                        f"{stats.fingerprint}) than this one ({tuple(shape)}, {sorted(fingerprints)[0]}); "
                        "re-run `readmoe calibrate` with this --model")
    if not stats.complete:
        raise UserError("stats file is incomplete (calibration was interrupted); re-run `readmoe calibrate` to finish it")


def identity(dense) -> tuple[set[str], tuple[int, int]]:
    """What `check_stats_match` compares, from a model in memory."""
    ms = backbone.mlps(dense)
    return {backbone.fingerprint(dense), backbone.fingerprint(dense, as_bf16=True)}, (len(ms), ms[0].down_proj.in_features)
