"""A generation request and its life in the engine: queued tokens, each with its pre-gated expert."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded output
    seed: int = 0


@dataclass
class Request:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_s: float = 0.0

    # set by the engine
    pending: list[int] = field(default_factory=list)  # tokens whose KV is not computed yet, in order
    pending_experts: list[int] = field(default_factory=list)  # their pre-gated experts
    output_ids: list[int] = field(default_factory=list)
    processed: int = 0  # tokens already in the KV cache
    waited: int = 0  # steps the head token has been schedulable but not scheduled
    router_cache: object = None
    kv: object = None
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    generator: torch.Generator | None = None

    @property
    def in_prefill(self) -> bool:
        return self.processed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take(self, n: int) -> tuple[list[int], list[int]]:
        """Pop the next n pending tokens and their experts."""
        toks, exps = self.pending[:n], self.pending_experts[:n]
        del self.pending[:n], self.pending_experts[:n]
        return toks, exps
