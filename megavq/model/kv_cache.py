"""Keys and values kept between forward passes, for generation: prefill a batch of prompts, then decode.

Legend: B batch, S new tokens of this forward, L = length + S slots seen so far, nkv key/value heads,
hs head size.
Rows are left-padded to a common length: slots [0, pad_B[b]) of row b hold padding, which no real token
attends to, and the token in slot j of row b has the absolute position j - pad_B[b]. All rows advance
together, one slot per decoded token, so one length serves the whole batch.
With document masking (model.document_eos_id >= 0) a document starts after each end-of-document id: a token
attends only to the earlier tokens of its own document and its position counts from its document's start,
in training and scoring (document_layout) as in generation's prefill and decoding (KVCache.layout).
"""
from __future__ import annotations

import torch

from megavq.config import ModelConfig


def documents(idx_BS: torch.Tensor, eos_id: int, slots_S: torch.Tensor, pad_B: torch.Tensor, doc_B: torch.Tensor,
              start_B: torch.Tensor, after_eos_B: torch.Tensor) -> tuple:
    """(doc_BS, start_BS, eos_BS) of the tokens in slots slots_S: document index (-1 for padding), the slot its
    document starts at, and whether it is an EOS; doc_B, start_B, after_eos_B: the rows' state before them."""
    real_BS = slots_S[None] >= pad_B[:, None]
    eos_BS = (idx_BS == eos_id) & real_BS if eos_id >= 0 else torch.zeros_like(real_BS)
    new_BS = torch.cat([after_eos_B[:, None], eos_BS[:, :-1]], dim=1) & real_BS  # a document starts here
    doc_BS = torch.where(real_BS, doc_B[:, None] + new_BS.cumsum(dim=1), -1)
    start_BS = torch.where(new_BS, slots_S[None], start_B[:, None]).cummax(dim=1).values
    return doc_BS, start_BS, eos_BS


def document_layout(idx_BS: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_BS, doc_BS) of rows of packed documents: positions restart after each EOS; document indices."""
    B, S = idx_BS.shape
    slots_S, zeros_B = torch.arange(S, device=idx_BS.device), idx_BS.new_zeros(B)
    doc_BS, start_BS, _ = documents(idx_BS, eos_id, slots_S, zeros_B, zeros_B, zeros_B, zeros_B.bool())
    return slots_S - start_BS, doc_BS


def document_mask(doc_BS: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool: a token attends to the earlier tokens of its own document."""
    slots_S = torch.arange(doc_BS.shape[1], device=doc_BS.device)
    return ((doc_BS[:, :, None] == doc_BS[:, None, :]) & (slots_S[:, None] >= slots_S[None]))[:, None]


def padding_layout(real_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_BS, mask (B, 1, S, S) bool) of padded rows (left, right or both; real_BS True at real tokens): a token's
    position counts the real tokens before it; a real token attends to the earlier real tokens of its row, a pad
    only to itself (no real token reads it, and its own output is never used)."""
    slots_S = torch.arange(real_BS.shape[1], device=real_BS.device)
    pos_BS = (real_BS.cumsum(dim=1) - 1).clamp(min=0)
    real_BSS = real_BS[:, :, None] & real_BS[:, None, :] & (slots_S[:, None] >= slots_S[None])
    return pos_BS, (real_BSS | (slots_S[:, None] == slots_S[None]))[:, None]


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
        self.pad_B, self.eos_id = pad_B, cfg.document_eos_id
        self.layers = [LayerKV(len(pad_B), n_kv, S_max, hs, dtype, pad_B.device) for _ in range(cfg.n_layers)]
        self.doc_BL = torch.full((len(pad_B), S_max), -1, dtype=torch.long, device=pad_B.device)  # -1: padding
        self.doc_B, self.start_B = torch.zeros_like(pad_B), pad_B.clone()  # each row's document, its first slot
        self.after_eos_B = torch.zeros_like(pad_B, dtype=torch.bool)  # the row's last token was an EOS

    @property
    def length(self) -> int:
        """Slots filled so far (every layer stores once per forward, so they agree)."""
        return self.layers[0].length

    def layout(self, idx_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos_BS, mask (B, 1, S, L)) of the next S tokens idx_BS of each row, once per forward (it records their
        documents): positions from their document's start (0 for padding); True where query slot q may attend
        to key slot j: j <= q, j not padding and in q's document. A padding query sees itself only, so that no
        row of the softmax is empty."""
        S, dev = idx_BS.shape[1], self.pad_B.device
        slots_S = torch.arange(self.length, self.length + S, device=dev)
        doc_BS, start_BS, eos_BS = documents(idx_BS, self.eos_id, slots_S, self.pad_B, self.doc_B, self.start_B,
                                             self.after_eos_B)
        self.doc_BL[:, self.length:self.length + S] = doc_BS
        self.doc_B, self.start_B, self.after_eos_B = doc_BS[:, -1], start_BS[:, -1], eos_BS[:, -1]
        doc_BL, j = self.doc_BL[:, :self.length + S], torch.arange(self.length + S, device=dev)
        same_BSL = (doc_BS[:, :, None] == doc_BL[:, None]) & (doc_BL[:, None] >= 0)
        mask = (j[None] <= slots_S[:, None]) & same_BSL | (j[None] == slots_S[:, None])
        return (slots_S - start_BS).clamp(min=0), mask[:, None]
