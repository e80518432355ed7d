"""A generation request and its life in the engine: queued tokens, each with its pre-gated expert."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .forecast import ExpertForecast


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded output (needs the engine's tokenizer)
    ignore_eos: bool = False
    seed: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)


class RequestStatus(enum.Enum):
    """Where a request is in its life; the finished states carry the OpenAI finish reason."""

    WAITING = "waiting"  # queued, no KV cache yet
    RUNNING = "running"  # holds a KV cache, tokens being scheduled
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context window
    FINISHED_ABORTED = "cancelled"  # cancelled by the caller (a disconnected client)

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Logprob:
    """A token's log-probability and the `top` most likely tokens at its position (token id -> logprob)."""

    token: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class Request:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_s: float = 0.0

    # set by the engine
    status: RequestStatus = RequestStatus.WAITING
    pending: list[int] = field(default_factory=list)  # tokens whose KV is not computed yet, in order
    pending_experts: list[int] = field(default_factory=list)  # their pre-gated experts
    output_ids: list[int] = field(default_factory=list)
    output_experts: list[int] = field(default_factory=list)  # the pre-gated expert of every generated token
    output_logprobs: list[Logprob] = field(default_factory=list)  # with params.logprobs
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)  # with params.prompt_logprobs
    processed: int = 0  # tokens already in the KV cache
    waited: int = 0  # steps the head token has been schedulable but not scheduled
    router_cache: object = None
    forecast: ExpertForecast | None = None  # the experts of tokens not yet generated (Belady's lookahead)
    kv: object = None
    first_token_s: float | None = None
    finish_s: float | None = None
    generator: torch.Generator | None = None

    @property
    def in_prefill(self) -> bool:
        return self.processed < len(self.prompt_ids)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        """'stop', 'length' or 'cancelled' once finished."""
        return self.status.value if self.finished else None

    def take(self, n: int) -> tuple[list[int], list[int]]:
        """Pop the next n pending tokens and their experts."""
        toks, exps = self.pending[:n], self.pending_experts[:n]
        del self.pending[:n], self.pending_experts[:n]
        return toks, exps


def validate(prompt_ids: list[int], params: SamplingParams, max_len: int | None, vocab_size: int,
             has_tokenizer: bool = True) -> None:
    """Raise a UserError for a request an engine of this context window and vocabulary cannot serve. A function of
    fixed facts, so a front end (the Ray ingress) rejects what its replicas would, without holding an engine."""
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token")
    if max_len and len(prompt_ids) >= max_len:
        raise UserError(f"prompt of {len(prompt_ids)} tokens does not fit the engine's context window of "
                        f"{max_len} tokens (max_model_len); shorten it")
    if params.max_tokens < 1:
        raise UserError("max_tokens must be >= 1")
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
        raise UserError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise UserError(f"prompt token ids must lie in [0, {vocab_size})")
    if params.stop and not has_tokenizer:
        raise UserError("stop strings need the engine's tokenizer: use Engine.from_pretrained or pass tokenizer=")
