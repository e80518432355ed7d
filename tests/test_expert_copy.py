"""The disk store's copy of the experts in the serving dtype: the same bits as a load from the checkpoint, built once,
keyed to the checkpoint, never half-written, and skipped where it would spare nothing or does not fit."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from readmoe.checkpoint import Checkpoint, is_checkpoint
from readmoe.errors import UserError
from readmoe.modeling import load_readme
from readmoe.serving import Engine, EngineConfig, SamplingParams
from readmoe.serving import expert_copy
from readmoe.serving.expert_cache import ExpertStore, expert_key

from helpers import byte_tokenizer, tiny_moe


def save(moe, d):
    moe.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def loads(store):
    return {(l, e): store.load(l, e) for l in range(store.num_layers) for e in range(store.num_experts)}


def test_copy_holds_the_bits_a_load_from_the_checkpoint_makes_and_is_built_once(tmp_path, expert_copies):
    d = save(tiny_moe(), tmp_path / "moe")
    moe, _ = load_readme(str(d), torch.bfloat16, routed=False)
    plain = ExpertStore(moe, d, "disk", copy=False)
    first = ExpertStore(moe, d, "disk")
    again = ExpertStore(moe, d, "disk")
    assert plain.copy_reason.startswith("set explicitly")
    assert first.copy_reason.startswith("built") and again.copy_reason.startswith("reused")
    want = loads(plain)
    for store in (first, again):
        got = loads(store)
        for k, (gu, down) in want.items():
            assert got[k][0].dtype == torch.bfloat16
            assert torch.equal(got[k][0], gu) and torch.equal(got[k][1], down), k
        assert store.nbytes == plain.nbytes
    copies = list(expert_copies.iterdir())
    assert len(copies) == 1 and is_checkpoint(copies[0])  # one copy, no temporary directory left
    c = Checkpoint(copies[0])
    assert {c.dtype(k) for k in c.keys()} == {torch.bfloat16}
    assert set(c.keys()) == {expert_key(l, e, p) for l in range(plain.num_layers) for e in range(plain.num_experts)
                             for p in ("gate_proj", "up_proj", "down_proj")}
    for s in (plain, first, again):
        s.close()
    c.close()


def test_a_changed_checkpoint_gets_a_new_copy_which_replaces_the_old(tmp_path, expert_copies):
    d = save(tiny_moe(), tmp_path / "moe")
    moe, _ = load_readme(str(d), torch.bfloat16, routed=False)
    before = loads(ExpertStore(moe, d, "disk"))
    other = tiny_moe()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    save(other, d)
    os.utime(d / "model.safetensors", ns=(1, 1))  # even if the rewrite kept the old size and time
    first = [p.name for p in expert_copies.iterdir()]
    other_dir = save(tiny_moe(), tmp_path / "other" / "moe")  # same name, another directory: its copy stays
    ExpertStore(moe, other_dir, "disk")
    store = ExpertStore(moe, d, "disk")
    assert store.copy_reason.startswith("built") and "removed 1 older copy" in store.copy_reason
    names = {p.name for p in expert_copies.iterdir()}
    assert len(names) == 2 and first[0] not in names
    after, plain = loads(store), loads(ExpertStore(moe, d, "disk", copy=False))
    assert all(torch.equal(after[k][0], plain[k][0]) for k in plain)
    assert not all(torch.equal(after[k][0], before[k][0]) for k in plain)


def test_no_copy_where_it_spares_nothing_or_does_not_fit(tmp_path, expert_copies, monkeypatch):
    d = save(tiny_moe(), tmp_path / "moe")
    fp32, _ = load_readme(str(d), torch.float32, routed=False)
    assert "already in float32" in ExpertStore(fp32, d, "disk").copy_reason
    bf16, _ = load_readme(str(d), torch.bfloat16, routed=False)

    class Usage:
        free = 1000

    monkeypatch.setattr(expert_copy.shutil, "disk_usage", lambda path: Usage)
    store = ExpertStore(bf16, d, "disk")
    assert "would take over 50% of the 0.0 GB free" in store.copy_reason
    assert not expert_copies.exists() or not any(expert_copies.iterdir())
    gu, _ = store.load(0, 0)
    assert gu.dtype == torch.bfloat16  # still served, cast on load
    with pytest.raises(UserError, match="`expert_copy` must be auto, on or off"):
        ExpertStore(bf16, d, "disk", copy="yes")


def test_a_failed_build_leaves_nothing_and_on_says_what_to_fix(tmp_path, expert_copies, monkeypatch):
    d = save(tiny_moe(), tmp_path / "moe")
    moe, _ = load_readme(str(d), torch.bfloat16, routed=False)

    def full(self, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(expert_copy.ShardWriter, "add", full)
    store = ExpertStore(moe, d, "disk")
    assert "writing the copy failed (No space left on device)" in store.copy_reason
    assert not any(expert_copies.iterdir())  # the temporary directory is gone
    with pytest.raises(UserError, match="could not write the experts' .* copy .*`expert_copy` off"):
        ExpertStore(moe, d, "disk", copy=True)


def test_engine_reads_the_copy_only_where_experts_are_loaded_while_serving(tmp_path, expert_copies):
    d = save(tiny_moe(), tmp_path / "moe")
    prompts = [[5, 9, 13, 200, 7], [40] * 9]
    with Engine.from_pretrained(d, EngineConfig(capacity=1, policy="lru"), dtype=torch.bfloat16) as eng:
        got = eng.run([(0.0, p, SamplingParams(max_tokens=6)) for p in prompts])
        store = eng.cache.store
        assert store.copy_reason.startswith("built") and store.bytes_loaded > 0
        assert all(f.path.is_relative_to(expert_copies) for f in store._ckpt.files.values())
        assert [len(r.output_ids) for r in got] == [6, 6]
    with Engine.from_pretrained(d, EngineConfig(), dtype=torch.bfloat16) as eng:  # all resident: each read once
        assert eng.cache.store.copy_reason.startswith("auto: every expert resident")


def test_a_copy_in_shards_is_read_like_one_file(tmp_path, expert_copies):
    """A parent-size copy is written in 1 GB shards with an index; the store reads it the same way."""
    d = save(tiny_moe(), tmp_path / "moe")
    moe, _ = load_readme(str(d), torch.bfloat16, routed=False)
    plain = ExpertStore(moe, d, "disk", copy=False)
    keys = [expert_key(l, e, p) for l in range(plain.num_layers) for e in range(plain.num_experts)
            for p in ("gate_proj", "up_proj", "down_proj")]
    out = expert_copy.build(plain._ckpt, keys, torch.bfloat16, expert_copy.copy_dir(d, torch.bfloat16),
                            max_shard_bytes=4096)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    store = ExpertStore(moe, d, "disk")
    assert store.copy_reason.startswith("reused")
    want, got = loads(plain), loads(store)
    assert all(torch.equal(got[k][0], want[k][0]) and torch.equal(got[k][1], want[k][1]) for k in want)


def test_the_copy_of_a_deleted_checkpoint_goes_when_another_engine_resolves_its_copy(tmp_path, expert_copies):
    """A copy names its checkpoint (SOURCE); once that directory holds no checkpoint the copy is removed, whichever
    checkpoint is served next. Copies that name no source (made by hand) and live checkpoints' copies stay."""
    a, b = save(tiny_moe(), tmp_path / "a"), save(tiny_moe(), tmp_path / "b")
    moe, _ = load_readme(str(a), torch.bfloat16, routed=False)
    ExpertStore(moe, a, "disk").close()
    ExpertStore(moe, b, "disk").close()
    copy_a, copy_b = (expert_copy.copy_dir(d, torch.bfloat16) for d in (a, b))
    assert (copy_a / expert_copy.SOURCE).read_text().strip() == str(a.resolve())
    unnamed = expert_copies / "by-hand"
    shutil.copytree(copy_b, unnamed)
    (unnamed / expert_copy.SOURCE).unlink()
    shutil.rmtree(a)
    store = ExpertStore(moe, b, "disk")
    assert store.copy_reason.startswith("reused") and "removed 1 copy of deleted checkpoints" in store.copy_reason
    assert not copy_a.exists() and is_checkpoint(copy_b) and is_checkpoint(unnamed)
    again = ExpertStore(moe, b, "disk")
    assert "removed" not in again.copy_reason
    store.close(), again.close()
