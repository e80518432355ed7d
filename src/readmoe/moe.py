"""The MoE MLP: a shared expert for every token plus one routed expert per token.

Both are slices of the dense SwiGLU MLP's neurons. Because that MLP is a sum
over neurons, `MLP_{shared ∪ e}(x) = MLP_shared(x) + MLP_e(x)` exactly. Tokens
are bucketed by expert and each bucket runs as one matmul (grouped dispatch),
so cost follows the number of distinct experts, not the number of tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn


class Routing:
    """The expert ids of the forward in flight, shared by every MoE layer of one model.

    Why a side channel at all: the backbone's HF decoder layers are reused unchanged, and they call their
    MLP with the hidden state only, so per-token expert ids cannot travel as an argument. `use()` scopes them
    to one forward and restores what was there before, so nested forwards neither clobber nor leak them."""

    def __init__(self):
        self.expert_ids: torch.Tensor | None = None  # LongTensor [B, T], or [B, T, L] for one path per layer
        self.gate_logits: list[torch.Tensor] | None = None  # layer-wise gates append their logits, layer by layer

    @contextmanager
    def use(self, expert_ids: torch.Tensor | None):
        """Route one forward with `expert_ids` (None: layer-wise gates decide); yields the list the gates'
        logits are appended to."""
        before = self.expert_ids, self.gate_logits
        self.expert_ids, self.gate_logits = expert_ids, []
        try:
            yield self.gate_logits
        finally:
            self.expert_ids, self.gate_logits = before


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) over a subset of the dense model's neurons."""

    def __init__(self, hidden: int, size: int, act: nn.Module, bias: bool = False, down_bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, size, bias=bias)
        self.up_proj = nn.Linear(hidden, size, bias=bias)
        self.down_proj = nn.Linear(size, hidden, bias=down_bias)
        self.act_fn = act
        # Dense neuron index of each row: maps this expert back to the parent model.
        self.register_buffer("neuron_idx", torch.zeros(size, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.gate_proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ReadMEMLP(nn.Module):
    """Shared expert + routed experts. With `layerwise=True` a linear gate on this layer's hidden state picks
    the expert (the conventional MoE design, kept as a baseline); otherwise the ids come from `routing`."""

    def __init__(self, hidden: int, shared_size: int, expert_sizes: list[int], act: nn.Module, routing: Routing,
                 bias: bool = False, down_bias: bool = False, layer_idx: int = 0, layerwise: bool = False):
        super().__init__()
        self.shared = GatedMLP(hidden, shared_size, act, bias, down_bias)
        self.experts = nn.ModuleList(GatedMLP(hidden, s, act, bias, False) for s in expert_sizes)
        self.gate = nn.Linear(hidden, len(expert_sizes), bias=False) if layerwise else None
        self.layer_idx = layer_idx
        self._routing = [routing]  # a list keeps it out of the module tree and the state dict

    @property
    def routing(self) -> Routing:
        return self._routing[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.routing.expert_ids
        if ids is None and self.gate is not None:
            logits = self.gate(x)
            if self.routing.gate_logits is not None:
                self.routing.gate_logits.append(logits)
            ids = logits.argmax(-1)
        elif ids is None:
            raise RuntimeError("ReadMEMLP called without expert ids; call ReadMEForCausalLM, not its backbone")
        elif ids.dim() == x.dim():  # [B, T, L]: one expert per token and layer
            ids = ids[..., self.layer_idx]
        flat = x.reshape(-1, x.shape[-1])
        ids = ids.reshape(-1)
        if ids.numel() != flat.shape[0]:
            raise ValueError(f"expert_ids has {ids.numel()} entries for {flat.shape[0]} tokens")
        if ids.numel() and int(ids.max()) >= len(self.experts):
            raise ValueError(f"expert id {int(ids.max())} out of range: the model has {len(self.experts)} routed experts")
        order = torch.unique(ids).tolist()  # ascending expert id
        out = self.shared(flat)
        if self.training and torch.is_grad_enabled():
            # every expert takes part in every training step, on no tokens if none chose it: its gradient is then
            # zero, not missing, on every process, which sharded data parallelism (FSDP) needs to stay in step
            for e in sorted(set(range(len(self.experts))) - set(order)):
                if self.experts[e].size:
                    out = out + self.experts[e](flat[:0]).sum()
        return add_routed(out, flat, ids, order, lambda e, xs, rest: self.experts[e](xs) if self.experts[e].size else None
                          ).view_as(x)


def add_routed(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, order: list[int],
               run: Callable[[int, torch.Tensor, list[int]], torch.Tensor | None], inplace: bool = False) -> torch.Tensor:
    """Grouped dispatch, the one used by the HF model and the serving step runner: add to `out` [N, H] each routed
    expert's output on its own tokens of `x` [N, H] (`ids` [N]), one call per expert in `order`.

    `run(e, rows, rest)` computes expert e on its rows (None: an empty expert, adds nothing); `rest` is `order`
    from e on, the experts this call still needs (the serving cache keeps them). A token has exactly one routed
    expert, so every row of `out` receives one addition whatever the order. `inplace` for inference only."""
    n = len(ids)
    for j, e in enumerate(order):
        rows = None if len(order) == 1 else (ids == e).nonzero().flatten()
        if rows is not None and len(rows) == n:
            rows = None
        y = run(e, x if rows is None else x.index_select(0, rows), order[j:])
        if y is None:
            continue
        if rows is None:
            out = out.add_(y) if inplace else out + y
        else:
            out = out.index_add_(0, rows, y) if inplace else out.index_add(0, rows, y)
    return out
