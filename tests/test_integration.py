"""On the real embedded default (SmolLM2-135M): the CLI pipeline with a small budget, and exactness."""

import json
import sys

import pytest
import torch

from readmoe import backbone
from readmoe.modeling import load_readme

from helpers import masked_dense_logits

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    stats, model, report = tmp / "stats.safetensors", tmp / "moe", tmp / "report.json"
    mp = pytest.MonkeyPatch()
    from readmoe import cli

    for args in (["calibrate", "--domains", "news,code", "--samples", "2", "--seq-len", "128", "--out", stats],
                 ["carve", "--stats", stats, "--keep", "0.5", "--out", model],
                 ["eval", "--model", model, "--domains", "news,code", "--seqs", "1", "--seq-len", "128", "--mmlu", "24", "--out", report]):
        mp.setattr(sys, "argv", ["readmoe", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main()
            raise SystemExit(0)
        assert e.value.code in (0, None), args
    mp.undo()
    return stats, model, report


def test_real_pipeline_report(pipeline):
    _, model, report = pipeline
    data = json.loads(report.read_text())
    ppl = data["perplexity"]
    for d in ("news", "code"):
        assert 1 < ppl["dense"][d] < 100, "the dense parent models its own domains well"
        # carving drops half the MLP neurons: worse than dense, far better than chance (vocab 49,152)
        assert ppl["dense"][d] < ppl["domain_oracle"][d] < 5000
    assert data["params"]["active"] < data["params"]["dense"]
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_type"] == "readmoe" and cfg["expert_names"] == ["news", "code"]
    assert len(cfg["shared_sizes"]) == 30


def test_real_expert_equals_masked_dense(pipeline):
    _, model, _ = pipeline
    moe, tok = load_readme(str(model))
    dense, _ = backbone.load_dense("embedded")
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    for e in range(2):
        with torch.no_grad():
            ref = masked_dense_logits(dense, ids, [torch.cat([sh, ex[e]]) for sh, ex in moe.neuron_sets()])
            got = moe(ids, expert_ids=e).logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    out = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4)


def test_real_gemma3_carves_exactly():
    """Second architecture on real weights: Gemma-3-270m (GELU-tanh gated MLP, sliding-window attention)."""
    from readmoe.carve import build_model, domain_sets

    dense, tok = backbone.load_dense("embedded:gemma3")
    mlps = backbone.mlps(dense)
    L, I = len(mlps), mlps[0].down_proj.in_features
    moe = build_model(dense, domain_sets(torch.rand(3, L, I, generator=torch.Generator().manual_seed(0)), 0.5),
                      ["a", "b", "c"], 0.5, "domain", "embedded:gemma3")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = masked_dense_logits(dense, ids, [torch.cat([sh, ex[1]]) for sh, ex in moe.neuron_sets()])
        got = moe(ids, expert_ids=1).logits
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_real_engine_matches_generate_and_scores_mmlu(pipeline):
    """The serving engine on the real carved model: greedy output equals generate, alone and batched, with the
    expert cache at capacity 1 reading experts from the checkpoint file; MMLU cloze scoring runs on it."""
    from readmoe import assets, mmlu
    from readmoe.serving import Engine, EngineConfig, SamplingParams

    _, model, _ = pipeline
    moe, tok = load_readme(str(model))
    prompts = [tok(t)["input_ids"] for t in ("The BBC reported that the minister", "def fibonacci(n):\n    ")]
    want = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        want.append(out[0, len(p):].tolist())
    eng = Engine(moe, EngineConfig(scheduler="expert-aware", capacity=1, policy="belady"), checkpoint=model)
    assert [eng.run([(0.0, p, SamplingParams(max_tokens=8))])[0].output_ids for p in prompts] == want
    assert [r.output_ids for r in eng.run([(0.0, p, SamplingParams(max_tokens=8)) for p in prompts])] == want
    assert eng.cache.misses > 0
    eng.close()
    res = mmlu.score(moe, tok, mmlu.load(assets.mmlu_jsonl(), 8))
    assert res["n"] == 8 and 0 <= res["accuracy"] <= 1


def test_real_model_over_http(pipeline):
    """`readmoe serve`'s app on the real carved model, at capacity 1 (experts load from disk): the openai client's
    greedy text equals generate(), streaming equals non-streaming, and chat goes through the model's template."""
    import openai

    from readmoe.server import build_app
    from readmoe.serving import Engine, EngineConfig
    from readmoe.serving.engine_thread import EngineThread

    from helpers import LiveServer

    _, model, _ = pipeline
    eng = Engine.from_pretrained(model, EngineConfig(capacity=1))
    with LiveServer(build_app(EngineThread(eng), "real")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=300)
        prompt = "The capital of France is"
        r = client.completions.create(model="real", prompt=prompt, max_tokens=12, temperature=0)
        moe, tok = load_readme(str(model))
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               eos_token_id=sorted(eng.eos), pad_token_id=tok.eos_token_id)
        assert r.choices[0].text == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert r.usage.prompt_tokens == ids.shape[1]
        streamed = client.completions.create(model="real", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
        chat = client.chat.completions.create(model="real", messages=[{"role": "user", "content": "Say hello."}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content and chat.usage.prompt_tokens > 5
