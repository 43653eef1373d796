"""Keys and values kept between forward passes, for generation: prefill a batch of prompts, then decode.

Legend: B batch, S new tokens of this forward, L = length + S slots seen so far, nkv key/value heads,
hs head size.
Rows are left-padded to a common length: slots [0, pad_B[b]) of row b hold padding, which no real token
attends to, and the token in slot j of row b has the absolute position j - pad_B[b]. All rows advance
together, one slot per decoded token, so one length serves the whole batch.
"""
from __future__ import annotations

import torch

from megavq.config import ModelConfig


class LayerKV:
    """One attention layer's keys and values: k, v (B, nkv, S_max, hs); slots [0, length) are filled."""

    def __init__(self, B: int, n_kv: int, S_max: int, head_size: int, dtype: torch.dtype, device):
        self.k = torch.zeros(B, n_kv, S_max, head_size, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (B, nkv, S, hs); return all of them so far, (B, nkv, L, hs)."""
        start, end = self.length, self.length + k.shape[2]
        assert end <= self.k.shape[2], f"KV cache full: {end} slots needed, {self.k.shape[2]} allocated"
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The keys and values of every layer of a model for a left-padded batch of B rows and up to S_max slots."""

    def __init__(self, cfg: ModelConfig, pad_B: torch.Tensor, S_max: int, dtype: torch.dtype):
        n_kv, hs = cfg.n_kv_heads or cfg.n_heads, cfg.head_size()
        self.pad_B = pad_B
        self.layers = [LayerKV(len(pad_B), n_kv, S_max, hs, dtype, pad_B.device) for _ in range(cfg.n_layers)]

    @property
    def length(self) -> int:
        """Slots filled so far (every layer stores once per forward, so they agree)."""
        return self.layers[0].length

    def positions(self, S: int) -> torch.Tensor:
        """(B, S) absolute positions of the next S tokens of each row (0 for padding)."""
        slots = torch.arange(self.length, self.length + S, device=self.pad_B.device)
        return (slots[None] - self.pad_B[:, None]).clamp(min=0)

    def mask(self, S: int) -> torch.Tensor:
        """(B, 1, S, L) bool, True where query slot q may attend to key slot j: j <= q and j is not padding.
        A padding query sees itself only, so that no row of the softmax is empty."""
        dev = self.pad_B.device
        q = torch.arange(self.length, self.length + S, device=dev)[:, None]  # (S, 1)
        j = torch.arange(self.length + S, device=dev)[None]  # (1, L)
        real = j[None] >= self.pad_B[:, None, None]  # (B, 1, L)
        return ((j <= q) & (real | (j == q)))[:, None]  # (B, 1, S, L)
