"""Scale-out on Ray Serve: the affinity policy and the simulation (fast), then a real local Ray deployment of a
tiny MoE (slow): the proxy serves completions and streaming chat equal to one engine's, affinity routes by experts
and falls back under load, a killed replica fails its requests cleanly and the next ones succeed, and shutdown
leaves no Ray process behind."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from readmoe.cluster.affinity import AffinityPolicy, ReplicaView, histogram
from readmoe.cluster.simulate import SimRequest, remap, simulate

from helpers import byte_tokenizer, free_port, tiny_moe


# ---------------------------------------------------------------- the policy, no Ray
def test_affinity_prefers_the_replica_holding_the_experts():
    p = AffinityPolicy(num_experts=4, bound=2)
    views = {"r0": ReplicaView(0, [1, 1, 0, 0]), "r1": ReplicaView(0, [0, 0, 1, 1])}
    assert p.choose([0, 0, 5, 1], views) == ("r1", "affinity")
    assert p.choose([7, 1, 0, 0], views) == ("r0", "affinity")


def test_affinity_cold_start_spreads_and_then_sticks():
    p = AffinityPolicy(num_experts=3, bound=2)
    views = {"r0": ReplicaView(0), "r1": ReplicaView(0)}
    first, why = p.choose([4, 0, 0], views)
    assert why == "cold"
    p.routed(first, [4, 0, 0])
    assert p.choose([4, 0, 0], views) == (first, "affinity"), "the router's own record makes the replica warm"
    other, why = p.choose([0, 4, 0], views)
    assert (other, why) != (first, "affinity") and why == "cold", "a request for other experts goes elsewhere"


def test_affinity_falls_back_beyond_the_bound():
    p = AffinityPolicy(num_experts=2, bound=2)
    assert p.choose([3, 0], {"hot": ReplicaView(3, [1, 0]), "idle": ReplicaView(0, [0, 1])}) == ("idle", "fallback")
    assert p.choose([3, 0], {"hot": ReplicaView(2, [1, 0]), "idle": ReplicaView(0, [0, 1])}) == ("hot", "affinity")
    with pytest.raises(ValueError, match="affinity_bound"):
        AffinityPolicy(2, bound=-1)


def test_histogram():
    assert histogram([2, 0, 2, 2], 4) == [1, 0, 3, 0]


def test_simulated_affinity_beats_spreading_when_requests_are_domain_pure():
    """Four domains, each request all one expert, capacity 1 per replica: affinity keeps a replica per domain;
    round-robin and pow2 mix the domains on every replica."""
    import random

    domains = [0, 1, 2, 3] * 40
    random.Random(0).shuffle(domains)
    reqs = [SimRequest([d] * 8, [d] * 12) for d in domains]
    hit = {route: simulate(reqs, 4, route, 4, capacity=1, max_running=4, load=0.6)["hit_ratio"]
           for route in ("affinity", "pow2", "round-robin")}
    assert hit["affinity"] > hit["pow2"] + 0.2 and hit["affinity"] > hit["round-robin"] + 0.2, hit
    one = {route: simulate(reqs, 1, route, 4, capacity=1, max_running=4)["hit_ratio"] for route in ("affinity", "pow2")}
    assert one["affinity"] == one["pow2"], "one replica: routing cannot matter"


def test_simulated_replica_runs_a_steps_resident_experts_first_as_the_engine_does():
    """Capacity 2 holding experts 0 and 1, a step over 2, 0 and 1: the engine runs 0 and 1 (hits), then loads 2.
    In first-use order 2 would evict 0, 0 evict 1 and 1 evict 2: no hit at all."""
    from readmoe.cluster.simulate import _Replica

    rep = _Replica(capacity=2)
    rep.access([0, 1])
    rep.access([2, 0, 1, 2])
    assert (rep.hits, rep.accesses) == (2, 5) and set(rep.cache) == {1, 2}


def test_remap_keeps_each_requests_concentration():
    reqs = [SimRequest([0, 0, 1], [0, 2])]
    (r,) = remap(reqs, 8, seed=3)
    assert len(set(r.prompt + r.output)) == 3 and r.prompt[0] == r.prompt[1] == r.output[0]
    with pytest.raises(ValueError):
        remap(reqs, 2)


def test_router_alone_equals_the_models_router(tmp_path):
    from readmoe.modeling import load_readme, load_router

    tiny_moe().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    router, tok = load_router(tmp_path)
    moe, _ = load_readme(str(tmp_path))
    x = torch.tensor([tok("mixture of experts")["input_ids"]])
    torch.testing.assert_close(router(x, None, None)[0], moe.router(x, None, None)[0], rtol=0, atol=0)


def test_one_replica_never_imports_ray():
    code = "import sys, readmoe.cli, readmoe.server, readmoe.serving; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_emit_config_and_bad_flags(tmp_path, monkeypatch, capsys):
    import yaml

    from helpers import cli, fails

    d = tmp_path / "m"
    tiny_moe().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    out = tmp_path / "serve.yaml"
    cli("serve", "--model", str(d), "--replicas", "3", "--route", "pow2", "--capacity", "2",
        "--num-cpus", "2", "--emit-config", str(out))
    cfg = yaml.safe_load(out.read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "readmoe.cluster.deploy:application"
    assert app["args"]["replicas"] == 3 and app["args"]["route"] == "pow2" and app["args"]["num_cpus"] == 2
    assert app["args"]["engine"]["capacity"] == 2 and os.path.isabs(app["args"]["model"])
    fails(monkeypatch, capsys, "--route", "serve", "--model", str(d), "--replicas", "2", "--route", "nearest")
    fails(monkeypatch, capsys, "--dense", "serve", "--model", str(d), "--replicas", "2", "--dense")


# ---------------------------------------------------------------- a live local Ray deployment (slow)
def pure_prompt(router, tok, expert: int) -> str:
    """A 16-byte prompt the router sends wholly to `expert` (searched, not assumed)."""
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        ids = tok(ch * 16)["input_ids"]
        if router(torch.tensor([ids]), None, None)[0][0].argmax(-1).tolist() == [expert] * len(ids):
            return ch * 16
    pytest.skip(f"no one-character prompt routes wholly to expert {expert}")


def test_replica_sends_one_message_unless_streaming(ckpt):
    """Outside Ray: a non-streaming request's whole output is one message (with the gaps between its steps, for
    the ingress's inter-token latency); a streaming one arrives in pieces that add up to the same tokens."""
    import asyncio

    from readmoe.cluster.replica import EngineReplica

    rep = EngineReplica(str(ckpt), {"capacity": 1}, dtype="float32")
    params = {"max_tokens": 12, "ignore_eos": True, "temperature": 0.0}

    async def events(stream):
        return [ev async for ev in rep.generate(list(b"The river runs"), params, stream=stream)]

    try:
        one = asyncio.run(events(False))
        pieces = asyncio.run(events(True))
    finally:
        rep.et.stop(timeout=5)
    assert len(one) == 1 and one[0].finished and len(one[0].new_ids) == 12
    assert len(one[0].gaps) == 11 and all(g >= 0 for g in one[0].gaps)
    assert one[0].request is None and one[0].replica == rep.name
    assert [t for ev in pieces for t in ev.new_ids] == one[0].new_ids and pieces[-1].finished


def ray_processes(pids) -> list[int]:
    import psutil

    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_cli_replicas_serve_and_stop_clean(ckpt):
    """`readmoe serve --replicas 2` as a user runs it: serves, and SIGTERM takes every Ray process down."""
    import psutil

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "readmoe.cli", "serve", "--model", str(ckpt), "--port", str(port),
                             "--replicas", "2", "--capacity", "2", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, end = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the deployment did not come up"
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 4, "Ray's processes run under the CLI"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        end = time.monotonic() + 30
        while ray_processes(tree) and time.monotonic() < end:
            time.sleep(0.5)
        assert not ray_processes(tree), "Ray processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(ckpt):
    """2 replicas (capacity 1) behind the affinity router on a local Ray with 2 CPUs; torn down at the end."""
    ray = pytest.importorskip("ray")
    from dataclasses import asdict

    from ray import serve

    from readmoe.cluster.deploy import ClusterArgs, application
    from readmoe.modeling import load_router

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    node = ray._private.worker._global_node
    pids = [p.process.pid for procs in node.all_processes.values() for p in procs]
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ClusterArgs(str(ckpt), replicas=2, route="affinity", served_model_name="tiny",
                           engine={"capacity": 1, "max_running": 8, "token_budget": 16}, dtype="float32",
                           affinity_bound=2)
        serve.run(application(asdict(args)), name="readmoe", route_prefix="/")
        router, tok = load_router(ckpt)
        yield type("Cluster", (), {"url": f"http://127.0.0.1:{port}", "router": router, "tok": tok, "ray": ray})
    finally:
        import psutil

        pids += [c.pid for p in pids if psutil.pid_exists(p) for c in psutil.Process(p).children(recursive=True)]
        serve.shutdown()
        ray.shutdown()
        end = time.monotonic() + 30
        while ray_processes(pids) and time.monotonic() < end:
            time.sleep(0.5)
        assert not ray_processes(pids), "Ray processes left behind"


def complete(c, prompt, max_tokens=1, **kw):
    r = httpx.post(f"{c.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, "return_experts": True, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def decisions(c) -> dict:
    text = httpx.get(f"{c.url}/metrics", timeout=10).text
    return {l.split('outcome="')[1].split('"')[0]: float(l.split()[-1]) for l in text.splitlines()
            if l.startswith("readmoe:router_decisions_total")}


@pytest.mark.slow
def test_affinity_routes_by_experts_and_falls_back_under_load(cluster):
    """First on the deployment: the replicas' caches and the router's record hold nothing else yet."""
    a, b = pure_prompt(cluster.router, cluster.tok, 0), pure_prompt(cluster.router, cluster.tok, 1)
    home_a = {complete(cluster, a)["replica"] for _ in range(3)}
    assert len(home_a) == 1, "expert-0 requests stay on one replica"
    home_b = {complete(cluster, b)["replica"] for _ in range(3)}
    assert len(home_b) == 1 and home_b != home_a, "expert-1 requests go to the other replica and stay there"
    assert complete(cluster, a)["replica"] in home_a
    # 8 long expert-0 requests at once: beyond the bound (2 more in flight) some must go to the other replica
    import concurrent.futures as cf

    before = decisions(cluster).get("fallback", 0)
    with cf.ThreadPoolExecutor(8) as pool:
        homes = list(pool.map(lambda _: complete(cluster, a, max_tokens=48, ignore_eos=True)["replica"], range(8)))
    assert set(homes) == home_a | home_b, homes
    assert decisions(cluster).get("fallback", 0) > before
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    assert text.count("readmoe:replica_requests_total{") == 2, "each replica's counters are exported"


@pytest.mark.slow
def test_outputs_through_ray_equal_one_engine(ckpt, cluster):
    from readmoe.serving import Engine, EngineConfig
    from readmoe.serving.request import SamplingParams

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0, timeout=120)
    prompts = ["The river runs", "0123", "zz top"]
    with Engine.from_pretrained(ckpt, EngineConfig(capacity=1)) as eng:
        want = [c.text for c in eng.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))]
    itl = 'readmoe:inter_token_latency_seconds_count{model_name="tiny"}'
    before = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    got = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert got == want
    after = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    count = lambda text: sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(itl))  # noqa: E731
    assert count(after) - count(before) == 3 * 11, "each token after the first is one inter-token latency"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt=prompts[0], max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == want[0]
    msgs = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


@pytest.mark.slow
def test_a_killed_replica_fails_its_requests_and_the_next_succeed(cluster):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_experts": True}
    lines = []
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=120) as r:
        it = r.iter_lines()
        first = json.loads(next(l for l in it if l.startswith("data: "))[6:])
        replica = first["choices"][0]["replica"]
        name = next(a["name"] for a in cluster.ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].endswith(replica))
        cluster.ray.kill(cluster.ray.get_actor(name, namespace="serve"), no_restart=False)
        for l in it:
            lines.append(l)
    events = [json.loads(l[6:]) for l in lines if l.startswith("data: ") and l != "data: [DONE]"]
    assert events and "error" in events[-1] and events[-1]["error"]["code"] == 503, events[-1:]
    assert [l for l in lines if l][-1] == "data: [DONE]"
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=3, timeout=120)
    for _ in range(3):  # sampled with a random seed: ignore_eos, or a drawn EOS would end one early
        out = client.completions.create(model="tiny", prompt="abc", max_tokens=4, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4


def test_scaleout_simulate_only_runs_the_simulation_on_expert_sequences_from_a_local_engine(ckpt):
    """`benchmarks/scaleout.py --simulate-only`: the expert of every generated token comes from one local engine
    (greedy, EOS ignored, so as many as asked), and drives the simulated replicas at 1-8 replicas per route."""
    from scaleout import ROUTES, offline_outputs, simulation

    rng = random.Random(0)
    reqs = [{"prompt": [rng.randrange(1, 250) for _ in range(rng.randrange(4, 20))], "max_tokens": rng.randrange(3, 9)}
            for _ in range(6)]
    for r in reqs:
        r["prompt_experts"] = [rng.randrange(3) for _ in r["prompt"]]
    outputs = offline_outputs(ckpt, reqs)
    assert [len(o) for o in outputs] == [r["max_tokens"] for r in reqs]
    assert {e for o in outputs for e in o} <= {0, 1, 2} and len({e for o in outputs for e in o}) > 1
    table = simulation(reqs, outputs)
    for rows in table.values():
        assert sorted({(r["replicas"], r["route"]) for r in rows}) == sorted((n, v) for n in (1, 2, 4, 8) for v in ROUTES)
        one = {r["hit_ratio"] for r in rows if r["replicas"] == 1}
        assert len(one) == 1, "one replica: routing cannot matter"
