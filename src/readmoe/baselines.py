"""The quality report's trained baselines, built from a carved MoE and its dense parent.

`pruned`: a dense model with the MoE's active MLP size in every layer (shared +
mean routed expert), keeping each layer's most important neurons by the same
calibration statistic that carved the experts (the paper's "Dense 4.7B" row).
`layerwise`: the same carved experts, routed by a top-1 linear gate per layer
on the hidden state, the conventional MoE design that pre-gating replaces.
Both start from the dense parent and train with the MoE's own budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .carve import build_model
from .errors import UserError

if TYPE_CHECKING:  # annotations only: importing these here would load transformers eagerly or cycle
    from transformers import PreTrainedModel
    from .modeling import ReadMEForCausalLM


BASELINES = ("pruned", "layerwise")


def carved_sets(moe: ReadMEForCausalLM):
    sets = moe.neuron_sets()
    return [s for s, _ in sets], [e for _, e in sets]


def build_layerwise(moe: ReadMEForCausalLM, dense: PreTrainedModel):
    """The carved (untrained) experts of `moe`, rebuilt from the parent, with a linear gate per layer."""
    c = moe.config
    return build_model(dense, carved_sets(moe), list(c.expert_names), c.keep, c.carve_mode, c.parent_model,
                       c.router_dim, scores=moe.neuron_scores, routing="layerwise")


def one_path_model(dense: PreTrainedModel, keep: list[torch.Tensor], name: str, mode: str, keep_share: float, parent: str | None,
                   scores: torch.Tensor | None = None):
    """A dense model over `keep[l]` neurons per layer, as a readmoe model with one empty routed expert."""
    empty = torch.zeros(0, dtype=torch.long)
    return build_model(dense, (keep, [[empty] for _ in keep]), [name], keep_share, mode, parent, router_dim=8,
                       scores=scores)


def build_pruned(moe: ReadMEForCausalLM, dense: PreTrainedModel):
    """Same active MLP size per layer as `moe`, top neurons by `moe.neuron_scores`, no routed expert."""
    scores = moe.neuron_scores
    if not bool(scores.abs().sum() > 0):
        raise UserError("this checkpoint holds no neuron scores (carved by an older readmoe); re-run `readmoe carve`")
    shared, experts = carved_sets(moe)
    sizes = [round(len(s) + sum(len(e) for e in ex) / len(ex)) for s, ex in zip(shared, experts)]
    keep = [scores[l].topk(k).indices.sort().values for l, k in enumerate(sizes)]
    return one_path_model(dense, keep, "pruned", "pruned", moe.config.keep, moe.config.parent_model, scores)


def build(name: str, moe: ReadMEForCausalLM, dense: PreTrainedModel):
    if name == "pruned":
        return build_pruned(moe, dense)
    if name == "layerwise":
        return build_layerwise(moe, dense)
    raise UserError(f"unknown baseline '{name}'; use one of {', '.join(BASELINES)} or 'all'")


def parse(arg: str | None) -> list[str]:
    """'all', 'none' or a comma list -> baseline names, validated."""
    if not arg or arg == "none":
        return []
    names = list(BASELINES) if arg == "all" else [a.strip() for a in arg.split(",") if a.strip()]
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise UserError(f"unknown baseline '{bad[0]}'; use one of {', '.join(BASELINES)}, 'all' or 'none'")
    return names
