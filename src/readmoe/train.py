"""Alternating training: router distillation (backbone frozen) and expert tuning (routing fixed).

Each round runs `router_steps` of distillation on cached teacher targets, then
`expert_steps` of LM loss on every non-router weight with the router's
choices as fixed routing. Learning rates follow a cosine within a round and
shrink by `lr_decay` per round (the paper's recipe). The checkpoint and a
state file are written after every phase, so a killed run resumes at the next
phase and ends with the same weights as an uninterrupted one (seeded).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import backbone
from .corpus import Corpus
from .errors import UserError, atomic_write_json, atomic_write_text
from .targets import compute_targets, distill_loss, oracle_labels


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
    # about an hour on 2 CPU cores
    "full": TrainConfig(rounds=4, router_steps=100, expert_steps=40, pool_seqs=240, batch_tokens=1280),
    # the paper's recipe (8 rounds, 100 + 200 steps, lr 5e-4 / 5e-5): for GPUs
    "paper": TrainConfig(rounds=8, router_steps=100, expert_steps=200, router_lr=5e-4, expert_lr=5e-5, seq_len=4096,
                         batch_tokens=4096 * 16, pool_seqs=4096),
}


def make_config(budget: str, **overrides) -> TrainConfig:
    if budget not in BUDGETS:
        raise UserError(f"unknown --budget '{budget}'; use one of {', '.join(BUDGETS)}")
    cfg = replace(BUDGETS[budget], **{k: v for k, v in overrides.items() if v is not None})
    if cfg.rounds < 1 or cfg.router_steps < 0 or cfg.expert_steps < 0 or cfg.router_steps + cfg.expert_steps == 0:
        raise UserError("training budget is 0: give --rounds >= 1 and at least one of --router-steps/--expert-steps > 0")
    if cfg.router_lr <= 0 or cfg.expert_lr <= 0 or not 0 < cfg.lr_decay <= 1:
        raise UserError("learning rates must be > 0 and --lr-decay in (0, 1]")
    if cfg.seq_len < 2 or cfg.batch_tokens < cfg.seq_len:
        raise UserError("--seq-len must be >= 2 and --batch-tokens >= --seq-len")
    return cfg


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def training_pool(tok, corpus: Corpus, domains: list[str], cfg: TrainConfig) -> torch.Tensor:
    """`pool_seqs` train-split sequences, an equal share per domain, interleaved."""
    per = math.ceil(cfg.pool_seqs / len(domains))
    parts = [corpus.sequences(tok, d, "train", per, cfg.seq_len) for d in domains]
    rows = [p[i] for i in range(per) for p in parts if i < len(p)]
    return torch.stack(rows[: cfg.pool_seqs])


def _save_weights(moe, out: Path) -> None:
    """Replace out/model.safetensors (and config/tokenizer files) atomically, file by file."""
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt.", dir=out))
    try:
        moe.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(moe, out: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in moe.all_tied_weights_keys]
    if missing or unexpected:
        raise UserError(f"cannot resume from {out}: its weights do not match the model; delete it or choose another --out")


def router_phase(moe, seqs, ov, labels, cfg: TrainConfig, rnd: int, log, progress: bool) -> None:
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2 * rnd)
    lr0 = cfg.router_lr * cfg.lr_decay ** rnd
    params = list(moe.router.parameters())
    moe.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr0, weight_decay=0.0)
    bar = tqdm(range(cfg.router_steps), desc=f"round {rnd + 1} router", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr0 * cosine(step, cfg.router_steps)
        idx = torch.randint(0, len(seqs), (cfg.batch_seqs,), generator=g)
        logits, _ = moe.router(seqs[idx])
        loss = distill_loss(logits, ov[idx], cfg.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc = float((logits.argmax(-1) == labels[idx]).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        log({"round": rnd, "phase": "router", "step": step, "loss": loss.item(), "router_acc": acc})
    moe.requires_grad_(False)


def expert_phase(moe, seqs, cfg: TrainConfig, rnd: int, log, progress: bool) -> None:
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2 * rnd + 1)
    lr0 = cfg.expert_lr * cfg.lr_decay ** rnd
    params = [p for n, p in moe.named_parameters() if not n.startswith("router.")]
    moe.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr0, weight_decay=0.0)
    moe.train()
    bar = tqdm(range(cfg.expert_steps), desc=f"round {rnd + 1} experts", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr0 * cosine(step, cfg.expert_steps)
        x = seqs[torch.randint(0, len(seqs), (cfg.batch_seqs,), generator=g)]
        with torch.no_grad():
            eids = moe.route(x)
        loss = moe(input_ids=x, labels=x, expert_ids=eids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log({"round": rnd, "phase": "experts", "step": step, "loss": loss.item(), "tokens": x.numel()})
    moe.eval()
    moe.requires_grad_(False)


def train(moe, dense, tok, corpus: Corpus, domains: list[str], cfg: TrainConfig, out: Path, progress: bool = True,
          stop_after: int | None = None) -> list[dict]:
    """Train in place and keep `out` (a checkpoint directory) current after every phase.

    `stop_after` ends the run after that many phases (tests use it to simulate a kill)."""
    out = Path(out)
    work = out / "train"
    work.mkdir(parents=True, exist_ok=True)
    state_file, log_file = work / "state.json", work / "log.jsonl"
    want = {"config": asdict(cfg), "domains": domains, "corpus": corpus.spec}
    done, history = 0, []
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if {k: state.get(k) for k in want} != want:
            raise UserError(f"{out} holds a run with other training settings; delete it or choose another --out")
        done = state["phases_done"]
        history = [json.loads(ln) for ln in log_file.read_text().splitlines()] if log_file.exists() else []
        history = [h for h in history if 2 * h["round"] + (h["phase"] == "experts") < done]
        if done:
            _load_weights(moe, out)
    else:
        tok.save_pretrained(out)
    seqs = training_pool(tok, corpus, domains, cfg)
    ov = compute_targets(dense, moe, seqs, work / "targets.safetensors", progress=progress)
    labels = oracle_labels(ov)
    phases = [(r, p) for r in range(cfg.rounds) for p in ("router", "experts")]
    ran = 0
    for i, (rnd, phase) in enumerate(phases):
        if i < done:
            continue
        if stop_after is not None and ran >= stop_after:
            break
        torch.manual_seed(cfg.seed * 1000 + i)
        if phase == "router" and cfg.router_steps:
            router_phase(moe, seqs, ov, labels, cfg, rnd, history.append, progress)
        elif phase == "experts" and cfg.expert_steps:
            expert_phase(moe, seqs, cfg, rnd, history.append, progress)
        _save_weights(moe, out)
        atomic_write_text(log_file, "".join(json.dumps(h) + "\n" for h in history))
        atomic_write_json(state_file, dict(want, phases_done=i + 1, complete=i + 1 == len(phases)))
        ran += 1
    return history


def check_pair(moe, dense, tok) -> None:
    """The dense teacher and tokenizer must be the ones the MoE was carved from."""
    if moe.config.parent_fingerprint and backbone.fingerprint(dense) != moe.config.parent_fingerprint:
        raise UserError("the dense model is not the parent this MoE was carved from; pass the right --dense")
    if len(tok) > moe.config.text_config.vocab_size:
        raise UserError(f"tokenizer has {len(tok)} tokens but the model's vocabulary is {moe.config.text_config.vocab_size}: "
                        "mismatched tokenizer")
