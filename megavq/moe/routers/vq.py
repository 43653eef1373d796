"""Vector-quantised routing (VQMoE, Do, Pham, Le, Tran; TMLR 2025).

Legend: T tokens (N rows in general), D hidden, C code dimension, Q codes, E experts, K slots per token.
A codebook of Q codes, code j pointing to expert j mod E, assigns each token one expert by its nearest code
(squared distance). During pre-training an ordinary router (softmax top-k, or the X-MoE cosine router) adds
k_c = top_k - 1 experts (compute-matched with `topk` at the same top_k), and a two-way gate
[g_c, g_d] = softmax(Linear(D, 2)(x)) mixes the paths, as one routing of k_c + 1 slots:
    indices = [continuous top-k_c ..., expert(code)],  weights = [g_c * w_cont ..., g_d].
With k_c > 1, w_cont are the continuous router's top-k_c weights renormalised to sum 1. With k_c = 1 a softmax
over one score is always 1 and that router would never learn (the official code's bug), so w_cont stands for 1
with a gradient, `continuous_weight` (p = the full-softmax probability of the chosen expert):
    "ratio" (default)  p / p.detach():     value 1 (the paper's g_c * 1), gradient g_c * grad(p) / p = g_c * grad(log p)
    "offset"           1 + p - p.detach(): value 1, gradient g_c * grad(p) (Switch's size: falls as 1/E)
    "prob"             p:                  the first landing; with `normalize=True` the two slot weights are then
                                           divided by their sum (the continuous slot gets about 1/E of it)
"ratio" was chosen by measuring the router's gradient at initialisation (docs/routers.md): it matches `topk`'s
at the same top_k for E = 4, 16 and 64, where "offset" falls as 1/E. The slot weights of "ratio" and "offset"
sum to 1 already, so `normalize` only acts with "prob". With top_k = 1 there is no continuous slot (k_c = 0):
the router is the discrete path alone, weight 1, as with `discrete_only`.
Gradients: the experts read x, not the quantised vector, so the LM loss reaches neither the codebook nor z through
the discrete path (the discrete expert's weight g_d does not depend on them either); it trains the experts, the
mixing gate and the continuous router. The codebook learns from EMA updates (or its loss with `ema=False`), z
from the commitment term only.
Losses: codebook MSE(c, z.detach()) + beta * commitment MSE(c.detach(), z), times vq_coef; the continuous
router's balance and z-losses. With `ema=True` (the default) the codebook is a buffer updated by exponential
moving averages of its tokens instead of the codebook loss.
Defaults beyond the paper (see docs/routers.md for the measurements): EMA codebook, k-means initialisation
on the first training batch, beta = 0, slot weights summing to 1, and restarts of codes unused for 10
training steps. The experts read x itself, so the commitment term's only effect is to pull the MoE input
toward its code, which the model satisfies by shrinking its pre-MoE norm gain.
Balancing (megavq.moe.routers.balance): the balancing options act on the continuous router (with top_k = 1 there is
none, and they are refused).
Balancing of the discrete path (`code_bias_rate` > 0; default off): a per-code bias b (persistent, fp32, no
gradient) subtracted from the squared distances for the choice of code, argmin_j ||z - c_j||^2 - b_j, moved after each
optimizer step by code_bias_rate * sign(mean count - count_j) with the step's code counts over all ranks (as the
expert bias of megavq.moe.routers.balance; the rate is in squared-distance units). It touches neither the codebook
updates' statistics beyond which code a token takes nor any gradient.
Codebook upkeep runs in training only, after the optimizer step: forward quantizes against the codebook as
it stood when the step began and records the code counts, the code sums and a few random inputs (`observing`);
`post_step()` then updates the EMA codebook and the usage counters once per optimizer step (so dead-code
restarts count optimizer steps, whatever the gradient accumulation) and restarts dead codes from the recorded
inputs. Only the k-means start runs inside forward, once, before the first use. In a distributed run the
statistics are summed over ranks and new codes come from rank 0, so the replicas of the router stay identical.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError
from megavq.moe.routers.base import (BALANCE_OPTIONS, FP32Linear, HealthLimits, Router, RouterOutput, from_rank0,
                                     own_balance, register, routing_metrics, sum_over_ranks)
from megavq.moe.routers.topk import TopKRouter
from megavq.moe.routers.xmoe import XMoERouter


CONTINUOUS_WEIGHTS = ("ratio", "offset", "prob")


def nearest_code(z_NC: torch.Tensor, codebook_QC: torch.Tensor, bias_Q: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_j ||z - c_j||^2 (- bias_j) for every row, (N,) int64."""
    with torch.no_grad():
        z, c = z_NC.float(), codebook_QC.float()
        dist_NQ = z.pow(2).sum(-1, keepdim=True) - 2 * z @ c.t() + c.pow(2).sum(-1)
        return (dist_NQ if bias_Q is None else dist_NQ - bias_Q).argmin(dim=-1)


def kmeans(z_NC: torch.Tensor, num_codes: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means from randomly chosen rows (with replacement if N < Q); empty clusters keep their centre."""
    z = z_NC.detach().float()
    g = torch.Generator().manual_seed(seed)
    N = z.shape[0]
    if N >= num_codes:
        rows = torch.randperm(N, generator=g)[:num_codes]
    else:
        rows = torch.randint(N, (num_codes,), generator=g)
    centres_QC = z[rows.to(z.device)].clone()
    for _ in range(iters):
        codes_N = nearest_code(z, centres_QC)
        sums_QC = torch.zeros_like(centres_QC).index_add_(0, codes_N, z)
        counts_Q = torch.bincount(codes_N, minlength=num_codes)
        filled = counts_Q > 0
        centres_QC[filled] = sums_QC[filled] / counts_Q[filled, None]
    return centres_QC


@register("vq")
class VQRouter(Router):
    state = ("codebook", "ema_count", "ema_sum", "unused_steps", "initialized")
    eval_variants = {"discrete_only": {"discrete_only": True}}  # one expert per token, by code
    legacy_options = {"continuous_weight": "prob"}  # runs saved before the option existed
    init_from_data_needed = True  # k-means codebook from the dense model's hidden states when upcycling
    needs_seq_len = True  # for the continuous router's balance_scope=sequence
    balance_options = tuple(BALANCE_OPTIONS)  # passed to the continuous router
    learned_buffers = ("codebook", "code_map", "initialized")  # the codebook kept by EMA, and where codes point

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, num_codes: int = 0, code_dim: int = 0,
                 discrete_only: bool = False, vq_coef: float = 0.08, beta: float = 0.0, ema: bool = True,
                 ema_decay: float = 0.99, dead_code_steps: int = 10, restart_dead_codes: bool = True,
                 codebook_init: str = "kmeans", continuous: str = "topk", normalize: bool = True,
                 balance_coef: float = 0.01, z_loss_coef: float = 1e-3, continuous_weight: str = "ratio",
                 code_bias_rate: float = 0.0,
                 **balance):
        super().__init__(hidden_size, num_experts, top_k)
        self._check_options(num_codes, code_dim, ema_decay, dead_code_steps, codebook_init, continuous)
        if continuous_weight not in CONTINUOUS_WEIGHTS:
            raise ConfigError(f"vq: continuous_weight must be one of {CONTINUOUS_WEIGHTS}, got {continuous_weight!r}")
        if code_bias_rate < 0:
            raise ConfigError(f"vq: code_bias_rate must be >= 0 (0 = off), got {code_bias_rate}")
        self.continuous_weight, self.code_bias_rate = continuous_weight, code_bias_rate
        Q, C = num_codes or num_experts, code_dim or hidden_size
        self.num_codes, self.discrete_only = Q, discrete_only
        self.vq_coef, self.beta, self.ema, self.ema_decay = vq_coef, beta, ema, ema_decay
        self.dead_code_steps, self.restart_dead_codes = dead_code_steps, restart_dead_codes
        self.proj = FP32Linear(hidden_size, C, bias=False) if code_dim else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=1 / math.sqrt(hidden_size))
        codebook_QC = torch.randn(Q, C)  # the scale of normalised hidden states
        if ema:
            self.register_buffer("codebook", codebook_QC)
            self.register_buffer("ema_count", torch.ones(Q))
            self.register_buffer("ema_sum", codebook_QC.clone())
        else:
            self.codebook = nn.Parameter(codebook_QC)
        self.register_buffer("code_map", torch.arange(Q) % num_experts)
        self.register_buffer("unused_steps", torch.zeros(Q, dtype=torch.long))  # optimizer steps since last use
        self.register_buffer("initialized", torch.tensor(codebook_init == "random"))
        if code_bias_rate > 0:
            self.register_buffer("code_bias", torch.zeros(Q))
        self.initialized_seen = False  # `initialized` was found True (reset when a state dict is loaded)
        self.observed = None  # (code counts (Q,), code sums (Q, C), Q random inputs (Q, C)) since the last post_step
        self.num_continuous, self.normalize = top_k - 1, normalize
        if self.num_continuous > 0:  # kept under discrete_only too, so checkpoints load either way
            k_c = self.num_continuous
            if continuous == "topk":
                self.continuous = TopKRouter(hidden_size, num_experts, k_c, normalize=k_c > 1,
                                             balance_coef=balance_coef, z_loss_coef=z_loss_coef,
                                             **own_balance("vq", TopKRouter, balance))
            else:
                self.continuous = XMoERouter(hidden_size, num_experts, k_c, normalize=k_c > 1,
                                             balance_coef=balance_coef, **own_balance("vq", XMoERouter, balance))
            self.mix = FP32Linear(hidden_size, 2)
            nn.init.normal_(self.mix.weight, std=0.02)
            nn.init.zeros_(self.mix.bias)
        else:
            own_balance("vq", Router, balance)  # no continuous router (top_k = 1): every balancing option at its default

    @staticmethod
    def _check_options(num_codes, code_dim, ema_decay, dead_code_steps, codebook_init, continuous) -> None:
        if num_codes < 0 or code_dim < 0 or dead_code_steps < 0:
            raise ConfigError(f"vq: num_codes, code_dim and dead_code_steps must be >= 0, "
                              f"got {num_codes}, {code_dim}, {dead_code_steps}")
        if not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"vq: ema_decay must be in (0, 1), got {ema_decay}")
        if codebook_init not in ("random", "kmeans"):
            raise ConfigError(f"vq: codebook_init must be 'random' or 'kmeans', got {codebook_init!r}")
        if continuous not in ("topk", "xmoe"):
            raise ConfigError(f"vq: continuous must be 'topk' or 'xmoe', got {continuous!r}")

    # ---- the codebook statistics stay fp32: an EMA step of 1 - ema_decay = 0.01 is below bf16's resolution ----
    FP32_STATE = ("codebook", "ema_count", "ema_sum", "code_bias")  # buffers when ema=True (code_bias: when on)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.code_bias_rate > 0:  # weights saved without the code bias load with it at 0
            state_dict.setdefault(prefix + "code_bias", torch.zeros_like(self.code_bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.initialized_seen = False

    def _apply(self, fn, recurse=True):
        """Module casts (model.bfloat16(), model.to(dtype)) leave the codebook statistics fp32 and exact; devices
        still follow."""
        before = {k: self._buffers[k] for k in self.FP32_STATE if k in self._buffers}
        super()._apply(fn, recurse)
        for k, b in before.items():
            if self._buffers[k].dtype != torch.float32:
                self._buffers[k] = b.to(self._buffers[k].device, torch.float32)
        return self

    def _restore_fp32(self) -> None:
        """Back to fp32 before any update, should a cast have bypassed _apply (DeepSpeed's data_types.buffer_dtype
        assigns buffer.data directly): the values were rounded once, the updates are not."""
        for k in self.FP32_STATE:
            b = self._buffers.get(k)
            if b is not None and b.dtype != torch.float32:
                self._buffers[k] = b.float()

    # ---- the discrete path --------------------------------------------------------------------------
    def project(self, x_ND: torch.Tensor) -> torch.Tensor:
        x = x_ND.float()
        return x if self.proj is None else self.proj(x)

    def quantize(self, z_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes_N, z_q, codebook + beta * commitment loss). z_q has the code's value and an identity gradient into
        z, but nothing downstream reads it (the experts read x): it only gives the metric quant_error."""
        codes_N = nearest_code(z_NC, self.codebook, self._buffers.get("code_bias"))
        c_NC = self.codebook.float()[codes_N]
        loss = self.beta * F.mse_loss(c_NC.detach(), z_NC)
        if not self.ema:
            loss = loss + F.mse_loss(c_NC, z_NC.detach())
        z_q = z_NC + (c_NC - z_NC).detach()  # forward: the code; backward: identity into z
        return codes_N, z_q, loss

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        x_TD = x_TD.float()
        z_TC = self.project(x_TD)
        if self.training and not self.initialized_seen:  # the flag read once, not at every forward (a host sync)
            if not self.initialized:
                self._init_codebook(z_TC.detach())
            self.initialized_seen = True
        codes_T, z_q, vq_loss = self.quantize(z_TC)
        if self.observing:
            self._observe(z_TC.detach(), codes_T)
        expert_T = self.code_map[codes_T]
        if self.discrete_only or self.num_continuous == 0:
            r = self._discrete_routing(expert_T)
        else:
            r = self._mixed_routing(x_TD, expert_T, seq_len)
        r = r._replace(aux_loss=r.aux_loss + self.vq_coef * vq_loss)
        r.metrics.update(self._code_metrics(codes_T), vq_loss=vq_loss.detach(),
                         quant_error=(z_q - z_TC).detach().pow(2).mean())  # z_q - z = c - z
        return r

    def _discrete_routing(self, expert_T: torch.Tensor) -> RouterOutput:
        indices_TK = expert_T[:, None]
        probs_TE = F.one_hot(expert_T, self.num_experts).float()
        weights_TK = torch.ones(indices_TK.shape, device=expert_T.device)
        return RouterOutput(weights_TK, indices_TK, probs_TE, probs_TE.new_zeros(()),
                            routing_metrics(indices_TK, probs_TE))

    def _mixed_routing(self, x_TD: torch.Tensor, expert_T: torch.Tensor, seq_len: int | None) -> RouterOutput:
        cont = self.continuous(x_TD, seq_len)
        g_T2 = self.mix(x_TD).softmax(dim=-1)  # [g_c, g_d]
        weights_TK = torch.cat([g_T2[:, :1] * self._continuous_weights(cont.weights), g_T2[:, 1:]], dim=1)
        if self.normalize and self.continuous_weight == "prob":  # the other forms sum to 1 already
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        indices_TK = torch.cat([cont.indices, expert_T[:, None]], dim=1)
        metrics = routing_metrics(indices_TK, cont.scores)
        metrics.update({k: v for k, v in cont.metrics.items()
                        if k in ("balance_loss", "z_loss", "temperature", "bias_min", "bias_max", "bias_mean")},
                       gate_discrete=g_T2[:, 1].mean().detach())
        return RouterOutput(weights_TK, indices_TK, cont.scores, cont.aux_loss, metrics)

    def _continuous_weights(self, w_TK: torch.Tensor) -> torch.Tensor:
        """What multiplies g_c in the continuous slots. With k_c > 1: the continuous router's top-k_c weights
        (renormalised, summing to 1). With k_c = 1 its single weight is the full-softmax probability p of the
        chosen expert, and `continuous_weight` says what stands in for it: "ratio" p / p.detach() (value 1, the
        gradient of log p), "offset" 1 + p - p.detach() (value 1, the gradient of p), "prob" p itself."""
        if self.num_continuous > 1 or self.continuous_weight == "prob":
            return w_TK
        if self.continuous_weight == "ratio":
            return w_TK / w_TK.detach()
        return 1 + w_TK - w_TK.detach()

    # ---- codebook upkeep -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_ND: torch.Tensor, seed: int = 0, iters: int = 10) -> float:
        """Set the codebook to k-means centres of hidden states x_ND (e.g. a dense model's, when upcycling);
        returns the fraction of codes that are the nearest code of at least one row."""
        z_NC = self.project(x_ND)
        self._set_codes(torch.arange(self.num_codes), kmeans(z_NC, self.num_codes, iters, seed))
        self.initialized.fill_(True)
        return nearest_code(z_NC, self.codebook).unique().numel() / self.num_codes

    @torch.no_grad()
    def init_from_routing(self, x_ND: torch.Tensor, weights_NE: torch.Tensor, seed: int = 0) -> float:
        """k-means codebook of x_ND, each code pointing to the expert with the largest total weight over its cell
        (codes with an empty cell keep theirs); returns the fraction of rows whose code's expert is their own
        top-1 expert."""
        self.init_from_data(x_ND, seed)
        codes_N = nearest_code(self.project(x_ND), self.codebook)
        cell_QE = torch.zeros(self.num_codes, self.num_experts).index_add_(0, codes_N.cpu(), weights_NE.float().cpu())
        filled_Q = cell_QE.sum(-1) > 0
        self.code_map.copy_(torch.where(filled_Q, cell_QE.argmax(-1), self.code_map.cpu()).to(self.code_map.device))
        return (self.code_map[codes_N] == weights_NE.argmax(-1).to(codes_N.device)).float().mean().item()

    @torch.no_grad()
    def _set_codes(self, codes: torch.Tensor, values_NC: torch.Tensor) -> None:
        self._restore_fp32()
        codes = codes.to(self.codebook.device)
        self.codebook[codes] = values_NC.to(self.codebook.dtype)
        if self.ema:
            self.ema_sum[codes] = values_NC.to(self.ema_sum.dtype)
            self.ema_count[codes] = 1.0
        self.unused_steps[codes] = 0

    @torch.no_grad()
    def _init_codebook(self, z_TC: torch.Tensor) -> None:
        """k-means centres of the first training batch (rank 0's), before the codebook is first used."""
        self._set_codes(torch.arange(self.num_codes), from_rank0(kmeans(z_TC, self.num_codes)))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _observe(self, z_TC: torch.Tensor, codes_T: torch.Tensor) -> None:
        """Add this forward's code counts and sums to the step's; the step's first forward also keeps Q of its
        inputs for restarts (rank 0's first micro-batch whatever the layout: the same rows at any rank count)."""
        count_Q = torch.bincount(codes_T, minlength=self.num_codes).float()
        sum_QC = count_Q.new_zeros(())  # the codebook learns from its loss: no sums needed
        if self.ema:
            sum_QC = torch.zeros(self.num_codes, z_TC.shape[1], device=z_TC.device).index_add_(0, codes_T, z_TC)
        if self.observed is None:
            rows_Q = torch.randint(z_TC.shape[0], (self.num_codes,), device=z_TC.device,
                                   generator=self.generator(z_TC.device))
            self.observed = (count_Q, sum_QC, z_TC[rows_Q])
        else:
            self.observed = (count_Q + self.observed[0], sum_QC + self.observed[1], self.observed[2])

    @torch.no_grad()
    def post_step(self) -> None:
        """Usage counters, EMA statistics over the tokens of all ranks, then restarts of codes dead for
        dead_code_steps optimizer steps from recorded inputs (rank 0's), so that replicas stay identical; the
        continuous router's post_step first."""
        super().post_step()
        if self.observed is None:
            return
        self._restore_fp32()
        count_Q, sum_QC, recent_QC = self.observed
        self.observed = None
        count_Q = sum_over_ranks(count_Q)
        if self.code_bias_rate > 0:
            self.code_bias.add_(self.code_bias_rate * torch.sign(count_Q.mean() - count_Q))
        self.unused_steps.copy_(torch.where(count_Q > 0, 0, self.unused_steps + 1))
        if self.ema:
            d = self.ema_decay
            self.ema_count.mul_(d).add_((1 - d) * count_Q.to(self.ema_count.dtype))
            self.ema_sum.mul_(d).add_((1 - d) * sum_over_ranks(sum_QC).to(self.ema_sum.dtype))
            n = self.ema_count.sum()
            smoothed_Q = (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n  # Laplace smoothing
            self.codebook.copy_(self.ema_sum / smoothed_Q[:, None])
        if self.restart_dead_codes and self.dead_code_steps:  # masked, not indexed: no host sync
            dead_Q = self.unused_steps >= self.dead_code_steps  # the same on every rank
            nth_Q = (dead_Q.long().cumsum(0) - 1).clamp(min=0)  # the n-th dead code takes the n-th recorded input
            values_QC = from_rank0(recent_QC.contiguous())[nth_Q].to(self.codebook.dtype)
            self.codebook.copy_(torch.where(dead_Q[:, None], values_QC, self.codebook))
            if self.ema:
                self.ema_sum.copy_(torch.where(dead_Q[:, None], values_QC.to(self.ema_sum.dtype), self.ema_sum))
                self.ema_count.masked_fill_(dead_Q, 1.0)
            self.unused_steps.masked_fill_(dead_Q, 0)

    def _code_metrics(self, codes_T: torch.Tensor) -> dict:
        with torch.no_grad():
            hist_Q = torch.bincount(codes_T, minlength=self.num_codes).float()
            p = hist_Q / hist_Q.sum().clamp(min=1)
            perplexity = torch.exp(-(p * p.clamp(min=1e-12).log()).sum())
            unused = (hist_Q == 0).sum().float()
            dead = (self.unused_steps >= self.dead_code_steps).sum().float() if self.dead_code_steps else unused
            out = {"code_perplexity": perplexity, "dead_codes": dead, "unused_codes": unused}
            if self.code_bias_rate > 0:
                b = self.code_bias
                out.update(code_bias_min=b.min(), code_bias_max=b.max(), code_bias_mean=b.mean())
            return out

    # ---- declarations: evaluation and health ------------------------------------------------------------
    @property
    def experts_per_token(self) -> float:
        return 1.0 if self.discrete_only or self.num_continuous == 0 else float(self.top_k)

    @property
    def sweeps_top_k(self) -> bool:
        return False  # its slots are fixed when built (k_c + 1); evaluated with discrete_only instead

    def view(self, x_TD: torch.Tensor) -> tuple[str, torch.Tensor]:
        z_TC, c_QC = self.project(x_TD), self.codebook.float()
        neg_dist_TQ = -(z_TC.pow(2).sum(-1, keepdim=True) - 2 * z_TC @ c_QC.t() + c_QC.pow(2).sum(-1))
        if self.code_bias_rate > 0:
            return "negative squared distances plus the code bias -|z - c_j|^2 + b_j, (T, codes)", \
                neg_dist_TQ + self.code_bias
        return "negative squared distances to the codes -|z - c_j|^2, (T, codes)", neg_dist_TQ

    def health(self, metrics: dict, limits: HealthLimits) -> dict[str, str | None]:
        return {**super().health(metrics, limits), "codes": self._code_problem(metrics, limits),
                "gate": gate_problem(metrics.get("gate_discrete"), limits.share)}

    def _code_problem(self, metrics: dict, limits: HealthLimits) -> str | None:
        """Too many dead codes, or a codebook collapsed onto few codes while the others are used just often
        enough never to count as dead (code perplexity below code_usage_min of the codes)."""
        Q, dead, perplexity = self.num_codes, metrics.get("dead_codes"), metrics.get("code_perplexity")
        if dead is not None and dead / Q > limits.dead_code_frac:
            return f"{dead:.0f} of {Q} vq codes are dead (train.dead_code_frac={limits.dead_code_frac})"
        if perplexity is not None and perplexity < limits.code_usage_min * Q:
            return f"vq code perplexity {perplexity:.2f} of {Q} codes (train.code_usage_min={limits.code_usage_min})"
        return None


def gate_problem(g: float | None, share: float) -> str | None:
    """The mixing gate gives one path (discrete or continuous) more than `share` of its weight on average: the
    layer then runs top_k experts and uses one path's."""
    if g is None or max(g, 1 - g) <= share:
        return None
    path = "discrete" if g > 0.5 else "continuous"
    return f"the vq mixing gate gives the {path} path {max(g, 1 - g):.0%} of its weight (train.collapse_share={share})"
