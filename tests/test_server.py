"""`readmoe serve` on a tiny MoE, tested with clients others wrote: the official openai client, httpx, schemathesis."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from readmoe.modeling import load_readme
from readmoe.server import build_app
from readmoe.serving import Engine, EngineConfig
from readmoe.serving.engine_thread import EngineThread

from helpers import CHAT_TEMPLATE, LiveServer, free_port

KEY = "sk-test"


@pytest.fixture(scope="module")
def live(ckpt):
    eng = Engine.from_pretrained(ckpt, EngineConfig(token_budget=8, max_running=8, capacity=2))
    et = EngineThread(eng, max_queued=64)
    with LiveServer(build_app(et, "tiny", api_key=KEY)) as srv:
        srv.engine, srv.et = eng, et
        yield srv


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(ckpt, ids, n):
    """What the HF model generates greedily (EOS not stopping it)."""
    from readmoe.modeling import load_readme

    moe, tok = load_readme(str(ckpt))
    with torch.no_grad():
        x = torch.tensor([ids])
        out = moe.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(ids):].tolist(), tok


def post(live, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{live.url}{path}", headers=headers, timeout=60, **kw, **({"json": body} if body is not None else {}))


# ---------------------------------------------------------------- the openai client
def test_completion_equals_generate(ckpt, live, client):
    prompt = "The river runs"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    ref, tok = reference(ckpt, tok_ids(ckpt, prompt), 12)
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 12, len(prompt) + 12)
    assert r.model == "tiny" and r.object == "text_completion" and r.id.startswith("cmpl-")


def tok_ids(ckpt, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))(text)["input_ids"]


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", prompt=[5, 9, 13, 200, 7], max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not(ckpt, client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    text = r.choices[0].message.content
    ids = tok_ids(ckpt, "<system>be brief\n<user>hi there\n<assistant>")
    ref, tok = reference(ckpt, ids, 8)
    assert text == tok.decode(ref, skip_special_tokens=True) and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_tokenizer_endpoints(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    t = post(live, "/tokenize", {"prompt": "abc"}).json()
    assert t["tokens"] == tok_ids_cached("abc", live) and t["count"] == 3
    assert post(live, "/detokenize", {"tokens": t["tokens"]}).json()["prompt"] == "abc"
    info = httpx.get(f"{live.url}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<eos>" and info["chat_template"] == CHAT_TEMPLATE


def tok_ids_cached(text, live):
    return live.engine.tok(text)["input_ids"]


def test_stop_strings_and_stop_tokens(live, client):
    kw = dict(model="tiny", prompt="abc", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw) if c.choices)
    assert streamed == cut.text, "a stream never sends the stop string"
    first = live.engine.tok(full)["input_ids"][0]
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [first]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_return_experts_are_the_routers(ckpt, live, client):
    prompt = [5, 9, 13, 200, 7]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True, "return_experts": True})
    experts = r.choices[0].model_extra["experts"]
    ref, _ = reference(ckpt, prompt, 6)
    with torch.no_grad():
        routed = live.engine.moe.route(torch.tensor([prompt + ref]))[0, len(prompt):].tolist()
    assert experts == routed and len(experts) == 6


def test_echo_logprobs_equal_the_models_log_softmax(ckpt, live):
    """What lm-eval's loglikelihood asks for: echo + logprobs, one generated token."""
    prompt = [5, 9, 13, 200, 7, 7, 31, 100]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    lp = post(live, "/v1/completions", body).json()["choices"][0]["logprobs"]
    moe, _ = load_readme(str(ckpt))  # the engine's copy holds no routed experts: its store serves them
    with torch.no_grad():
        want = torch.log_softmax(moe(torch.tensor([prompt])).logits[0].float(), -1)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:len(prompt)])
    torch.testing.assert_close(got, want[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=1e-4, rtol=1e-4)
    assert len(lp["tokens"]) == len(prompt) + 1
    greedy = int(want[-1].argmax())
    assert lp["token_logprobs"][-1] == pytest.approx(float(want[-1, greedy]), abs=1e-4)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content), "greedy picks the top token"


# ---------------------------------------------------------------- concurrency and cancellation
def test_concurrent_streams_equal_alone(live, client):
    """16 streaming clients, 3 requests each: batching must not change any greedy output; none lost or duplicated."""
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + i % 5)] for i in range(16)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    results, errors = {}, []

    def worker(i):
        c = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            for k in range(3):
                stream = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=8, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
                chunks = list(stream)
                results[(i, k)] = ("".join(ch.choices[0].text for ch in chunks if ch.choices), {ch.id for ch in chunks})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 48
    for (i, _), (text, ids) in results.items():
        assert text == alone[i] and len(ids) == 1
    assert len({next(iter(ids)) for _, ids in results.values()}) == 48


def test_disconnect_cancels_and_frees_the_kv(live, client, monkeypatch):
    step = live.engine.step

    def slow_step():  # 200 tokens take seconds, so the request is surely running when the client leaves
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(live.engine, "step", slow_step)
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data: "))
    # the connection is closed: within a few engine steps nothing runs and no KV cache is held
    end = time.monotonic() + 10
    while time.monotonic() < end and (live.engine.running or live.engine.waiting):
        time.sleep(0.02)
    assert not live.engine.running and live.engine.kv_bytes() == 0
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'readmoe:request_success_total{finished_reason="cancelled",model_name="tiny"}' in metrics
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens >= 1


# ---------------------------------------------------------------- bad input: 4xx with the OpenAI error body
def error_of(resp, status):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["code"] == status and e["message"]
    return e


def test_bad_requests_are_400(live):
    url = f"{live.url}/v1/completions"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    error_of(httpx.post(url, content=b"{not json", headers=auth), 400)
    error_of(httpx.post(url, content=b"[1, 2]", headers=auth), 400)
    assert error_of(post(live, "/v1/completions", {"prompt": 5}), 400)["param"].startswith("prompt")
    assert error_of(post(live, "/v1/completions", {"prompt": "a", "max_tokens": 0}), 400)["param"] == "max_tokens"
    assert error_of(post(live, "/v1/completions", {"prompt": "a", "max_tokens": "x"}), 400)["param"] == "max_tokens"
    assert error_of(post(live, "/v1/completions", {"prompt": "a", "temperature": -1}), 400)["param"] == "temperature"
    assert "context window" in error_of(post(live, "/v1/completions", {"prompt": "a" * 300}), 400)["message"]
    error_of(post(live, "/v1/completions", {"prompt": [], "max_tokens": 2}), 400)
    error_of(post(live, "/v1/completions", {"prompt": [10**6]}), 400)
    error_of(post(live, "/v1/completions", {"prompt": "a", "n": 2}), 400)
    error_of(post(live, "/v1/chat/completions", {"messages": []}), 400)
    error_of(post(live, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    ok = post(live, "/v1/completions", {"prompt": "a", "max_tokens": 1, "some_future_field": {"x": 1}})
    assert ok.status_code == 200, "unknown fields are ignored"


def test_unknown_model_bad_key_full_queue(live):
    assert error_of(post(live, "/v1/completions", {"model": "gpt-9", "prompt": "a"}), 404)["param"] == "model"
    error_of(post(live, "/v1/completions", {"prompt": "a"}, key=None), 401)
    error_of(post(live, "/v1/completions", {"prompt": "a"}, key="wrong"), 401)
    error_of(httpx.get(f"{live.url}/v1/nothing-here"), 404)
    live.et.max_queued = 0  # every request now finds the queue full
    try:
        t = time.monotonic()
        e = error_of(post(live, "/v1/completions", {"prompt": "a"}), 503)
        assert "queued" in e["message"] and time.monotonic() - t < 5, "a full queue answers at once"
    finally:
        live.et.max_queued = 64
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_metrics(live, client):
    client.completions.create(model="tiny", prompt="metrics", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("readmoe:num_requests_running", "readmoe:num_requests_waiting", "readmoe:prompt_tokens_total",
                 "readmoe:generation_tokens_total", "readmoe:time_to_first_token_seconds_bucket",
                 "readmoe:inter_token_latency_seconds_bucket", "readmoe:e2e_request_latency_seconds_count",
                 "readmoe:expert_cache_hits_total", "readmoe:expert_cache_misses_total",
                 "readmoe:expert_bytes_loaded_total", "readmoe:unique_experts_per_step_bucket", "readmoe:queued_tokens",
                 "readmoe:router_seconds_total", "readmoe:kv_cache_bytes", "readmoe:expert_load_hidden_seconds_total"):
        assert name in text, name
    line = next(l for l in text.splitlines() if l.startswith('readmoe:request_success_total{finished_reason="length"'))
    assert float(line.split()[-1]) >= 1
    misses = next(l for l in text.splitlines() if l.startswith("readmoe:expert_cache_misses_total"))
    assert float(misses.split()[-1]) > 0, "capacity 2 of 3 experts: some accesses load"
    value = lambda name: float(next(l for l in text.splitlines() if l.startswith(name)).split()[-1])  # noqa: E731
    assert value("readmoe:expert_forecast_tokens_total") >= 4, "every generated token is routed, and forecast first"
    assert 0 <= value("readmoe:expert_forecast_hits_total") <= value("readmoe:expert_forecast_tokens_total")


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(live, tmp_path):
    """Fuzz every documented endpoint from /openapi.json; bounded examples, loopback only."""
    st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    r = subprocess.run([st, "run", f"{live.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "15",
                        "--header", f"Authorization: Bearer {KEY}", "--seed", "1", "--no-color",
                        "--exclude-path", "/metrics"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the repo
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


# ---------------------------------------------------------------- the CLI: a real process, SIGTERM drains
@pytest.mark.slow
def test_cli_serve_drains_on_sigterm(ckpt, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "readmoe.cli", "serve", "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", "tiny", "--drain-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "server did not come up"
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
        texts = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(l for l in lines if l.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = [l for l in lines if l.startswith("data: ")]
        for l in [first] + rest[:-1]:
            texts.append(json.loads(l[6:])["choices"][0])
        assert rest[-1] == "data: [DONE]" and texts[-1]["finish_reason"] == "length", "the running request finished"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_without_a_model_is_one_line(tmp_path, monkeypatch, capsys):
    from helpers import fails

    monkeypatch.chdir(tmp_path)
    fails(monkeypatch, capsys, "make demo", "serve")
    fails(monkeypatch, capsys, "--port", "serve", "--model", tmp_path, "--port", "70000")
    fails(monkeypatch, capsys, "--pack-weights", "serve", "--model", tmp_path, "--pack-weights", "always")
    fails(monkeypatch, capsys, "--merge-experts", "serve", "--model", tmp_path, "--merge-experts", "yes")
    fails(monkeypatch, capsys, "--expert-copy", "serve", "--model", tmp_path, "--expert-copy", "always")
    fails(monkeypatch, capsys, "drop --capacity", "serve", "--model", tmp_path, "--merge-experts", "on", "--capacity", "2")
    fails(monkeypatch, capsys, "--prefetch-buffer", "serve", "--model", tmp_path, "--prefetch-buffer", "-1")


def test_a_failing_step_fails_its_requests_not_the_server(live, client, monkeypatch):
    def broken():
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(live.engine.runner, "step", lambda segs, order=None: broken())
    r = post(live, "/v1/completions", {"prompt": "abc", "max_tokens": 3})
    assert r.status_code == 503 and "simulated kernel failure" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=2).usage.completion_tokens >= 1
    assert not live.engine.running and live.engine.kv_bytes() == 0


def test_tiny_top_p_keeps_the_top_token(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=1.0, top_p=5e-324, seed=3,
                                  extra_body={"ignore_eos": True})
    greedy = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy.choices[0].text
