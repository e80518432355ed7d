"""Domain discovery, disjoint deterministic splits, and input errors."""

import pytest

from readmoe.corpus import Corpus, assign_splits, chunk_hash, chunk_text, clean_wikitext
from readmoe.errors import UserError

from helpers import byte_tokenizer


def test_user_corpus_layouts(corpus_dir):
    c = Corpus(str(corpus_dir))
    assert c.domains == ["chat", "code", "prose"]
    for d in c.domains:
        parts = {s: c.texts(d, s) for s in ("calib", "train", "validation")}
        assert all(parts.values()), f"{d}: every split gets text"
        seen = [t for s in parts.values() for t in s]
        all_chunks = [ch for doc in c.documents(d).values() for ch in chunk_text(doc)]
        assert sorted(seen) == sorted(all_chunks)  # disjoint and complete


def test_splits_are_deterministic_with_exact_shares():
    keys = [chunk_hash("wiki", f"d{i}", 0) for i in range(1000)]
    assert assign_splits(keys) == assign_splits(list(keys))
    shares = assign_splits(keys)
    assert shares.count("validation") == 100 and shares.count("calib") == 100 and shares.count("train") == 800
    assert sorted(assign_splits(keys[:3])) == ["calib", "train", "validation"]


def test_sequences_shape_and_too_little_text(corpus_dir):
    c = Corpus(str(corpus_dir))
    seqs = c.sequences(byte_tokenizer(), "prose", "calib", 3, 32)
    assert seqs.shape == (3, 32)
    with pytest.raises(UserError, match="fewer than"):
        c.sequences(byte_tokenizer(), "prose", "calib", 2, 10**6)


def test_corpus_errors(tmp_path, corpus_dir):
    with pytest.raises(UserError, match="not found"):
        Corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        Corpus(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="unknown domain"):
        Corpus(str(corpus_dir)).select(["prose", "poetry"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match="x.jsonl:2"):
        Corpus(str(bad)).documents("x")
    blank = tmp_path / "blank"
    (blank / "d").mkdir(parents=True)
    (blank / "d" / "a.txt").write_text("   \n")
    with pytest.raises(UserError, match="no text"):
        Corpus(str(blank)).documents("d")


def test_clean_wikitext():
    raw = "'''Anarchism''' is a {{cite|x={{y}}}} [[political philosophy|philosophy]]<ref>r</ref>.\n[[Category:X]]\n== History =="
    assert clean_wikitext(raw) == "Anarchism is a  philosophy.\nHistory"
