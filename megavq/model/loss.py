"""Cross-entropy of the output head in chunks: its memory does not grow with the vocabulary.

Legend: N tokens, D hidden, V vocabulary.
Plain `cross_entropy(h @ w.T, y)` keeps the (N, V) logits and their log-softmax for the backward (at vocab
32000 and 16k tokens per micro-batch, 4 GiB in fp32). Here the logits of a few thousand tokens at a time are
made, turned into their loss and gradients, and dropped: the backward keeps the (N, D) and (V, D) gradients.
The loss is computed in fp32 whatever the head's dtype; the result equals the plain loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32)


def _chunks(n: int, vocab: int) -> list[slice]:
    size = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def head_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h_ND @ w_VD.T against targets_N, as an fp32 scalar."""
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _HeadCrossEntropy.apply(h_ND, w_VD, targets_N)
    total = h_ND.new_zeros((), dtype=torch.float32)
    for rows in _chunks(h_ND.shape[0], w_VD.shape[0]):
        total = total + F.cross_entropy((h_ND[rows] @ w_VD.T).float(), targets_N[rows], reduction="sum")
    return total / h_ND.shape[0]


class _HeadCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward scales them by the incoming
    gradient (a scalar), so nothing of size (N, V) outlives a chunk."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N):
        n = h_ND.shape[0]
        total = h_ND.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h_ND)
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        for rows in _chunks(n, w_VD.shape[0]):
            logits = (h_ND[rows] @ w_VD.T).float()
            total = total + F.cross_entropy(logits, targets_N[rows], reduction="sum")
            grad_logits = logits.softmax(-1)  # d(sum of losses)/d logits = softmax - one_hot
            grad_logits[torch.arange(logits.shape[0], device=logits.device), targets_N[rows]] -= 1
            grad_logits = (grad_logits / n).to(h_ND.dtype)
            grad_h[rows] = grad_logits @ w_VD
            grad_w += (grad_logits.T @ h_ND[rows]).float()
        ctx.save_for_backward(grad_h, grad_w.to(w_VD.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None
