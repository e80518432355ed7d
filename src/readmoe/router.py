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


def rope_angles(pos: torch.Tensor, d: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, D] for positions [B, T]; computed once per forward and shared by q, k and every block."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[:, None, :, None] * inv  # [B, 1, T, D/2]
    return torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE; x [B, H, T, D], pos [B, T]."""
    return apply_rope(x, *rope_angles(pos, x.shape[-1], theta, x.dtype))


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
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, *rot), apply_rope(k, *rot)
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: RouterCache | None = None) -> tuple[torch.Tensor, RouterCache]:
        """Logits [B, T, num_experts] for the new tokens, and the extended cache."""
        B, T = input_ids.shape
        past_len = cache[0][0].shape[2] if cache else 0
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        else:
            pos = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        rot = rope_angles(pos, self.c.dim // self.c.n_heads, self.c.rope_theta, x.dtype)
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
