"""The private torch APIs megavq uses, each with its reason and the versions it was checked on.

- `torch._grouped_mm(x (N, D), w (E, D, H), offs=int32 chunk ends)`: one grouped GEMM over the experts' row
  chunks (the kernel torchtitan's MoE uses on Hopper in bf16). Checked with torch 2.11 (CUDA) and 2.13 (CPU:
  forward only; its backward failed there). Rows past the last chunk end are left unwritten, forward and
  backward: callers mask them.
"""
from __future__ import annotations

import torch


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x_ND @ w[e] for the rows of each expert e, chunk e ending at offs[e] (int32, on x's device)."""
    return torch._grouped_mm(x, w, offs=offs)
