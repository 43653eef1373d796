"""Hypersphere routing (X-MoE, Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of Experts").

Legend: T tokens, D hidden, P routing dimension (d_e), E experts, K experts per token.
mode="paper" (default): tokens are projected to P dimensions; scores are cosines between the projected token and
learned expert embeddings (both L2-normalised); gate = softmax(s / tau) with a learned temperature; top-k on s.
The balance loss uses softmax(s / tau0) with a fixed tau0, not the learned tau.
mode="torchscale": what microsoft/torchscale's X-MoE gate computes (component/xmoe/routing.py): P = 16, the
projection with torch's default Linear initialisation, expert embeddings initialised orthogonal (gain 0.32) and
rescaled to norm 1.5, s = W_r x . e / |e| (the token side NOT normalised), gate = softmax(s) with no temperature,
top-k on s, and the balance loss E * sum_e mean_t(gate_e) * (fraction of tokens whose first choice is e).
torchscale rescales the embeddings to norm 1.5 in place at every forward; here the rescale is in the forward's
arithmetic (value rescaled, identity gradient), so the router keeps no state and the scores and gradients equal
torchscale's at the same parameters (as under an optimizer with fp32 master weights, where torchscale's in-place
rescale never reaches the master copy). The temperature options are unused in this mode.
Balancing (megavq.moe.routers.balance): balance_scope and the expert bias (added to s for the selection); the
scores are cosines, so the sigmoid score option does not apply.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError
from megavq.moe.routers.balance import Balance
from megavq.moe.routers.base import FP32Linear, Router, RouterOutput, register, routing_metrics


TORCHSCALE_DIM, TORCHSCALE_NORM = 16, 1.5  # torchscale's routing dimension and expert-embedding norm


def default_proj_dim(hidden_size: int, num_experts: int) -> int:
    """E/2 (the paper's rule), at least 16 (its value with 32 experts; torchscale's fixed one), at most D.
    With a handful of experts E/2 would leave a 1- or 2-dimensional routing space."""
    return min(hidden_size, max(num_experts // 2, 16))


@register("xmoe")
class XMoERouter(Router):
    needs_seq_len = True  # for balance_scope=sequence
    balance_options = ("balance_scope", "bias_rate", "bias_centre", "groups", "group_top")
    balance_refusal = "xmoe's scores are cosine similarities under a softmax with a temperature, not logits"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, proj_dim: int = 0, temperature: float = 0.07,
                 learn_temperature: bool = True, balance_tau: float = 0.3, normalize: bool | None = None,
                 balance_coef: float = 0.01, frozen: bool = False, mode: str = "paper", **balance):
        super().__init__(hidden_size, num_experts, top_k)
        if proj_dim < 0:
            raise ConfigError(f"xmoe: proj_dim must be >= 0 (0 = the default), got {proj_dim}")
        if temperature <= 0 or balance_tau <= 0:
            raise ConfigError(f"xmoe: temperature and balance_tau must be > 0, got {temperature}, {balance_tau}")
        if mode not in ("paper", "torchscale"):
            raise ConfigError(f"xmoe: mode must be 'paper' or 'torchscale', got {mode!r}")
        self.mode = mode
        if mode == "paper":
            P = proj_dim or default_proj_dim(hidden_size, num_experts)
            self.proj = FP32Linear(hidden_size, P, bias=False)
            nn.init.normal_(self.proj.weight, std=0.02)
            self.centroids = nn.Parameter(torch.randn(num_experts, P) / math.sqrt(P))  # (E, P), rows of norm ~1
            self.log_temperature = nn.Parameter(torch.tensor([math.log(temperature)]),  # (1,): not 0-dim, for DeepSpeed
                                                requires_grad=learn_temperature)
        else:
            P = proj_dim or TORCHSCALE_DIM
            self.proj = FP32Linear(hidden_size, P, bias=False)  # torch's default init, as torchscale's nn.Linear
            centroids_EP = nn.init.orthogonal_(torch.empty(num_experts, P), gain=0.32)
            self.centroids = nn.Parameter(centroids_EP * (TORCHSCALE_NORM / centroids_EP.norm(dim=-1, keepdim=True)))
        self.normalize = top_k > 1 if normalize is None else normalize
        self.balance_tau, self.balance_coef = balance_tau, balance_coef
        self.balance = Balance("xmoe", num_experts, top_k, **balance)
        if frozen:  # the paper's fine-tuning recipe: keep the routing fixed
            self.requires_grad_(False)

    def cosine_scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """s[t, e] = cos(W_r x_t, e_e), in [-1, 1]: invariant to the scale of x."""
        h_TP = F.normalize(self.proj(x_TD), dim=-1)
        e_EP = F.normalize(self.centroids.float(), dim=-1)
        return h_TP @ e_EP.t()

    def torchscale_scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """s[t, e] = W_r x_t . e_e / max(|e_e|, 1e-4), e_e rescaled to norm 1.5 (value only) as torchscale does."""
        e_EP = self.centroids.float()
        rescaled_EP = e_EP * (TORCHSCALE_NORM / e_EP.norm(dim=-1, keepdim=True).clamp(min=1e-4))
        e_EP = e_EP + (rescaled_EP - e_EP).detach()
        return self.proj(x_TD) @ (e_EP / e_EP.norm(dim=-1, keepdim=True).clamp(min=1e-4)).t()

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.cosine_scores(x_TD) if self.mode == "paper" else self.torchscale_scores(x_TD)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        s_TE = self.scores(x_TD)
        indices_TK = self.balance.select(s_TE, self.top_k)
        if self.mode == "paper":
            tau = self.log_temperature.float().exp()[0]
            probs_TE = (s_TE / tau).softmax(dim=-1)
            balance = self.balance.loss((s_TE / self.balance_tau).softmax(dim=-1), indices_TK, seq_len)
        else:  # no temperature; balance counts first choices only
            probs_TE = s_TE.softmax(dim=-1)
            balance = self.balance.loss(probs_TE, indices_TK[:, :1], seq_len)
        weights_TK = self.balance.weights(probs_TE, indices_TK, self.normalize)
        metrics = routing_metrics(indices_TK, probs_TE)
        metrics.update(balance_loss=balance.detach(), **self.balance.metrics())
        if self.mode == "paper":
            metrics.update(temperature=tau.detach())
        return RouterOutput(weights_TK, indices_TK, probs_TE, self.balance_coef * balance, metrics)

    def view(self, x_TD: torch.Tensor) -> tuple[str, torch.Tensor]:
        if self.mode == "paper":
            return "cosine scores cos(W_r x, e_i), (T, E)", self.cosine_scores(x_TD)
        return "scores W_r x . e_i / |e_i| (torchscale), (T, E)", self.torchscale_scores(x_TD)
