"""Workloads: arrival times, prompts and output lengths, or the replay of a trace file.

Arrivals are Poisson (exponential gaps) or bursty (gamma gaps with the same mean
and a coefficient of variation of 3). Prompts mix the corpora's validation texts and
MMLU questions, with lengths spread log-uniformly between bounds; output lengths
are drawn the same way. A trace is JSONL with `arrival_s`, `prompt` and `max_tokens`
per line, so real traces replay as recorded.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .request import SamplingParams


@dataclass
class WorkloadConfig:
    requests: int = 48
    rate: float = 4.0  # requests per second
    arrival: str = "poisson"  # or "bursty"
    prompt_tokens: tuple[int, int] = (16, 192)
    output_tokens: tuple[int, int] = (8, 48)
    mmlu_share: float = 0.3
    seed: int = 0


def arrival_times(n: int, rate: float, kind: str, rng: random.Random) -> list[float]:
    if rate <= 0:
        raise UserError("`rate` must be > 0")
    t, out = 0.0, []
    for _ in range(n):
        if kind == "poisson":
            gap = rng.expovariate(rate)
        elif kind == "bursty":
            cv = 3.0
            shape = 1 / cv ** 2
            gap = rng.gammavariate(shape, 1 / (rate * shape))
        else:
            raise UserError(f"unknown arrival process '{kind}': use poisson or bursty")
        t += gap
        out.append(t)
    return out


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def synthetic(tok, corpus, cfg: WorkloadConfig) -> list[tuple[float, list[int], SamplingParams]]:
    """Requests from the corpus's validation texts and MMLU questions (greedy, so runs are comparable)."""
    from .. import assets
    from ..mmlu import load

    rng = random.Random(cfg.seed)
    texts = [(d, t) for d in corpus.domains for t in corpus.texts(d, "validation")]
    questions = load(assets.mmlu_jsonl(), 500, seed=cfg.seed) if cfg.mmlu_share > 0 else []
    out = []
    for a in arrival_times(cfg.requests, cfg.rate, cfg.arrival, rng):
        n = _log_uniform(rng, *cfg.prompt_tokens)
        if questions and rng.random() < cfg.mmlu_share:
            q = rng.choice(questions)
            text = f"Question: {q['question']}\nA. {q['answer_a']}\nB. {q['answer_b']}\nC. {q['answer_c']}\nD. {q['answer_d']}\nAnswer:"
            ids = tok(text)["input_ids"][-n:]
        else:
            _, text = rng.choice(texts)
            ids = tok(text[:n * 8], add_special_tokens=False)["input_ids"][:n]
        m = _log_uniform(rng, *cfg.output_tokens)
        out.append((a, ids or [tok.eos_token_id], SamplingParams(max_tokens=m, stop_token_ids=())))
    return out


def trace(tok, path: Path) -> list[tuple[float, list[int], SamplingParams]]:
    """Replay a JSONL trace: one {"arrival_s", "prompt", "max_tokens"} object per line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"trace file '{path}' not found")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            a, prompt, m = float(row["arrival_s"]), str(row["prompt"]), int(row["max_tokens"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{i}: each line needs arrival_s (number), prompt (text) and max_tokens (int)") from None
        if a < 0 or m < 1 or not prompt:
            raise UserError(f"{path}:{i}: arrival_s must be >= 0, max_tokens >= 1 and the prompt non-empty")
        out.append((a, tok(prompt)["input_ids"], SamplingParams(max_tokens=m)))
    if not out:
        raise UserError(f"trace file '{path}' holds no requests")
    return out
