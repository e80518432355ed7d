"""MMLU accuracy by cloze scoring: the answer whose text is most likely after `Question: …\\nAnswer:`.

Each question is one packed row: the prompt once, then its four answers side by
side, each attending to the prompt and to itself only (a 4D mask, positions
restarting after the prompt). That reads the prompt once instead of four times
and gives the same log-probs as four separate forwards (tested). Answers are
scored by mean token log-prob; only the logits of answer positions are computed.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .errors import UserError

if TYPE_CHECKING:  # annotations only: importing these here would load transformers eagerly or cycle
    from transformers import PreTrainedTokenizerBase


LETTERS = "ABCD"


def load(path, n: int | None, seed: int = 0) -> list[dict]:
    """A fixed seeded subset of `n` questions (all of them when n is None), in file order."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r.get("correct_answer") in LETTERS and all(f"answer_{c.lower()}" in r for c in LETTERS):
                    rows.append(r)
    if n is not None:
        if n < 1:
            raise UserError("`mmlu` must be >= 1 or 'all'")
        if n < len(rows):
            keep = sorted(random.Random(seed).sample(range(len(rows)), n))
            rows = [rows[i] for i in keep]
    return rows


def parse_count(arg: str | int | None) -> int | None:
    """'all' -> None, '0'/'none' -> 0 (skip), else a positive int."""
    if arg is None or str(arg) in ("0", "none"):
        return 0
    if str(arg) == "all":
        return None
    if not str(arg).isdigit():
        raise UserError(f"`mmlu` takes a number of questions, 'all' or 'none', not '{arg}'")
    return int(arg)


def _encode(tok: PreTrainedTokenizerBase, q: dict, max_prompt: int) -> tuple[list[int], list[list[int]]]:
    prompt = tok(f"Question: {q['question'].strip()}\nAnswer:")["input_ids"][-max_prompt:]
    answers = [tok(" " + str(q[f"answer_{c.lower()}"]).strip(), add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
               for c in LETTERS]
    return prompt, answers


def pack(items: list[tuple[list[int], list[list[int]]]], pad_id: int):
    """Rows of prompt + answers: ids, positions, which keys each token may see [B, T, T], and per-row answer spans."""
    lens = [len(p) + sum(len(a) for a in ans) for p, ans in items]
    B, T = len(items), max(lens)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    allow = torch.zeros(B, T, T, dtype=torch.bool)
    spans = []
    for b, (p, ans) in enumerate(items):
        P = len(p)
        ids[b, :P] = torch.tensor(p)
        pos[b, :P] = torch.arange(P)
        allow[b, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        start, row = P, []
        for a in ans:
            n = len(a)
            ids[b, start:start + n] = torch.tensor(a)
            pos[b, start:start + n] = torch.arange(P, P + n)
            allow[b, start:start + n, :P] = True
            allow[b, start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            row.append((start, n))
            start += n
        allow[b, start:, start:] = torch.eye(T - start, dtype=torch.bool)  # padding sees itself: no empty rows
        spans.append(row)
    return ids, pos, allow, spans


def additive(allow: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allow.shape[0], 1, *allow.shape[1:]).masked_fill(~allow[:, None], torch.finfo(torch.float32).min)


def masks_for(config, pos: torch.Tensor, allow: torch.Tensor):
    """The 4D mask, or for models with sliding-window layers (Gemma-3) one mask per attention type."""
    tc = getattr(config, "text_config", None) or config
    window = getattr(tc, "sliding_window", None)
    if not window or "sliding_attention" not in (getattr(tc, "layer_types", None) or []):
        return additive(allow)
    near = (pos[:, :, None] - pos[:, None, :]) < window
    return {"full_attention": additive(allow), "sliding_attention": additive(allow & near)}


def _expert_ids(moe, items, ids):
    """Pre-gating over each prompt + answer on its own (the router is causal), laid out like the packed row."""
    seqs = [p + a for p, ans in items for a in ans]
    L = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    routed = moe.route(x)
    out = torch.zeros_like(ids)
    for b, (p, ans) in enumerate(items):
        P, start = len(p), len(p)
        out[b, :P] = routed[4 * b, :P]
        for k, a in enumerate(ans):
            out[b, start:start + len(a)] = routed[4 * b + k, P:P + len(a)]
            start += len(a)
    return out


@torch.no_grad()
def score(model, tok: PreTrainedTokenizerBase, questions: list[dict], batch_size: int = 8, max_prompt: int = 768, desc: str | None = None,
          routing: str = "model", reduce: str = "mean") -> dict:
    """Accuracy and per-question choices. `model` is a dense HF causal LM or a ReadMEForCausalLM;
    `routing="model"` lets a MoE route itself. `reduce`: an answer's score is its tokens' mean log-prob (the
    report's rule) or their sum (lm-eval's `acc`, to check a server's loglikelihood against)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', not {reduce!r}")
    items = [_encode(tok, q, max_prompt) for q in questions]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + sum(map(len, items[i][1])))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    is_moe = getattr(model.config, "model_type", None) == "readmoe"
    chosen, scores = [0] * len(items), [None] * len(items)
    dev = next(model.parameters()).device
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        idx = order[s:s + batch_size]
        batch = [items[i] for i in idx]
        ids, pos, allow, spans = pack(batch, pad)
        mask = masks_for(model.config, pos, allow)
        # answer token j is predicted at the token before it; the first one at the prompt's last token
        src = [[[len(p) - 1 if j == 0 else st + j - 1 for j in range(n)] for st, n in row]
               for (p, _), row in zip(batch, spans)]
        need = sorted({q for row in src for ans in row for q in ans})
        kw = {}
        if is_moe and not model.layerwise:
            kw["expert_ids"] = _expert_ids(model, batch, ids).to(dev)
        if isinstance(mask, dict):
            mask = {k: v.to(dev) for k, v in mask.items()}
        else:
            mask = mask.to(dev)
        logits = model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask, use_cache=False,
                       logits_to_keep=torch.tensor(need, device=dev), **kw).logits.float().cpu()
        logp = torch.log_softmax(logits, -1)
        at = {p: k for k, p in enumerate(need)}
        for r, (i, row) in enumerate(zip(idx, spans)):
            means = [float(getattr(torch.stack([logp[r, at[q], ids[r, st + j]] for j, q in enumerate(srcs)]), reduce)())
                     for (st, n), srcs in zip(row, src[r])]
            chosen[i], scores[i] = max(range(4), key=lambda k: means[k]), means
    correct = [LETTERS[c] == q["correct_answer"] for c, q in zip(chosen, questions)]
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct), "choices": [LETTERS[c] for c in chosen],
            "scores": scores}
