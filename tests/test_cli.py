"""The CLI end to end on a tiny checkpoint, and every bad input gets one clear line and exit code 2."""

import json

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from helpers import byte_tokenizer, cli, fails, run, tiny_llama, write_corpus_dir, write_dense_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One calibrate -> carve -> eval run on the tiny checkpoint, shared by the tests that read what it wrote."""
    d = tmp_path_factory.mktemp("evaluated")
    dense, corpus = write_dense_dir(d / "dense"), write_corpus_dir(d / "corpus")
    cli("calibrate", "--model", dense, "--corpus", corpus, "--samples", 2, "--seq-len", 32, "--out", d / "stats")
    cli("carve", "--model", dense, "--stats", d / "stats", "--out", d / "moe")
    cli("eval", "--model", d / "moe", "--corpus", corpus, "--out", d / "r.json", "--seqs", 2, "--seq-len", 32, "--mmlu", 6)
    return d / "moe", corpus, d / "r.json"


def test_carve_writes_its_report(evaluated):
    model, _, _ = evaluated
    carve_report = json.loads((model / "carve_report.json").read_text())
    assert carve_report["experts"] == ["chat", "code", "prose"] and len(carve_report["layers"]) == 2
    assert carve_report["streamed"] is True  # a parent on disk is carved streaming
    assert (model / "carve_report.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_reports_perplexity_router_and_mmlu(evaluated):
    _, _, report = evaluated
    data = json.loads(report.read_text())
    assert set(data["perplexity"]) == {"dense", "readme", "domain_oracle", "oracle", "random"}
    for variant in data["perplexity"].values():
        assert set(variant) == {"chat", "code", "prose"} and all(v > 1 for v in variant.values())
    assert 0.0 <= data["router"]["accuracy"] <= 1.0 and data["router"]["params"] > 0
    assert 0.0 < data["router"]["time_share"] < 1.0
    assert set(data["mmlu"]) == {"dense", "readme"} and data["settings"]["mmlu_questions"] == 6
    assert all(v in {0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1} for v in data["mmlu"].values())


def test_eval_reports_routing_statistics_and_plots(evaluated):
    _, _, report = evaluated
    data = json.loads(report.read_text())
    load = data["routing"]["load"]["readme"]
    assert set(load) == {"chat", "code", "prose"} and all(abs(sum(v) - 1) < 1e-5 for v in load.values())
    assert len(data["routing"]["adjacent_mi_bits"]["oracle"]) == 1 and 0 <= data["routing"]["keep_previous"]["readme"] <= 1
    assert report.with_suffix(".md").read_text().startswith("# Quality report")
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert report.with_name("r_routing.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_baselines_need_a_training_record(evaluated, tmp_path, monkeypatch, capsys):
    model, corpus, _ = evaluated
    fails(monkeypatch, capsys, "no training record", "eval", "--model", model, "--corpus", corpus,
          "--out", tmp_path / "r.json", "--baselines", "all")


def test_eval_bad_mmlu_count_is_one_line(evaluated, tmp_path, monkeypatch, capsys):
    model, corpus, _ = evaluated
    fails(monkeypatch, capsys, "--mmlu", "eval", "--model", model, "--corpus", corpus, "--out", tmp_path / "r.json",
          "--mmlu", "x")


def test_generate_with_a_forced_expert(evaluated, monkeypatch, capsys):
    model, _, _ = evaluated
    code, out, err = run(monkeypatch, capsys, "generate", "--model", model, "--prompt", "def f", "--max-tokens", 5,
                         "--expert", "code")
    assert code == 0 and out.strip(), err


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


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2"])
def test_bad_keep_is_one_line(tmp_path, dense_dir, workflow, monkeypatch, capsys, keep):
    stats, _ = workflow
    fails(monkeypatch, capsys, "--keep", "carve", "--model", dense_dir, "--stats", stats, "--keep", keep, "--out", tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_corrupt_stats_file_is_one_line(tmp_path, dense_dir, monkeypatch, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    fails(monkeypatch, capsys, "corrupt", "carve", "--model", dense_dir, "--stats", junk, "--out", tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_empty_corpus_and_unknown_domain_are_one_line(tmp_path, dense_dir, corpus_dir, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    fails(monkeypatch, capsys, "empty", "calibrate", "--model", dense_dir, "--corpus", tmp_path / "empty", "--out", tmp_path / "s")
    fails(monkeypatch, capsys, "unknown domain", "calibrate", "--model", dense_dir, "--corpus", corpus_dir,
          "--domains", "prose,poetry", "--out", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_unsupported_architecture_and_missing_path_are_one_line(tmp_path, corpus_dir, monkeypatch, capsys):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=260)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    fails(monkeypatch, capsys, "unsupported architecture GPT2LMHeadModel", "calibrate", "--model", gpt2,
          "--corpus", corpus_dir, "--out", tmp_path / "s")
    fails(monkeypatch, capsys, "does not exist", "calibrate", "--model", "./no/such/dir", "--out", tmp_path / "s")


def test_help_on_every_command(monkeypatch, capsys):
    for cmd in ("calibrate", "carve", "train", "eval", "generate", "demo"):
        code, out, _ = run(monkeypatch, capsys, cmd, "--help")
        assert code == 0 and "Usage" in out


def test_unreachable_hub_id_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without the hub sees, without waiting on retries;
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub reads the variable on import
    fails(monkeypatch, capsys, "hub id could not be fetched", "calibrate", "--model", "someone/no-such-model",
          "--out", tmp_path / "s")


def test_dtype_flag(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    """--dtype bfloat16 carves a bf16 checkpoint that generates; a bad value is one line naming the flag."""
    from safetensors import safe_open

    stats, _ = workflow
    out = tmp_path / "bf16"
    code, _, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--out", out,
                       "--dtype", "bfloat16")
    assert code == 0, err
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64", "BOOL"} == {"BF16"}
    code, text, err = run(monkeypatch, capsys, "generate", "--model", out, "--prompt", "def f", "--max-tokens", 4,
                          "--dtype", "bfloat16")
    assert code == 0 and text.strip(), err
    fails(monkeypatch, capsys, "--dtype must be one of auto, float32, bfloat16, float16", "generate", "--model", out,
          "--prompt", "x", "--dtype", "float64")


def test_auto_dtype_follows_the_hardware(monkeypatch):
    import torch

    from readmoe import dtype

    monkeypatch.setattr(dtype, "cpu_has_bf16_units", lambda: True)
    assert dtype.resolve("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(dtype, "cpu_has_bf16_units", lambda: False)
    assert dtype.resolve("auto", "cpu") == torch.float32
    assert dtype.resolve("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype.resolve("fp8")


def test_library_messages_become_flag_speak_in_the_cli():
    from readmoe.cli import flag_speak

    msg = "`keep` 2 is out of (0, 1]; lower `seq_len` or pass `overwrite=True`; then run `readmoe calibrate`"
    assert flag_speak(msg) == "--keep 2 is out of (0, 1]; lower --seq-len or pass --overwrite; then run `readmoe calibrate`"


def test_loading_a_model_leaves_the_callers_logging_as_it_was(dense_dir):
    from transformers.utils import logging as hf_logging

    from readmoe import backbone

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        backbone.load_dense(str(dense_dir))
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()
