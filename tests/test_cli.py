"""The CLI end to end on a tiny checkpoint, and every bad input gets one clear line and exit code 2."""

import json
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from readmoe import cli

from conftest import byte_tokenizer, tiny_llama


def run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop whatever the test's own set-up printed
    monkeypatch.setattr(sys, "argv", ["readmoe", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def fails(monkeypatch, capsys, match, *args):
    code, _, err = run(monkeypatch, capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def workflow(tmp_path, dense_dir, corpus_dir, monkeypatch, capsys):
    stats, model = tmp_path / "stats.safetensors", tmp_path / "moe"
    code, _, err = run(monkeypatch, capsys, "calibrate", "--model", dense_dir, "--corpus", corpus_dir, "--samples", 2,
                       "--seq-len", 32, "--out", stats)
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--keep", 0.5, "--out", model)
    assert code == 0, err
    return stats, model


def test_workflow_calibrate_carve_eval_generate(workflow, tmp_path, corpus_dir, monkeypatch, capsys):
    stats, model = workflow
    carve_report = json.loads((model / "carve_report.json").read_text())
    assert carve_report["experts"] == ["chat", "code", "prose"] and len(carve_report["layers"]) == 2
    report = tmp_path / "r.json"
    code, out, err = run(monkeypatch, capsys, "eval", "--model", model, "--corpus", corpus_dir, "--out", report,
                         "--seqs", 2, "--seq-len", 32)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert set(data["perplexity"]) == {"dense", "readme", "domain_oracle"}
    for variant in data["perplexity"].values():
        assert set(variant) == {"chat", "code", "prose"} and all(v > 1 for v in variant.values())
    assert report.with_suffix(".md").read_text().startswith("# Validation perplexity")
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (model / "carve_report.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(monkeypatch, capsys, "generate", "--model", model, "--prompt", "def f", "--max-tokens", 5,
                         "--expert", "code")
    assert code == 0, err and out.strip() != ""


def test_domain_free_carve(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    stats, _ = workflow
    code, _, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--experts", 4,
                       "--out", tmp_path / "free")
    assert code == 0, err
    assert json.loads((tmp_path / "free" / "config.json").read_text())["expert_names"] == [f"cluster{i}" for i in range(4)]


def test_bad_checkpoints(tmp_path, workflow, corpus_dir, monkeypatch, capsys):
    _, model = workflow
    fails(monkeypatch, capsys, "not found", "eval", "--model", tmp_path / "nope", "--corpus", corpus_dir, "--out", tmp_path / "r.json")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    fails(monkeypatch, capsys, "corrupt", "eval", "--model", model, "--corpus", corpus_dir, "--out", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_stats_from_another_model(tmp_path, workflow, monkeypatch, capsys):
    stats, _ = workflow
    other = tmp_path / "other"
    tiny_llama(seed=7).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    fails(monkeypatch, capsys, "another model", "carve", "--model", other, "--stats", stats, "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_keep_stats_corpus_domain_and_arch(tmp_path, dense_dir, corpus_dir, workflow, monkeypatch, capsys):
    stats, _ = workflow
    for keep in ("0", "1.5", "-0.2"):
        fails(monkeypatch, capsys, "--keep", "carve", "--model", dense_dir, "--stats", stats, "--keep", keep, "--out", tmp_path / "k")
    assert not (tmp_path / "k").exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    fails(monkeypatch, capsys, "corrupt", "carve", "--model", dense_dir, "--stats", junk, "--out", tmp_path / "k")
    (tmp_path / "empty").mkdir()
    fails(monkeypatch, capsys, "empty", "calibrate", "--model", dense_dir, "--corpus", tmp_path / "empty", "--out", tmp_path / "s")
    fails(monkeypatch, capsys, "unknown domain", "calibrate", "--model", dense_dir, "--corpus", corpus_dir,
          "--domains", "prose,poetry", "--out", tmp_path / "s")
    assert not (tmp_path / "s").exists()
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=260)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    fails(monkeypatch, capsys, "unsupported architecture GPT2LMHeadModel", "calibrate", "--model", gpt2,
          "--corpus", corpus_dir, "--out", tmp_path / "s")
    fails(monkeypatch, capsys, "does not exist", "calibrate", "--model", "./no/such/dir", "--out", tmp_path / "s")


def test_help_on_every_command(monkeypatch, capsys):
    for cmd in ("calibrate", "carve", "eval", "generate", "demo"):
        code, out, _ = run(monkeypatch, capsys, cmd, "--help")
        assert code == 0 and "Usage" in out
