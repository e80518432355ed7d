"""No command destroys user data, and every bad input is one clear line (exit code 2, no traceback)."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from readmoe.modeling import load_readme
from readmoe.outdir import MANIFEST, read_manifest

from helpers import fails, run


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_carve_refuses_a_directory_with_user_files(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    stats, _ = workflow
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    fails(monkeypatch, capsys, "--overwrite", "carve", "--model", dense_dir, "--stats", stats, "--out", out)
    assert snapshot(out) == {"thesis.txt": b"four years of work"}


def test_carve_overwrite_keeps_unknown_files(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    stats, _ = workflow
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years of work")
    (out / "notes" / "a.md").write_text("keep me")
    code, _, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--out", out, "--overwrite")
    assert code == 0, err
    assert (out / "thesis.txt").read_text() == "four years of work" and (out / "notes" / "a.md").read_text() == "keep me"
    m = read_manifest(out)
    assert m["kind"] == "carve" and "model.safetensors" in m["files"] and "thesis.txt" not in m["files"]
    load_readme(str(out))


def test_carve_reruns_into_its_own_output(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    stats, model = workflow  # the fixture carved into `model` already
    assert read_manifest(model)["kind"] == "carve"
    (model / "my-notes.txt").write_text("added by the user")
    code, _, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--out", model, "--keep", 0.6)
    assert code == 0, err
    moe, _ = load_readme(str(model))
    assert moe.config.keep == 0.6
    assert (model / "my-notes.txt").read_text() == "added by the user"
    assert not [p for p in model.iterdir() if p.name.startswith(".readmoe-tmp-")]


def test_other_kinds_of_output_are_not_ours_to_replace(tmp_path, dense_dir, workflow, corpus_dir, monkeypatch, capsys):
    stats, model = workflow
    demo_like = tmp_path / "d"
    demo_like.mkdir()
    (demo_like / MANIFEST).write_text('{"kind": "demo", "version": "0", "files": []}')
    (demo_like / "report.json").write_text("{}")
    fails(monkeypatch, capsys, "readmoe 'demo' output", "carve", "--model", dense_dir, "--stats", stats, "--out", demo_like)
    fails(monkeypatch, capsys, "--overwrite", "demo", "--out", model)  # a carve output is no demo directory


def test_a_killed_carve_leaves_the_previous_output(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    stats, model = workflow
    before = snapshot(model)
    from readmoe import report

    def killed(*a, **k):  # dies after the weights and tokenizer are written, before the plot
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_carve", killed)
    code, _, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--out", model, "--keep", 0.7)
    assert code == 130, err
    assert snapshot(model) == before
    assert load_readme(str(model))[0].config.keep == 0.5
    # a SIGKILL leaves its temporary directory behind: it neither counts as a user file nor blocks the next run
    (model / ".readmoe-tmp-deadbeef").mkdir()
    (model / ".readmoe-tmp-deadbeef" / "model.safetensors").write_bytes(b"half")
    monkeypatch.undo()
    code, _, err = run(monkeypatch, capsys, "carve", "--model", dense_dir, "--stats", stats, "--out", model)
    assert code == 0, err


def test_demo_refuses_a_foreign_directory_before_any_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.txt").write_text("x")
    fails(monkeypatch, capsys, "--overwrite", "demo", "--out", out)
    assert snapshot(out) == {"thesis.txt": b"x"}


def test_out_that_is_a_file(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    stats, _ = workflow
    f = tmp_path / "file"
    f.write_text("x")
    fails(monkeypatch, capsys, "not a directory", "carve", "--model", dense_dir, "--stats", stats, "--out", f)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out(tmp_path, dense_dir, workflow, monkeypatch, capsys):
    stats, _ = workflow
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    fails(monkeypatch, capsys, "permission denied", "carve", "--model", dense_dir, "--stats", stats, "--out", ro / "x")


def test_empty_prompt(workflow, monkeypatch, capsys):
    _, model = workflow
    fails(monkeypatch, capsys, "--prompt is empty", "generate", "--model", model, "--prompt", "")


def test_corpus_file_of_unknown_format(tmp_path, dense_dir, corpus_dir, monkeypatch, capsys):
    (corpus_dir / "slides.pdf").write_bytes(b"%PDF-1.4")
    fails(monkeypatch, capsys, "unknown format", "calibrate", "--model", dense_dir, "--corpus", corpus_dir,
          "--out", tmp_path / "s.safetensors")


def test_checkpoint_of_another_architecture(tmp_path, dense_dir, corpus_dir, monkeypatch, capsys):
    fails(monkeypatch, capsys, "not a readmoe MoE", "eval", "--model", dense_dir, "--corpus", corpus_dir,
          "--out", tmp_path / "r.json")
    fails(monkeypatch, capsys, "not a readmoe MoE", "generate", "--model", dense_dir, "--prompt", "hi")


def test_bad_flag_values_are_one_line(monkeypatch, capsys):
    fails(monkeypatch, capsys, "--samples", "calibrate", "--samples", "many", "--out", "s")
    fails(monkeypatch, capsys, "No such command", "calbrate")
    fails(monkeypatch, capsys, "Missing option '--stats'", "carve", "--out", "x")


# Every numeric option, each with the check it must fail; values are generated, the commands run in-process.
NUMERIC = [
    ("calibrate", "--samples"), ("calibrate", "--seq-len"), ("carve", "--keep"), ("generate", "--max-tokens"),
    ("eval", "--seqs"), ("eval", "--seq-len"), ("train", "--rounds"), ("train", "--seq-len"),
    ("bench", "--token-budget"), ("bench", "--max-running"), ("bench", "--max-wait"), ("bench", "--requests"),
    ("bench", "--rounds"), ("bench", "--link-gbps"),
]
bad_number = st.one_of(st.integers(max_value=0).map(str), st.sampled_from(["", "abc", "1e999x", "--", "NaN?", "½"]))
bad_path = st.text(alphabet="abcxyz/._-", min_size=1, max_size=12).map(lambda s: f"no-such-{s.strip('/') or 'x'}")


def _base(cmd: str, tmp: Path, model: Path, stats: Path) -> list[str]:
    return {"calibrate": ["calibrate", "--out", tmp / "s.safetensors"],
            "carve": ["carve", "--stats", stats, "--out", tmp / "c"],
            "generate": ["generate", "--model", model, "--prompt", "hi"],
            "eval": ["eval", "--model", model, "--out", tmp / "r.json"],
            "train": ["train", "--model", model, "--out", tmp / "t"],
            "bench": ["bench", "serve", "--model", model, "--out", tmp / "b"]}[cmd]


def refused_in_empty_dir(cmd: str, extra: list, tmp_path_factory, workflow, monkeypatch, capsys) -> None:
    """`cmd` with `extra` appended fails with one line and creates nothing in its (empty) working directory."""
    stats, model = workflow
    tmp = tmp_path_factory.mktemp("bad")
    monkeypatch.chdir(tmp)
    fails(monkeypatch, capsys, "", *_base(cmd, tmp, model, stats), *[e(tmp) if callable(e) else e for e in extra])
    assert list(tmp.iterdir()) == [], "a refused command creates nothing"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(NUMERIC), value=bad_number)
def test_property_bad_numbers(case, value, tmp_path_factory, workflow, monkeypatch, capsys):
    cmd, opt = case
    refused_in_empty_dir(cmd, [f"{opt}={value}"], tmp_path_factory, workflow, monkeypatch, capsys)


PATHS = [("calibrate", "--model"), ("calibrate", "--corpus"), ("carve", "--model"), ("carve", "--stats"),
         ("generate", "--model"), ("eval", "--model"), ("eval", "--corpus"), ("train", "--model"), ("train", "--corpus"),
         ("bench", "--model"), ("bench", "--corpus")]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(PATHS), path=bad_path)
def test_property_bad_paths(case, path, tmp_path_factory, workflow, monkeypatch, capsys):
    cmd, opt = case
    refused_in_empty_dir(cmd, [opt, lambda tmp: tmp / path], tmp_path_factory, workflow, monkeypatch, capsys)
