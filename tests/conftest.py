"""Fixtures: tiny random-weight backbones of two architectures saved as real HF checkpoint directories, a corpus,
and a calibrated + carved workflow. The helpers they use live in helpers.py."""

from __future__ import annotations

import pytest

from helpers import ARCHS, byte_tokenizer, run, tiny_llama


@pytest.fixture(params=list(ARCHS))
def dense(request):
    return ARCHS[request.param]()


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def dense_dir(tmp_path):
    """A tiny Llama checkpoint directory with a tokenizer, as a user would point --model at."""
    d = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def corpus_dir(tmp_path):
    """Three small domains in the three accepted layouts: a sub-directory, a .txt and a .jsonl file."""
    import json

    root = tmp_path / "corpus"
    (root / "prose").mkdir(parents=True)
    for i in range(30):
        (root / "prose" / f"doc{i}.txt").write_text(f"The quiet river number {i} runs past the old mill.\n\n" * 20)
    (root / "code.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 8 for i in range(400)))
    (root / "chat.jsonl").write_text("\n".join(json.dumps({"text": f"Hello {i}, how are you today? Fine, thanks. " * 12})
                                              for i in range(80)))
    return root


@pytest.fixture
def workflow(tmp_path, dense_dir, corpus_dir, monkeypatch, capsys):
    stats, model = tmp_path / "stats.safetensors", tmp_path / "moe"
    code, _, err = run(monkeypatch, capsys, "calibrate", "--model", dense_dir, "--corpus", corpus_dir, "--samples", 2,
                       "--seq-len", 32, "--out", stats)
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--keep", 0.5, "--out", model)
    assert code == 0, err
    return stats, model
