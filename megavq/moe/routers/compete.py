"""Competition routing (CompeteSMoE, Pham, Do et al. 2024; revised 2025).

Legend: T tokens, D hidden, E experts, K experts per token, B sequences of S tokens (T = B * S).
Normal step: a softmax router picks the top-k experts. Competition step: every expert runs on every token,
y_e(x) (E, T, D); the affinity a[t, e] of an expert's output is its L2 norm (2024) or the mean softplus of its
entries (2025); the competition score is c = (1 - combine) * a + combine * logits (the 2024 scripts' combine gate
is combine = 0.5; 0 = the affinity alone); the top-k of c win, with output weights softmax(c_W) or, with
`weights="linear"`, c_W / sum(c_W) (the 2025 code); the experts learn from the routing through c. Losses on a
competition step, besides the router's balance loss (every step):
  distillation   MSE(softmax(logits), q) over all E in expert order + winner_coef * the same MSE at the winners;
                 q = softmax(c).detach() (2025), or with `distill_target="topk"` softmax over the winners' c and 0
                 elsewhere (2024)
  diversity      signed cosine between the winners' outputs of a token, over ordered pairs i != j, summed and
                 divided by T * k * k (2025 code; (k - 1) / k times the mean over pairs); it pushes winners apart
  affinity bal.  Switch form on softmax(c) with the first winner's counts, per sequence, averaged:
                 (1 / B) sum_b E * sum_e f[b, e] * P[b, e] (2025 code, its VLM implementation)
See docs/routers.md for the equations with the official defaults and where they were read.
Balancing (megavq.moe.routers.balance) acts on the router path: balance_scope and the expert bias (added to the
router's softmax for its selection). Its distillation matches softmax probabilities: the score option does not
apply.

Schedule: after the warm-up (`warmup_steps`, or `warmup_frac` of the run's train.max_steps, which the MoE spec
passes to `place`), each MoE layer competes with probability `rate` per optimizer step, at most `max_competing`
layers in one step. The draw is a pure function of (schedule_seed, step, layer): every rank (and every
expert-parallel group) takes the same decision without communicating, so all ranks run the dense step together,
and a recomputed forward competes again. The trainer tells the router its step (`set_step`) and the MoE layer
its place among the MoE layers (`place`). In eval mode the router never competes. The `competitions` buffer
counts the optimizer steps in which the layer competed (updated by `post_step`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megavq.errors import ConfigError
from megavq.moe.routers.balance import Balance
from megavq.moe.routers.base import Router, RouterOutput, linear_gate, mix64, register, routing_metrics


DEFAULT_WARMUP_STEPS = 100  # (m): no competition in the first optimizer steps when warmup_frac is not set


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


def distillation_target(c_TE: torch.Tensor, winners_TK: torch.Tensor, target: str) -> torch.Tensor:
    """(T, E), detached: softmax(c) over all E ("softmax", 2025), or softmax over the winners' c, 0 elsewhere ("topk",
    the 2024 scripts)."""
    c_TE = c_TE.detach()
    if target == "softmax":
        return c_TE.softmax(dim=-1)
    return torch.zeros_like(c_TE).scatter_(1, winners_TK, c_TE.gather(1, winners_TK).softmax(dim=-1))


def distillation_loss(probs_TE: torch.Tensor, target_TE: torch.Tensor, winners_TK: torch.Tensor,
                      winner_coef: float) -> torch.Tensor:
    """MSE(router probs, target) over all E in expert order, + winner_coef * the same MSE at the winners."""
    loss = F.mse_loss(probs_TE, target_TE)
    if winner_coef:
        loss = loss + winner_coef * F.mse_loss(probs_TE.gather(1, winners_TK), target_TE.gather(1, winners_TK))
    return loss


def diversity_loss(y_ETD: torch.Tensor, winners_TK: torch.Tensor) -> torch.Tensor:
    """Signed cosine similarity between the winners' outputs of each token, over ordered pairs i != j, summed and
    divided by T * k * k (the 2025 code's normalisation). 0 with k = 1."""
    T, K = winners_TK.shape
    y_TED = y_ETD.float().transpose(0, 1)
    u_TKD = F.normalize(y_TED.gather(1, winners_TK[..., None].expand(-1, -1, y_TED.shape[-1])), dim=-1, eps=1e-12)
    cos_TKK = u_TKD @ u_TKD.transpose(1, 2)
    return (cos_TKK.sum() - cos_TKK.diagonal(dim1=1, dim2=2).sum()) / (T * K * K)


def affinity_balance_loss(q_TE: torch.Tensor, first_T: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """Switch balance loss per sequence with the first winner's counts, averaged over sequences:
    (1 / B) sum_b E * sum_e f[b, e] * P[b, e], f = fraction of the sequence's tokens whose first winner is e,
    P = the sequence's mean of q. One group of all T tokens when seq_len is None."""
    T, E = q_TE.shape
    G = seq_len or T
    f_BE = F.one_hot(first_T, E).float().view(-1, G, E).mean(1)
    P_BE = q_TE.float().view(-1, G, E).mean(1)
    return E * (f_BE * P_BE).sum(-1).mean()


@register("compete")
class CompeteRouter(Router):
    needs_expert_outputs = True
    needs_seq_len = True  # the affinity balance loss is per sequence
    state = ("competitions",)
    legacy_options = {"diversity_coef": 0.0, "affinity_balance_coef": 0.0}  # runs saved before the 2025 losses
    balance_options = ("balance_scope", "bias_rate", "bias_centre", "groups", "group_top")
    balance_refusal = "compete distils softmax router probabilities towards softmax affinities"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, affinity: str = "softplus",
                 rate: float = 0.07, warmup_steps: int | None = None, max_competing: int = 3,
                 distill_coef: float = 1e-3, winner_coef: float = 0.2, balance_coef: float = 0.01,
                 normalize: bool | None = None, schedule_seed: int = 0, weights: str = "softmax",
                 diversity_coef: float = 0.01, affinity_balance_coef: float = 0.01, warmup_frac: float | None = None,
                 combine: float = 0.0, distill_target: str = "softmax", **balance):
        super().__init__(hidden_size, num_experts, top_k)
        self._check_options(affinity, rate, warmup_steps, warmup_frac, max_competing, weights, combine,
                            distill_target)
        self.gate = linear_gate(hidden_size, num_experts)
        self.affinity, self.rate, self.max_competing = affinity, rate, max_competing
        self.warmup_steps = DEFAULT_WARMUP_STEPS if warmup_steps is None else warmup_steps
        self.warmup_frac = warmup_frac
        self.distill_coef, self.winner_coef, self.balance_coef = distill_coef, winner_coef, balance_coef
        self.diversity_coef, self.affinity_balance_coef = diversity_coef, affinity_balance_coef
        self.weights, self.combine, self.distill_target = weights, combine, distill_target
        self.normalize = top_k > 1 if normalize is None else normalize
        self.schedule_seed = schedule_seed
        self.balance = Balance("compete", num_experts, top_k, **balance)
        self.register_buffer("competitions", torch.zeros((), dtype=torch.long))  # optimizer steps that competed
        self.competed = False  # observed since the last post_step

    @staticmethod
    def _check_options(affinity, rate, warmup_steps, warmup_frac, max_competing, weights, combine,
                       distill_target) -> None:
        if affinity not in ("norm", "softplus"):
            raise ConfigError(f"compete: affinity must be 'norm' (2024) or 'softplus' (2025), got {affinity!r}")
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"compete: rate must be in [0, 1], got {rate}")
        if (warmup_steps or 0) < 0 or max_competing < 0:
            raise ConfigError(f"compete: warmup_steps and max_competing must be >= 0, "
                              f"got {warmup_steps}, {max_competing}")
        if warmup_frac is not None and (warmup_steps is not None or not 0.0 <= warmup_frac < 1.0):
            raise ConfigError(f"compete: warmup_frac must be in [0, 1) and replaces warmup_steps (set one of them), "
                              f"got warmup_frac={warmup_frac}, warmup_steps={warmup_steps}")
        if weights not in ("softmax", "linear"):
            raise ConfigError(f"compete: weights must be 'softmax' or 'linear' (2025 code), got {weights!r}")
        if not 0.0 <= combine <= 1.0 or (combine > 0 and weights == "linear"):
            raise ConfigError(f"compete: combine must be in [0, 1], and 0 with weights='linear' (a logit can be "
                              f"negative), got combine={combine}, weights={weights!r}")
        if distill_target not in ("softmax", "topk"):
            raise ConfigError(f"compete: distill_target must be 'softmax' (2025) or 'topk' (2024), "
                              f"got {distill_target!r}")

    @property
    def warmup(self) -> int:
        """Optimizer steps without competition: warmup_steps, or int(warmup_frac * train.max_steps)."""
        if self.warmup_frac is None:
            return self.warmup_steps
        if self.max_steps <= 0:
            raise ConfigError("compete: warmup_frac needs the run's length (train.max_steps), which the MoE layer "
                              "passes to the router (Router.place); this router was built without it")
        return int(self.warmup_frac * self.max_steps)

    def competes_now(self) -> bool:
        if not self.training or self.rate == 0 or self.step < self.warmup:
            return False
        return self.layer_index in competing_layers(self.schedule_seed, self.step, self.num_moe_layers, self.rate,
                                                    self.warmup, self.max_competing)

    def post_step(self) -> None:
        super().post_step()
        if self.competed:
            self.competitions += 1
        self.competed = False

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None, expert_fn=None) -> RouterOutput:
        logits_TE = self.gate(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        indices_TK = self.balance.select(probs_TE, self.top_k)
        weights_TK = self.balance.weights(probs_TE, indices_TK, self.normalize)  # normalised = softmax over top-k
        balance = self.balance.loss(probs_TE, indices_TK, seq_len)  # on the router path, every step
        aux = self.balance_coef * balance
        if not self.competes_now():
            metrics = self._metrics(indices_TK, probs_TE, balance, competed=False)
            return RouterOutput(weights_TK, indices_TK, probs_TE, aux, metrics)
        assert expert_fn is not None, "a competition step needs expert_fn (the MoE layer passes it)"
        y_ETD = expert_fn()
        c_TE = self.competition_score(y_ETD, logits_TE)
        c_win_TK, winners_TK = c_TE.topk(self.top_k, dim=-1)
        losses = self.competition_losses(probs_TE, c_TE, y_ETD, winners_TK, seq_len)
        aux = aux + self.distill_coef * losses["distill_loss"] + self.diversity_coef * losses["diversity_loss"]
        aux = aux + self.affinity_balance_coef * losses["affinity_balance_loss"]
        self.competed = self.competed or self.observing
        metrics = self._metrics(winners_TK, probs_TE, balance, competed=True)
        metrics.update({k: v.detach() for k, v in losses.items()}, agreement=topk_agreement(indices_TK, winners_TK))
        return RouterOutput(self.winner_weights(c_win_TK), winners_TK, probs_TE, aux, metrics)

    def competition_score(self, y_ETD: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
        """c = (1 - combine) * a + combine * logits, (T, E) fp32 (c = a when combine = 0)."""
        a_TE = expert_affinity(y_ETD, self.affinity)
        return a_TE if self.combine == 0 else (1 - self.combine) * a_TE + self.combine * logits_TE

    def winner_weights(self, c_win_TK: torch.Tensor) -> torch.Tensor:
        if self.weights == "softmax":
            return c_win_TK.softmax(dim=-1)
        return c_win_TK / c_win_TK.sum(-1, keepdim=True).clamp(min=1e-12)  # a >= 0 (combine is 0)

    def competition_losses(self, probs_TE, c_TE, y_ETD, winners_TK, seq_len) -> dict:
        """The competition step's losses, before their coefficients (all are logged, whatever the coefficients)."""
        target_TE = distillation_target(c_TE, winners_TK, self.distill_target)
        return {"distill_loss": distillation_loss(probs_TE, target_TE, winners_TK, self.winner_coef),
                "diversity_loss": diversity_loss(y_ETD, winners_TK),
                "affinity_balance_loss": affinity_balance_loss(c_TE.softmax(dim=-1), winners_TK[:, 0], seq_len)}

    def hf_routing(self) -> dict | None:
        """At evaluation it never competes: softmax top-k of the gate, renormalised when `normalize`, no jitter (None,
        exported with its own modelling code, with a bias)."""
        if self.balance.custom:
            return None
        return {"normalize": bool(self.normalize), "jitter": 0.0}

    def _metrics(self, indices_TK, probs_TE, balance, competed: bool) -> dict:
        metrics = routing_metrics(indices_TK, probs_TE)
        metrics.update(balance_loss=balance.detach(), competed=torch.tensor(float(competed)),
                       competitions=self.competitions.detach().clone(), **self.balance.metrics())
        return metrics


def topk_agreement(router_TK: torch.Tensor, winners_TK: torch.Tensor) -> torch.Tensor:
    """Mean fraction of the competition winners that the router's own top-k also picked."""
    with torch.no_grad():
        return (winners_TK[:, :, None] == router_TK[:, None, :]).any(-1).float().mean()
