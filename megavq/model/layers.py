"""Building blocks: norms, rotary positions, causal self-attention, the dense MLP.

Legend: B batch, S sequence, D hidden, nh heads, nkv key/value heads, hs head size, H MLP hidden,
L slots of a KV cache (generation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megavq.compat.torch import flex_attention
from megavq.config import ModelConfig
from megavq.model.kv_cache import LayerKV
from megavq.moe.experts import DenseMLP


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_tables(seq_len: int, head_size: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (S, hs/2), in the half-split (Llama / Hugging Face) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32, device=device) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


class Rope(nn.Module):
    """The rotary tables as non-persistent fp32 buffers: they move with the model (no copy per step), are
    not in checkpoints, and are rebuilt in fp32 when the model is cast (a bf16 engine)."""

    def __init__(self, seq_len: int, head_size: int, theta: float):
        super().__init__()
        self.shape = (seq_len, head_size, theta)
        cos, sin = rope_tables(*self.shape)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        return self._fp32()

    def _fp32(self) -> "Rope":
        """Rebuilt after a cast (also one that bypassed _apply: DeepSpeed's buffer_dtype assigns .data)."""
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = rope_tables(*self.shape, device=self.cos.device)
        return self

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (S_max, hs/2) tables of training and scoring."""
        self._fp32()
        return self.cos, self.sin

    def at(self, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row tables (B, 1, S, hs/2) of the positions pos_BS (generation)."""
        cos, sin = self()
        return cos[pos_BS][:, None], sin[pos_BS][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, S, hs); rotate the two halves of each head."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head (grouped-query) attention; heads of model.head_dim; with model.qk_norm, RMSNorm on the queries
    and keys over the whole projections ("proj", OLMoE) or per head ("head", Qwen3); with model.clip_qkv, q, k
    and v clamped after that (OLMoE)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        self.head_size = cfg.head_size()
        q_dim, kv_dim = self.n_heads * self.head_size, self.n_kv * self.head_size
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_size if per_head else q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_size if per_head else kv_dim, cfg.norm_eps)
        self.dropout = cfg.dropout
        self.use_rope = cfg.pos == "rope"

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, S, hs), keys and values (B, nkv, S, hs) of x (B, S, D), before RoPE."""
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_size)
        k, v = (t.view(B, S, self.n_kv, self.head_size) for t in (k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv: LayerKV | None = None, mask=None) -> torch.Tensor:
        """Without kv: causal attention over x (training, scoring), rope the full (S_max, hs/2) tables; with a
        mask (documents: megavq.model.transformer.Transformer.layout), attention under it, rope per-row tables.
        With kv (generation): x holds only the new tokens, rope their per-row tables (B, 1, S, hs/2), and
        the attention reads the cached keys and values under mask (B, 1, S, L) (see megavq.model.kv_cache)."""
        B, S, _ = x.shape
        q, k, v = self.qkv(x)  # (B, nh, S, hs), (B, nkv, S, hs) twice
        if self.use_rope:
            cos, sin = rope if kv is not None or mask is not None else (t[:S] for t in rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if kv is not None:
            k, v = kv.update(k, v)  # (B, nkv, L, hs): the cached slots and the new ones
        y = attend(q, k, v, mask, gqa, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


def attend(q, k, v, mask, gqa: bool, dropout_p: float) -> torch.Tensor:
    """Causal attention (mask None), or attention under mask: a bool (B, 1, S, L) tensor (True: may attend), or
    a flex_attention BlockMask (documents on a GPU, megavq.compat.torch.document_block_mask)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, dropout_p=dropout_p)
    if not torch.is_tensor(mask):
        return flex_attention(q, k, v, mask, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, dropout_p=dropout_p)


class MLP(DenseMLP):
    """The dense MLP of a block (width model.d_ff): SwiGLU (Llama family) or GELU (GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.mlp_bias)
