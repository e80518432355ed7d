"""Pruned and layer-wise baselines, and MMLU cloze scoring, on tiny models."""

import json

import pytest
import torch

from readmoe import mmlu
from readmoe.baselines import build_layerwise, build_pruned, parse
from readmoe.carve import build_model, domain_sets
from readmoe.corpus import Corpus
from readmoe.errors import UserError
from readmoe.train import make_config, train

from helpers import byte_tokenizer, masked_dense_logits, tiny_gemma3, tiny_llama

CFG = dict(rounds=2, router_steps=15, expert_steps=3, seq_len=32, batch_tokens=128, pool_seqs=12, router_lr=1e-2, expert_lr=1e-3)


def _moe(dense, seed=0):
    L, I = len(dense.model.layers), dense.config.intermediate_size
    scores = torch.rand(3, L, I, generator=torch.Generator().manual_seed(seed))
    return build_model(dense, domain_sets(scores, 0.5), ["a", "b", "c"], 0.5, "domain", "test", scores=scores.mean(0))


@pytest.mark.parametrize("arch", [tiny_llama, tiny_gemma3])
def test_pruned_is_the_dense_model_on_the_top_neurons(arch):
    dense = arch()
    moe = _moe(dense)
    pruned = build_pruned(moe, dense)
    ids = torch.randint(0, 250, (2, 12))
    for l, (m, sh) in enumerate(zip(moe.moe_layers(), pruned.moe_layers())):
        want = round(m.shared.size + sum(e.size for e in m.experts) / len(m.experts))
        assert sh.shared.size == want and sh.experts[0].size == 0
        assert torch.equal(sh.shared.neuron_idx, moe.neuron_scores[l].topk(want).indices.sort().values)
    keep = [m.shared.neuron_idx for m in pruned.moe_layers()]
    torch.testing.assert_close(pruned(input_ids=ids, expert_ids=0).logits, masked_dense_logits(dense, ids, keep))


def test_pruned_needs_scores():
    dense = tiny_llama()
    moe = _moe(dense)
    moe.neuron_scores.zero_()
    with pytest.raises(UserError, match="no neuron scores"):
        build_pruned(moe, dense)


def test_layerwise_gates_route_per_layer_and_fixed_ids_match_the_moe():
    dense = tiny_llama()
    moe = _moe(dense)
    lw = build_layerwise(moe, dense)
    assert lw.router is None and all(m.gate is not None for m in lw.moe_layers())
    ids = torch.randint(0, 250, (2, 10))
    torch.testing.assert_close(lw(input_ids=ids, expert_ids=1).logits, moe(input_ids=ids, expert_ids=1).logits)
    # per-layer ids [B, T, L]: layer l uses column l
    per_layer = torch.stack([torch.zeros_like(ids), torch.full_like(ids, 2)], -1)
    keep = [torch.cat([m.shared.neuron_idx, m.experts[e].neuron_idx]) for m, e in zip(moe.moe_layers(), (0, 2))]
    torch.testing.assert_close(moe(input_ids=ids, expert_ids=per_layer).logits, masked_dense_logits(dense, ids, keep))
    # the gates choose: the choice follows the gate weights
    out = lw(input_ids=ids)
    assert out.router_logits.shape == (2, 10, 2, 3) and torch.equal(out.expert_ids, out.router_logits.argmax(-1))
    assert lw.routing.gate_logits is None and lw.routing.expert_ids is None  # nothing left behind
    with pytest.raises(ValueError, match="inside the backbone"):
        lw.route(ids)


def test_baselines_train_with_the_same_budget(corpus_dir, tmp_path):
    dense, tok, corpus = tiny_llama(), byte_tokenizer(), Corpus(str(corpus_dir))
    moe = _moe(dense)
    cfg = make_config("demo", **CFG)
    h_moe = train(moe, dense, tok, corpus, corpus.domains, cfg, tmp_path / "moe", progress=False)
    lw = build_layerwise(moe, dense)
    h_lw = train(lw, dense, tok, corpus, corpus.domains, cfg, tmp_path / "lw", progress=False,
                 targets_from=tmp_path / "moe" / "train" / "targets.safetensors")
    pr = build_pruned(moe, dense)
    h_pr = train(pr, dense, tok, corpus, corpus.domains, cfg, tmp_path / "pr", progress=False)
    tokens = lambda h: sum(r["tokens"] for r in h if r["phase"] == "experts")  # noqa: E731
    assert tokens(h_moe) == tokens(h_lw) == tokens(h_pr) == 2 * 3 * 128
    r = [h for h in h_lw if h["phase"] == "router"]
    assert len(r) == 30 and sum(h["loss"] for h in r[-5:]) < sum(h["loss"] for h in r[:5])
    assert not [h for h in h_pr if h["phase"] == "router"]  # nothing to route
    for h in (h_moe, h_lw, h_pr):  # the recovery curve: before training and after every expert phase
        ev = [r for r in h if r["phase"] == "eval"]
        assert [r["tokens"] for r in ev] == [0, 384, 768] and ev[-1]["ppl"] < ev[0]["ppl"]
    gates_before = [m.gate.weight.clone() for m in build_layerwise(moe, dense).moe_layers()]
    assert any(not torch.equal(a, m.gate.weight) for a, m in zip(gates_before, lw.moe_layers()))


def test_parse_baselines():
    assert parse("all") == ["pruned", "layerwise"] and parse("none") == [] and parse("pruned") == ["pruned"]
    with pytest.raises(UserError, match="unknown baseline 'big'"):
        parse("pruned,big")


QS = [{"question": "What is 2 + 2?", "answer_a": "3", "answer_b": "4", "answer_c": "five", "answer_d": "22",
       "correct_answer": "B"},
      {"question": "Which is a colour?", "answer_a": "blue sky", "answer_b": "dog", "answer_c": "x", "answer_d": "seven seas",
       "correct_answer": "A"},
      {"question": "A longer question about rivers and mills that goes on for a while?", "answer_a": "yes",
       "answer_b": "no", "answer_c": "maybe so", "answer_d": "never", "correct_answer": "D"}]


def _naive(model, tok, q, **kw):
    """Four separate forwards, one per answer: the reference for the packed scorer."""
    p, answers = mmlu._encode(tok, q, 768)
    means = []
    for a in answers:
        x = torch.tensor([p + a])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x, **kw).logits.float(), -1)
        means.append(float(torch.stack([lp[0, len(p) - 1 + j, a[j]] for j in range(len(a))]).mean()))
    return "ABCD"[max(range(4), key=lambda k: means[k])], means


@pytest.mark.parametrize("arch", [tiny_llama, tiny_gemma3])
def test_packed_mmlu_scoring_equals_separate_forwards(arch):
    tok, dense = byte_tokenizer(), arch()
    moe = _moe(dense)
    for model in (dense, moe, build_layerwise(moe, dense)):
        model.eval()
        got = mmlu.score(model, tok, QS, batch_size=2)
        want = [_naive(model, tok, q) for q in QS]
        torch.testing.assert_close(torch.tensor(got["scores"]), torch.tensor([w[1] for w in want]), rtol=1e-4, atol=1e-5)
        want = [w[0] for w in want]
        assert got["choices"] == want and got["n"] == 3
        assert got["accuracy"] == sum(c == q["correct_answer"] for c, q in zip(want, QS)) / 3


def test_mmlu_subset_is_seeded_and_validated(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text("\n".join(json.dumps(dict(QS[i % 3], question=f"q{i}")) for i in range(50)) + "\n")
    a, b = mmlu.load(f, 10, seed=0), mmlu.load(f, 10, seed=0)
    assert a == b and len(a) == 10 and len(mmlu.load(f, None)) == 50
    assert mmlu.load(f, 10, seed=1) != a
    assert mmlu.parse_count("all") is None and mmlu.parse_count("none") == 0 and mmlu.parse_count("300") == 300
    with pytest.raises(UserError, match="`mmlu`"):
        mmlu.parse_count("lots")
