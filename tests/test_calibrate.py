"""Calibration statistics are the mean |input of down_proj|, and a killed run resumes to the same result."""

import pytest
import torch

from readmoe.calibrate import calibrate, load_stats
from readmoe.corpus import Corpus

from helpers import byte_tokenizer, tiny_llama


def test_stats_are_mean_abs_down_proj_input(corpus_dir, tmp_path):
    dense, tok, c = tiny_llama(), byte_tokenizer(), Corpus(str(corpus_dir))
    st = calibrate(dense, tok, c, ["prose", "code"], samples=3, seq_len=16, out=tmp_path / "s.safetensors", progress=False)
    assert st.domains == ["prose", "code"] and st.tokens == [48, 48]
    seqs = c.sequences(tok, "code", "calib", 3, 16)
    acts = []
    h = dense.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, i: acts.append(i[0].abs()))
    dense(seqs)
    h.remove()
    torch.testing.assert_close(st.mean[1, 1], acts[0].reshape(-1, acts[0].shape[-1]).mean(0))
    on_disk = load_stats(tmp_path / "s.safetensors")
    assert on_disk.complete and torch.equal(on_disk.mean, st.mean)


def test_resume_after_kill_equals_uninterrupted(corpus_dir, tmp_path, monkeypatch):
    dense, tok, c = tiny_llama(), byte_tokenizer(), Corpus(str(corpus_dir))
    full = calibrate(dense, tok, c, c.domains, 2, 16, tmp_path / "full.safetensors", progress=False)

    out = tmp_path / "part.safetensors"
    real = Corpus.sequences

    def dies_on_prose(self, tokenizer, domain, *a, **k):
        if domain == "prose":
            raise KeyboardInterrupt
        return real(self, tokenizer, domain, *a, **k)

    monkeypatch.setattr(Corpus, "sequences", dies_on_prose)
    with pytest.raises(KeyboardInterrupt):
        calibrate(dense, tok, c, c.domains, 2, 16, out, progress=False)
    part = load_stats(out)
    assert not part.complete and part.domains == ["chat", "code"]
    monkeypatch.setattr(Corpus, "sequences", real)
    resumed = calibrate(dense, tok, c, c.domains, 2, 16, out, progress=False)
    assert load_stats(out).complete
    torch.testing.assert_close(resumed.mean, full.mean)
    torch.testing.assert_close(resumed.sketch, full.sketch)


def test_sketch_sums_every_domain_and_device_map_auto_changes_nothing(dense_dir, corpus_dir, tmp_path):
    """The sketch is |A|^T R over all domains' tokens; a model dispatched by accelerate (device_map="auto", here
    all on the CPU) records the same statistics as a plainly loaded one."""
    from readmoe import backbone

    c = Corpus(str(corpus_dir))
    plain, tok = backbone.load_dense(str(dense_dir))
    st = calibrate(plain, tok, c, ["prose", "code"], 2, 16, tmp_path / "a.safetensors", progress=False)
    R = {}
    for di, d in enumerate(["prose", "code"]):
        g = torch.Generator().manual_seed(1000 + di)
        seqs = c.sequences(tok, d, "calib", 2, 16)
        R[d] = (seqs, torch.randn(seqs.numel(), 64, generator=g))
    acts = {}
    h = plain.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, i: acts.setdefault("a", []).append(i[0]))
    with torch.no_grad():
        for d, (seqs, _) in R.items():
            plain(seqs)
    h.remove()
    want = sum(a.abs().reshape(-1, a.shape[-1]).T @ r for a, (_, r) in zip(acts["a"], R.values()))
    torch.testing.assert_close(st.sketch[0], want, rtol=1e-4, atol=1e-4)
    dispatched, _ = backbone.load_dense(str(dense_dir), device_map="auto")
    st2 = calibrate(dispatched, tok, c, ["prose", "code"], 2, 16, tmp_path / "b.safetensors", progress=False)
    torch.testing.assert_close(st2.mean, st.mean)
    torch.testing.assert_close(st2.sketch, st.sketch)
