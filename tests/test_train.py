"""Teacher targets, router distillation and expert tuning on tiny models; resume; bad input."""

import json
from types import SimpleNamespace

import pytest
import torch

from readmoe.carve import build_model, domain_sets
from readmoe.corpus import Corpus
from readmoe.errors import UserError
from readmoe.targets import distill_loss, expert_masks, oracle_labels, overlaps
from readmoe.train import make_config, train

from helpers import byte_tokenizer, fails, run, tiny_llama


def test_overlaps_hand_made():
    """One layer, 4 neurons: the token's top-2 neurons are {0, 3}; expert 0 owns {0, 1}, expert 1 owns {2, 3}."""
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.down_proj(x)

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Module()])
            self.model.layers[0].mlp = MLP()

        def forward(self, input_ids, use_cache=False):
            acts = torch.tensor([[[5.0, 1.0, 0.5, -4.0], [0.1, 0.2, 3.0, 2.0]]])  # [1, 2 tokens, 4 neurons]
            return SimpleNamespace(logits=self.model.layers[0].mlp(acts[:, : input_ids.shape[1]]))  # like an HF output

    masks = [torch.tensor([[True, True, False, False], [False, False, True, True]])]
    ov = overlaps(Dense(), masks, torch.zeros(1, 2, dtype=torch.long), keep=0.5)
    assert ov.shape == (1, 2, 1, 2)
    torch.testing.assert_close(ov[0, :, 0], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert oracle_labels(ov).tolist() == [[0, 1]]


def test_distill_loss_prefers_the_target():
    ov = torch.tensor([[[[0.9, 0.1, 0.0]]]])  # [B, T, L, E]
    good = distill_loss(torch.tensor([[[5.0, 0.0, -5.0]]]), ov)
    bad = distill_loss(torch.tensor([[[-5.0, 5.0, 0.0]]]), ov)
    assert good < bad


@pytest.fixture
def setup(corpus_dir):
    dense, tok, corpus = tiny_llama(), byte_tokenizer(), Corpus(str(corpus_dir))
    L, I = len(dense.model.layers), dense.config.intermediate_size
    sets = domain_sets(torch.rand(3, L, I, generator=torch.Generator().manual_seed(0)), 0.5)
    make = lambda: build_model(dense, sets, corpus.domains, 0.5, "domain", "test")  # noqa: E731
    return dense, tok, corpus, make


CFG = dict(rounds=2, router_steps=15, expert_steps=3, seq_len=32, batch_tokens=128, pool_seqs=12, router_lr=1e-2, expert_lr=1e-3)


def test_training_lowers_losses_and_raises_router_accuracy(setup, tmp_path):
    dense, tok, corpus, make = setup
    moe = make()
    hist = train(moe, dense, tok, corpus, corpus.domains, make_config("demo", **CFG), tmp_path / "out", progress=False)
    r = [h for h in hist if h["phase"] == "router"]
    e = [h for h in hist if h["phase"] == "experts"]
    assert len(r) == 30 and len(e) == 6
    assert sum(h["loss"] for h in r[-5:]) < sum(h["loss"] for h in r[:5])
    assert sum(h["router_acc"] for h in r[-5:]) > sum(h["router_acc"] for h in r[:5])
    assert e[-1]["loss"] < e[0]["loss"]
    state = json.loads((tmp_path / "out" / "train" / "state.json").read_text())
    assert state["complete"] and state["phases_done"] == 4


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(setup, tmp_path):
    dense, tok, corpus, make = setup
    cfg = make_config("demo", **CFG)
    full = make()
    train(full, dense, tok, corpus, corpus.domains, cfg, tmp_path / "a", progress=False)
    part = make()
    train(part, dense, tok, corpus, corpus.domains, cfg, tmp_path / "b", progress=False, stop_after=3)  # killed
    resumed = make()  # a fresh process: weights come from the checkpoint
    train(resumed, dense, tok, corpus, corpus.domains, cfg, tmp_path / "b", progress=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_the_same_weights_as_one(corpus_dir, tmp_path, mode):
    """Data parallelism over 2 CPU processes (torchrun, gloo): DDP, and FSDP2 with the router left whole, end with
    the one-process run's weights to float rounding, after training moved them far more than that."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from distributed_train import CFG as DIST_CFG, tiny_setup

    dense, tok, corpus, moe = tiny_setup(str(corpus_dir))
    init = {k: v.clone() for k, v in moe.state_dict().items()}
    train(moe, dense, tok, corpus, corpus.domains, make_config("demo", **DIST_CFG), tmp_path / "one", progress=False)
    script = Path(__file__).with_name("distributed_train.py")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(corpus_dir), str(tmp_path / mode), mode],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / mode / "model.safetensors")
    assert one.keys() == two.keys()
    for part in ("router.", ".experts.", "self_attn"):
        keys = [k for k in one if part in k]
        moved = sum(float((one[k] - init[k]).abs().sum()) for k in keys)
        diff = sum(float((one[k] - two[k]).abs().sum()) for k in keys)
        # Adam turns rounding in near-zero averaged gradients into steps of up to lr: compare in L1, not max
        assert moved > 0 and diff < 1e-2 * moved, (part, diff, moved)
    evals = [[h["ppl"] for h in map(json.loads, (tmp_path / d / "train" / "log.jsonl").read_text().splitlines())
              if h["phase"] == "eval"] for d in ("one", mode)]
    assert len(evals[0]) == 3
    torch.testing.assert_close(evals[1], evals[0], rtol=1e-4, atol=0)


def test_budget_zero_rejected():
    with pytest.raises(UserError, match="budget is 0"):
        make_config("demo", router_steps=0, expert_steps=0)
    with pytest.raises(UserError, match="budget is 0"):
        make_config("demo", rounds=0)
    with pytest.raises(UserError, match="unknown `budget`"):
        make_config("huge")


def test_cli_train_bad_inputs(tmp_path, workflow, dense_dir, corpus_dir, monkeypatch, capsys):
    _, model = workflow
    fails(monkeypatch, capsys, "budget is 0", "train", "--model", model, "--corpus", corpus_dir, "--out", tmp_path / "t",
          "--rounds", 0)
    fails(monkeypatch, capsys, "not a readmoe MoE", "train", "--model", dense_dir, "--corpus", corpus_dir, "--out", tmp_path / "t")
    big = tmp_path / "bigtok"
    big.mkdir()
    for f in model.iterdir():
        if f.is_file():
            (big / f.name).write_bytes(f.read_bytes())
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(model)
    tk.add_tokens([f"<extra{i}>" for i in range(40)])
    tk.save_pretrained(big)
    fails(monkeypatch, capsys, "mismatched tokenizer", "train", "--model", big, "--corpus", corpus_dir, "--out", tmp_path / "t")
    assert not (tmp_path / "t" / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_train_then_eval(tmp_path, workflow, corpus_dir, monkeypatch, capsys):
    _, model = workflow
    code, out, err = run(monkeypatch, capsys, "train", "--model", model, "--corpus", corpus_dir, "--out", tmp_path / "t",
                         "--rounds", 1, "--router-steps", 5, "--expert-steps", 1, "--seq-len", 32, "--batch-tokens", 64)
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "eval", "--model", tmp_path / "t", "--corpus", corpus_dir, "--out",
                         tmp_path / "r.json", "--seqs", 1, "--seq-len", 32, "--baselines", "all", "--mmlu", 4)
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert {"dense", "readme", "pruned", "layerwise", "oracle", "random"} <= set(data["perplexity"])
    assert set(data["mmlu"]) == {"dense", "readme", "pruned"}
    assert set(data["params"]) >= {"total", "active", "router"} and set(data["router"]) >= {"accuracy", "params", "time_share"}
    assert {k: len(v) for k, v in data["recovery"].items()} == {"readme": 2, "pruned": 2, "layerwise": 2}
    assert "layerwise" in data["routing"]["keep_previous"] and (tmp_path / "r_recovery.png").exists()
    for b in ("pruned", "layerwise"):
        assert json.loads((tmp_path / "t" / "baselines" / b / "train" / "state.json").read_text())["complete"]
    # a second eval reuses the trained baselines instead of training again
    code, out, err = run(monkeypatch, capsys, "eval", "--model", tmp_path / "t", "--corpus", corpus_dir, "--out",
                         tmp_path / "r2.json", "--seqs", 1, "--seq-len", 32, "--baselines", "pruned", "--mmlu", "none")
    assert code == 0, err and "training baseline" not in out
    assert json.loads((tmp_path / "r2.json").read_text())["mmlu"] == {}
