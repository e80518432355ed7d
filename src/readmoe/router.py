"""The pre-gating router: a tiny causal transformer over token ids only.

It never reads backbone hidden states, so the expert of every token is known
before the backbone runs (DESIGN.md). Shape follows the paper: RMSNorm, RoPE,
multi-head causal attention, SwiGLU, one logit per routed expert. It keeps its
own small KV cache so decoding never recomputes the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RouterCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v): [B, heads, T, head_dim]


@dataclass
class RouterConfig:
    vocab_size: int
    num_experts: int
    dim: int = 128
    n_heads: int = 4
    n_layers: int = 1
    ffn_dim: int = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


def rope_table(n: int, d: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, d] fp32 for positions 0..n-1 (rotate-half layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class RouterBlock(nn.Module):
    def __init__(self, c: RouterConfig):
        super().__init__()
        self.c = c
        self.attn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.o = nn.Linear(c.dim, c.dim, bias=False)
        self.ffn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.w_gate = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.w_up = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.w_down = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x, rot, key_mask, past):
        B, T, _ = x.shape
        H = self.c.n_heads
        qkv = self.qkv(self.attn_norm(x)).view(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)
        (q, k), v = apply_rope(qkv[:2], *rot).unbind(0), qkv[2]  # q and k rotated in one pass
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        S = k.shape[2]
        if key_mask is None and T == 1:  # one new token sees the whole prefix: no mask (the decode fast path)
            y = F.scaled_dot_product_attention(q, k, v)
            x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
            h = self.ffn_norm(x)
            return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h)), (k, v)
        # causal over the new tokens, full view of the cached prefix, padding keys hidden
        allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, -S:].bool()
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # a fully padded row attends anywhere (ignored later)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        x = x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))
        return x, (k, v)


class PreGatingRouter(nn.Module):
    def __init__(self, c: RouterConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(RouterBlock(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.head = nn.Linear(c.dim, c.num_experts, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin table, grown on demand (not saved)

    def rotation(self, past_len: int, T: int, pos: torch.Tensor | None, device, dtype):
        """cos, sin broadcastable to [B, heads, T, head_dim]: rows of a cached table, so a decode step costs
        two slices instead of recomputing the angles (the router's step is a few dozen tiny ops; each counts)."""
        need = past_len + T
        if self._rope is None or self._rope[0].shape[0] < need or self._rope[0].device != torch.device(device):
            n = max(need, 256, 2 * (self._rope[0].shape[0] if self._rope is not None else 0))
            self._rope = rope_table(n, self.c.dim // self.c.n_heads, self.c.rope_theta, device)
        cos, sin = self._rope
        if pos is None:  # every row at positions past_len .. past_len + T - 1
            cos, sin = cos[past_len:need], sin[past_len:need]
        else:  # per-row positions [B, T] (left padding)
            cos, sin = cos[pos][:, None], sin[pos][:, None]
        return cos.to(dtype), sin.to(dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: RouterCache | None = None) -> tuple[torch.Tensor, RouterCache]:
        """Logits [B, T, num_experts] for the new tokens, and the extended cache."""
        T = input_ids.shape[1]
        past_len = cache[0][0].shape[2] if cache else 0
        pos = None
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.embed(input_ids)
        rot = self.rotation(past_len, T, pos, x.device, x.dtype)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, rot, attention_mask, cache[i] if cache else None)
            new_cache.append(kv)
        return self.head(self.norm(x)), new_cache

    @torch.no_grad()
    def init_embedding_from(self, emb: torch.Tensor) -> None:
        """Start from the backbone's token embedding: copied, or its top principal directions."""
        emb = emb.detach().float()
        if emb.shape[1] == self.c.dim:
            w = emb
        else:
            centred = emb - emb.mean(0, keepdim=True)
            _, _, v = torch.pca_lowrank(centred, q=min(self.c.dim, *centred.shape), center=False, niter=3)
            w = centred @ v
            if w.shape[1] < self.c.dim:
                w = F.pad(w, (0, self.c.dim - w.shape[1]))
        w = w / w.std().clamp(min=1e-6)  # unit scale: the pre-norm blocks expect O(1) residuals
        self.embed.weight.copy_(w.to(self.embed.weight.dtype))
