"""Load balancing shared by the routers that score experts per token (topk, xmoe, usmoe with token selection,
compete's router path, vq's continuous router): `Balance`, a child module `balance` of such a router.

Legend: T tokens, E experts, K slots per token, B sequences of S tokens (T = B * S).
Options (moe.router_options.NAME=VALUE; the defaults, base.BALANCE_OPTIONS, are the Switch loss per micro-batch on
softmax scores without a bias):
  balance_scope  where the Switch loss E * sum_e f_e * P_e counts f (the fraction of routed (token, slot) pairs
                 that chose e; P_e the mean probability, the only factor with a gradient):
                   micro_batch  this rank's micro-batch (Switch, GShard)
                   sequence     per sequence, averaged over the micro-batch's sequences (DeepSeek-V2/V3 sequence-wise
                                loss): a token's gradient does not depend on how sequences are grouped in micro-batches
                   global       counts summed over every rank and over the micro-batches of the optimizer step so far
                                (a running sum, reset after each optimizer step), times this rank's P (Qwen, arXiv
                                2501.11873; Megatron-Core's global_aux_loss). With data-parallel gradient averaging the
                                gradient equals one rank's holding the whole global batch as one micro-batch
  bias_rate      u > 0: aux-loss-free balancing (arXiv 2408.15664, DeepSeek-V3). A per-expert bias b (persistent buffer,
                 no gradient) is added to the scores for the selection only; the weights come from the unbiased scores
                 of the chosen experts. After each optimizer step b_e += u * sign(mean load - load_e) with the step's
                 load over every rank and micro-batch, counted in training forwards only (not in evaluation, not in
                 the recomputed forward of activation checkpointing). DeepSeek-V3 keeps a small sequence-level loss
                 beside it: balance_scope=sequence with balance_coef=1e-4.
  bias_centre    subtract the bias's mean after each update (its mean then stays 0: the bias cannot drift)
  score          softmax | sigmoid (DeepSeek-V3): with sigmoid scores s the weights are the chosen s divided by their sum
                 (when the router normalises) times route_scale, and P uses s / sum_e s (DeepSeek-V3 eq. 19)
  route_scale    the sigmoid weights' factor (DeepSeek-V3: 2.5)
  groups, group_top  group-limited routing (DeepSeek-V3's node-limited routing; group_top = 0: off): the E experts
                 form `groups` groups of E / groups consecutive experts (aligned with the expert-parallel ranks when
                 groups is a multiple of moe.ep_size); a token keeps the group_top groups with the largest sum of its
                 top-2 (biased) scores in the group, then takes its top-k among their experts. The native
                 dispatcher sends a token once to each rank holding one of its experts, so with aligned groups it
                 reaches at most group_top ranks (megavq.moe.dispatch.expert_parallel.run_routed)
"""
from __future__ import annotations

import torch
from torch import nn

from megavq.errors import ConfigError
from megavq.moe.routers.base import expert_counts, expert_keys, is_recomputing, sum_over_ranks, switch_loss

SCOPES = ("micro_batch", "sequence", "global")
SCORES = ("softmax", "sigmoid")


def sequence_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """The Switch loss of each sequence of seq_len tokens (all T when None), averaged over the sequences."""
    T, E = probs_TE.shape
    S = seq_len or T
    keys_BM = expert_keys(indices_TK, E).view(T // S, -1)
    counts_BE = torch.zeros(T // S, E + 1, device=probs_TE.device).scatter_add_(
        1, keys_BM, torch.ones(keys_BM.shape, device=probs_TE.device))[:, :E]
    f_BE = counts_BE / counts_BE.sum(-1, keepdim=True).clamp(min=1)
    P_BE = probs_TE.float().view(T // S, S, E).mean(1)
    return E * (f_BE * P_BE).sum(-1).mean()


def check_groups(router: str, num_experts: int, top_k: int, groups: int, group_top: int) -> None:
    if group_top == 0:
        if groups:
            raise ConfigError(f"{router}: groups={groups} needs group_top > 0 (the groups a token may use)")
        return
    if groups < 1 or num_experts % groups or not 1 <= group_top <= groups:
        raise ConfigError(f"{router}: groups must divide the {num_experts} experts and group_top be in [1, groups], "
                          f"got groups={groups}, group_top={group_top}")
    if top_k > group_top * (num_experts // groups):
        raise ConfigError(f"{router}: top_k={top_k} exceeds the experts of group_top={group_top} groups of "
                          f"{num_experts // groups}")


class Balance(nn.Module):
    """The balancing of one router: scores, selection, weights, the balance loss of its scope, the expert bias."""

    def __init__(self, router: str, num_experts: int, top_k: int, balance_scope: str = "micro_batch",
                 bias_rate: float = 0.0, bias_centre: bool = False, score: str = "softmax", route_scale: float = 1.0,
                 groups: int = 0, group_top: int = 0):
        super().__init__()
        check_groups(router, num_experts, top_k, groups, group_top)
        if balance_scope not in SCOPES:
            raise ConfigError(f"{router}: balance_scope must be one of {SCOPES}, got {balance_scope!r}")
        if score not in SCORES:
            raise ConfigError(f"{router}: score must be one of {SCORES}, got {score!r}")
        if bias_rate < 0 or route_scale <= 0:
            raise ConfigError(f"{router}: bias_rate must be >= 0 and route_scale > 0, got {bias_rate}, {route_scale}")
        if route_scale != 1.0 and score != "sigmoid":
            raise ConfigError(f"{router}: route_scale={route_scale} applies to score='sigmoid' only, got score={score!r}")
        self.scope, self.rate, self.centre = balance_scope, bias_rate, bias_centre
        self.score, self.route_scale = score, route_scale
        self.groups, self.group_top = groups, group_top
        if bias_rate > 0:
            self.register_buffer("bias", torch.zeros(num_experts))  # fp32 whatever the model dtype (_apply)
        self.load = None  # (E,) routed slots per expert in this step's training forwards (bias_rate > 0)
        self.running = None  # (E,) global scope: the step's counts so far, summed over ranks

    @property
    def has_bias(self) -> bool:
        return self.rate > 0

    @property
    def custom(self) -> bool:
        """Routing that Hugging Face's softmax top-k MoE does not express (a bias, sigmoid scores, groups)."""
        return self.has_bias or self.score != "softmax" or self.group_top > 0

    # ---- scores, selection, weights ---------------------------------------------------------------------
    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """s (T, E): softmax or sigmoid of the logits."""
        return logits_TE.softmax(dim=-1) if self.score == "softmax" else logits_TE.sigmoid()

    def probs(self, s_TE: torch.Tensor) -> torch.Tensor:
        """The probabilities of the balance loss and of RouterOutput.scores: s, or s / sum_e s for sigmoid."""
        return s_TE if self.score == "softmax" else s_TE / s_TE.sum(-1, keepdim=True)

    def select(self, s_TE: torch.Tensor, k: int) -> torch.Tensor:
        """(T, k) the experts of the top-k of s + bias (s alone without a bias), among the experts of the token's best
        group_top groups when groups are on; observes them in training."""
        biased_TE = s_TE.detach() + self.bias if self.has_bias else s_TE
        if self.group_top:
            biased_TE = self.group_limited(biased_TE.detach())
        indices_TK = biased_TE.topk(k, dim=-1).indices
        self.observe(indices_TK)
        return indices_TK

    def group_limited(self, biased_TE: torch.Tensor) -> torch.Tensor:
        """The scores with -inf outside each token's group_top best groups (by the sum of its top-2 scores there)."""
        T, E = biased_TE.shape
        G = self.groups
        group_TG = biased_TE.view(T, G, E // G).topk(min(2, E // G), dim=-1).values.sum(-1)
        kept_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(
            1, group_TG.topk(self.group_top, dim=-1).indices, True)
        return biased_TE.masked_fill(~kept_TG.repeat_interleave(E // G, dim=1), float("-inf"))

    def weights(self, s_TE: torch.Tensor, indices_TK: torch.Tensor, normalize: bool) -> torch.Tensor:
        """The unbiased scores of the chosen experts, divided by their sum when `normalize`; times route_scale."""
        w_TK = s_TE.gather(1, indices_TK)
        if normalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return w_TK * self.route_scale if self.score == "sigmoid" else w_TK

    # ---- the balance loss -------------------------------------------------------------------------------
    def loss(self, probs_TE: torch.Tensor, indices_TK: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """The Switch loss of the configured scope (before its coefficient)."""
        if self.scope == "sequence":
            return sequence_loss(probs_TE, indices_TK, seq_len)
        counts_E = expert_counts(indices_TK, probs_TE.shape[-1])
        if self.scope == "global" and self.training:
            counts_E = self.step_counts(counts_E)
        return switch_loss(counts_E, probs_TE)

    @torch.no_grad()
    def step_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """The running sum over ranks and micro-batches of this step, this micro-batch included. A recomputed
        forward (activation checkpointing) takes it as its first forward left it: its backward runs before the
        next micro-batch's forward."""
        if is_recomputing():
            assert self.running is not None, "a recomputed forward without its first forward"
            return self.running
        counts_E = sum_over_ranks(counts_E.float())
        self.running = counts_E if self.running is None else self.running + counts_E
        return self.running

    # ---- the expert bias --------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, indices_TK: torch.Tensor) -> None:
        if not self.has_bias or not self.training or is_recomputing():
            return
        counts_E = expert_counts(indices_TK, self.bias.shape[0]).float()
        self.load = counts_E if self.load is None else self.load + counts_E

    @torch.no_grad()
    def post_step(self) -> None:
        """After the optimizer step: the bias moves by rate * sign(mean load - load) with the step's load over all
        ranks (then centred with bias_centre); the global scope's running sum starts again."""
        self.running = None
        if self.load is None:
            return
        load_E, self.load = sum_over_ranks(self.load), None
        if self.bias.dtype != torch.float32:  # a cast that bypassed _apply (DeepSpeed's buffer_dtype)
            self._buffers["bias"] = self.bias.float()
        self.bias.add_(self.rate * torch.sign(load_E.mean() - load_E))
        if self.centre:
            self.bias.sub_(self.bias.mean())

    def metrics(self) -> dict:
        """The bias's range and mean (no metrics without a bias)."""
        if not self.has_bias:
            return {}
        b = self.bias.detach()
        return {"bias_min": b.min(), "bias_max": b.max(), "bias_mean": b.mean()}

    # ---- checkpoints and casts --------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state dict saved without the bias (a model trained without one) loads with the bias at 0."""
        if self.has_bias:
            state_dict.setdefault(prefix + "bias", torch.zeros_like(self.bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        """Module casts (model.bfloat16()) leave the bias fp32: updates of 1e-3 are below bf16's resolution."""
        before = self._buffers.get("bias")
        super()._apply(fn, recurse)
        if before is not None and self._buffers["bias"].dtype != torch.float32:
            self._buffers["bias"] = before.to(self._buffers["bias"].device, torch.float32)
        return self

