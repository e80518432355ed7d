"""Per-domain validation perplexity of the dense parent and of the MoE under several routings."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .corpus import Corpus

if TYPE_CHECKING:  # annotations only: importing these here would load transformers eagerly or cycle
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from .modeling import ReadMEForCausalLM



@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, expert_ids=None, batch_size: int = 2, desc: str | None = None,
               used: list[torch.Tensor] | None = None) -> float:
    """exp(mean next-token NLL) over the rows of `seqs` [N, T]. `expert_ids`: None (the model decides),
    one int for every token, or a LongTensor [N, T] of per-token experts. `used` collects the experts each
    batch used, from the model's output."""
    nll, count = 0.0, 0
    dev = next(model.parameters()).device
    for b in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=desc is None, leave=False):
        x = seqs[b:b + batch_size].to(dev)
        kw = {}
        if expert_ids is not None:
            kw["expert_ids"] = expert_ids[b:b + batch_size].to(dev) if torch.is_tensor(expert_ids) else expert_ids
        out = model(input_ids=x, use_cache=False, **kw)
        nll += summed_nll(out.logits, x)
        if used is not None:
            used.append(out.expert_ids.cpu())
        count += x[:, 1:].numel()
    return math.exp(nll / max(count, 1))


def summed_nll(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Sum of next-token negative log-likelihoods of `x` [B, T] under `logits` [B, T, V]."""
    logits, x = logits.float(), x.to(logits.device)
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                   reduction="sum"))


def domain_perplexities(moe: ReadMEForCausalLM, dense: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corpus: Corpus, domains: list[str], n_seqs: int, seq_len: int,
                        batch_size: int = 2, seed: int = 0, baselines: dict | None = None) -> tuple[dict, dict, dict]:
    """Perplexity per variant and domain, the router's top-1 accuracy against oracle labels, and routing statistics.

    Variants: `dense`; `readme` (the model's own router); each trained baseline (`pruned`, `layerwise`);
    `domain_oracle` (each text to its own domain's expert; None where the MoE has no expert of that name);
    `oracle` (per token, the expert holding most of the dense model's top-`keep` neurons, summed over layers:
    the router's upper bound); `random` (uniform)."""
    from .targets import expert_masks, oracle_labels, overlaps_and_logits

    baselines = baselines or {}
    names = list(moe.config.expert_names)
    variants = (["dense", "readme", *baselines, "domain_oracle", "oracle", "random"] if dense is not None
                else ["readme", *baselines, "domain_oracle", "random"])
    out: dict[str, dict[str, float | None]] = {v: {} for v in variants}
    masks = expert_masks(moe)
    g = torch.Generator().manual_seed(seed)
    hits, total = 0, 0
    choices: dict[str, dict[str, torch.Tensor]] = {"readme": {}, "oracle": {}, "oracle_per_layer": {}, "layerwise": {}}
    for d in domains:
        seqs = corpus.sequences(tokenizer, d, "validation", n_seqs, seq_len)
        routed = moe.route(seqs)
        choices["readme"][d] = routed
        if dense is not None:  # one dense pass per batch gives its perplexity and the oracle labels
            nll, labels, per_layer = 0.0, [], []
            for b in tqdm(range(0, len(seqs), batch_size), desc=f"eval dense {d}", leave=False):
                x = seqs[b:b + batch_size]
                ov, logits = overlaps_and_logits(dense, masks, x, moe.config.keep)
                nll += summed_nll(logits, x)
                labels.append(oracle_labels(ov).cpu())
                per_layer.append(ov.float().argmax(-1).cpu())
            out["dense"][d] = math.exp(nll / seqs[:, 1:].numel())
            oracle = torch.cat(labels)
            choices["oracle"][d], choices["oracle_per_layer"][d] = oracle, torch.cat(per_layer)
            out["oracle"][d] = perplexity(moe, seqs, oracle, batch_size, desc=f"eval oracle {d}")
            hits += int((routed == oracle).sum())
            total += oracle.numel()
        out["readme"][d] = perplexity(moe, seqs, routed, batch_size, desc=f"eval readme {d}")
        for name, model in baselines.items():
            if getattr(model, "layerwise", False):  # every layer's gate choice, from the outputs
                used: list[torch.Tensor] = []
                out[name][d] = perplexity(model, seqs, None, batch_size, desc=f"eval {name} {d}", used=used)
                choices["layerwise"][d] = torch.cat(used)
            else:
                out[name][d] = perplexity(model, seqs, None, batch_size, desc=f"eval {name} {d}")
        out["domain_oracle"][d] = (perplexity(moe, seqs, names.index(d), batch_size, desc=f"eval domain-oracle {d}")
                                   if d in names else None)
        rand = torch.randint(0, moe.num_experts, seqs.shape, generator=g)
        out["random"][d] = perplexity(moe, seqs, rand, batch_size, desc=f"eval random {d}")
    router = {"accuracy": hits / total if total else None}
    return out, router, routing_stats(choices, moe.num_experts)


def keep_previous(ids: torch.Tensor) -> float:
    """Share of tokens whose expert equals the previous token's ([N, T], or [N, T, L]: mean over layers)."""
    same = (ids[:, 1:] == ids[:, :-1]).float()
    return float(same.mean())


def mutual_information(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """I(a; b) in bits between two expert-choice tensors of equal shape, from their joint histogram."""
    joint = torch.bincount((a.flatten() * k + b.flatten()), minlength=k * k).float().view(k, k)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pa @ pb)[nz]).log2()).sum())


def routing_stats(choices: dict, num_experts: int) -> dict:
    """Expert load per domain, keep-previous-expert rate, and mutual information between adjacent layers' choices
    (the paper's Fig. 2 redundancy analysis: high MI means the per-layer routers carry little new information)."""
    E = num_experts
    stats: dict = {"load": {}, "keep_previous": {}, "adjacent_mi_bits": {}}
    for variant in ("readme", "oracle", "layerwise"):
        by_domain = choices.get(variant) or {}
        if not by_domain:
            continue
        stats["load"][variant] = {d: (torch.bincount(ids.flatten(), minlength=E).float() / ids.numel()).tolist()
                                  for d, ids in by_domain.items()}
        stats["keep_previous"][variant] = sum(keep_previous(ids) for ids in by_domain.values()) / len(by_domain)
    stats["keep_previous"]["random"] = 1.0 / E
    for variant, key in (("oracle", "oracle_per_layer"), ("layerwise", "layerwise")):
        by_domain = choices.get(key) or {}
        if by_domain:
            ids = torch.cat([v.reshape(-1, v.shape[-1]) for v in by_domain.values()])  # [tokens, L]
            stats["adjacent_mi_bits"][variant] = [mutual_information(ids[:, l], ids[:, l + 1], E)
                                                  for l in range(ids.shape[1] - 1)]
            stats["max_mi_bits"] = math.log2(E)
    return stats


@torch.no_grad()
def router_time_share(moe: ReadMEForCausalLM, prompt: torch.Tensor, steps: int = 32, repeats: int = 3) -> float | None:
    """Batch-1 greedy decode: the router's share of the time of a whole MoE forward step (router included).

    A few warm-up steps first (first calls pay one-off allocation costs), then the median of `repeats` runs."""
    if moe.layerwise:
        return None
    prompt = prompt.to(next(moe.parameters()).device)
    _decode_timing(moe, prompt, 4)
    return statistics.median(_decode_timing(moe, prompt, steps) for _ in range(repeats))


def _decode_timing(moe: ReadMEForCausalLM, prompt: torch.Tensor, steps: int) -> float:
    import time

    out = moe(input_ids=prompt, use_cache=True)
    cache, rcache = out.past_key_values, out.router_cache
    tok = out.logits[:, -1:].argmax(-1)
    t_router = t_total = 0.0
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    for _ in range(steps):
        sync()
        r0 = time.perf_counter()
        logits, rcache = moe.router(tok, None, rcache)
        sync()
        r1 = time.perf_counter()
        out = moe(input_ids=tok, past_key_values=cache, use_cache=True, expert_ids=logits.argmax(-1))
        sync()
        r2 = time.perf_counter()
        t_router += r1 - r0
        t_total += r2 - r0
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return t_router / t_total
