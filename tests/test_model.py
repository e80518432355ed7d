"""The carved MoE is an exact decomposition of the dense model, and behaves as an HF causal LM."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from readmoe.carve import build_model, domain_sets
from readmoe.modeling import ReadMEForCausalLM

from helpers import VOCAB, masked_dense_logits, tiny_llama


def carve(dense, n_domains=3, keep=0.5, seed=0):
    layers = len(dense.model.layers)
    inter = dense.config.intermediate_size
    g = torch.Generator().manual_seed(seed)
    sets = domain_sets(torch.rand(n_domains, layers, inter, generator=g), keep)
    return build_model(dense, sets, [f"d{i}" for i in range(n_domains)], keep, "domain", "test"), sets


def test_keep_all_one_domain_equals_dense(dense):
    moe, _ = carve(dense, n_domains=1, keep=1.0)
    ids = torch.randint(0, VOCAB, (2, 12))
    assert all(len(e) == 0 for _, ex in moe.neuron_sets() for e in ex)  # everything is shared
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits)
    torch.testing.assert_close(moe(ids, expert_ids=0).logits, dense(ids).logits)


def test_each_expert_equals_masked_dense(dense):
    moe, (shared, experts) = carve(dense, n_domains=3)
    ids = torch.randint(0, VOCAB, (2, 10))
    for e in range(3):
        keep = [torch.cat([shared[l], experts[l][e]]) for l in range(len(shared))]
        torch.testing.assert_close(moe(ids, expert_ids=e).logits, masked_dense_logits(dense, ids, keep))


def test_mixed_routing_equals_per_token_reference():
    """Grouped dispatch over mixed experts equals running each token's own path (a per-token reference)."""
    dense = tiny_llama()
    moe, _ = carve(dense, n_domains=3)
    ids = torch.randint(0, VOCAB, (2, 9))
    eids = torch.randint(0, 3, (2, 9))
    mlp = moe.moe_layers()[0]
    x = torch.randn(2, 9, 32)
    with moe.routing.use(eids):
        got = mlp(x)
    assert moe.routing.expert_ids is None  # scoped to the block
    ref = torch.stack([torch.stack([mlp.shared(x[b, t]) + mlp.experts[int(eids[b, t])](x[b, t]) for t in range(9)])
                       for b in range(2)])
    torch.testing.assert_close(got, ref)
    assert moe(ids, expert_ids=eids).logits.shape == (2, 9, VOCAB)


def test_neuron_sets_map_back_to_dense(dense):
    moe, (shared, experts) = carve(dense, n_domains=2)
    for l, (sh, ex) in enumerate(moe.neuron_sets()):
        assert torch.equal(sh, shared[l]) and all(torch.equal(a, b) for a, b in zip(ex, experts[l]))
        assert not set(sh.tolist()) & set(torch.cat(ex).tolist())  # routed experts exclude the shared set
        dm = dense.model.layers[l].mlp
        for e, idx in enumerate(ex):
            torch.testing.assert_close(moe.moe_layers()[l].experts[e].gate_proj.weight, dm.gate_proj.weight[idx])
            torch.testing.assert_close(moe.moe_layers()[l].experts[e].down_proj.weight, dm.down_proj.weight[:, idx])


def test_save_load_identical_and_one_tensor_per_expert(dense, tmp_path):
    moe, _ = carve(dense, n_domains=3)
    ids = torch.randint(0, VOCAB, (1, 16))
    ref = moe(ids).logits
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, ReadMEForCausalLM)
    torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("backbone.model.layers.1.mlp.experts.2.up_proj.weight")  # one expert, read alone
    torch.testing.assert_close(w, moe.moe_layers()[1].experts[2].up_proj.weight)
    for l in range(len(moe.moe_layers())):
        for e in range(3):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"backbone.model.layers.{l}.mlp.experts.{e}.{proj}.weight" in keys


def test_cached_generate_equals_uncached_greedy(dense):
    moe, _ = carve(dense, n_domains=3)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7))
    got = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    x = ids
    for _ in range(12):
        nxt = moe(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
    assert torch.equal(got, x)


def test_router_cache_matches_full_recompute():
    moe, _ = carve(tiny_llama(), n_domains=4)
    ids = torch.randint(0, VOCAB, (2, 11))
    full, _ = moe.router(ids)
    head, cache = moe.router(ids[:, :6])
    tail, _ = moe.router(ids[:, 6:], cache=cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), full)


def test_router_left_padding_and_long_contexts_match_plain_positions():
    """A left-padded row routes like the same row unpadded, in prefill and in cached decode, also past the
    length of the router's first RoPE table (it grows on demand)."""
    moe, _ = carve(tiny_llama(), n_domains=4)
    ids = torch.randint(0, VOCAB, (1, 300))
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded, mask = torch.cat([pad, ids[:, :-1]], 1), torch.cat([pad, torch.ones_like(ids[:, :-1])], 1)
    want, _ = moe.router(ids)
    head, cache = moe.router(padded, mask)
    tail, _ = moe.router(ids[:, -1:], torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1), cache)
    torch.testing.assert_close(head[:, 5:], want[:, :-1])
    torch.testing.assert_close(tail, want[:, -1:])


def test_router_is_causal():
    moe, _ = carve(tiny_llama(), n_domains=4)
    with torch.no_grad():
        moe.router.head.weight.normal_(0, 1.0)
    a = torch.randint(0, VOCAB, (1, 20))
    b = a.clone()
    b[0, 12:] = torch.randint(0, VOCAB, (8,))
    la, _ = moe.router(a)
    lb, _ = moe.router(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert torch.equal(moe.route(a)[:, :12], moe.route(b)[:, :12])
    assert moe.route(a).shape == (1, 20) and moe.route(a).dtype == torch.long


def test_bad_expert_ids_rejected():
    moe, _ = carve(tiny_llama(), n_domains=2)
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="expert ids"):
        moe(ids, expert_ids=2)
    with pytest.raises(ValueError, match="shape"):
        moe(ids, expert_ids=torch.zeros(1, 4, dtype=torch.long))


def test_routing_scope_nests_and_unwinds_on_error():
    import pytest

    from readmoe.moe import Routing

    r, a, b = Routing(), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
    with r.use(a):
        with r.use(b) as gates:
            assert r.expert_ids is b and gates == [] and r.gate_logits is gates
        assert r.expert_ids is a  # the inner forward restored the outer one's ids
    assert r.expert_ids is None and r.gate_logits is None
    with pytest.raises(RuntimeError):
        with r.use(a):
            raise RuntimeError("forward failed")
    assert r.expert_ids is None
