"""Which queued tokens run in the next step, under a token budget.

Every request exposes its pending tokens in order (the prompt's not yet computed
tokens, or the one token just sampled), each with the expert the router picked on
arrival. A scheduler returns chunks: (request, n) takes the request's next n tokens.

- `decode-first` (DeepSpeed-FastGen style): decode tokens first, prompts fill the rest.
- `prefill-first` (vLLM / TGI style): prompt chunks first, then decode tokens.
- `expert-aware-strict` (Read-ME Algorithm 1): one queue per expert holding the runs
  of consecutive same-expert tokens at the head of each request; the batch is filled
  from the longest queues first, so it touches few distinct experts. It is not
  work-conserving: a prompt advances one same-expert run per step.
- `expert-aware` (the default): work-conserving and cost-aware. Requests are taken in
  decode-first order, each as far as the budget allows, and a token whose expert is
  not yet in the batch is taken only if the step cost model says loading that expert
  now (every request in the batch waits for the load) costs less than deferring it by one
  step (every request whose next token needs it waits a step). Only a load can be saved
  by waiting (the expert's compute is paid whenever its tokens run), so with every expert
  resident it schedules exactly as decode-first; where experts must be loaded it groups.
  Both sides are weighed in normalized latency (latency per output token, the metric
  serving is judged by): a step of delay costs a request 1/its output length, so a
  short request is not deferred for long ones, and more for each step it has already
  waited (`delay_cost`).

All obey the aging rule: a request whose head token has waited `max_wait`
steps is served first, so no token waits longer than that (given at most
`token_budget` running requests, which the engine enforces).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, get_args

from .cost_model import StepCostModel


class Queued(Protocol):
    rid: int
    arrival_s: float
    pending_experts: list[int]
    waited: int
    max_tokens: int

    @property
    def in_prefill(self) -> bool: ...


@dataclass(frozen=True)
class Chunk:
    req: object
    n: int


@dataclass(frozen=True)
class SchedulerOutput:
    """What one engine step runs: the chunks of queued tokens, each a request and how many of its tokens."""

    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.n for c in self.chunks)


def age(reqs: Sequence[Queued], ran: set[int]) -> None:
    """The aging rule: a request with queued tokens that did not run waits one step longer."""
    for r in reqs:
        r.waited = 0 if r.rid in ran or not r.pending_experts else r.waited + 1


def delay_cost(r: Queued) -> float:
    """What one more step of delay costs `r`, in steps of normalized latency: 1 / its output length (max_tokens
    stands in: where a stop token falls is unknown), times 1 + the steps it has already waited. The second factor
    is a soft aging rule: deferring a token saves nothing if the expert it needs stays out of the batch, so
    without it a lone request on a costly expert would wait the full aging bound at every token it generates."""
    return (1 + r.waited) / max(1, r.max_tokens)


def head_run(experts: Sequence[int]) -> int:
    """Length of the run of equal experts at the head."""
    n = 1
    while n < len(experts) and experts[n] == experts[0]:
        n += 1
    return n


class Scheduler:
    name = "base"
    aged_head_run = False  # an aged request takes only its head run of same-expert tokens

    def __init__(self, token_budget: int, max_wait: int = 8):
        if token_budget < 1 or max_wait < 1:
            raise ValueError("token_budget and max_wait must be >= 1")
        self.token_budget, self.max_wait = token_budget, max_wait

    def schedule(self, reqs: Sequence[Queued]) -> list[Chunk]:
        ready = [r for r in reqs if r.pending_experts]
        ready.sort(key=lambda r: (r.arrival_s, r.rid))
        aged = [r for r in ready if r.waited >= self.max_wait]
        aged.sort(key=lambda r: -r.waited)
        taken: dict[int, int] = {}
        left = self.token_budget
        for r in aged:  # aging: one token each first, so every aged request is served this step
            if left == 0:
                break
            taken[r.rid], left = 1, left - 1
        for r in aged:  # then as much of their head as they would normally take
            if r.rid in taken and left:
                want = head_run(r.pending_experts) if self.aged_head_run else len(r.pending_experts)
                extra = min(want - 1, left)
                taken[r.rid] += extra
                left -= extra
        rest = [r for r in ready if r.rid not in taken]
        by_id = {r.rid: r for r in ready}
        self.forced = {e for rid, n in taken.items() for e in by_id[rid].pending_experts[:n]}  # the aged chunks'
        self.forced_cost = sum(delay_cost(by_id[rid]) for rid in taken)
        for r, n in self.fill(rest, left):
            taken[r.rid] = n
        return [Chunk(by_id[rid], n) for rid, n in taken.items() if n > 0]

    def fill(self, reqs: list, budget: int) -> list[tuple[object, int]]:
        raise NotImplementedError


class _Ordered(Scheduler):
    def order(self, reqs: list) -> list:
        raise NotImplementedError

    def fill(self, reqs, budget):
        out = []
        for r in self.order(reqs):
            if budget == 0:
                break
            n = min(len(r.pending_experts), budget)
            out.append((r, n))
            budget -= n
        return out


class DecodeFirst(_Ordered):
    name = "decode-first"

    def order(self, reqs):
        return [r for r in reqs if not r.in_prefill] + [r for r in reqs if r.in_prefill]


class PrefillFirst(_Ordered):
    name = "prefill-first"

    def order(self, reqs):
        return [r for r in reqs if r.in_prefill] + [r for r in reqs if not r.in_prefill]


class ExpertAwareStrict(Scheduler):
    name = "expert-aware-strict"
    aged_head_run = True

    def fill(self, reqs, budget):
        queues: dict[int, list] = {}
        for r in sorted(reqs, key=lambda r: r.in_prefill):  # within a queue: decode tokens first, then FCFS
            queues.setdefault(r.pending_experts[0], []).append(r)
        size = {e: sum(head_run(r.pending_experts) for r in q) for e, q in queues.items()}
        out = []
        for e in sorted(queues, key=lambda e: (-size[e], e)):
            for r in queues[e]:
                if budget == 0:
                    return out
                n = min(head_run(r.pending_experts), budget)
                out.append((r, n))
                budget -= n
        return out


class ExpertAware(Scheduler):
    name = "expert-aware"

    def __init__(self, token_budget: int, max_wait: int = 8, cost: StepCostModel | None = None):
        super().__init__(token_budget, max_wait)
        self.cost = cost or StepCostModel()

    def fill(self, reqs, budget):
        batch, out = set(self.forced), []
        size: dict[int, int] = {}  # queued head-run tokens per expert
        waiting: dict[int, float] = {}  # delay cost of the requests whose next token needs the expert
        for r in reqs:
            e = r.pending_experts[0]
            size[e] = size.get(e, 0) + head_run(r.pending_experts)
            waiting[e] = waiting.get(e, 0.0) + delay_cost(r)
        if not batch and reqs:  # a step always runs something: seed with the longest queue, as Algorithm 1 does
            batch.add(max(size, key=lambda e: (size[e], -e)))
        # What deferring costs: a step more of waiting, as long as the queued work makes it (a full budget's step
        # would overstate it at light load, where a step holds a few tokens)
        queued = min(budget, sum(len(r.pending_experts) for r in reqs))
        defer_s = self.cost.step_s(queued, max(1, len(set(size) | batch)))
        in_batch = self.forced_cost  # delay cost of the requests already in the batch
        for r in [r for r in reqs if not r.in_prefill] + [r for r in reqs if r.in_prefill]:
            if budget == 0:
                break
            new, n = set(), 0
            for e in r.pending_experts[:budget]:
                if e not in batch and e not in new:
                    # loading e now makes every request in the batch wait for it; deferring e makes every request
                    # waiting on e wait a step (e's compute is paid later either way: cost_model.deferrable_s)
                    if self.cost.deferrable_s(e) * in_batch > max(delay_cost(r), waiting.get(e, 0.0)) * defer_s:
                        break
                    new.add(e)
                n += 1
            if n:
                out.append((r, n))
                batch |= new
                budget -= n
                in_batch += delay_cost(r)
        return out


SchedulerName = Literal["decode-first", "prefill-first", "expert-aware", "expert-aware-strict"]
SCHEDULERS = {c.name: c for c in (DecodeFirst, PrefillFirst, ExpertAware, ExpertAwareStrict)}
assert set(SCHEDULERS) == set(get_args(SchedulerName))


def make_scheduler(name: str, token_budget: int, max_wait: int = 8, cost: StepCostModel | None = None) -> Scheduler:
    if name not in SCHEDULERS:
        from ..errors import UserError

        raise UserError(f"unknown scheduler '{name}'; use one of {', '.join(SCHEDULERS)}")
    if name == ExpertAware.name:
        return ExpertAware(token_budget, max_wait, cost)
    return SCHEDULERS[name](token_budget, max_wait)


@dataclass
class _Sim:
    rid: int
    arrival_s: float
    pending_experts: list
    waited: int
    prompt_left: int
    decode_left: int
    max_tokens: int
    draft: list = field(default_factory=list)  # forecast experts of the tokens it will generate, in order

    @property
    def in_prefill(self) -> bool:
        return self.prompt_left > 0


def lookahead(sched: Scheduler, reqs: Sequence, steps: int,
              running_now: dict[int, tuple[int, int]] | None = None) -> list[list[int]]:
    """The experts of the next `steps` batches if nothing new arrives, simulated on copies of the queues, each
    batch's in the order its layers will use them (first use in the flat batch, as the step runner visits them):
    Belady ranks experts by their next use, and within a step that order decides it.

    `running_now` maps each request in the step about to run to (tokens taken, expert of the last one): those
    are no longer queued, and a request whose queue they emptied samples a token at the end of the step. The
    experts of that token and every later one come from the request's `forecast` (forecast.py); a request
    without one keeps its last expert (tokens usually do)."""
    now = running_now or {}
    sims = []
    for r in reqs:
        if r.finished:
            continue
        n, last_e = now.get(r.rid, (0, None))
        prompt_left = max(0, len(r.prompt_ids) - r.processed - n)
        decode_left = r.params.max_tokens - len(r.output_ids)
        pending = list(r.pending_experts)
        forecast = getattr(r, "forecast", None)
        draft = forecast.next(min(steps, decode_left)) if forecast is not None else []
        if not pending and last_e is not None and prompt_left == 0:
            decode_left -= 1  # the step's last token yields an output ...
            if decode_left >= 1:
                pending = [draft.pop(0) if draft else last_e]  # ... which is queued for the next step
        sims.append(_Sim(r.rid, r.arrival_s, pending, r.waited, prompt_left, decode_left, r.max_tokens, draft))
    out = []
    for _ in range(steps):
        chunks = sched.schedule(sims)
        if not chunks:
            break
        used: dict[int, None] = {}
        ran = {c.req.rid for c in chunks}
        for c in chunks:
            s = c.req
            used.update(dict.fromkeys(s.pending_experts[:c.n]))
            last = s.pending_experts[c.n - 1]
            del s.pending_experts[:c.n]
            s.prompt_left = max(0, s.prompt_left - c.n)
            if not s.pending_experts and s.prompt_left == 0 and s.decode_left > 1:
                s.decode_left -= 1
                s.pending_experts.append(s.draft.pop(0) if s.draft else last)
        age(sims, ran)
        out.append(list(used))
    return out
