"""Fixtures: tiny random-weight backbones of two architectures saved as real HF checkpoint directories, a corpus,
and a calibrated + carved workflow. The helpers they use live in helpers.py."""

from __future__ import annotations

import os

import pytest

from helpers import ARCHS, CHAT_TEMPLATE, byte_tokenizer, run, tiny_moe, write_corpus_dir, write_dense_dir


@pytest.fixture(scope="session", autouse=True)
def _expert_copies_off_the_user_cache(tmp_path_factory):
    """Expert copies (serving/expert_copy.py) made by any test, module fixtures and server subprocesses included,
    go to a temporary directory, not the user's cache."""
    old = os.environ.get("READMOE_EXPERT_COPIES")
    os.environ["READMOE_EXPERT_COPIES"] = str(tmp_path_factory.mktemp("expert-copies"))
    yield
    if old is None:
        os.environ.pop("READMOE_EXPERT_COPIES")
    else:
        os.environ["READMOE_EXPERT_COPIES"] = old


@pytest.fixture
def expert_copies(tmp_path, monkeypatch):
    """This test's own directory for expert copies."""
    root = tmp_path / "expert-copies"
    monkeypatch.setenv("READMOE_EXPERT_COPIES", str(root))
    return root


@pytest.fixture(params=list(ARCHS))
def dense(request):
    return ARCHS[request.param]()


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def dense_dir(tmp_path):
    """A tiny Llama checkpoint directory with a tokenizer, as a user would point --model at."""
    return write_dense_dir(tmp_path / "tiny-llama")


@pytest.fixture
def corpus_dir(tmp_path):
    """Three small domains in the three accepted layouts: a sub-directory, a .txt and a .jsonl file."""
    return write_corpus_dir(tmp_path / "corpus")


@pytest.fixture
def workflow(tmp_path, dense_dir, corpus_dir, monkeypatch, capsys):
    stats, model = tmp_path / "stats.safetensors", tmp_path / "moe"
    code, _, err = run(monkeypatch, capsys, "calibrate", "--model", dense_dir, "--corpus", corpus_dir, "--samples", 2,
                       "--seq-len", 32, "--out", stats)
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--keep", 0.5, "--out", model)
    assert code == 0, err
    return stats, model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny carved MoE with a byte tokenizer and a chat template, saved as a user's checkpoint directory."""
    d = tmp_path_factory.mktemp("ckpt")
    tiny_moe().save_pretrained(d)
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d
