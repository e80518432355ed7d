"""The serving engine on a tiny MoE: schedulers, expert cache policies, parity with generate, cancellation."""

import random
from pathlib import Path

import pytest
import torch

from readmoe.errors import UserError
from readmoe.serving import Engine, EngineConfig, SamplingParams
from readmoe.serving.expert_cache import ExpertCache, min_hits, simulate
from readmoe.serving.forecast import ExpertForecast
from readmoe.serving.scheduler import SCHEDULERS, lookahead, make_scheduler

from helpers import tiny_moe


class Q:
    """A queued request as the scheduler sees it."""

    def __init__(self, rid, experts, prefill=True, max_tokens=16):
        self.rid, self.arrival_s, self.pending_experts, self.waited = rid, float(rid), list(experts), 0
        self.prefill, self.max_tokens = prefill, max_tokens
        self.taken = []

    @property
    def in_prefill(self):
        return self.prefill


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_invariants(name):
    rng = random.Random(0)
    budget, max_wait = 6, 3
    sched = make_scheduler(name, budget, max_wait)
    reqs = [Q(i, [rng.choice([0, 0, 0, 1, 2, 3]) for _ in range(rng.randint(1, 15))], prefill=rng.random() < 0.5)
            for i in range(6)]
    want = {r.rid: list(range(len(r.pending_experts))) for r in reqs}
    pos = {r.rid: 0 for r in reqs}
    worst = 0
    for _ in range(200):
        live = [r for r in reqs if r.pending_experts]
        if not live:
            break
        chunks = sched.schedule(live)
        assert chunks and sum(c.n for c in chunks) <= budget
        assert len({c.req.rid for c in chunks}) == len(chunks)
        ran = set()
        for c in chunks:
            assert 1 <= c.n <= len(c.req.pending_experts)
            c.req.taken += range(pos[c.req.rid], pos[c.req.rid] + c.n)
            pos[c.req.rid] += c.n
            del c.req.pending_experts[:c.n]
            ran.add(c.req.rid)
        for r in live:
            r.waited = 0 if r.rid in ran or not r.pending_experts else r.waited + 1
            worst = max(worst, r.waited)
    assert {r.rid: r.taken for r in reqs} == want  # every token exactly once, in order
    assert worst <= max_wait


def test_expert_aware_batches_fewer_experts():
    def queues():
        return [Q(i, [i % 4] * 3, prefill=False) for i in range(12)]
    counts = {}
    for name in SCHEDULERS:
        chunks = make_scheduler(name, 6, 8).schedule(queues())
        counts[name] = len({c.req.pending_experts[0] for c in chunks})
    assert counts["expert-aware-strict"] == 1 and counts["decode-first"] == 2 and counts["prefill-first"] == 2
    assert counts["expert-aware"] == 2, "resident, cheap experts: the cost-aware default batches like decode-first"


def _plan(sched, reqs):
    return [(c.req.rid, c.n) for c in sched.schedule(reqs)]


def test_cost_aware_groups_only_when_experts_are_costly():
    from readmoe.serving.cost_model import StepCostModel

    def queues():  # decode tokens of four experts, and a prompt whose experts alternate
        return [Q(i, [i % 4], prefill=False) for i in range(8)] + [Q(8, [0, 1, 0, 2, 3, 1], prefill=True)]

    cheap = StepCostModel(fixed=0.05, per_token=0.001, per_expert=0.001)
    assert _plan(make_scheduler("expert-aware", 16, 8, cheap), queues()) == \
        _plan(make_scheduler("decode-first", 16, 8), queues()), "work-conserving: the whole prompt runs at once"
    strict = _plan(make_scheduler("expert-aware-strict", 16, 8), queues())
    assert (8, 1) in strict, "Algorithm 1 advances a prompt by one same-expert run"

    # resident experts whose compute costs as much as the sweep's fits on this CPU (12 ms against a 30 ms step): holding
    # tokens back saves no compute (the expert runs whenever they do), so the plan is still decode-first's
    compute = StepCostModel(fixed=0.03, per_token=0.0005, per_expert=0.012)
    lone = lambda: [Q(i, [0], prefill=False, max_tokens=32) for i in range(12)] + [Q(12, [1], prefill=False, max_tokens=32)]  # noqa: E731
    for q in (queues, lone):  # the lone request on expert 1 is not held back to spare the twelve its compute
        assert _plan(make_scheduler("expert-aware", 16, 8, compute), q()) == _plan(make_scheduler("decode-first", 16, 8), q())

    costly = StepCostModel(fixed=0.05, per_token=0.001, per_expert=0.001)
    costly.load_s = lambda e: 0.0 if e == 0 else 0.5  # expert 0 resident, the others behind a slow link
    plan = make_scheduler("expert-aware", 16, 8, costly).schedule(queues())
    used = {e for c in plan for e in c.req.pending_experts[:c.n]}
    assert used == {0} and sum(c.n for c in plan) == 3, "only the resident expert's tokens: 2 decodes + 1 prompt token"

    stuck = StepCostModel(fixed=0.05, per_token=0.001, per_expert=0.001)
    stuck.load_s = lambda e: 0.5  # nothing resident: still runs the longest queue rather than nothing
    assert make_scheduler("expert-aware", 16, 8, stuck).schedule(queues())


def test_cost_aware_weighs_delay_per_output_token():
    """Deferring a 2-token request by a step costs it as much normalized latency as 16 steps cost a 32-token one, so
    a costly expert that a lone short request needs joins a batch of long requests; a request as long as the others
    waits a step for it, and each step it waited makes the next deferral cost more."""
    from readmoe.serving.cost_model import StepCostModel

    cost = StepCostModel(fixed=0.05, per_token=0.001, per_expert=0.001)
    cost.load_s = lambda e: 0.0 if e == 0 else 0.05  # expert 0 resident, expert 1 behind the link

    def plan(last_max_tokens, waited=0):
        last = Q(3, [1], prefill=False, max_tokens=last_max_tokens)
        last.waited = waited
        return [rid for rid, _ in _plan(make_scheduler("expert-aware", 16, 8, cost),
                                        [Q(i, [0], prefill=False, max_tokens=32) for i in range(3)] + [last])]

    assert plan(32) == [0, 1, 2], "an equally long request waits a step for its expert"
    assert plan(2) == [0, 1, 2, 3], "the short request's expert is loaded now"
    assert plan(32, waited=2) == [0, 1, 2, 3], "soft aging: two steps held back, it runs, well before the bound of 8"


def test_cost_aware_prices_a_deferral_at_the_step_the_queue_makes():
    """A deferred token waits one step, and a step is as long as the queued work, not the token budget: with four
    decode tokens queued the step is short, so a request waits a step rather than make the batch wait for its
    expert's load, whatever the budget; behind a long prompt the step is long and the expert joins now."""
    from readmoe.serving.cost_model import StepCostModel

    cost = StepCostModel(fixed=0.05, per_token=0.001, per_expert=0.001)
    cost.load_s = lambda e: 0.0 if e == 0 else 0.03  # expert 0 resident, expert 1 to load

    def plan(budget, prompt=False):
        reqs = [Q(i, [0], prefill=False, max_tokens=32) for i in range(3)] + [Q(3, [1], prefill=False, max_tokens=32)]
        reqs += [Q(4, [0] * 100, prefill=True, max_tokens=32)] if prompt else []
        return [rid for rid, _ in _plan(make_scheduler("expert-aware", budget, 8, cost), reqs)]

    assert plan(128) == plan(16) == [0, 1, 2]
    assert plan(128, prompt=True) == [0, 1, 2, 3, 4]


def test_cost_model_fits_its_coefficients():
    from readmoe.serving.cost_model import StepCostModel

    rng = random.Random(0)
    m = StepCostModel(refit_every=1)
    for _ in range(64):
        t, e = rng.randint(1, 16), rng.randint(1, 5)
        m.observe(t, e, 0.04 + 0.003 * t + 0.01 * e + rng.uniform(-1e-4, 1e-4))
    assert m.fitted
    assert m.fixed == pytest.approx(0.04, abs=2e-3) and m.per_token == pytest.approx(0.003, abs=2e-4)
    assert m.per_expert == pytest.approx(0.01, abs=5e-4)



class _LinkStore:
    """A store behind a 1 GB/s link that records when each transfer was issued (no weights)."""

    link_gbps, num_layers, num_experts, device = 1.0, 2, 4, torch.device("cpu")

    def __init__(self):
        self.nbytes = {(l, e): 1000 for l in range(2) for e in range(4)}
        self.issued: list[tuple[int, int]] = []

    def transfer(self, layer, expert, count=True):
        self.issued.append((layer, expert))
        return (torch.zeros(1), torch.zeros(1)), 0.0

    def load(self, layer, expert, count=True):
        return self.transfer(layer, expert, count)[0]

    def close(self):
        pass


class _NoLinkStore(_LinkStore):
    link_gbps = None


def test_transfer_buffer_starts_a_steps_extra_experts_ahead_and_shrinks_back_to_capacity():
    store = _LinkStore()
    cache = ExpertCache(store, 2, "lru", prefetch=True, buffer=1)
    for e in (0, 1):
        cache.get(0, e, keep=[e])
    store.issued.clear()
    cache.hits = cache.misses = 0
    # a step needs experts 0, 1 and 2 in layer 0; 0 and 1 fill the layer: 2 goes into the buffer at once,
    # without evicting either, where without a buffer its transfer would wait for the layer to use one of them
    cache.prefetch(0, [0, 1, 2])
    assert store.issued == [(0, 2)] and set(cache.resident[0]) == {0, 1, 2} and cache.buffered == 1
    cache.prefetch(0, [0, 1, 2, 3])  # one buffer slot per layer: 3 must wait
    assert store.issued == [(0, 2)]
    cache.get(0, 0, keep=[0, 1, 2])
    assert set(cache.resident[0]) == {0, 1, 2}  # everything held is still needed by the step
    cache.get(0, 1, keep=[1, 2])
    assert set(cache.resident[0]) == {1, 2}  # 0 is done: back to capacity
    cache.get(0, 2, keep=[2])
    assert (cache.hits, cache.misses) == (2, 1)  # the buffered expert counts as a miss, loaded early
    no_buffer = ExpertCache(_LinkStore(), 2, "lru", prefetch=True, buffer=0)
    for e in (0, 1):
        no_buffer.get(0, e, keep=[e])
    no_buffer.prefetch(0, [0, 1, 2])
    assert set(no_buffer.resident[0]) == {0, 1} and no_buffer.buffered == 0
    # a loader thread on the compute cores gets no buffer: running further ahead only competes harder
    threaded = ExpertCache(_NoLinkStore(), 2, "lru", prefetch=True, buffer=1)
    assert threaded.pool is not None and threaded.buffer == 0
    threaded.close()


def test_transfer_buffer_behind_the_link_keeps_outputs_and_capacity_between_steps(served):
    moe, d = served
    outs = {}
    for buf in (0, 1):
        eng = Engine(moe, EngineConfig(scheduler="decode-first", capacity=1, policy="belady", link_gbps=50.0,
                                       prefetch_buffer=buf), checkpoint=d)
        reqs = [eng.submit(p, SamplingParams(max_tokens=6)) for p in PROMPTS]
        while eng.has_work():
            eng.step()
            assert all(len(res) <= 1 for res in eng.cache.resident)  # the buffer is empty between steps
        outs[buf] = [r.output_ids for r in reqs]
        assert (eng.cache.buffered > 0) is (buf > 0)
        eng.close()
    assert outs[0] == outs[1]
    with pytest.raises(UserError, match="prefetch_buffer"):
        Engine(moe, EngineConfig(capacity=1, prefetch_buffer=-1), checkpoint=d)

SEQ = [[0], [1], [2], [0], [1], [3], [0], [1]]


def test_cache_policies_on_hand_made_sequences():
    # capacity 2. LRU: 0m 1m 2m(ev0) 0m(ev1) 1m(ev2) 3m(ev0) 0m(ev1) 1m(ev3) -> 0 hits
    assert simulate("lru", SEQ, 2) == 0.0
    # Belady: 0m 1m 2m(ev2's next use is never -> evict... 2 is the newcomer: evict 1? next uses: 0@3, 1@4) -> ev1;
    # 0h; 1m(ev2); 3m(ev3 newcomer: 0@6,1@7 -> ev1); 0h; 1m -> 2 hits of 8
    assert simulate("belady", SEQ, 2) == 2 / 8
    assert min_hits(SEQ, 2) == (2, 8)
    # LFU at capacity 2 on 0 0 1 0 2 1: 0m 0h 1m 0h 2m(ev1: fewer uses) 1m(ev2) -> 2 hits
    assert simulate("lfu", [[0], [0], [1], [0], [2], [1]], 2) == 2 / 6
    assert simulate("lru", [[0], [0], [1], [0], [2], [1]], 2) == 2 / 6
    assert simulate("lru", [[0, 1], [0, 1], [1, 0]], 2) == 4 / 6  # several experts in one step
    assert simulate("random", [[0], [1], [0], [1]], 2) == 0.5  # fits: random never needs to evict


def test_belady_with_full_future_equals_min():
    rng = random.Random(1)
    for _ in range(30):
        seq = [rng.sample(range(6), rng.randint(1, 3)) for _ in range(rng.randint(5, 40))]
        for cap in (1, 2, 3, 4):
            h, n = min_hits(seq, cap)
            assert simulate("belady", seq, cap) == pytest.approx(h / n)
            assert simulate("lru", seq, cap) <= h / n + 1e-12


def test_lookahead_predicts_the_next_batches():
    class R(Q):
        def __init__(self, rid, experts, prompt, out_left):
            super().__init__(rid, experts, prefill=True, max_tokens=out_left)
            self.prompt_ids, self.processed, self.output_ids = [0] * prompt, 0, []
            self.params = SamplingParams(max_tokens=out_left)
            self.finished = False

    sched = make_scheduler("expert-aware-strict", 4, 8)
    ahead = lookahead(sched, [R(0, [1, 1, 2], 3, 2), R(1, [3, 3, 3, 3, 3], 5, 1)], 4)
    assert ahead[0] == [3] and sorted(ahead[1]) == [1, 3]
    assert ahead[1] == list(dict.fromkeys(e for c in sched.schedule([R(0, [1, 1, 2], 3, 2), R(1, [3], 5, 1)])
                                          for e in c.req.pending_experts[:c.n]))  # first-use order


def test_lookahead_keeps_the_requests_decoding_in_the_current_step():
    """A decoding request's one queued token is taken by the step about to run; the lookahead must still see the
    token that step samples (assumed on the same expert), or the whole decode load vanishes from Belady's future."""
    class R(Q):
        def __init__(self, rid, prompt, out_done, max_tokens):
            super().__init__(rid, [], prefill=False, max_tokens=max_tokens)
            self.prompt_ids, self.processed = [0] * prompt, prompt + out_done - 1
            self.output_ids = [0] * out_done
            self.params = SamplingParams(max_tokens=max_tokens)
            self.finished = False

    sched = make_scheduler("decode-first", 8, 8)
    reqs = [R(0, 4, 2, 10), R(1, 3, 5, 7), R(2, 5, 9, 10)]  # r1 has one output left after this step, r2 none
    ahead = lookahead(sched, reqs, 3, running_now={0: (1, 2), 1: (1, 4), 2: (1, 0)})
    assert ahead == [[2, 4], [2], [2]]  # decode-first order; r0 keeps going
    assert lookahead(sched, reqs, 3) == []  # without the step's tokens nothing is queued


def test_forecast_continues_the_last_match_and_repeats_a_loop():
    f = ExpertForecast([5, 6, 7, 8], [0, 1, 2, 3])
    assert f.next(3) == [3, 3, 3]  # no earlier occurrence of the last token: keep its expert
    f.append(6, 1)  # 6 followed 5 before, then 7 came (expert 2): unigram match
    assert f.next(2) == [2, 3]
    f.append(7, 4)  # the bigram (6, 7) matches at its first occurrence: 8 (expert 3) came next
    assert f.next(5) == [3, 1, 4, 3, 1]  # ... and then 6, 7: a loop of period 3 goes on
    g = ExpertForecast([1, 2, 3, 9, 2, 1, 2], [0, 0, 1, 2, 3, 4, 4])
    assert g.next(1) == [1]  # the bigram (1, 2) outranks the later unigram 2 -> 1
    assert ExpertForecast([], []).next(4) == []
    with pytest.raises(ValueError):
        ExpertForecast([1, 2], [0])


def test_lookahead_takes_decode_experts_from_the_forecast():
    """Where a request's tokens repeat, Belady's future holds the experts its loop will use, not the last one."""
    class R(Q):
        def __init__(self, rid, tokens, experts, max_tokens):
            super().__init__(rid, [], prefill=False, max_tokens=max_tokens)
            self.prompt_ids, self.processed, self.output_ids = tokens, len(tokens), [0]
            self.params = SamplingParams(max_tokens=max_tokens)
            self.finished = False
            self.forecast = ExpertForecast(tokens, experts)

    sched = make_scheduler("decode-first", 8, 8)
    r = R(0, [4, 5, 4, 5, 4], [1, 2, 1, 2, 1], 10)  # the step about to run takes token 4 (expert 1)
    assert lookahead(sched, [r], 4, running_now={0: (1, 1)}) == [[2], [1], [2], [1]]
    r.forecast = None  # without one, every later token keeps the last expert
    assert lookahead(sched, [r], 4, running_now={0: (1, 1)}) == [[1], [1], [1], [1]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    moe = tiny_moe()
    d = tmp_path_factory.mktemp("served")
    moe.save_pretrained(d)
    return moe, d


PROMPTS = [[5, 9, 13, 200, 7, 7, 31], [100, 101, 102], [40] * 12, [3, 250, 3, 250, 3]]


def _reference(moe, prompt, n):
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("cfg", [dict(scheduler="decode-first"), dict(scheduler="prefill-first", token_budget=5, max_running=4),
                                 dict(scheduler="expert-aware", token_budget=4, max_running=4),
                                 dict(scheduler="expert-aware", capacity=1, policy="belady", prefetch=True),
                                 dict(scheduler="expert-aware", capacity=2, policy="lru", prefetch=False, store="host")])
def test_engine_greedy_equals_generate_alone_and_batched(served, cfg):
    moe, d = served
    want = [_reference(moe, p, 6) for p in PROMPTS]
    eng = Engine(moe, EngineConfig(**cfg), checkpoint=d)
    alone = [eng.run([(0.0, p, SamplingParams(max_tokens=6))])[0].output_ids for p in PROMPTS]
    assert alone == want
    batched = eng.run([(0.0, p, SamplingParams(max_tokens=6)) for p in PROMPTS])
    assert [r.output_ids for r in batched] == want
    assert all(r.finish_reason == "length" and r.first_token_s <= r.finish_s for r in batched)
    for r in batched:  # Belady's forecast saw every token with the expert it was routed to
        assert r.forecast.tokens == r.prompt_ids + r.output_ids
        assert r.forecast.experts[len(r.prompt_ids):] == r.output_experts
        assert r.forecast.experts[:len(r.prompt_ids)] == eng.pregate.prompt(r.prompt_ids)[0]
    assert eng.stats.forecast_tokens == 2 * 6 * len(PROMPTS) >= eng.stats.forecast_hits  # alone, then batched
    if "capacity" in cfg:
        assert eng.cache.misses > 0 and eng.cache.store.bytes_loaded > 0
        assert all(len(res) <= cfg["capacity"] for res in eng.cache.resident)
    else:  # all experts resident: nothing is loaded while serving
        assert eng.cache.misses == 0 and eng.cache.store.bytes_loaded == 0
    eng.close()


@pytest.mark.parametrize("cfg", [dict(capacity=1, policy="lru"), dict(capacity=1, policy="belady", store="host"),
                                 dict(capacity=1, policy="belady", link_gbps=50.0)])
def test_a_step_loads_only_the_experts_it_began_without(served, cfg):
    """A step over more experts than fit runs the resident ones first, so it never evicts an expert it has yet to
    use only to load it back: each layer loads exactly the step's experts that were not resident when it began."""
    moe, d = served
    eng = Engine(moe, EngineConfig(scheduler="decode-first", **cfg), checkpoint=d)
    store, loads, transfer = eng.cache.store, [], eng.cache.store.transfer

    def record(layer, expert, count=True):  # every load, inline or prefetched, is a transfer
        loads.append((layer, expert))
        return transfer(layer, expert, count)
    store.transfer = record
    for p in PROMPTS:
        eng.submit(p, SamplingParams(max_tokens=6))
    over = 0
    while eng.has_work():
        began = [set(res) for res in eng.cache.resident]
        loads.clear()
        eng.step()
        step = eng.access_log[-1]
        over += len(step) > cfg["capacity"]
        want = sorted((l, e) for l in range(len(began)) for e in step if e not in began[l])
        assert sorted(loads) == want
    assert over > 0  # some steps needed more experts than fit
    eng.close()


def test_prefetch_makes_the_same_loads_as_on_demand_and_link_emulation_takes_time(served):
    import time

    moe, d = served
    logs = {}
    for cap, sched in ((2, "expert-aware"), (1, "decode-first")):  # at capacity 1 steps need more than fit
        for pf, link in ((False, None), (True, None), (True, 50.0)):  # on demand, a loader thread, a link
            # without the transfer buffer (tested below), prefetching only moves the same loads earlier
            eng = Engine(moe, EngineConfig(scheduler=sched, capacity=cap, policy="belady", prefetch=pf,
                                           link_gbps=link, prefetch_buffer=0), checkpoint=d)
            assert (eng.cache.pool is not None) == (pf and link is None)
            eng.run([(0.0, p, SamplingParams(max_tokens=6)) for p in PROMPTS])
            logs[pf, link] = (eng.access_log, eng.cache.hits, eng.cache.misses, eng.cache.store.bytes_loaded)
            if not pf or cap == 1:  # within a layer, loads start early only when prefetching
                assert (eng.cache.early_loads > 0) is bool(pf)
            eng.close()
        assert logs[True, None] == logs[False, None] == logs[True, 50.0]
    eng = Engine(moe, EngineConfig(capacity=1, link_gbps=0.001), checkpoint=d)  # 1 MB/s
    store = eng.cache.store
    t = time.perf_counter()
    ws = store.load(0, 1)
    n = sum(w.numel() * w.element_size() for w in ws)
    assert n == store.nbytes[0, 1] and time.perf_counter() - t >= n / 1e6 * 0.95
    # transfers queue on the link: issued back to back, the second arrives a whole transfer after the first
    t = time.perf_counter()
    _, first = store.transfer(1, 0)
    _, second = store.transfer(1, 1)
    assert first >= t + store.nbytes[1, 0] / 1e6 and second >= first + store.nbytes[1, 1] / 1e6 * 0.999
    assert time.perf_counter() < second  # issuing does not wait for the link
    eng.close()
    # experts in host memory on a CPU: the link's copy engine costs no core, so a transfer hands out the model's
    # own weights (gate and up stacked in place) after the link's time, with no copy on the compute thread
    eng = Engine(moe, EngineConfig(capacity=1, store="host", link_gbps=0.001), checkpoint=d)
    store, ex = eng.cache.store, moe.moe_layers()[0].experts[1]
    t = time.perf_counter()
    gu, down = store.load(0, 1)
    assert time.perf_counter() - t >= store.nbytes[0, 1] / 1e6 * 0.95
    assert gu.data_ptr() == ex.gate_proj.weight.data_ptr() and down.data_ptr() == ex.down_proj.weight.data_ptr()
    assert torch.equal(gu, torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
    eng.close()


def test_sampling_stop_and_cancel_free_kv(served):
    moe, d = served
    eng = Engine(moe, EngineConfig(scheduler="decode-first"))
    greedy = _reference(moe, PROMPTS[0], 6)
    r = eng.run([(0.0, PROMPTS[0], SamplingParams(max_tokens=6, stop_token_ids=(greedy[2],)))])[0]
    assert r.output_ids == greedy[:greedy.index(greedy[2]) + 1] and r.finish_reason == "stop"
    a = eng.run([(0.0, PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, seed=3))])[0].output_ids
    b = eng.run([(0.0, PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, seed=3))])[0].output_ids
    assert a == b and len(a) == 8  # seeded sampling is reproducible
    r1 = eng.submit(PROMPTS[2], SamplingParams(max_tokens=50))
    r2 = eng.submit(PROMPTS[3], SamplingParams(max_tokens=50))
    eng.step()
    eng.step()
    assert eng.kv_bytes() > 0 and r1.kv is not None
    one = eng.kv_bytes()
    assert eng.cancel(r1.rid) and r1.finish_reason == "cancelled" and r1.kv is None
    assert eng.kv_bytes() < one
    assert eng.cancel(r2.rid) and eng.kv_bytes() == 0 and not eng.has_work()
    assert not eng.cancel(12345)


def test_engine_bad_input(served):
    moe, d = served
    eng = Engine(moe, EngineConfig())
    with pytest.raises(UserError, match="context window of 256 tokens"):
        eng.submit([5] * 300)
    with pytest.raises(UserError, match="empty prompt"):
        eng.submit([])
    with pytest.raises(UserError, match="token ids"):
        eng.submit([10 ** 6])
    with pytest.raises(UserError, match="unknown scheduler"):
        Engine(moe, EngineConfig(scheduler="fifo"))
    with pytest.raises(UserError, match="capacity"):
        Engine(moe, EngineConfig(capacity=9), checkpoint=d)


def test_benchmark_configs_refuse_bad_settings_before_any_run():
    """The library paths check what the CLI checks: a sweep or bench with a bad setting fails before it serves."""
    from readmoe.serving.bench import BenchConfig
    from readmoe.serving.sweep import SweepConfig, sweep

    with pytest.raises(UserError, match="`rounds` must be >= 1"):
        sweep(None, None, None, None, None, SweepConfig(rounds=0), Path("unused"))
    for bad, match in ((dict(memory=["ram"]), "unknown memory setting 'ram'"), (dict(rates=[0.0]), "rates"),
                       (dict(schedulers=["fifo"]), "unknown scheduler"),
                       (dict(engine=EngineConfig(token_budget=0)), "`token_budget`")):
        with pytest.raises(UserError, match=match):
            SweepConfig(**bad).check()
    for bad, match in ((dict(rounds=0), "`rounds`"), (dict(link_gbps=0.0), "`link_gbps`"),
                       (dict(policies=["fifo"]), "unknown `policy`"), (dict(store="tape"), "unknown `store`")):
        with pytest.raises(UserError, match=match):
            BenchConfig(**bad).check()
    with pytest.raises(UserError, match="`capacities` must lie in"):
        BenchConfig(capacities=[9]).check(num_experts=4)
    assert BenchConfig(capacities=[9]).check() is not None  # the expert count is not known yet: checked later


@pytest.mark.slow
def test_cli_bench_serve_quick(workflow, corpus_dir, tmp_path, monkeypatch, capsys):
    import json

    from helpers import fails, run

    _, model = workflow
    out = tmp_path / "serve"
    code, stdout, err = run(monkeypatch, capsys, "bench", "serve", "--model", model, "--corpus", corpus_dir, "--out", out,
                            "--quick", "--requests", 5, "--rate", 50, "--token-budget", 8, "--max-running", 4)
    assert code == 0, err
    verdict_lines = [ln for ln in stdout.splitlines() if ln.startswith(("met: ", "missed: "))]
    assert any("Belady - LRU" in ln for ln in verdict_lines) and any("within 3 %" in ln for ln in verdict_lines)
    assert "- met: " in (out / "report.md").read_text() or "- missed: " in (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    keys = {"scheduler", "policy", "capacity", "prefetch", "mean_norm_latency_s", "p95_norm_latency_s",
            "p99_norm_latency_s", "unique_experts_per_batch", "hit_ratio", "optimal_hit_ratio", "tokens_per_s", "access_file"}
    n = len(SCHEDULERS)  # each resident, each at capacity 2 with lru and belady, and expert-aware on demand; and
    extra = [c for c in (3, 4) if c < data["settings"]["experts"]]  # expert-aware's lru and belady at capacities 3-4
    assert len(data["runs"]) == n + n * 2 + 1 + 2 * len(extra) and all(keys <= set(r) for r in data["runs"])
    assert {(r["policy"], r["capacity"]) for r in data["runs"] if r["capacity"] in extra} == \
        {(p, c) for p in ("lru", "belady") for c in extra}
    assert sorted(data["goals"]["belady_minus_lru_points"]) == [str(c) for c in [2] + extra]
    for r in data["runs"]:
        assert r["requests"] == 5 and r["hit_ratio"] <= r["optimal_hit_ratio"] + 1e-9
        assert 0 <= r["forecast_accuracy"] <= 1
        lines = [json.loads(ln) for ln in (out / r["access_file"]).read_text().splitlines()]
        assert len(lines) == r["steps"] * 2 and set(lines[0]) == {"step", "layer", "experts"}
        if r["policy"] != "resident":  # MIN from the file alone (experts in first-use order) equals the report's
            h, n = min_hits([ln["experts"] for ln in lines if ln["layer"] == 0], r["capacity"])
            assert h / n == pytest.approx(r["optimal_hit_ratio"])
    assert data["dense"]["requests"] == 5 and data["batch1_decode"]["speedup"] > 0
    b1 = data["batch1_decode"]
    assert b1["bound"] == pytest.approx(b1["dense_matmul_ms"] / b1["moe_matmul_ms"], rel=0.5) and b1["moe_matmul_ms"] > 0
    assert data["goals"]["batch1_matmuls_only_speedup"] == b1["bound"]
    import statistics  # the resident runs, the dense parent and expert-aware's Belady and LRU runs with prefetch:

    # 3 interleaved rounds, medians in the row
    repeated = [x for x in data["runs"] if x["policy"] == "resident" or (x["scheduler"] == "expert-aware" and x["prefetch"])]
    assert len(repeated) == len(SCHEDULERS) + 2 + 2 * len(extra)
    for r in repeated + [data["dense"]]:
        rounds = r["rounds"]["mean_norm_latency_s"]
        assert len(rounds) == 3 and r["mean_norm_latency_s"] == statistics.median(rounds)
        assert r["p95_norm_latency_s"] == statistics.median(r["rounds"]["p95_norm_latency_s"])
    assert all("rounds" not in r for r in data["runs"] if r not in repeated)
    bel, lru = (next(x for x in repeated if x["policy"] == p and x["capacity"] == 2) for p in ("belady", "lru"))
    paired = [b - l for b, l in zip(bel["rounds"]["hit_ratio"], lru["rounds"]["hit_ratio"])]
    assert data["goals"]["belady_minus_lru_points"]["2"] == pytest.approx(100 * statistics.median(paired))
    pts = data["goals"]["belady_minus_lru_points"]  # the goal averages the capacities measured
    assert data["goals"]["belady_minus_lru_mean_points"] == pytest.approx(statistics.mean(pts.values()))
    below = [o - h for o, h in zip(bel["rounds"]["optimal_hit_ratio"], bel["rounds"]["hit_ratio"])]
    assert data["goals"]["belady_below_min_points"]["2"] == pytest.approx(100 * statistics.median(below))
    room = [o - h for o, h in zip(lru["rounds"]["optimal_hit_ratio"], lru["rounds"]["hit_ratio"])]
    assert data["goals"]["lru_below_min_points"]["2"] == pytest.approx(100 * statistics.median(room))
    assert any("below the MIN of its own trace" in ln for ln in verdict_lines if "Belady - LRU" in ln)
    assert any("median of 3 rounds" in ln for ln in verdict_lines if "Belady" in ln)
    for png in ("latency_cdf.png", "hit_ratio.png", "experts_per_batch.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    tr = tmp_path / "trace.jsonl"
    tr.write_text('{"arrival_s": 0.0, "prompt": "hello there", "max_tokens": 3}\n'
                  '{"arrival_s": 0.1, "prompt": "def f(x):", "max_tokens": 4}\n')
    code, _, err = run(monkeypatch, capsys, "bench", "serve", "--model", model, "--out", tmp_path / "tr", "--trace", tr,
                       "--schedulers", "expert-aware", "--policies", "belady", "--capacities", "1", "--dense", "none")
    assert code == 0, err
    data = json.loads((tmp_path / "tr" / "report.json").read_text())
    assert [r["generated_tokens"] for r in data["runs"]][0] == 7 and data["dense"] is None
    tr.write_text('{"arrival_s": "soon", "prompt": "x"}\n')
    fails(monkeypatch, capsys, "trace.jsonl:1", "bench", "serve", "--model", model, "--out", tmp_path / "bad", "--trace", tr)
    fails(monkeypatch, capsys, "unknown --policy", "bench", "serve", "--model", model, "--out", tmp_path / "bad",
          "--policies", "fifo")


def test_quick_matrix_measures_belady_and_lru_at_capacities_2_to_4():
    """Issue 10's Belady goals average over capacities 2-4: the quick matrix adds the default scheduler's Belady and
    LRU runs (with prefetch) at 3 and 4 where the model has more experts, and only those."""
    from readmoe.serving.bench import BenchConfig, plan, run_name

    cfg = BenchConfig(capacities=[2], policies=["lru", "belady"], belady_capacities=[3, 4])
    names = [run_name(c) for c in plan(cfg, 5)]
    assert len(names) == len(set(names)) == len(SCHEDULERS) * 3 + 1 + 4
    assert {n for n in names if ".cap3." in n or ".cap4." in n} == {
        f"expert-aware.{p}.cap{c}.prefetch" for p in ("lru", "belady") for c in (3, 4)}
    assert not any(".cap4." in run_name(c) for c in plan(cfg, 4))  # capacity 4 of 4 experts holds them all
    with pytest.raises(UserError, match="belady_capacities"):
        BenchConfig(belady_capacities=[0]).check()


def test_benchmark_rounds_alternate_which_variant_runs_first():
    """Interleaved rounds run every variant once per round, and reverse the order every other round, so neither the
    first run of a round (after another model's) nor the last always falls on the same variant."""
    from readmoe.serving.bench import interleaved

    jobs = interleaved(["a", "b", "c"], 4)
    assert [v for _, v in jobs] == list("abccbaabccba")
    assert [k for k, _ in jobs] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


@pytest.mark.slow
def test_cli_bench_serve_sweep(workflow, corpus_dir, tmp_path, monkeypatch, capsys):
    """The quick sweep: every rate x memory setting x scheduler, on-demand behind the link, the dense parent;
    the goals judged from those runs; one latency plot per memory setting and the throughput plot."""
    import json

    from helpers import run

    from readmoe.serving.sweep import MEMORY, QUICK_RATES

    _, model = workflow
    out = tmp_path / "sweep"
    code, stdout, err = run(monkeypatch, capsys, "bench", "serve", "--model", model, "--corpus", corpus_dir, "--out", out,
                            "--sweep", "--quick", "--requests", 4, "--max-running", 4, "--rounds", 2)
    assert code == 0, err
    data = json.loads((out / "report.json").read_text())
    runs = data["runs"]
    assert data["saturating_rate"] > 0 and all(r["requests"] == 4 for r in runs)
    per_rate = len(MEMORY) * 2 + 1 + 1  # 2 schedulers per memory setting, on-demand behind the link, dense
    assert len(runs) == len(QUICK_RATES) * per_rate
    for r in runs:  # every cell ran in 2 interleaved rounds and keeps the medians, the on-demand reference too
        assert len(r["rounds"]["mean_norm_latency_s"]) == 2
    assert data["settings"]["capacity_rounds"] == 2
    for f in QUICK_RATES:
        at = [r for r in runs if r["rate_factor"] == f]
        assert {(r["scheduler"], r["memory"]) for r in at if r["model"] == "moe" and not r["ondemand"]} == \
            {(s, m) for s in ("decode-first", "expert-aware") for m in MEMORY}
        assert all(r["rate"] == pytest.approx(f * data["saturating_rate"]) for r in at)
        link = [r for r in at if r["memory"] == "cap2-link" and r["scheduler"] == "expert-aware"]
        auto, ondemand = sorted(link, key=lambda r: r["ondemand"])
        assert "link" in auto["prefetch_reason"] and auto["prefetch"] and not ondemand["prefetch"]  # on behind the link
        disk = [r for r in at if r["memory"] == "cap2-disk"]
        assert all(not r["prefetch"] and r["capacity"] == 2 for r in disk)  # ... and off on the CPU's own cores
    g = data["goals"]
    assert set(g["vs_best_baseline"]) == {f"{m}@{f:g}x" for m in MEMORY for f in QUICK_RATES}
    assert g["saturated_tokens_per_s_vs_dense_resident"] > 0 and len(g["prefetch_behind_link"]) == len(QUICK_RATES)
    verdict_lines = [ln for ln in stdout.splitlines() if ln.startswith(("met: ", "missed: "))]
    assert len(verdict_lines) == 6 and any("at every rate" in ln for ln in verdict_lines)
    assert any("closes >= 50 %" in ln and "link time hidden" in ln for ln in verdict_lines)
    for png in [f"latency_{m}.png" for m in MEMORY] + ["throughput.png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_prefetch_switch_keeps_the_faster_setting_and_probes_again():
    from readmoe.serving.prefetch import PrefetchSwitch

    for faster in (True, False):
        sw = PrefetchSwitch(window=2, rounds=2, every=20, warmup=3)
        seen = []
        for _ in range(23):
            on = sw.next_step()
            seen.append(on)
            sw.observe(0.1 if on == faster else 0.3, predicted=0.1)
        assert seen[:3] == [True] * 3  # warm-up: on, nothing measured
        assert seen[3:11] == [True, True, False, False, True, True, False, False]  # the probe alternates windows
        assert set(seen[11:]) == {faster} and sw.decisions[0]["on"] is faster
        assert sw.decisions[0]["on_vs_predicted"] == pytest.approx(1.0 if faster else 3.0)
        assert sw.next_step() is True  # `every` steps after the last probe began: probing again


def test_auto_prefetch_on_behind_a_link_measured_on_a_gpu_off_on_cpu_cores(served, monkeypatch):
    from readmoe.serving import engine as engine_mod
    from readmoe.serving.prefetch import resolve_prefetch

    cpu = torch.device("cpu")
    assert resolve_prefetch("auto", 2, None, cpu)[0] is False
    assert resolve_prefetch("auto", 2, 2.0, cpu)[0] is True  # the link's copy engine needs no core
    assert resolve_prefetch("auto", 2, None, torch.device("cuda"))[0] == "measure"
    assert resolve_prefetch("auto", None, 2.0, cpu)[0] is False  # all resident: nothing to load
    assert resolve_prefetch(True, 2, None, cpu) == (True, "set explicitly")
    with pytest.raises(UserError, match="auto, on or off"):
        resolve_prefetch("sometimes", 2, None, cpu)
    moe, d = served
    prompts = [[5, 6, 7, 8] * 3, [9, 10, 11] * 5, [12, 13] * 4]
    outs = {}
    for pf, link in (("auto", 50.0), ("measure", 50.0), ("measure", None), (False, None)):
        # "measure" is what auto picks on a GPU: switched on and off by measurement, here on a CPU
        monkeypatch.setattr(engine_mod, "resolve_prefetch",
                            lambda *a, pf=pf: ("measure", "test") if pf == "measure" else resolve_prefetch(*a))
        with Engine(moe, EngineConfig(capacity=1, link_gbps=link, prefetch="auto" if pf == "measure" else pf,
                                      max_running=1), checkpoint=d) as eng:
            outs[pf, link] = [c.output_ids for c in eng.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))]
            if pf == "measure":
                sw = eng.switch
                assert sw is not None and sw.decisions and eng.cache.enabled == sw.decisions[-1]["on"]
            else:
                assert eng.switch is None and eng.cache.enabled is (pf == "auto")
    first = next(iter(outs.values()))
    assert all(o == first for o in outs.values())  # prefetching, switched or not, never changes what is computed


@pytest.mark.parametrize("capacity", [None, 1])
def test_engine_in_bf16_matches_the_hf_model_in_bf16(served, capacity):
    """The engine serves a bf16 copy of an fp32 checkpoint (experts read from disk are cast on load, as the model
    loader casts: rounding.cast_module): its prompt log-probabilities match the HF model's in bf16 at bf16's
    tolerance, and greedy decoding runs to length."""
    import copy

    from readmoe.rounding import cast_module

    moe, d = served
    bf = cast_module(copy.deepcopy(moe), torch.bfloat16)
    with Engine(bf, EngineConfig(capacity=capacity, prefetch=False), checkpoint=d) as eng:
        assert eng.runner.kv.buf.dtype == torch.bfloat16
        reqs = [eng.submit(p, SamplingParams(max_tokens=5, prompt_logprobs=0, ignore_eos=True)) for p in PROMPTS]
        while eng.has_work():
            eng.step()
        if capacity is not None:
            assert eng.cache.store.bytes_loaded > 0 and all(
                w.dtype == torch.bfloat16 for res in eng.cache.resident for ws in res.values() for w in ws)
    for p, r in zip(PROMPTS, reqs):
        with torch.no_grad():
            want = torch.log_softmax(bf(torch.tensor([p])).logits[0].float(), -1)
        got = torch.tensor([lp.logprob for lp in r.prompt_logprobs[1:]])
        want = want[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)
        assert len(r.output_ids) == 5 and r.finish_reason == "length"


def test_packed_bf16_weights_compute_what_plain_weights_do(served, monkeypatch):
    """Prepacking for oneDNN (auto: bf16 on CPU cores) changes the layout, not the numbers: the same prompt
    log-probabilities and greedy tokens as the plain weights; fp32 stays plain, an impossible `on` is a UserError,
    and auto declines when the packed copy would be large against the memory available."""
    import copy

    from readmoe.serving import packed_linear
    from readmoe.serving.packed_linear import PackedLinear, resolve_packing, supported

    cpu = torch.device("cpu")
    moe, d = served
    assert resolve_packing("auto", cpu, torch.float32, 1)[0] is False
    with pytest.raises(UserError, match="pack-weights on. needs bf16"):
        resolve_packing(True, cpu, torch.float32, 1)
    with pytest.raises(UserError, match="auto, on or off"):
        resolve_packing("yes", cpu, torch.bfloat16, 1)
    if not supported(cpu, torch.bfloat16):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    monkeypatch.setattr(packed_linear, "available_bytes", lambda: 10 ** 9)
    assert resolve_packing("auto", cpu, torch.bfloat16, 10 ** 7)[0] is True
    packed, why = resolve_packing("auto", cpu, torch.bfloat16, 2 * 10 ** 8)
    assert packed is False and "available memory" in why
    monkeypatch.undo()
    from readmoe.rounding import cast_module

    bf = cast_module(copy.deepcopy(moe), torch.bfloat16)  # as the loaders cast
    prompts = PROMPTS + [[3, 4] * 9]  # 1 to 18 rows per matmul
    out = {}
    for mode in (False, "auto"):
        with Engine(bf, EngineConfig(pack_weights=mode), checkpoint=d) as eng:
            assert eng.packed is (mode == "auto") and eng.runner.packed is eng.packed
            assert all(isinstance(w, PackedLinear) is eng.packed
                       for res in eng.cache.resident for ws in res.values() for w in ws)
            reqs = [eng.submit(p, SamplingParams(max_tokens=6, prompt_logprobs=0, ignore_eos=True)) for p in prompts]
            while eng.has_work():
                eng.step()
        out[mode] = [([lp.logprob for lp in r.prompt_logprobs[1:]], r.output_ids) for r in reqs]
    assert out["auto"] == out[False]
    from helpers import tiny_llama
    from readmoe.pipeline import dense_on_engine

    dense = dense_on_engine(tiny_llama(), moe).to(torch.bfloat16)  # empty routed experts stay unpacked
    gen = {}
    for mode in (False, "auto"):
        with Engine(dense, EngineConfig(pack_weights=mode)) as eng:
            gen[mode] = [c.output_ids for c in eng.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))]
    assert gen["auto"] == gen[False]
    with Engine(bf, EngineConfig(capacity=1), checkpoint=d) as eng:  # loaded experts stay plain tensors
        assert eng.packed and eng.cache.store.bytes_loaded == 0
        eng.generate([prompts[0]], SamplingParams(max_tokens=3))
        assert all(isinstance(w, torch.Tensor) for res in eng.cache.resident for ws in res.values() for w in ws)
    # experts in host memory (behind a link) are packed once by the store and load packed: the same numbers
    gen = {}
    for mode in (False, "auto"):
        with Engine(bf, EngineConfig(capacity=1, store="host", link_gbps=100.0, pack_weights=mode), checkpoint=d) as eng:
            assert eng.cache.store.packed is (mode == "auto") and ("host store's experts packed" in eng.pack_reason) is eng.packed
            gen[mode] = [c.output_ids for c in eng.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))]
            loaded = [w for res in eng.cache.resident for ws in res.values() for w in getattr(ws, "ws", ws)]
            assert loaded and all(isinstance(w, PackedLinear) is eng.packed for w in loaded if w.shape[0])
    assert gen["auto"] == gen[False]


def test_pregate_decodes_many_slots_as_the_router_does_one_sequence(served):
    """The engine's batched pre-gating (fixed per-slot router KV, one call for every running request's new token)
    gives the router logits its own forward gives each whole sequence, whatever the slots and lengths."""
    from readmoe.serving.pregate import PreGate

    moe, _ = served
    pg = PreGate(moe.router, slots=6, max_len=64)
    seqs = {4: [5, 9, 13, 200, 7], 1: [100, 101], 2: [40] * 9}  # slot -> prompt; slots 0, 3 and 5 idle
    for slot, ids in seqs.items():
        experts, cache = pg.prompt(ids)
        assert not any(t.requires_grad for kv in cache for t in kv), "pre-gating builds no autograd graph"
        with torch.no_grad():
            assert experts == moe.router(torch.tensor([ids]))[0][0].argmax(-1).tolist()
        pg.admit(slot, cache)
    for step in range(3):
        slots = [4, 1, 2] if step != 1 else [2, 4]  # any order, any subset
        toks = [(7 * s + 3 * step) % 250 for s in slots]
        got = pg.decode(slots, toks)
        for j, (s, t) in enumerate(zip(slots, toks)):
            seqs[s] = seqs[s] + [t]
            with torch.no_grad():
                want = moe.router(torch.tensor([seqs[s]]))[0][0, -1]
            torch.testing.assert_close(got[j], want, atol=1e-5, rtol=1e-5)
    assert pg.lens[4] == len(seqs[4]) and pg.lens[0] == 0


def test_decode_weights_are_the_lone_decode_steps_matmuls(served, monkeypatch):
    """The batch-1 bound times `decode_weights()`: exactly the weights a lone request's decode step multiplies by,
    in order, with merged experts (one merged MLP per layer) and without (shared, then routed)."""
    from readmoe.serving import step_runner
    from readmoe.serving.bench import matmul_ms

    moe, d = served
    for merge in ("auto", False):
        with Engine(moe, EngineConfig(merge_experts=merge, scheduler="decode-first"), checkpoint=d) as eng:
            r = eng.runner
            req = eng.submit(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
            eng.step()  # the prompt; the next step decodes one token on one expert
            used = []
            with monkeypatch.context() as m:  # record the MLP's matmuls and the projections' calls
                lin, proj = step_runner.linear, type(r.lm_head)  # q/k/v, o and lm_head share one class
                call = proj.__call__
                m.setattr(step_runner, "linear", lambda x, w: used.append(w) or lin(x, w))
                m.setattr(proj, "__call__", lambda self, x: used.append(self) or call(self, x))
                expert = req.pending_experts[0]
                eng.step()
            want = r.decode_weights(expert)
            assert [id(w) for w in used] == [id(w) for w in want]
            assert len(want) == (4 if merge else 6) * len(r.layers) + 1
            assert matmul_ms(want, r.dtype, reps=2) > 0


def test_merged_experts_compute_what_shared_plus_routed_do(served, monkeypatch):
    """Merged experts (auto when every expert is resident): a one-expert step runs shared + its expert as one MLP,
    a step over several experts runs either grouped by expert (each expert's rows through its merged copy) or as
    one masked MLP over all of them, whichever the chooser measured faster. Every way gives the same greedy tokens and prompt log-probabilities as the
    separate experts, and the cache still counts each use; auto declines with a capacity, an empty expert or
    too little memory. q, k and v run as one matmul whose stack the attention modules share as views, so the HF
    model computes what it did."""
    from readmoe.serving import merged_experts
    from readmoe.serving.merged_experts import ALL, GROUPED, WayChooser, resolve_merging

    moe, d = served
    with torch.no_grad():
        before = moe(torch.tensor([PROMPTS[0]])).logits
    prompts = PROMPTS + [[3, 4] * 9]
    out, seen = {}, {}
    for mode, way in ((False, None), ("auto", ALL), ("auto", GROUPED), ("auto", None)):
        with Engine(moe, EngineConfig(merge_experts=mode, scheduler="decode-first"), checkpoint=d) as eng:
            assert eng.merged is (mode == "auto") and (eng.runner.merged is not None) is eng.merged
            mg = eng.runner.merged
            one = {id(m[0]) for row in (mg.one if mg else []) for m in row if m}
            every = {id(a[0]) for a in (mg.all if mg else []) if a}
            if way is not None:
                monkeypatch.setattr(mg.chooser, "choose", lambda rows, k, w=way: w)
            calls = []  # per MLP call: one merged expert, all of them, or an expert of the grouped path
            monkeypatch.setattr(eng.runner, "_gated", lambda x, gu, dn, act, mask=None, f=eng.runner._gated: calls.append(
                "one" if id(gu) in one else "all" if id(gu) in every else "grouped") or f(x, gu, dn, act, mask))
            reqs = []
            for batch in [[p] for p in prompts] + [prompts]:  # alone (one expert per step, often), then together
                reqs += [eng.submit(p, SamplingParams(max_tokens=6, prompt_logprobs=0, ignore_eos=True)) for p in batch]
                while eng.has_work():
                    eng.step()
            key = (mode, way)
            out[key] = [([lp.logprob for lp in r.prompt_logprobs[1:]], r.output_ids) for r in reqs]
            seen[key] = (calls, eng.cache.hits, [len(s.experts) for s in eng.stats.steps],
                         mg.chooser.as_dict() if mg else None)
    base = (False, None)
    for key in out:
        assert [o for _, o in out[key]] == [o for _, o in out[base]], key
        for (a, _), (b, _) in zip(out[key], out[base]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
        assert seen[key][1] == seen[base][1] > 0 and seen[key][2] == seen[base][2]  # hits, experts per step
    layers, experts = len(moe.backbone.model.layers), seen[base][2]
    single, several = experts.count(1), sum(k > 1 for k in experts)
    assert single and several and set(seen[base][0]) == {"grouped"}
    assert seen["auto", ALL][0].count("one") == layers * single
    assert seen["auto", ALL][0].count("all") == layers * several and "grouped" not in seen["auto", ALL][0]
    # grouped with merged copies: one call per expert per layer, each expert's rows through shared + it merged
    grouped = seen["auto", GROUPED][0]
    assert "all" not in grouped and len(grouped) == layers * sum(experts) and grouped.count("one") > layers * single
    timed = seen["auto", None][3]  # the chooser timed the several-expert steps, trying the merged way first
    assert timed and all(GROUPED in ways for ways in timed.values())
    # the chooser: both ways first, then the faster, the slower again now and then
    ch = WayChooser(explore=1, retry=4)
    picks = []
    for i in range(8):
        w = ch.choose(16, 3)
        picks.append(w)
        ch.observe(16, 3, w, 1.0 if w == ALL else 2.0)
    assert picks == [GROUPED, ALL, ALL, GROUPED, ALL, ALL, ALL, GROUPED]
    assert ch.choose(9, 3) == ALL and ch.key(9, 3) == (16, 3) and ch.as_dict()["16x3"][ALL] == 1000.0
    for w in (ch.choose(64, 3), ch.choose(64, 3)):  # all loses at 64 rows: never tried at more rows
        ch.observe(64, 3, w, 3.0 if w == ALL else 2.0)
    assert [ch.choose(512, 3) for _ in range(5)] == [GROUPED] * 5 and ch.choose(512, 4) == GROUPED
    ch.observe(512, 4, GROUPED, 2.0)
    assert ch.choose(512, 4) == ALL  # other experts: no evidence against all yet
    # auto's rules, and the errors a user can fix
    assert resolve_merging("auto", 2, 10)[0] is False and "capacity" in resolve_merging("auto", 2, 10)[1]
    assert resolve_merging("auto", None, 0) == (False, "auto: no routed expert to merge")
    monkeypatch.setattr(merged_experts, "available_bytes", lambda: 10 ** 6)
    merged, why = resolve_merging("auto", None, 2 * 10 ** 5)
    assert merged is False and "available memory" in why
    with pytest.raises(UserError, match="drop --capacity"):
        resolve_merging(True, 2, 1)
    with pytest.raises(UserError, match="auto, on or off"):
        resolve_merging("yes", None, 1)
    # q, k, v: one stack, the modules' weights its views, found in place by the next engine
    attn = moe.backbone.model.layers[0].self_attn
    with Engine(moe, EngineConfig(), checkpoint=d) as eng:
        w = eng.runner.qkv[0].weight
        assert attn.q_proj.weight.data_ptr() == w.data_ptr() and attn.v_proj.weight.data_ptr() == w[-attn.v_proj.weight.shape[0]:].data_ptr()
        with Engine(moe, EngineConfig(), checkpoint=d) as again:
            assert again.runner.qkv[0].weight.data_ptr() == w.data_ptr()
    with torch.no_grad():
        assert torch.equal(moe(torch.tensor([PROMPTS[0]])).logits, before)


def test_resident_expert_aware_schedules_what_decode_first_does(served, monkeypatch):
    """With every expert resident the cost-aware default runs the same tokens in every step as decode-first, at
    light load and overloaded, even where an expert costs a step as much as in the sweep's fits on this CPU (12 ms
    against a 30 ms fixed cost): holding tokens back saves no compute, only loads. The engine is replayed on a
    deterministic clock, so any difference would be the scheduler's, not noise."""
    from readmoe.serving import engine as engine_mod

    class Clock:  # time advances only by the modelled cost of each step
        t = 0.0

        def perf_counter(self):
            return self.t

    moe, _ = served
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 40))] for _ in range(16)]
    lengths = [rng.randrange(4, 24) for _ in prompts]  # short and long requests, as the sweep's 8-48 tokens
    for gap in (0.5, 0.05, 0.0):  # light load, saturation, every request at once
        steps = {}
        for sched in ("decode-first", "expert-aware"):
            clock = Clock()
            monkeypatch.setattr(engine_mod, "time", clock)
            with Engine(moe, EngineConfig(scheduler=sched, token_budget=64, max_running=12)) as eng:
                real = eng.runner.step

                def step(segs, order=None, real=real, clock=clock):
                    out = real(segs, order)
                    clock.t += 0.03 + 0.0005 * sum(len(s.tokens) for s in segs) + 0.012 * len(
                        {e for s in segs for e in s.experts})
                    return out

                eng.runner.step = step
                eng.run([(i * gap, p, SamplingParams(max_tokens=n, ignore_eos=True)) for i, (p, n) in enumerate(zip(prompts, lengths))])
                steps[sched] = [(s.tokens, s.experts) for s in eng.stats.steps]
        assert steps["expert-aware"] == steps["decode-first"] and len(steps["decode-first"]) > 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_runner_fused_norm_and_rope_are_the_backbones_own_bit_for_bit(served, dtype):
    """The step runner's three-op RMSNorm and its one rotation of q and k together are chosen on a Llama and give the
    HF modules' outputs exactly; a norm of another formula (Gemma-3's 1 + weight) keeps its own module."""
    import copy

    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from readmoe.rounding import cast_module
    from readmoe.serving.step_runner import FusedRMSNorm, StepRunner, fused_norm

    moe, _ = served
    m = cast_module(copy.deepcopy(moe), dtype)
    r = StepRunner(m, expert_fn=None, slots=2)
    assert r.rope_qk and all(isinstance(n, FusedRMSNorm) for pair in r.norms for n in pair)
    layer = m.backbone.model.layers[1]
    h = (3 * torch.randn(1, 7, m.config.text_config.hidden_size)).to(dtype)
    with torch.no_grad():
        for fused, mod in zip(r.norms[1], (layer.input_layernorm, layer.post_attention_layernorm)):
            assert torch.equal(fused(h), mod(h))
    gemma = Gemma3RMSNorm(h.shape[-1])
    gemma.variance_epsilon = 1e-6  # even with Llama's attribute name, the probe sees the other formula
    assert fused_norm(gemma.to(dtype)) is gemma


def test_importing_readmoe_sizes_onednns_kernel_cache_unless_the_user_did():
    """oneDNN's kernel cache must hold every MoE matmul shape, or bf16 kernels compile again on every call; the
    setting must be in place at import, before oneDNN makes its first kernel, and a user's own value wins."""
    import os
    import subprocess
    import sys

    code = "import torch, readmoe, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.strip()
    assert int(run(env)) >= 8192
    assert run(env | {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}) == "512"


def test_closing_an_engine_frees_its_copies_without_the_cycle_collector(served):
    """The engine and its parts refer to each other, so close() must drop the merged experts and the KV caches
    itself: a benchmark that makes engine after engine otherwise grew by hundreds of MiB per engine."""
    import gc
    import weakref

    moe, d = served
    gc.collect()
    gc.disable()
    try:
        eng = Engine(moe, EngineConfig(), checkpoint=d)
        eng.run([(0.0, PROMPTS[0], SamplingParams(max_tokens=3))])
        assert eng.merged and eng.runner.merged is not None
        refs = [weakref.ref(x) for x in (eng.runner.merged, eng.runner.kv, eng.pregate.kv)]
        eng.close()
        assert [r() for r in refs] == [None, None, None]
        assert all(not res for res in eng.cache.resident)
    finally:
        gc.enable()
