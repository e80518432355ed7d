"""Alternating training: router distillation (backbone frozen) and expert tuning (routing fixed).

Each round runs `router_steps` of distillation on cached teacher targets, then
`expert_steps` of LM loss on every non-router weight with the router's
choices as fixed routing. Learning rates follow a cosine within a round and
shrink by `lr_decay` per round (the paper's recipe). The checkpoint and a
state file are written after every phase, so a killed run resumes at the next
phase and ends with the same weights as an uninterrupted one (seeded).

Runs through `accelerate`: `accelerate launch -m readmoe.cli train ...` on
several GPUs or nodes splits every global batch across processes (DDP); with
an FSDP config (configs/accelerate/fsdp.yaml) the backbone's weights, gradients
and optimizer state are also sharded (FSDP2), while the router stays whole on
every process. A plain `readmoe train` is one process on the best device.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from . import backbone
from .corpus import Corpus
from .atomic import atomic_write_json, atomic_write_text
from .errors import UserError
from .evaluate import perplexity
from .targets import compute_targets, distill_loss, oracle_labels

if TYPE_CHECKING:  # annotations only: importing these here would load transformers eagerly or cycle
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from .modeling import ReadMEForCausalLM



@dataclass(frozen=True)
class TrainConfig:
    rounds: int = 2
    router_steps: int = 100
    expert_steps: int = 10
    router_lr: float = 2e-3
    expert_lr: float = 1e-4
    lr_decay: float = 0.8
    seq_len: int = 256
    batch_tokens: int = 1024
    pool_seqs: int = 64  # training sequences (mixed domains) with cached teacher targets
    tau: float = 0.1
    seed: int = 0

    @property
    def batch_seqs(self) -> int:
        return max(1, self.batch_tokens // self.seq_len)


BUDGETS = {
    # a few minutes on 2 CPU cores
    "demo": TrainConfig(),
    # about 30 min on 2 CPU cores (measured: 28 min for SmolLM2-135M; the demo with both baselines 90 min)
    "full": TrainConfig(rounds=4, router_steps=100, expert_steps=40, pool_seqs=240, batch_tokens=1280),
    # the paper's recipe (8 rounds, 100 + 200 steps, lr 5e-4 / 5e-5): for GPUs
    "paper": TrainConfig(rounds=8, router_steps=100, expert_steps=200, router_lr=5e-4, expert_lr=5e-5, seq_len=4096,
                         batch_tokens=4096 * 16, pool_seqs=4096),
}


def make_config(budget: str, **overrides) -> TrainConfig:
    if budget not in BUDGETS:
        raise UserError(f"unknown `budget` '{budget}'; use one of {', '.join(BUDGETS)}")
    cfg = replace(BUDGETS[budget], **{k: v for k, v in overrides.items() if v is not None})
    if cfg.rounds < 1 or cfg.router_steps < 0 or cfg.expert_steps < 0 or cfg.router_steps + cfg.expert_steps == 0:
        raise UserError("training budget is 0: give `rounds` >= 1 and at least one of `router_steps`/`expert_steps` > 0")
    if cfg.router_lr <= 0 or cfg.expert_lr <= 0 or not 0 < cfg.lr_decay <= 1:
        raise UserError("learning rates must be > 0 and `lr_decay` in (0, 1]")
    if cfg.seq_len < 2 or cfg.batch_tokens < cfg.seq_len:
        raise UserError("`seq_len` must be >= 2 and `batch_tokens` >= `seq_len`")
    return cfg


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def training_pool(tok: PreTrainedTokenizerBase, corpus: Corpus, domains: list[str], cfg: TrainConfig) -> torch.Tensor:
    """`pool_seqs` train-split sequences, an equal share per domain, interleaved."""
    per = math.ceil(cfg.pool_seqs / len(domains))
    parts = [corpus.sequences(tok, d, "train", per, cfg.seq_len) for d in domains]
    rows = [p[i] for i in range(per) for p in parts if i < len(p)]
    return torch.stack(rows[: cfg.pool_seqs])


def _save_weights(moe: ReadMEForCausalLM, out: Path, state_dict: dict | None = None) -> None:
    """Replace out/model.safetensors (and config/tokenizer files) atomically, file by file. `state_dict`: the
    full weights when the model itself holds only this process's shards (FSDP)."""
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt.", dir=out))
    try:
        if state_dict is None:
            moe.save_pretrained(tmp)
        else:  # transformers' save would read the sharded parameters: a collective on this process alone
            from safetensors.torch import save_file

            tied = set(moe.all_tied_weights_keys)
            save_file({k: v.contiguous() for k, v in state_dict.items() if k not in tied},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            moe.config.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(moe: ReadMEForCausalLM, out: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in moe.all_tied_weights_keys]
    if missing or unexpected:
        raise UserError(f"cannot resume from {out}: its weights do not match the model; delete it or choose another `out`")


def make_accelerator(precision: str = "no"):
    """accelerate's Accelerator; precision "bf16" runs forwards under bf16 autocast, weights and optimizer in fp32."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # experts a batch does not touch get no gradient: DDP must allow unused parameters
    return Accelerator(mixed_precision=precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def is_fsdp(acc) -> bool:
    """accelerate shards the models it prepares (launched with an FSDP config)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return False
    if not acc.is_fsdp2:
        raise UserError("readmoe trains with FSDP2: set `fsdp_version: 2` in the accelerate config "
                        "(see configs/accelerate/fsdp.yaml)")
    return True


def shard(acc, moe) -> None:
    """FSDP2 over the model, in place, once before training (the whole model never sits on one accelerator):
    each decoder layer is a unit, parameters move to the device shard by shard. The router (or the layer-wise
    gates) stays whole on every process: it is tiny, trained on its own, and runs ahead of the backbone."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    acc.state.fsdp_plugin.ignored_modules = moe.router_modules()
    fsdp2_prepare_model(acc, moe)
    for m in moe.router_modules():
        m.to(acc.device)


def _all_reduce_grads(acc, params: list[nn.Parameter]) -> None:
    """Average gradients over processes for parameters that no wrapper synchronises (the router under FSDP)."""
    if acc.num_processes > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= acc.num_processes


def _local(acc, idx: torch.Tensor) -> torch.Tensor:
    """This process's share of a global batch (all processes draw the same indices from the same seed)."""
    if len(idx) < acc.num_processes:
        raise UserError(f"`batch_tokens` gives {len(idx)} sequences per step, fewer than the {acc.num_processes} processes")
    return idx[acc.process_index::acc.num_processes]


class _Gates(nn.Module):
    """The layer-wise baseline's gates as one module, so accelerate can wrap them."""

    def __init__(self, moe):
        super().__init__()
        self.gates = nn.ModuleList(m.gate for m in moe.moe_layers())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [B, T, L, H] -> [B, T, L, E]
        return torch.stack([g(feats[:, :, l]) for l, g in enumerate(self.gates)], dim=2)


@torch.no_grad()
def layer_inputs(moe: ReadMEForCausalLM, seqs: torch.Tensor, ov: torch.Tensor, batch: int = 4, progress: bool = True) -> torch.Tensor:
    """[N, T, L, H] fp16: every MoE layer's input, with each layer routed by its own oracle label (teacher forcing)."""
    hard = ov.float().argmax(-1)
    layers, store = moe.moe_layers(), {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, l=l: store.__setitem__(l, a[0].detach().half()))
             for l, m in enumerate(layers)]
    parts = []
    try:
        for b in tqdm(range(0, len(seqs), batch), desc="layer inputs", disable=not progress, leave=False):
            moe(input_ids=seqs[b:b + batch], expert_ids=hard[b:b + batch].to(seqs.device), use_cache=False, logits_to_keep=1)
            parts.append(torch.stack([store[l] for l in range(len(layers))], dim=2).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(parts)


def router_phase(moe: ReadMEForCausalLM, seqs, ov, labels, cfg: TrainConfig, rnd: int, log, progress: bool, acc) -> None:
    """Distil the routing from the teacher targets; the backbone is frozen. For a layer-wise model the gates
    read each layer's input, recorded once per round."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2 * rnd)
    lr0 = cfg.router_lr * cfg.lr_decay ** rnd
    params = moe.router_parameters()
    moe.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if moe.layerwise:
        feats = layer_inputs(moe, seqs, ov, progress=progress)
        module, labels = _Gates(moe), ov.float().argmax(-1)
    else:
        feats, module = seqs, moe.router
    opt = torch.optim.AdamW(params, lr=lr0, weight_decay=0.0)
    fsdp = is_fsdp(acc)
    if not fsdp:  # under FSDP the router is left out of the sharding (it is tiny): its gradients are averaged here
        module, opt = acc.prepare(module, opt)
    bar = tqdm(range(cfg.router_steps), desc=f"round {rnd + 1} router", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr0 * cosine(step, cfg.router_steps)
        idx = _local(acc, torch.randint(0, len(seqs), (cfg.batch_seqs,), generator=g))
        if moe.layerwise:
            logits = module(feats[idx].to(acc.device, torch.float32))
        else:
            logits, _ = module(feats[idx])
        loss = distill_loss(logits, ov[idx].to(acc.device), cfg.tau)
        opt.zero_grad(set_to_none=True)
        if fsdp:
            loss.backward()
            _all_reduce_grads(acc, params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:
            acc.backward(loss)
            acc.clip_grad_norm_(params, 1.0)
        opt.step()
        hit = float((logits.argmax(-1) == labels[idx].to(acc.device)).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{hit:.2f}")
        log({"round": rnd, "phase": "router", "step": step, "loss": loss.item(), "router_acc": hit})
    acc.free_memory()
    moe.requires_grad_(False)


def expert_phase(moe: ReadMEForCausalLM, seqs, cfg: TrainConfig, rnd: int, log, progress: bool, acc) -> None:
    """LM loss on every non-router weight; the router's (or the gates') choices are fixed routing."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2 * rnd + 1)
    lr0 = cfg.expert_lr * cfg.lr_decay ** rnd
    frozen = {id(p) for p in moe.router_parameters()}
    params = [p for p in moe.parameters() if id(p) not in frozen]
    moe.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr0, weight_decay=0.0)
    model, opt = acc.prepare(moe, opt)
    moe.train()
    bar = tqdm(range(cfg.expert_steps), desc=f"round {rnd + 1} experts", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr0 * cosine(step, cfg.expert_steps)
        x = seqs[_local(acc, torch.randint(0, len(seqs), (cfg.batch_seqs,), generator=g))]
        eids = None if moe.layerwise else moe.route(x)
        loss = model(input_ids=x, labels=x, expert_ids=eids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log({"round": rnd, "phase": "experts", "step": step, "loss": loss.item(), "tokens": x.numel() * acc.num_processes})
    acc.free_memory()
    moe.eval()
    moe.requires_grad_(False)


def recovery_seqs(tok: PreTrainedTokenizerBase, corpus: Corpus, domains: list[str], cfg: TrainConfig, per_domain: int = 1) -> torch.Tensor:
    """A small fixed validation set, evaluated after every expert phase: the recovery curve."""
    return torch.cat([corpus.sequences(tok, d, "validation", per_domain, cfg.seq_len) for d in domains])


def train(moe: ReadMEForCausalLM, dense: PreTrainedModel, tok: PreTrainedTokenizerBase, corpus: Corpus, domains: list[str], cfg: TrainConfig, out: Path, progress: bool = True,
          stop_after: int | None = None, targets_from: Path | None = None, accelerator=None,
          precision: str = "no") -> list[dict]:
    """Train in place and keep `out` (a checkpoint directory) current after every phase.

    Works for the MoE and for both baselines (a pruned model has no router phase; a layer-wise model trains its
    gates). `targets_from` reuses another run's cached teacher targets when they match. `stop_after` ends the
    run after that many phases (tests use it to simulate a kill). `precision` "bf16": bf16 autocast, fp32 weights."""
    acc = accelerator or make_accelerator(precision)
    out = Path(out)
    work = out / "train"
    work.mkdir(parents=True, exist_ok=True)
    state_file, log_file = work / "state.json", work / "log.jsonl"
    want = {"config": asdict(cfg), "domains": domains, "corpus": corpus.spec}
    done, history = 0, []
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if {k: state.get(k) for k in want} != want:
            raise UserError(f"{out} holds a run with other training settings; delete it or choose another `out`")
        done = state["phases_done"]
        history = [json.loads(ln) for ln in log_file.read_text().splitlines()] if log_file.exists() else []
        history = [h for h in history if h.get("i", 2 * h["round"] + (h["phase"] == "experts")) < done]
        if done:
            _load_weights(moe, out)
    elif acc.is_main_process:
        tok.save_pretrained(out)
    if is_fsdp(acc):
        shard(acc, moe)
    else:
        moe.to(acc.device)
    seqs = training_pool(tok, corpus, domains, cfg).to(acc.device)
    routed = moe.num_experts > 1
    ov = labels = None
    if routed:
        target_file = work / "targets.safetensors"
        if targets_from is not None and Path(targets_from).exists() and not target_file.exists():
            shutil.copyfile(targets_from, target_file)
        home = next(dense.parameters()).device
        with acc.main_process_first():
            ov = compute_targets(dense.to(acc.device), moe, seqs, target_file, progress=progress and acc.is_main_process)
        dense.to(home)  # the teacher is done: give its accelerator memory to training
        ov = ov.to(acc.device)
        labels = oracle_labels(ov)
    val = recovery_seqs(tok, corpus, domains, cfg).to(acc.device)
    phases = [(r, p) for r in range(cfg.rounds) for p in ("router", "experts")]
    seen = sum(h.get("tokens", 0) for h in history if h["phase"] == "experts")
    ran = 0
    for i, (rnd, phase) in enumerate(phases):
        if i < done:
            continue
        if stop_after is not None and ran >= stop_after:
            break
        torch.manual_seed(cfg.seed * 1000 + i)
        records: list[dict] = []
        if i == 0:
            records.append({"round": -1, "phase": "eval", "tokens": 0, "ppl": perplexity(moe, val)})
        if phase == "router" and cfg.router_steps and routed:
            router_phase(moe, seqs, ov, labels, cfg, rnd, records.append, progress and acc.is_main_process, acc)
        elif phase == "experts" and cfg.expert_steps:
            expert_phase(moe, seqs, cfg, rnd, records.append, progress and acc.is_main_process, acc)
            seen += sum(r.get("tokens", 0) for r in records)
            records.append({"round": rnd, "phase": "eval", "tokens": seen, "ppl": perplexity(moe, val)})
        history += [dict(r, i=i) for r in records]
        acc.wait_for_everyone()
        full = acc.get_state_dict(moe) if is_fsdp(acc) else None  # a collective: every process gathers
        if acc.is_main_process:
            _save_weights(moe, out, full)
            atomic_write_text(log_file, "".join(json.dumps(h) + "\n" for h in history))
            atomic_write_json(state_file, dict(want, phases_done=i + 1, complete=i + 1 == len(phases)))
        acc.wait_for_everyone()
        ran += 1
    return history


def is_complete(out: Path) -> bool:
    f = Path(out) / "train" / "state.json"
    try:
        return bool(json.loads(f.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def saved_config(out: Path) -> tuple[TrainConfig, list[str], str] | None:
    """The budget, domains and corpus a finished run in `out` used, so baselines can match it."""
    f = Path(out) / "train" / "state.json"
    if not f.exists():
        return None
    state = json.loads(f.read_text())
    return TrainConfig(**state["config"]), state["domains"], state["corpus"]


def check_pair(moe: ReadMEForCausalLM, dense: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """The dense teacher and tokenizer must be the ones the MoE was carved from."""
    if moe.config.parent_fingerprint and not backbone.same_model(moe.config.parent_fingerprint, dense):
        raise UserError("the dense model is not the parent this MoE was carved from; pass the right `dense`")
    if len(tok) > moe.config.text_config.vocab_size:
        raise UserError(f"tokenizer has {len(tok)} tokens but the model's vocabulary is {moe.config.text_config.vocab_size}: "
                        "mismatched tokenizer")
