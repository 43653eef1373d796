"""Competition routing (CompeteSMoE, Pham, Do et al. 2024; revised 2025).

Legend: T tokens, D hidden, E experts, K experts per token.
Normal step: a softmax router picks the top-k experts. Competition step: every expert runs on every
token, the affinity a[t, e] of an expert's output (its L2 norm, or the mean softplus of its entries)
picks the top-k, the output weights are a softmax over the winners' affinities (so the experts learn
from the routing), and the router is distilled towards softmax(a) over all E experts in expert order.

Schedule: after `warmup_steps`, each MoE layer competes with probability `rate` per optimizer step, at
most `max_competing` layers in one step. The draw is a pure function of (schedule_seed, step, layer):
every rank (and every expert-parallel group) takes the same decision without communicating, so all
ranks run the dense step together, and a recomputed forward competes again. The trainer tells the router
its step (`set_step`) and the MoE layer its place among the MoE layers (`place`). In eval mode the router
never competes. The `competitions` buffer counts the optimizer steps in which the layer competed
(updated by `post_step`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megavq.errors import ConfigError
from megavq.moe.routers.base import (Router, RouterOutput, linear_gate, load_balance_loss, mix64, register,
                                     routing_metrics, top_k_weights)


def schedule_uniform(seed: int, step: int, layer: int) -> float:
    """A number in [0, 1) that depends only on (seed, step, layer): the same on every rank."""
    return (mix64(seed, step, layer) >> 11) / float(1 << 53)


def competing_layers(seed: int, step: int, num_layers: int, rate: float, warmup_steps: int,
                     max_competing: int) -> list[int]:
    """The MoE layers (0-based among MoE layers) that compete at `step`.

    Layer l is drawn when u(seed, step, l) < rate; of the drawn layers the `max_competing` with the
    smallest u compete (0 = no cap).
    """
    if step < warmup_steps:
        return []
    drawn = sorted((schedule_uniform(seed, step, l), l) for l in range(num_layers))
    drawn = [l for u, l in drawn if u < rate]
    return sorted(drawn[:max_competing] if max_competing > 0 else drawn)


def expert_affinity(y_ETD: torch.Tensor, kind: str) -> torch.Tensor:
    """(E, T, D) expert outputs -> (T, E) affinities, fp32, differentiable into the experts."""
    y = y_ETD.float()
    a_ET = y.norm(dim=-1) if kind == "norm" else F.softplus(y).mean(dim=-1)
    return a_ET.t()


def distillation_loss(probs_TE: torch.Tensor, a_TE: torch.Tensor, winners_TK: torch.Tensor,
                      winner_coef: float) -> torch.Tensor:
    """MSE(router probs, softmax(a).detach()) over all E in expert order, + winner_coef * the same at the winners."""
    target_TE = a_TE.detach().softmax(dim=-1)
    loss = F.mse_loss(probs_TE, target_TE)
    if winner_coef:
        loss = loss + winner_coef * F.mse_loss(probs_TE.gather(1, winners_TK), target_TE.gather(1, winners_TK))
    return loss


@register("compete")
class CompeteRouter(Router):
    needs_expert_outputs = True
    state = ("competitions",)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, affinity: str = "softplus",
                 rate: float = 0.07, warmup_steps: int = 100, max_competing: int = 3, distill_coef: float = 1e-3,
                 winner_coef: float = 0.2, balance_coef: float = 0.01, normalize: bool | None = None,
                 schedule_seed: int = 0):
        super().__init__(hidden_size, num_experts, top_k)
        if affinity not in ("norm", "softplus"):
            raise ConfigError(f"compete: affinity must be 'norm' (2024) or 'softplus' (2025), got {affinity!r}")
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"compete: rate must be in [0, 1], got {rate}")
        if warmup_steps < 0 or max_competing < 0:
            raise ConfigError(f"compete: warmup_steps and max_competing must be >= 0, "
                              f"got {warmup_steps}, {max_competing}")
        self.gate = linear_gate(hidden_size, num_experts)
        self.affinity, self.rate, self.warmup_steps, self.max_competing = affinity, rate, warmup_steps, max_competing
        self.distill_coef, self.winner_coef, self.balance_coef = distill_coef, winner_coef, balance_coef
        self.normalize = top_k > 1 if normalize is None else normalize
        self.schedule_seed = schedule_seed
        self.register_buffer("competitions", torch.zeros((), dtype=torch.long))  # optimizer steps that competed
        self.competed = False  # observed since the last post_step

    def competes_now(self) -> bool:
        if not self.training or self.step < self.warmup_steps or self.rate == 0:
            return False
        return self.layer_index in competing_layers(self.schedule_seed, self.step, self.num_moe_layers, self.rate,
                                                    self.warmup_steps, self.max_competing)

    def post_step(self) -> None:
        if self.competed:
            self.competitions += 1
        self.competed = False

    def forward(self, x_TD: torch.Tensor, expert_fn=None) -> RouterOutput:
        logits_TE = self.gate(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, indices_TK = top_k_weights(probs_TE, self.top_k, self.normalize)  # normalised = softmax over top-k
        balance = load_balance_loss(probs_TE, indices_TK)  # on the router path, every step
        aux = self.balance_coef * balance
        if not self.competes_now():
            metrics = self._metrics(indices_TK, probs_TE, balance, competed=False)
            return RouterOutput(weights_TK, indices_TK, probs_TE, aux, metrics)
        assert expert_fn is not None, "a competition step needs expert_fn (the MoE layer passes it)"
        a_TE = expert_affinity(expert_fn(), self.affinity)
        a_win_TK, winners_TK = a_TE.topk(self.top_k, dim=-1)
        distill = distillation_loss(probs_TE, a_TE, winners_TK, self.winner_coef)
        self.competed = self.competed or self.observing
        metrics = self._metrics(winners_TK, probs_TE, balance, competed=True)
        metrics.update(distill_loss=distill.detach(), agreement=topk_agreement(indices_TK, winners_TK))
        return RouterOutput(a_win_TK.softmax(dim=-1), winners_TK, probs_TE, aux + self.distill_coef * distill,
                            metrics)

    def hf_routing(self) -> dict:
        """At evaluation it never competes: softmax top-k of the gate, renormalised when `normalize`, no jitter."""
        return {"normalize": bool(self.normalize), "jitter": 0.0}

    def _metrics(self, indices_TK, probs_TE, balance, competed: bool) -> dict:
        metrics = routing_metrics(indices_TK, probs_TE)
        metrics.update(balance_loss=balance.detach(), competed=torch.tensor(float(competed)),
                       competitions=self.competitions.detach().clone())
        return metrics


def topk_agreement(router_TK: torch.Tensor, winners_TK: torch.Tensor) -> torch.Tensor:
    """Mean fraction of the competition winners that the router's own top-k also picked."""
    with torch.no_grad():
        return (winners_TK[:, :, None] == router_TK[:, None, :]).any(-1).float().mean()
