"""Paper-size paths at tiny size: sharded checkpoints, streaming carve, an engine that never loads routed experts."""

import json

import pytest
import torch

from readmoe import rounding
from readmoe.carve import NotStreamable, ParentCheckpoint, build_model, carve_streaming, domain_sets
from readmoe.checkpoint import Checkpoint, MapPool, ShardWriter
from readmoe.modeling import is_routed_key
from readmoe.serving import Engine, EngineConfig, SamplingParams
from readmoe.serving.expert_cache import PROJ, ExpertStore

from helpers import tiny_moe


def test_shard_writer_round_trips_every_dtype_and_shards_by_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    groups = [{f"l{i}.w": torch.randn(40, 30, generator=g).to(dt), f"l{i}.idx": torch.arange(7) * i}
              for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16])]
    groups.append({"mask": torch.rand(5, generator=g) > 0.5, "empty": torch.zeros(0, 4)})
    w = ShardWriter(tmp_path, max_shard_bytes=4000)
    for grp in groups:
        w.add(grp)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) == 3 and all((tmp_path / s).is_file() for s in shards)
    assert index["weight_map"]["l0.w"] == index["weight_map"]["l0.idx"]  # a group is never split
    ck = Checkpoint(tmp_path)
    for grp in groups:
        for k, t in grp.items():
            got = ck.read(k)
            assert got.dtype == t.dtype and torch.equal(got, t)
    out = torch.empty(40, 30, dtype=torch.bfloat16)
    assert ck.read("l1.w", out) is out and torch.equal(out, groups[1]["l1.w"])
    with pytest.raises(ValueError):
        ck.read("l1.w", torch.empty(40, 30))  # a buffer of the wrong size is refused, not overrun
    ck.close()
    single = tmp_path / "one"
    w = ShardWriter(single)
    w.add(groups[0])
    w.close()
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]  # what save_pretrained writes


def _parent(dense, tmp_path):
    dense.save_pretrained(tmp_path / "parent")
    L, I = len(dense.model.layers), dense.config.intermediate_size
    sets = domain_sets(torch.rand(3, L, I, generator=torch.Generator().manual_seed(0)), 0.5)
    return tmp_path / "parent", sets, torch.rand(L, I, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_carve_writes_the_in_memory_carve_tensor_for_tensor(dense, tmp_path, dtype):
    parent_dir, sets, scores = _parent(dense, tmp_path)
    ref = rounding.cast_module(build_model(dense, sets, ["a", "b", "c"], 0.5, "domain", "p", scores=scores), dtype)
    ref.save_pretrained(tmp_path / "ref")
    parent = ParentCheckpoint(parent_dir)
    out = tmp_path / "streamed"
    out.mkdir()
    skeleton = carve_streaming(parent, sets, ["a", "b", "c"], 0.5, "domain", "p", out, dtype, scores=scores,
                               max_shard_bytes=4096, progress=False)
    parent.close()
    assert (out / "model.safetensors.index.json").is_file()  # sharded: one layer per shard at this size
    want, got = Checkpoint(tmp_path / "ref"), Checkpoint(out)
    assert sorted(want.keys()) == sorted(got.keys())
    for k in want.keys():
        assert torch.equal(want.read(k), got.read(k)), k
    assert json.loads((tmp_path / "ref" / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    assert all(p.device.type == "meta" for n, p in skeleton.named_parameters() if "router" not in n)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype)  # HF reads the shards itself
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref"), dtype=dtype)
    ids = torch.tensor([[3, 50, 7, 200, 9, 11]])
    with torch.no_grad():  # same tensors; only the buffers' alignment differs, which matmul kernels may notice
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits)


def test_a_parent_whose_tensors_are_named_otherwise_is_not_streamed(tmp_path):
    from safetensors.torch import load_file, save_file

    from helpers import tiny_llama

    parent_dir, _, _ = _parent(tiny_llama(), tmp_path)
    sd = load_file(str(parent_dir / "model.safetensors"))
    save_file({f"language_model.{k}": v for k, v in sd.items()}, str(parent_dir / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(NotStreamable):
        ParentCheckpoint(parent_dir)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny MoE saved as shards, as a parent-size carve writes it."""
    moe = tiny_moe()
    d = tmp_path_factory.mktemp("sharded")
    w = ShardWriter(d, max_shard_bytes=8192)
    for k, v in moe.state_dict().items():
        if k not in moe.all_tied_weights_keys:
            w.add({k: v})
    w.close()
    moe.config.save_pretrained(d)
    moe.generation_config.save_pretrained(d)
    from helpers import byte_tokenizer

    byte_tokenizer().save_pretrained(d)
    return moe, d


def test_map_pool_reuses_a_map_only_once_no_tensor_uses_it_and_unmaps_spare_ones():
    pool = MapPool(slack=1.5, keep=2.0)
    a = pool.empty((64, 128), torch.bfloat16)
    a.fill_(1)
    ptr = a.data_ptr()
    view = a[:2]
    del a
    b = pool.empty((64, 128), torch.bfloat16)  # a view keeps the map in use: a new one
    assert (pool.created, pool.reused) == (2, 0) and b.data_ptr() != ptr
    del view
    c = pool.empty((60, 128), torch.bfloat16)  # free now, and within the slack
    assert (pool.created, pool.reused) == (2, 1) and c.data_ptr() == ptr and c.shape == (60, 128)
    c.fill_(2)
    assert bool((c == 2).all())
    del c
    d = pool.empty((16, 128), torch.bfloat16)  # too small for the free map (over the slack): a new map
    assert pool.created == 3 and d.data_ptr() != ptr
    del b, d
    pool.empty((8, 8), torch.float32)  # every other map is free: spare bytes are cut to keep x the largest request
    spare = sum(len(m) for m in pool._maps) - 8 * 8 * 4
    assert spare <= 2.0 * 64 * 128 * 2 and len(pool._maps) < 4
    assert pool.empty((0, 4), torch.bfloat16).numel() == 0


def test_expert_store_reads_each_expert_from_the_shards(sharded):
    moe, d = sharded
    assert len(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    store = ExpertStore(moe, d, "disk")
    for l, m in enumerate(moe.moe_layers()):
        for e, ex in enumerate(m.experts):
            gu, down = store.load(l, e)
            torch.testing.assert_close(gu, torch.cat([ex.gate_proj.weight, ex.up_proj.weight]), rtol=0, atol=0)
            torch.testing.assert_close(down, ex.down_proj.weight, rtol=0, atol=0)
            assert store.nbytes[l, e] == sum(getattr(ex, p).weight.nbytes for p in PROJ)
    store.close()


@pytest.mark.parametrize("capacity", [None, 1])
def test_engine_from_a_sharded_checkpoint_never_loads_routed_experts_and_matches_generate(sharded, capacity):
    moe, d = sharded
    prompts = [[5, 9, 13, 200, 7], [40] * 9, [3, 250, 3]]
    with torch.no_grad():
        want = [moe.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=5,
                             do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    with Engine.from_pretrained(d, EngineConfig(capacity=capacity, policy="lru")) as eng:
        routed = [n for n, p in eng.moe.named_parameters() if is_routed_key(n)]
        assert routed and all(p.device.type == "meta" for n, p in eng.moe.named_parameters() if n in routed)
        assert all(p.device.type != "meta" for n, p in eng.moe.named_parameters() if n not in routed)
        got = eng.run([(0.0, p, SamplingParams(max_tokens=5)) for p in prompts])
        assert [r.output_ids for r in got] == want
        with pytest.raises(ValueError, match="without its routed experts"):
            eng.moe(torch.tensor([[1, 2]]))
