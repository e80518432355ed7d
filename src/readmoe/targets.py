"""Teacher targets for router distillation, from the dense parent's activations.

For token t and layer l, take the dense model's top-`keep` neurons (by
|input of down_proj|) and measure the share of them that lies in each routed
expert: `overlap[t, l, e]`. Per layer, softmax(overlap / tau) is the soft
target and argmax the hard label. The oracle expert of a token (for router
accuracy and the oracle baseline) is the argmax of the overlaps summed over
layers, since one expert index is a path through every layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import backbone
from .atomic import atomic_file
from .errors import UserError

if TYPE_CHECKING:  # annotations only: importing these here would load transformers eagerly or cycle
    from transformers import PreTrainedModel
    from .modeling import ReadMEForCausalLM


TARGETS_FORMAT = "readmoe-targets/1"


def expert_masks(moe: ReadMEForCausalLM) -> list[torch.Tensor]:
    """Per layer a bool [E, I] membership matrix of the routed experts' dense neurons."""
    inter = moe.config.text_config.intermediate_size
    out = []
    for _, experts in moe.neuron_sets():
        m = torch.zeros(len(experts), inter, dtype=torch.bool)
        for e, idx in enumerate(experts):
            m[e, idx] = True
        out.append(m)
    return out


@torch.no_grad()
def overlaps(dense: PreTrainedModel, masks: list[torch.Tensor], input_ids: torch.Tensor, keep: float) -> torch.Tensor:
    """[B, T, L, E]: share of each token's top-`keep` dense neurons inside each routed expert."""
    return overlaps_and_logits(dense, masks, input_ids, keep)[0]


@torch.no_grad()
def overlaps_and_logits(dense: PreTrainedModel, masks: list[torch.Tensor], input_ids: torch.Tensor,
                        keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The overlaps and the dense model's logits, from one forward pass."""
    acts: dict[int, torch.Tensor] = {}
    mlps = backbone.mlps(dense)
    hooks = [m.down_proj.register_forward_pre_hook(lambda _m, i, l=l: acts.__setitem__(l, i[0].detach()))
             for l, m in enumerate(mlps)]
    try:
        logits = dense(input_ids=input_ids.to(next(dense.parameters()).device), use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    out = []
    for l, mask in enumerate(masks):
        a = acts[l].abs()
        k = max(1, round(keep * a.shape[-1]))
        top = torch.zeros_like(a).scatter_(-1, a.topk(k, dim=-1).indices, 1.0)
        out.append(top @ mask.T.to(top.device, top.dtype) / k)
    return torch.stack(out, dim=2), logits


def oracle_labels(ov: torch.Tensor) -> torch.Tensor:
    """[B, T]: the expert path with the largest overlap summed over layers."""
    return ov.float().sum(2).argmax(-1)


def distill_loss(router_logits: torch.Tensor, ov: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Mean over layers of CE(hard label) + KL(soft target || router), averaged over tokens.

    `router_logits` [B, T, E] (pre-gating: one distribution serves every layer) or [B, T, L, E] (layer-wise gates)."""
    logp = F.log_softmax(router_logits.float(), -1)
    ov = ov.float()
    hard = ov.argmax(-1)  # [B, T, L]
    soft = F.softmax(ov / tau, -1)
    logp_l = logp if logp.dim() == ov.dim() else logp.unsqueeze(2).expand_as(ov)
    ce = -logp_l.gather(-1, hard.unsqueeze(-1)).squeeze(-1).mean()
    kl = (soft * (soft.clamp_min(1e-9).log() - logp_l)).sum(-1).mean()
    return ce + kl


def compute_targets(dense: PreTrainedModel, moe: ReadMEForCausalLM, seqs: torch.Tensor, path: Path, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Teacher overlaps for every training sequence, computed once and cached on disk (fp16)."""
    meta = {"format": TARGETS_FORMAT, "fingerprint": backbone.fingerprint(dense), "keep": moe.config.keep,
            "experts": list(moe.config.expert_names), "shape": list(seqs.shape)}
    if path.exists():
        cached = load_targets(path)
        if cached is not None and cached[2] == meta and torch.equal(cached[0], seqs.cpu()):
            return cached[1]
    masks = expert_masks(moe)
    parts = [overlaps(dense, masks, seqs[b:b + batch_size], moe.config.keep).half()
             for b in tqdm(range(0, len(seqs), batch_size), desc="teacher targets", disable=not progress)]
    ov = torch.cat(parts)
    with atomic_file(path) as tmp:
        save_file({"input_ids": seqs.cpu().contiguous(), "overlaps": ov.cpu().contiguous()}, str(tmp),
                  metadata={"readmoe": json.dumps(meta)})
    return ov


def load_targets(path: Path):
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("readmoe", "{}"))
            return f.get_tensor("input_ids"), f.get_tensor("overlaps"), meta
    except Exception:  # noqa: BLE001 - a corrupt cache is recomputed, not fatal
        return None


def check_router(moe: ReadMEForCausalLM) -> None:
    if moe.num_experts < 2:
        raise UserError("this checkpoint has fewer than 2 routed experts: there is nothing for a router to choose")
