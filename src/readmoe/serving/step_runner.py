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

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError


class SeqKV:
    """One sequence's KV cache: per layer K and V [kv_heads, capacity, head_dim], grown by doubling."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device, capacity: int = 64):
        self.shape = (kv_heads, capacity, head_dim)
        self.k = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.len = 0

    def reserve(self, n: int) -> None:
        cap = self.k[0].shape[1]
        if self.len + n <= cap:
            return
        while cap < self.len + n:
            cap *= 2
        for buf in (self.k, self.v):
            for l, t in enumerate(buf):
                new = t.new_empty(t.shape[0], cap, t.shape[2])
                new[:, :self.len] = t[:, :self.len]
                buf[l] = new

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for buf in (self.k, self.v) for t in buf)


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


def check_supported(moe) -> None:
    tc = moe.config.text_config
    layer = moe.backbone.model.layers[0]
    attn = layer.self_attn
    ok = (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
          and not hasattr(layer, "pre_feedforward_layernorm")
          and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")))
    sliding = getattr(tc, "sliding_window", None) and getattr(tc, "use_sliding_window", True) and \
        "sliding_attention" in (getattr(tc, "layer_types", None) or [])
    if not ok or sliding:
        raise UserError(f"the serving engine runs Llama-style decoders (llama, mistral, qwen2, smollm); "
                        f"this model is '{tc.model_type}'")


class StepRunner:
    def __init__(self, moe, expert_fn):
        check_supported(moe)
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
        self.max_len = getattr(tc, "max_position_embeddings", None)
        self.expert_fn = expert_fn  # (layer, expert, rest of the step's experts) -> (gate, up, down) weights
        self.on_layer = None  # called with the layer index before it runs (the prefetcher's hook)
        p = next(moe.parameters())
        self.dtype, self.device = p.dtype, p.device

    def new_kv(self) -> SeqKV:
        return SeqKV(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)

    def _mlp(self, l: int, x: torch.Tensor, ids: torch.Tensor, order: list[int]) -> torch.Tensor:
        mlp = self.layers[l].mlp
        out = mlp.shared(x)
        act = mlp.shared.act_fn
        for j, e in enumerate(order):
            sel = (ids == e).nonzero().flatten()
            g, u, d = self.expert_fn(l, e, order[j:])
            if g.shape[0] == 0:
                continue
            xs = x.index_select(0, sel) if len(sel) < len(ids) else x
            y = F.linear(act(F.linear(xs, g)) * F.linear(xs, u), d)
            if len(sel) < len(ids):
                out.index_add_(0, sel, y)
            else:
                out = out + y
        return out

    @torch.no_grad()
    def step(self, segs: list[Segment]) -> torch.Tensor:
        """Run every segment's tokens; returns the logits of each segment's last token [S, vocab]."""
        lens = [len(s.tokens) for s in segs]
        ids = torch.tensor([t for s in segs for t in s.tokens], device=self.device)
        eids = torch.tensor([e for s in segs for e in s.experts], device=self.device)
        order = first_use_order(segs)
        pos = torch.cat([torch.arange(s.kv.len, s.kv.len + n) for s, n in zip(segs, lens)]).to(self.device)
        for s, n in zip(segs, lens):
            s.kv.reserve(n)
        h = self.m.embed_tokens(ids)[None]  # [1, N, H]
        cos, sin = self.m.rotary_emb(h, pos[None])
        N = ids.numel()
        for l, layer in enumerate(self.layers):
            if self.on_layer is not None:
                self.on_layer(l, order)
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, N, -1, self.head_dim)
            k = attn.k_proj(x).view(1, N, -1, self.head_dim)
            v = attn.v_proj(x).view(1, N, -1, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, N, d]
            v = v.transpose(1, 2)
            out = torch.empty(1, self.heads, N, self.head_dim, dtype=q.dtype, device=q.device)
            off = 0
            for s, n in zip(segs, lens):
                p0 = s.kv.len
                s.kv.k[l][:, p0:p0 + n] = k[0, :, off:off + n]
                s.kv.v[l][:, p0:p0 + n] = v[0, :, off:off + n]
                K, V = s.kv.k[l][None, :, :p0 + n], s.kv.v[l][None, :, :p0 + n]
                mask = None
                if n > 1:
                    mask = torch.ones(n, p0 + n, dtype=torch.bool, device=q.device).tril(p0)
                out[:, :, off:off + n] = F.scaled_dot_product_attention(
                    q[:, :, off:off + n], K, V, attn_mask=mask, scale=self.scaling,
                    enable_gqa=self.kv_heads != self.heads)
                off += n
            h = h + attn.o_proj(out.transpose(1, 2).reshape(1, N, -1))
            x = layer.post_attention_layernorm(h)[0]
            h = h + self._mlp(l, x, eids, order)[None]
        for s, n in zip(segs, lens):
            s.kv.len += n
        ends = torch.tensor(lens, device=self.device).cumsum(0)
        head = lambda rows: self.moe.backbone.lm_head(self.m.norm(rows))  # noqa: E731
        for s, end, n in zip(segs, ends.tolist(), lens):
            if s.all_logits:
                s.logits = head(h[0, end - n:end])
        return head(h[0, ends - 1])
