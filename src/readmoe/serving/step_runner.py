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
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..backbone import check_supported
from ..moe import add_routed
from .merged_experts import ALL, GROUPED, MergedExperts
from .packed_linear import PackedLinear, linear, pack
from .stacked import stack_rows

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


@dataclass(frozen=True)
class Projection:
    """A plain linear projection, called like the PackedLinear that `pack()` makes of it."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's (out, in), as a PackedLinear has it."""
        return tuple(self.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SeqKV:
    """One sequence's handle on the KV cache: its slot and how many positions it holds."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache, self.slot, self.len = cache, slot, 0

    @property
    def nbytes(self) -> int:
        return self.len * self.cache.token_bytes


class DecodePlan(NamedTuple):
    """Where a step's one-token segments go: their rows in the flat batch, KV slots and positions (tensors), the
    attention mask over slots × positions (None where nothing needs masking), how many slots and positions the
    attention spans, whether token i holds slot i (no gathering), and the first token's position as an int."""

    rows: torch.Tensor
    slots: torch.Tensor
    pos: torch.Tensor
    allowed: torch.Tensor | None
    width: int
    span: int
    aligned: bool
    first_pos: int


@dataclass
class Segment:
    kv: SeqKV
    tokens: list[int]
    experts: list[int]
    all_logits: bool = False  # also compute the logits of every token, not only the last (prompt logprobs)
    logits: torch.Tensor | None = None  # [tokens, vocab], set by the step when all_logits


class FusedRMSNorm:
    """HF's Llama RMSNorm (statistics in fp32, cast back, then the weight) in three ops instead of eight: at batch 1
    a step is mostly per-op overhead, and every layer has two norms."""

    def __init__(self, mod):
        self.weight, self.eps, self.shape = mod.weight, mod.variance_epsilon, (mod.weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


@torch.no_grad()
def fused_norm(mod):
    """A FusedRMSNorm where it gives `mod`'s output bit for bit on a probe, else `mod` itself (another norm)."""
    w = getattr(mod, "weight", None)
    if getattr(mod, "variance_epsilon", None) is None or w is None or w.dim() != 1 or w.is_meta:
        return mod
    f = FusedRMSNorm(mod)
    x = (4 * torch.randn(8, w.shape[0], generator=torch.Generator().manual_seed(0))).to(w.dtype).to(w.device)
    return f if torch.equal(f(x), mod(x)) else mod


def rope_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's rotary factors for `rope`, made once for every layer: cos, and sin with its first half negated,
    both [1, N, 1, d] to broadcast over heads."""
    half = sin.shape[-1] // 2
    return cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None]


def rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [1, N, heads, d] with `rope_factors` (HF's `apply_rotary_pos_emb`), so q and k, which lie
    side by side in the q/k/v matmul's output, rotate in one pass instead of two. rotate_half(x) * sin is
    cat(-x2, x1) * sin, that is roll(x) * sin with sin's first half negated: the same products, bit for bit, in
    two ops fewer per layer."""
    return x * c + x.roll(x.shape[-1] // 2, -1) * s


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
        shared = [layer.mlp.shared for layer in self.layers]
        biased = [any(p.bias is not None for p in (sh.gate_proj, sh.up_proj, sh.down_proj)) for sh in shared]
        # None for an MLP with biases (rare in Llama-style models), which runs as its own module
        self.shared_gu = [None if b else stack_rows([sh.gate_proj, sh.up_proj])[0] for sh, b in zip(shared, biased)]
        self.shared_down = [sh.down_proj.weight for sh in shared]
        # The projections the step calls: q, k and v as one matmul, and o; plain or prepacked (packed_linear.py)
        attns = [layer.self_attn for layer in self.layers]
        self.qkv = [Projection(*stack_rows([a.q_proj, a.k_proj, a.v_proj])) for a in attns]
        self.qkv_sizes = [m.weight.shape[0] for m in (attns[0].q_proj, attns[0].k_proj, attns[0].v_proj)]
        self.o_proj = [Projection(a.o_proj.weight, a.o_proj.bias) for a in attns]
        self.lm_head = Projection(moe.backbone.lm_head.weight, moe.backbone.lm_head.bias)
        self.norms = [(fused_norm(x.input_layernorm), fused_norm(x.post_attention_layernorm)) for x in self.layers]
        self.final_norm = fused_norm(m.norm)
        self.rope_qk = not hasattr(attn, "q_norm") and self._rope_matches()
        self.merged: MergedExperts | None = None
        self._way = GROUPED  # this step's MLP with several experts: grouped by expert, or all experts merged
        self.packed = False
        if pack:
            self.pack()

    @torch.no_grad()
    def _rope_matches(self) -> bool:
        """Whether `rope` over q and k together gives the backbone's own rotation bit for bit (a probe)."""
        g = torch.Generator().manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(self.dtype).to(self.device)  # noqa: E731
        n, d = 5, self.head_dim
        qk, cos, sin = rnd(1, n, self.heads + self.kv_heads, d), rnd(1, n, d), rnd(1, n, d)
        q, k = self.rotate(qk[:, :, :self.heads].transpose(1, 2), qk[:, :, self.heads:].transpose(1, 2), cos, sin)
        both = rope(qk, *rope_factors(cos, sin))
        return torch.equal(both[:, :, :self.heads].transpose(1, 2), q) and torch.equal(both[:, :, self.heads:].transpose(1, 2), k)

    def packed_bytes(self) -> int:
        """What `pack()` would add to memory: a copy of every weight it packs, read from the same lists."""
        ws = [p.weight for p in [self.lm_head, *self.qkv, *self.o_proj]]
        ws += [w for w in self.shared_gu + self.shared_down if w is not None]
        return 0 if self.packed else sum(w.numel() * w.element_size() for w in ws)

    @torch.no_grad()
    def pack(self) -> None:
        """Prepack every projection the step runs outside the expert cache (the cache packs its own), the merged
        experts included: the packed copy replaces their plain one."""
        lin = lambda p: PackedLinear(p.weight, p.bias)  # noqa: E731
        self.qkv, self.o_proj = [lin(p) for p in self.qkv], [lin(p) for p in self.o_proj]
        self.lm_head = lin(self.lm_head)
        self.shared_gu = [None if gu is None else pack(gu) for gu in self.shared_gu]
        self.shared_down = [pack(d) for d in self.shared_down]
        if self.merged is not None:
            self.merged.pack()
        self.packed = True

    def merged_bytes(self, expert_bytes: dict[tuple[int, int], int]) -> int:
        """What `merge()` adds to memory (merged_experts.py); `expert_bytes`: the expert store's `nbytes`."""
        return MergedExperts.nbytes(self.shared_gu, self.shared_down, expert_bytes)

    @torch.no_grad()
    def merge(self, load) -> None:
        """Build the merged experts (merged_experts.py) from `load(layer, expert)` -> plain (gate+up, down)."""
        if self.packed:
            raise RuntimeError("merge() before pack(): it concatenates plain weights")
        self.merged = MergedExperts(self.shared_gu, self.shared_down, load, self.moe.num_experts)

    def release(self) -> None:
        """Drop the copies this runner made (packed and merged weights) and its KV cache; it cannot step after."""
        self.merged, self.lm_head, self.kv = None, None, None
        self.qkv, self.o_proj, self.shared_gu, self.shared_down = [], [], [], []
        self.expert_fn = self.on_layer = None

    def decode_weights(self, expert: int = 0) -> list:
        """The weights a lone request's decode step on `expert` multiplies by, in the step's order: per layer q/k/v,
        o and the MLP (the expert merged with the shared one where merged, as a one-expert step runs it; else the
        shared expert's gate+up and down, then the routed one's from the expert cache), then the lm_head. Timed
        alone they bound what the step can gain from reading fewer weight bytes."""
        out = []
        for l in range(len(self.layers)):
            out += [self.qkv[l], self.o_proj[l]]
            one = self.merged.one[l][expert] if self.merged is not None else None
            if one is not None:
                out += one
                continue
            out += [self.shared_gu[l], self.shared_down[l]]
            gu, down = self.expert_fn(l, expert, [expert])
            out += [gu, down] if gu.shape[0] else []
        return out + [self.lm_head]

    def new_kv(self) -> SeqKV:
        return self.kv.alloc()

    def _gated(self, x: torch.Tensor, gu, down, act, mask: torch.Tensor | None = None) -> torch.Tensor:
        """down(act(gate x) * up x) with gate and up in one matmul; `mask` [rows, neurons] zeroes each row's
        neurons outside its experts (the all-experts merged MLP).

        On a CPU, bf16 matmuls run JIT-compiled oneDNN kernels, one per (rows, columns) shape, and the MoE
        produces many shapes (a row count per expert group times an expert size per layer): past oneDNN's
        primitive cache every call compiles again (measured here: 1.4 ms a call instead of 0.1 ms). Padding
        the rows to a power of two keeps the shapes few; rows are independent, so the padding is dropped."""
        m = x.shape[0]
        if self.pad_rows and m & (m - 1):
            pad = (0, 0, 0, (1 << (m - 1).bit_length()) - m)
            x = F.pad(x, pad)
            mask = None if mask is None else F.pad(mask, pad)
        g, u = linear(x, gu).chunk(2, -1)
        h = act(g) * u
        return linear(h if mask is None else h * mask, down)[:m]

    def _mlp(self, l: int, x: torch.Tensor, ids: torch.Tensor, order: list[int]) -> torch.Tensor:
        sh = self.layers[l].mlp.shared
        act = sh.act_fn
        mg = self.merged
        if mg is not None and len(order) == 1 and mg.one[l][order[0]] is not None:
            self.expert_fn(l, order[0], order)  # the cache records the use
            return self._gated(x, *mg.one[l][order[0]], act)
        if mg is not None and self._way == ALL and mg.all[l] is not None:
            for j, e in enumerate(order):
                self.expert_fn(l, e, order[j:])
            gu, down, mask = mg.all[l]
            return self._gated(x, gu, down, act, mask[ids])
        if mg is not None and mg.all[l] is not None:
            # Grouped, each expert's rows through its merged copy (shared + it): 2 matmuls an expert instead of 2
            # for the shared expert over every row plus 2 an expert. On the demo, 30 layers at 16 rows on 2 experts
            # took 14.1 ms against 18.2 grouped apart, 37.1 against 38.9 at 64 rows on 3; the shared weights are
            # read once per expert, which small matmuls do not notice.
            def merged(e: int, rows: torch.Tensor, rest: list[int]) -> torch.Tensor:
                self.expert_fn(l, e, rest)  # the cache records the use
                w = mg.one[l][e] or (self.shared_gu[l], self.shared_down[l])  # an empty expert: the shared one alone
                return self._gated(rows, *w, act)

            return add_routed(torch.zeros_like(x), x, ids, order, merged, inplace=True)
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
        # Aligned: every token is a decode token and token i's sequence holds slot i (always so for a lone request),
        # so tokens need no gathering into slots, and with one sequence every position is allowed: no mask.
        aligned = len(dec) == len(segs) and slots == list(range(width))
        if aligned and width == 1:
            allowed = None
        dev = self.device
        return DecodePlan(torch.tensor([offs[i] for i in dec], device=dev), torch.tensor(slots, device=dev),
                          torch.tensor([segs[i].kv.len for i in dec], device=dev),
                          None if allowed is None else allowed.to(dev), width, span, aligned, segs[dec[0]].kv.len)

    def _attend_decode(self, l: int, q, k, v, out, plan: DecodePlan) -> None:
        """All one-token segments at once: write their K/V into their slots, then one SDPA over the slots in use.
        The query heads sharing a KV head are laid out as that head's query rows, so no KV is repeated."""
        rows, slots, pos, allowed, width, span, aligned, p = plan
        K, V = self.kv.k(l), self.kv.v(l)
        group = self.heads // self.kv_heads
        if aligned and width == 1:  # a lone sequence: its position is a plain view, no index tensors
            K[0, :, p:p + 1] = k[0]
            V[0, :, p:p + 1] = v[0]
            qs = q[0].transpose(0, 1)
        elif aligned:
            K[slots, :, pos] = k[0].transpose(0, 1)  # [B, kv_heads, d]
            V[slots, :, pos] = v[0].transpose(0, 1)
            qs = q[0].transpose(0, 1)
        else:
            K[slots, :, pos] = k[0, :, rows].transpose(0, 1)
            V[slots, :, pos] = v[0, :, rows].transpose(0, 1)
            qs = q.new_zeros(width, self.heads, self.head_dim)
            qs[slots] = q[0, :, rows].transpose(0, 1)
        y = F.scaled_dot_product_attention(qs.reshape(width, self.kv_heads, group, self.head_dim), K[:width, :, :span],
                                           V[:width, :, :span], attn_mask=allowed, scale=self.scaling)
        y = y.view(width, self.heads, self.head_dim)
        if aligned:
            out[0] = y.transpose(0, 1)
        else:
            out[0, :, rows] = y[slots].transpose(0, 1)

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
    def step(self, segs: list[Segment], order: list[int] | None = None) -> torch.Tensor:
        """Run every segment's tokens; returns the logits of each segment's last token [S, vocab]. `order`: the
        routed experts in the order each layer runs them (default: first use in the flat batch)."""
        lens = [len(s.tokens) for s in segs]
        if any(s.kv.len + n > self.kv.capacity for s, n in zip(segs, lens)):
            raise RuntimeError(f"a sequence outgrew the KV capacity of {self.kv.capacity} tokens")
        ids = torch.tensor([t for s in segs for t in s.tokens], device=self.device)
        eids = torch.tensor([e for s in segs for e in s.experts], device=self.device)
        order = first_use_order(segs) if order is None else order
        pos = torch.cat([torch.arange(s.kv.len, s.kv.len + n) for s, n in zip(segs, lens)]).to(self.device)
        offs = list(itertools.accumulate(lens, initial=0))[:-1]  # each segment's first row in the flat batch
        plan = self._decode_plan(segs, lens, offs)
        chunks = [(s, off, n) for s, off, n in zip(segs, offs, lens) if n > 1]
        h = self.m.embed_tokens(ids)[None]  # [1, N, H]
        cos, sin = self.m.rotary_emb(h, pos[None])
        rot = rope_factors(cos, sin) if self.rope_qk else None
        N = ids.numel()
        choose = self.merged is not None and len(order) > 1
        self._way = self.merged.chooser.choose(N, len(order)) if choose else GROUPED
        mlp_s = 0.0
        for l, layer in enumerate(self.layers):
            if self.on_layer is not None:
                self.on_layer(l, order)
            attn = layer.self_attn
            x = self.norms[l][0](h)
            qkv = self.qkv[l](x)
            if self.rope_qk:  # q and k side by side in one rotation
                nq = self.qkv_sizes[0] + self.qkv_sizes[1]
                qk = rope(qkv[..., :nq].view(1, N, -1, self.head_dim), *rot)
                q, k = qk[:, :, :self.heads].transpose(1, 2), qk[:, :, self.heads:].transpose(1, 2)
                v = qkv[..., nq:].view(1, N, -1, self.head_dim)
            else:
                q, k, v = (t.view(1, N, -1, self.head_dim) for t in qkv.split(self.qkv_sizes, -1))
                if hasattr(attn, "q_norm"):
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, N, d]
            v = v.transpose(1, 2)
            out = torch.empty(1, self.heads, N, self.head_dim, dtype=q.dtype, device=q.device)
            if plan is not None:
                self._attend_decode(l, q, k, v, out, plan)
            for seg, off, n in chunks:
                self._attend_chunk(l, seg, off, n, q, k, v, out)
            h = h + self.o_proj[l](out.transpose(1, 2).reshape(1, N, -1))
            x = self.norms[l][1](h)[0]
            t = time.perf_counter()
            y = self._mlp(l, x, eids, order)
            mlp_s += time.perf_counter() - t
            h = h + y[None]
        if choose:
            self.merged.chooser.observe(N, len(order), self._way, mlp_s)
        for s, n in zip(segs, lens):
            s.kv.len += n
        ends = torch.tensor(lens, device=self.device).cumsum(0)
        head = lambda rows: self.lm_head(self.final_norm(rows))  # noqa: E731
        for s, end, n in zip(segs, ends.tolist(), lens):
            if s.all_logits:
                s.logits = head(h[0, end - n:end])
        return head(h[0, ends - 1])

