"""fp32 -> bf16/fp16 casts round stochastically, the same way in every reader of a checkpoint, and keep a training
update that is smaller than the 16-bit spacing, which rounding to nearest throws away."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import byte_tokenizer, tiny_moe
from readmoe.modeling import load_readme
from readmoe.rounding import cast, cast_module
from readmoe.serving.expert_cache import PROJ, ExpertStore

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_a_value_between_two_neighbours_rounds_up_in_proportion_to_its_distance(dtype):
    lo = torch.tensor(1.5, dtype=dtype)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=dtype))
    x = torch.full((200_000,), lo.float() + 0.3 * (hi.float() - lo.float()))
    assert torch.equal(x.to(dtype), torch.full_like(x, lo.item(), dtype=dtype))  # nearest: the 30 % step is gone
    y = cast(x, dtype, "w")
    assert set(y.float().unique().tolist()) == {lo.item(), hi.item()}
    assert abs(float((y == hi).float().mean()) - 0.3) < 0.01
    assert abs(float(y.float().mean() - x.mean())) < 0.01 * float(hi.float() - lo.float())


@pytest.mark.parametrize("dtype", HALF)
def test_the_cast_is_fixed_by_the_tensor_name_and_leaves_representable_values_alone(dtype):
    x = torch.randn(3000, 700)  # several chunks
    assert torch.equal(cast(x, dtype, "a.weight"), cast(x, dtype, "a.weight"))
    assert not torch.equal(cast(x, dtype, "a.weight"), cast(x, dtype, "b.weight"))
    assert torch.equal(cast(x, dtype, "a.weight"), cast(x.double(), dtype, "a.weight"))
    out = torch.empty(3000, 700, dtype=dtype)
    assert cast(x, dtype, "a.weight", out=out) is out and torch.equal(out, cast(x, dtype, "a.weight"))
    on_grid = x.to(dtype).float()
    assert torch.equal(cast(on_grid, dtype, "a.weight"), on_grid.to(dtype))
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    assert torch.equal(cast(special, dtype, "s"), special.to(dtype))
    assert cast(torch.tensor([float("nan")]), dtype, "s").isnan().all()
    assert torch.equal(cast(x, torch.float32, "a.weight"), x)  # no rounding into a wide dtype


def test_a_training_step_smaller_than_the_bf16_spacing_survives_the_cast():
    """One SGD step on a model whose weights lie on the bf16 grid moves them by less than half a spacing: to nearest,
    the bf16 model is the model before the step; stochastically rounded, it keeps most of the step's gain."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
    cast_module(model, torch.bfloat16).float()  # start on the grid, as a bf16 parent's weights do
    x, target = torch.randn(512, 64), torch.randn(512, 8)
    with torch.no_grad():
        loss = lambda m: float(torch.nn.functional.mse_loss(m(x), target))  # noqa: E731
        before = loss(model)
    torch.nn.functional.mse_loss(model(x), target).backward()
    with torch.no_grad():
        for p in model.parameters():  # a descent step of at most 0.2 of each weight's own spacing
            spacing = (torch.nextafter(p.bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16)).float() - p).abs()
            p -= 0.2 * spacing * p.grad / p.grad.abs().max()
        after = loss(model)
        nearest = loss(copy.deepcopy(model).bfloat16().float())
        rounded = loss(cast_module(copy.deepcopy(model), torch.bfloat16).float())
    assert after < before
    assert nearest == before  # the step is lost
    assert before - rounded > 0.5 * (before - after)  # the step is kept


def test_every_reader_of_an_fp32_checkpoint_gets_the_same_bf16_weights(tmp_path):
    """The model loader, the loader that leaves experts to the store, and the expert store reading from disk."""
    moe = tiny_moe()
    moe.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    full, _ = load_readme(str(tmp_path), torch.bfloat16)
    offloaded, _ = load_readme(str(tmp_path), torch.bfloat16, routed=False)
    sd = full.state_dict()
    assert not torch.equal(sd["backbone.model.layers.0.self_attn.q_proj.weight"],
                           moe.backbone.model.layers[0].self_attn.q_proj.weight.bfloat16())  # not to nearest
    for k, v in offloaded.state_dict().items():
        if v.device.type != "meta":
            assert torch.equal(v, sd[k]), k
    store = ExpertStore(offloaded, tmp_path, "disk")
    try:
        for l, m in enumerate(full.moe_layers()):
            for e, ex in enumerate(m.experts):
                gu, down = store.load(l, e)
                assert gu.dtype == torch.bfloat16
                assert torch.equal(gu, torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
                assert torch.equal(down, ex.down_proj.weight)
                assert store.nbytes[l, e] == sum(getattr(ex, p).weight.nbytes for p in PROJ)
    finally:
        store.close()
