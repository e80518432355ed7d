"""Per-domain validation perplexity of the dense parent and of the MoE under several routings."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .corpus import Corpus


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, expert_ids=None, batch_size: int = 2, desc: str | None = None) -> float:
    """exp(mean next-token NLL) over the rows of `seqs` [N, T]. `expert_ids` (int) fixes routing."""
    nll, count = 0.0, 0
    kw = {} if expert_ids is None else {"expert_ids": expert_ids}
    for b in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=desc is None, leave=False):
        x = seqs[b:b + batch_size]
        logits = model(input_ids=x, use_cache=False, **kw).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / max(count, 1))


def domain_perplexities(moe, dense, tokenizer, corpus: Corpus, domains: list[str], n_seqs: int, seq_len: int,
                        batch_size: int = 2) -> dict[str, dict[str, float | None]]:
    """{variant: {domain: ppl}} for `dense`, `readme` (the model's own router) and `domain_oracle`
    (each text routed to its own domain's expert; None where the MoE has no expert of that name)."""
    names = list(moe.config.expert_names)
    out: dict[str, dict[str, float | None]] = {"dense": {}, "readme": {}, "domain_oracle": {}}
    for d in domains:
        seqs = corpus.sequences(tokenizer, d, "validation", n_seqs, seq_len)
        if dense is not None:
            out["dense"][d] = perplexity(dense, seqs, batch_size=batch_size, desc=f"eval dense {d}")
        out["readme"][d] = perplexity(moe, seqs, batch_size=batch_size, desc=f"eval readme {d}")
        out["domain_oracle"][d] = (perplexity(moe, seqs, names.index(d), batch_size, desc=f"eval domain-oracle {d}")
                                   if d in names else None)
    if dense is None:
        del out["dense"]
    return out
