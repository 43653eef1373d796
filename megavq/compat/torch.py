"""The private torch APIs megavq uses, each with its reason and the versions it was checked on.

- `torch._grouped_mm(x (N, D), w (E, D, H), offs=int32 chunk ends)`: one grouped GEMM over the experts' row
  chunks (the kernel torchtitan's MoE uses on Hopper in bf16). Checked with torch 2.11 (CUDA) and 2.13 (CPU:
  forward only; its backward failed there). Rows past the last chunk end are left unwritten, forward and
  backward: callers mask them.
- `torch.nn.attention.flex_attention` (`flex_attention`, `create_block_mask`; public but a prototype API since
  torch 2.5): attention within documents on a GPU without an (S, S) mask in memory, compiled once as torch
  recommends (uncompiled it materialises the scores). Used only on CUDA when it imports; not run on CPU.
"""
from __future__ import annotations

import functools
import importlib.util

import torch


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def has_flex_attention(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, gqa: bool) -> torch.Tensor:
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def document_block_mask(doc_BS: torch.Tensor):
    """The BlockMask of causal attention within documents, doc_BS the document index of each token."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, S = doc_BS.shape

    def same_document(b, h, q, kv):
        return (doc_BS[b, q] == doc_BS[b, kv]) & (q >= kv)
    return create_block_mask(same_document, B, None, S, S, device=doc_BS.device)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x_ND @ w[e] for the rows of each expert e, chunk e ending at offs[e] (int32, on x's device)."""
    return torch._grouped_mm(x, w, offs=offs)
