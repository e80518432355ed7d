"""The step runner: one forward over a flat ragged batch of tokens from many sequences.

Per layer: the norms and the q/k/v/o projections run once over all tokens; attention
runs per sequence against that sequence's own KV cache; the MoE MLP runs once over
all tokens, grouped by expert (shared expert on every token, each routed expert on
its tokens, weights from the expert cache). It reuses the backbone's own modules
(norms, projections, rotary embedding, `apply_rotary_pos_emb`), so the numbers are
the HF model's; the parity test checks greedy output against `generate`.
Llama-style decoders (Llama, Mistral, Qwen2/3, SmolLM) are supported.
"""

from __future__ import annotations

import heapq
import itertools
import math
import mmap
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone import check_supported
from ..moe import add_routed
from .packed_linear import PackedLinear, linear, pack

# Linux's flag (Python < 3.12 lacks the constant): map the KV cache without reserving memory for all of it.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


class KVCache:
    """Fixed KV storage, allocated once (as gpt-fast does): per layer K and V [slots, kv_heads, capacity, head_dim].

    A sequence owns one slot for its life, so nothing is reallocated or copied as it grows, and the decode
    tokens of every sequence attend in one call per layer over the slots in use, masked by length. On CPU
    the buffer is an anonymous memory map: its pages read as zeros and are committed only when written, so
    resident memory follows the tokens actually held, not the capacity; positions past a sequence's length
    are always finite (zeros or an earlier sequence's keys) and the mask removes them."""

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (layers, 2, slots, kv_heads, capacity, head_dim)
        if torch.device(device).type == "cpu":
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            self._map = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=flags)
            self.buf = torch.frombuffer(self._map, dtype=dtype).view(shape)
        else:
            self.buf = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.token_bytes = 2 * layers * kv_heads * head_dim * self.buf.element_size()
        self._free = list(range(slots))  # a min-heap: the lowest slot first keeps the slots in use compact
        self.used: dict[int, "SeqKV"] = {}

    def alloc(self) -> "SeqKV":
        if not self._free:
            raise RuntimeError("every KV slot is taken")
        kv = SeqKV(self, heapq.heappop(self._free))
        self.used[kv.slot] = kv
        return kv

    def free(self, kv: "SeqKV") -> None:
        if self.used.pop(kv.slot, None) is kv:
            heapq.heappush(self._free, kv.slot)

    def k(self, layer: int) -> torch.Tensor:
        return self.buf[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.buf[layer, 1]

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (what a paged cache would use), not of the reserved capacity."""
        return sum(kv.len for kv in self.used.values()) * self.token_bytes


class SeqKV:
    """One sequence's handle on the KV cache: its slot and how many positions it holds."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache, self.slot, self.len = cache, slot, 0

    @property
    def nbytes(self) -> int:
        return self.len * self.cache.token_bytes


@dataclass
class Segment:
    kv: SeqKV
    tokens: list[int]
    experts: list[int]
    all_logits: bool = False  # also compute the logits of every token, not only the last (prompt logprobs)
    logits: torch.Tensor | None = None  # [tokens, vocab], set by the step when all_logits


def first_use_order(segs: list[Segment]) -> list[int]:
    """The batch's routed experts in the order the MLP visits them (first use in the flat batch)."""
    return list(dict.fromkeys(e for s in segs for e in s.experts))


class StepRunner:
    """Runs flat ragged batches; owns the KV cache of `slots` sequences of up to `max_len` tokens each."""

    def __init__(self, moe, expert_fn, slots: int = 16, max_len: int | None = None, pack: bool = False):
        check_supported(moe, serving=True)
        self.moe = moe
        m = moe.backbone.model
        self.m, self.layers = m, list(m.layers)
        tc = moe.config.text_config
        attn = self.layers[0].self_attn
        self.heads = tc.num_attention_heads
        self.kv_heads = getattr(tc, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or tc.hidden_size // self.heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        model_max = getattr(tc, "max_position_embeddings", None)
        self.max_len = min(x for x in (max_len, model_max) if x) if (max_len or model_max) else 2048
        self.expert_fn = expert_fn  # (layer, expert, rest of the step's experts) -> (gate+up stacked, down) weights
        self.on_layer = None  # called with the layer index before it runs (the prefetcher's hook)
        p = next(moe.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.pad_rows = self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16)
        self.kv = KVCache(len(self.layers), slots, self.kv_heads, self.max_len, self.head_dim, self.dtype, self.device)
        self.shared_gu = [self._stack_shared(layer.mlp.shared) for layer in self.layers]
        self.shared_down = [layer.mlp.shared.down_proj.weight for layer in self.layers]
        # The projections the step calls: the modules, or their weights prepacked (packed_linear.py)
        self.qkvo = [(a.q_proj, a.k_proj, a.v_proj, a.o_proj) for a in (layer.self_attn for layer in self.layers)]
        self.lm_head = moe.backbone.lm_head
        self.packed = False
        if pack:
            self.pack()

    def packed_bytes(self) -> int:
        """What `pack()` would add to memory: a copy of every weight it packs, read from the same lists."""
        ws = [self.lm_head.weight] + [m.weight for ps in self.qkvo for m in ps]
        ws += [w for w in self.shared_gu + self.shared_down if w is not None]
        return 0 if self.packed else sum(w.numel() * w.element_size() for w in ws)

    @torch.no_grad()
    def pack(self) -> None:
        """Prepack every projection the step runs outside the expert cache (the cache packs its own)."""
        lin = lambda m: PackedLinear(m.weight, m.bias)  # noqa: E731
        self.qkvo = [tuple(map(lin, ps)) for ps in self.qkvo]
        self.lm_head = lin(self.lm_head)
        self.shared_gu = [None if gu is None else pack(gu) for gu in self.shared_gu]
        self.shared_down = [pack(d) for d in self.shared_down]
        self.packed = True

    @staticmethod
    @torch.no_grad()
    def _stack_shared(sh) -> torch.Tensor | None:
        """The shared expert's gate and up stacked, as the expert store stacks the routed ones; the module's own
        weights become views of it, so the stacking costs no memory (it matters at 7B). None for an MLP with
        biases (rare in Llama-style models), which runs as its own module."""
        if any(p.bias is not None for p in (sh.gate_proj, sh.up_proj, sh.down_proj)):
            return None
        g, u = sh.gate_proj.weight, sh.up_proj.weight
        gu = getattr(sh, "_stacked_gu", None)  # stacked by an earlier engine on this model, and still its storage
        if gu is None or gu.data_ptr() != g.data_ptr() or gu[g.shape[0]:].data_ptr() != u.data_ptr():
            gu = torch.cat([g, u])
            g.data, u.data = gu[:g.shape[0]], gu[g.shape[0]:]
            sh._stacked_gu = gu
        return gu

    def new_kv(self) -> SeqKV:
        return self.kv.alloc()

    def _gated(self, x: torch.Tensor, gu: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
        """down(act(gate x) * up x) with gate and up in one matmul.

        On a CPU, bf16 matmuls run JIT-compiled oneDNN kernels, one per (rows, columns) shape, and the MoE
        produces many shapes (a row count per expert group times an expert size per layer): past oneDNN's
        primitive cache every call compiles again (measured here: 1.4 ms a call instead of 0.1 ms). Padding
        the rows to a power of two keeps the shapes few; rows are independent, so the padding is dropped."""
        m = x.shape[0]
        if self.pad_rows and m & (m - 1):
            x = F.pad(x, (0, 0, 0, (1 << (m - 1).bit_length()) - m))
        g, u = linear(x, gu).chunk(2, -1)
        return linear(act(g) * u, down)[:m]

    def _mlp(self, l: int, x: torch.Tensor, ids: torch.Tensor, order: list[int]) -> torch.Tensor:
        sh = self.layers[l].mlp.shared
        act = sh.act_fn
        out = sh(x) if self.shared_gu[l] is None else self._gated(x, self.shared_gu[l], self.shared_down[l], act)

        def run(e: int, rows: torch.Tensor, rest: list[int]) -> torch.Tensor | None:
            gu, d = self.expert_fn(l, e, rest)  # referenced only here: an evicted expert's memory goes at once
            return self._gated(rows, gu, d, act) if gu.shape[0] else None

        return add_routed(out, x, ids, order, run, inplace=True)

    def _decode_plan(self, segs: list[Segment], lens: list[int], offs: list[int]):
        """Index tensors for the step's one-token segments, which attend together in one call per layer."""
        dec = [i for i, n in enumerate(lens) if n == 1]
        if not dec:
            return None
        slots = [segs[i].kv.slot for i in dec]
        width = max(slots) + 1  # the slots in use are compact (lowest free first)
        span = max(segs[i].kv.len for i in dec) + 1
        allowed = torch.zeros(width, 1, 1, span, dtype=torch.bool)
        allowed[:, ..., 0] = True  # idle rows attend somewhere harmless; their output is dropped
        for i, sl in zip(dec, slots):
            allowed[sl, ..., :segs[i].kv.len + 1] = True
        dev = self.device
        return (torch.tensor([offs[i] for i in dec], device=dev), torch.tensor(slots, device=dev),
                torch.tensor([segs[i].kv.len for i in dec], device=dev), allowed.to(dev), width, span)

    def _attend_decode(self, l: int, q, k, v, out, plan) -> None:
        """All one-token segments at once: write their K/V into their slots, then one SDPA over the slots in use.
        The query heads sharing a KV head are laid out as that head's query rows, so no KV is repeated."""
        rows, slots, pos, allowed, width, span = plan
        K, V = self.kv.k(l), self.kv.v(l)
        K[slots, :, pos] = k[0, :, rows].transpose(0, 1)  # [B, kv_heads, d]
        V[slots, :, pos] = v[0, :, rows].transpose(0, 1)
        group = self.heads // self.kv_heads
        qs = q.new_zeros(width, self.heads, self.head_dim)
        qs[slots] = q[0, :, rows].transpose(0, 1)
        y = F.scaled_dot_product_attention(qs.view(width, self.kv_heads, group, self.head_dim), K[:width, :, :span],
                                           V[:width, :, :span], attn_mask=allowed, scale=self.scaling)
        out[0, :, rows] = y.view(width, self.heads, self.head_dim)[slots].transpose(0, 1)

    def _attend_chunk(self, l: int, seg: Segment, off: int, n: int, q, k, v, out) -> None:
        """One prompt chunk: causal over its own tokens, full view of its sequence's earlier positions."""
        p0, sl = seg.kv.len, seg.kv.slot
        K, V = self.kv.k(l), self.kv.v(l)
        K[sl, :, p0:p0 + n] = k[0, :, off:off + n]
        V[sl, :, p0:p0 + n] = v[0, :, off:off + n]
        mask = torch.ones(n, p0 + n, dtype=torch.bool, device=q.device).tril(p0)
        out[:, :, off:off + n] = F.scaled_dot_product_attention(
            q[:, :, off:off + n], K[sl:sl + 1, :, :p0 + n], V[sl:sl + 1, :, :p0 + n], attn_mask=mask,
            scale=self.scaling, enable_gqa=self.kv_heads != self.heads)

    @torch.no_grad()
    def step(self, segs: list[Segment]) -> torch.Tensor:
        """Run every segment's tokens; returns the logits of each segment's last token [S, vocab]."""
        lens = [len(s.tokens) for s in segs]
        if any(s.kv.len + n > self.kv.capacity for s, n in zip(segs, lens)):
            raise RuntimeError(f"a sequence outgrew the KV capacity of {self.kv.capacity} tokens")
        ids = torch.tensor([t for s in segs for t in s.tokens], device=self.device)
        eids = torch.tensor([e for s in segs for e in s.experts], device=self.device)
        order = first_use_order(segs)
        pos = torch.cat([torch.arange(s.kv.len, s.kv.len + n) for s, n in zip(segs, lens)]).to(self.device)
        offs = list(itertools.accumulate(lens, initial=0))[:-1]  # each segment's first row in the flat batch
        plan = self._decode_plan(segs, lens, offs)
        chunks = [(s, off, n) for s, off, n in zip(segs, offs, lens) if n > 1]
        h = self.m.embed_tokens(ids)[None]  # [1, N, H]
        cos, sin = self.m.rotary_emb(h, pos[None])
        N = ids.numel()
        for l, layer in enumerate(self.layers):
            if self.on_layer is not None:
                self.on_layer(l, order)
            attn = layer.self_attn
            q_proj, k_proj, v_proj, o_proj = self.qkvo[l]
            x = layer.input_layernorm(h)
            q = q_proj(x).view(1, N, -1, self.head_dim)
            k = k_proj(x).view(1, N, -1, self.head_dim)
            v = v_proj(x).view(1, N, -1, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, N, d]
            v = v.transpose(1, 2)
            out = torch.empty(1, self.heads, N, self.head_dim, dtype=q.dtype, device=q.device)
            if plan is not None:
                self._attend_decode(l, q, k, v, out, plan)
            for seg, off, n in chunks:
                self._attend_chunk(l, seg, off, n, q, k, v, out)
            h = h + o_proj(out.transpose(1, 2).reshape(1, N, -1))
            x = layer.post_attention_layernorm(h)[0]
            h = h + self._mlp(l, x, eids, order)[None]
        for s, n in zip(segs, lens):
            s.kv.len += n
        ends = torch.tensor(lens, device=self.device).cumsum(0)
        head = lambda rows: self.lm_head(self.m.norm(rows))  # noqa: E731
        for s, end, n in zip(segs, ends.tolist(), lens):
            if s.all_logits:
                s.logits = head(h[0, end - n:end])
        return head(h[0, ends - 1])
