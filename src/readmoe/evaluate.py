"""Per-domain validation perplexity of the dense parent and of the MoE under several routings."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .corpus import Corpus


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, expert_ids=None, batch_size: int = 2, desc: str | None = None) -> float:
    """exp(mean next-token NLL) over the rows of `seqs` [N, T]. `expert_ids`: None (the model decides),
    one int for every token, or a LongTensor [N, T] of per-token experts."""
    nll, count = 0.0, 0
    for b in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=desc is None, leave=False):
        x = seqs[b:b + batch_size]
        kw = {}
        if expert_ids is not None:
            kw["expert_ids"] = expert_ids[b:b + batch_size] if torch.is_tensor(expert_ids) else expert_ids
        nll += summed_nll(model(input_ids=x, use_cache=False, **kw).logits, x)
        count += x[:, 1:].numel()
    return math.exp(nll / max(count, 1))


def summed_nll(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Sum of next-token negative log-likelihoods of `x` [B, T] under `logits` [B, T, V]."""
    logits = logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                   reduction="sum"))


def domain_perplexities(moe, dense, tokenizer, corpus: Corpus, domains: list[str], n_seqs: int, seq_len: int,
                        batch_size: int = 2, seed: int = 0) -> tuple[dict[str, dict[str, float | None]], dict]:
    """Perplexity per variant and domain, and the router's top-1 accuracy against oracle labels.

    Variants: `dense`; `readme` (the model's own router); `domain_oracle` (each text to its own domain's
    expert; None where the MoE has no expert of that name); `oracle` (per token, the expert holding most of
    the dense model's top-`keep` neurons, summed over layers: the router's upper bound); `random` (uniform)."""
    from .targets import expert_masks, oracle_labels, overlaps_and_logits

    names = list(moe.config.expert_names)
    variants = ["dense", "readme", "domain_oracle", "oracle", "random"] if dense is not None else ["readme", "domain_oracle", "random"]
    out: dict[str, dict[str, float | None]] = {v: {} for v in variants}
    masks = expert_masks(moe)
    g = torch.Generator().manual_seed(seed)
    hits, total = 0, 0
    for d in domains:
        seqs = corpus.sequences(tokenizer, d, "validation", n_seqs, seq_len)
        routed = moe.route(seqs)
        if dense is not None:  # one dense pass per batch gives its perplexity and the oracle labels
            nll, labels = 0.0, []
            for b in tqdm(range(0, len(seqs), batch_size), desc=f"eval dense {d}", leave=False):
                x = seqs[b:b + batch_size]
                ov, logits = overlaps_and_logits(dense, masks, x, moe.config.keep)
                nll += summed_nll(logits, x)
                labels.append(oracle_labels(ov))
            out["dense"][d] = math.exp(nll / seqs[:, 1:].numel())
            oracle = torch.cat(labels)
            out["oracle"][d] = perplexity(moe, seqs, oracle, batch_size, desc=f"eval oracle {d}")
            hits += int((routed == oracle).sum())
            total += oracle.numel()
        out["readme"][d] = perplexity(moe, seqs, routed, batch_size, desc=f"eval readme {d}")
        out["domain_oracle"][d] = (perplexity(moe, seqs, names.index(d), batch_size, desc=f"eval domain-oracle {d}")
                                   if d in names else None)
        rand = torch.randint(0, moe.num_experts, seqs.shape, generator=g)
        out["random"][d] = perplexity(moe, seqs, rand, batch_size, desc=f"eval random {d}")
    router = {"accuracy": hits / total if total else None}
    return out, router
