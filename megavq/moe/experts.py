"""A bank of E independent expert MLPs stored as stacked weights, and the dense MLP (shared experts, dense blocks).

Legend: N routed rows (tokens sorted by expert), D hidden, H expert hidden, E experts.
`forward(x_ND, counts_E)` runs each expert on its contiguous chunk of rows (one matrix product per
expert, or three grouped products on CUDA); `grouped(x_ND, ends_E)` takes the chunk ends as a device tensor
(no host read); `expert(e, x)` runs one expert and serves the reference backend and weight conversion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megavq.compat.torch import grouped_mm, has_grouped_mm
from megavq.moe.phases import phase


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False,
                 init_std: float = 0.02, out_std: float | None = None, seed: int = 0, first_expert: int = 0):
        super().__init__()
        self.num_experts, self.mlp, self.first_expert = num_experts, mlp, first_expert
        n_in = 2 if mlp == "swiglu" else 1
        self.w_in = nn.Parameter(torch.empty(num_experts, n_in, d_model, d_hidden))  # (E, 1|2, D, H)
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # (E, H, D)
        self.b_in = nn.Parameter(torch.zeros(num_experts, n_in, d_hidden)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.init_std, self.out_std, self.seed = init_std, out_std or init_std, seed
        self.reset_parameters()

    @classmethod
    def for_spec(cls, spec, count: int | None = None, first_expert: int = 0) -> "Experts":
        """`count` experts (default all) of an MoE layer's spec, starting at global id `first_expert`."""
        return cls(count or spec.moe.num_experts, spec.d_model, spec.d_hidden, spec.mlp, spec.bias, spec.init_std,
                   spec.out_std, spec.seed, first_expert)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert from its own generator, seeded by its global id: the same weights at any ep_size.

        On the meta device (a model built only for its shapes) there is nothing to draw."""
        if self.w_in.is_meta:
            return
        for e in range(self.num_experts):
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.first_expert + e)
            self.w_in[e].copy_(torch.randn(self.w_in[e].shape, generator=g) * self.init_std)
            self.w_out[e].copy_(torch.randn(self.w_out[e].shape, generator=g) * self.out_std)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x_ND: the plain formula, used by the reference backend."""
        h = torch.einsum("nd,idh->nih", x_ND, self.w_in[e])  # (N, 1|2, H)
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = activation(h, self.mlp) @ self.w_out[e]
        return y + self.b_out[e] if self.b_out is not None else y

    def forward(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Rows sorted by expert; counts_E[e] rows belong to expert e. One product per non-empty expert."""
        if grouped_products(x_ND, self):
            ends = torch.tensor(counts_E, dtype=torch.long).cumsum(0).to(x_ND.device, non_blocking=True)
            return self.grouped(x_ND, ends)
        with phase("experts"):
            # unbind, not w_in[e]: the backward of E selects would zero-fill and add E full-size gradients
            w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
            no_bias = [None] * len(w_in)
            b_in, b_out = (self.b_in.unbind(0), self.b_out.unbind(0)) if self.b_in is not None else (no_bias, no_bias)
            outs = [expert_mlp(x, w_in[e], w_out[e], b_in[e], b_out[e], self.mlp)
                    for e, x in enumerate(torch.split(x_ND, counts_E)) if x.shape[0]]
            return torch.cat(outs) if outs else x_ND.new_zeros(0, self.w_out.shape[-1])

    def grouped(self, x_ND: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, expert e's rows ending at ends_E[e] (a device tensor): three grouped products
        (megavq.compat.torch.grouped_mm) on views of the stored weights. Rows past ends_E[-1] give zeros and no
        gradient."""
        with phase("experts"):
            return self._grouped(x_ND, ends_E)

    def _grouped(self, x_ND: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
        offs = ends_E.to(torch.int32)
        valid = (torch.arange(x_ND.shape[0], device=x_ND.device) < ends_E[-1])[:, None]
        # grouped products leave rows past the last chunk unwritten, forward and backward: mask what enters them
        x = torch.where(valid, x_ND, 0)
        h = torch.stack([grouped_mm(x, self.w_in[:, i], offs) for i in range(self.w_in.shape[1])], 1)
        h = torch.where(valid[:, None], h, 0)
        e_N = expert_of_row(ends_E, x_ND.shape[0]) if self.b_in is not None else None
        if e_N is not None:
            h = h + self.b_in[e_N]
        y = grouped_mm(torch.where(valid, activation(h, self.mlp), 0), self.w_out, offs)
        if e_N is not None:
            y = y + self.b_out[e_N]
        return torch.where(valid, y, 0)

    def all_experts(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, (E, T, D): the dense mode of competition routing."""
        return every_expert(self, self.num_experts, x_TD)


class DenseMLP(nn.Module):
    """One dense MLP on every row, (..., D) -> (..., D): SwiGLU (Llama family) or tanh GELU (GPT-2), its Linear
    layers under Llama's names."""

    def __init__(self, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias) if mlp == "swiglu" else None
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def grouped_products(x_ND: torch.Tensor, experts: Experts) -> bool:
    """Whether `Experts` runs its products grouped: on CUDA in bf16 where torch's grouped GEMM exists (a private
    API: megavq.compat.torch) and every row stride is a multiple of 16 bytes; elsewhere the loop over experts is
    faster."""
    D, H = experts.w_out.shape[-1], experts.w_out.shape[-2]
    return (x_ND.is_cuda and x_ND.dtype == torch.bfloat16 and has_grouped_mm()
            and D % 8 == 0 and H % 8 == 0)


def expert_of_row(ends_E: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the expert of each row sorted by expert, from the chunk ends; rows past the last end get E - 1."""
    rows = torch.arange(n, device=ends_E.device)
    return torch.bucketize(rows, ends_E, right=True).clamp(max=ends_E.numel() - 1)


def activation(h: torch.Tensor, mlp: str) -> torch.Tensor:
    """(..., 1|2, H) -> (..., H): SwiGLU (silu of the gate side times the up side) or tanh GELU."""
    if mlp == "swiglu":
        return F.silu(h[..., 0, :]) * h[..., 1, :]
    return F.gelu(h[..., 0, :], approximate="tanh")


def expert_mlp(x_ND: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, b_in: torch.Tensor | None,
               b_out: torch.Tensor | None, mlp: str) -> torch.Tensor:
    """One expert on rows x_ND with one fused input product: w_in (1|2, D, H), w_out (H, D)."""
    h = (x_ND @ w_in.transpose(0, 1).flatten(1)).unflatten(-1, (w_in.shape[0], w_in.shape[-1]))  # (N, 1|2, H)
    if b_in is not None:
        h = h + b_in
    y = activation(h, mlp) @ w_out
    return y + b_out if b_out is not None else y


def every_expert(bank, num_experts: int, x_TD: torch.Tensor) -> torch.Tensor:
    """Every expert of `bank` (called as bank(x_ND, counts_E) on rows sorted by expert) on every token, (E, T, D)."""
    T = x_TD.shape[0]
    y = bank(x_TD.repeat(num_experts, 1), [T] * num_experts)
    return y.view(num_experts, T, -1)


def expert_out_std(init_std: float, n_layers: int) -> float:
    """GPT-2 scaled init of residual projections."""
    return init_std / math.sqrt(2 * n_layers)
