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
