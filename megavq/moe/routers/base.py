"""The router contract, what every router declares about itself, and the registry of routers by name.

Legend: T tokens, D hidden size, E experts, K slots per token.
A router maps x_TD to a RouterOutput. Slots a router does not use carry index -1 and weight 0.
All routing math runs in fp32 whatever the model dtype.

Declarations (class attributes and methods of `Router`; the MoE layer, the start-up validation, evaluation,
health checks and export read them, and nothing outside this package tests a router's name):
  layer_kind            "token": the MoE layer routes tokens to experts; "slots": experts run on Soft MoE slots
  causal, is_causal()   a token's routing depends on no later token (is_causal(options) where an option decides)
  needs_seq_len         forward takes `seq_len=` (it routes within sequences)
  needs_expert_outputs  forward takes `expert_fn=`, which returns every expert on every token, (E, T, D)
  state                 the buffers post_step() updates: router state kept across optimizer steps
  eval_variants         {name: attribute overrides} that evaluation runs apart (vq's discrete_only)
  hf_routing()          how Hugging Face's softmax top-k MoE (Mixtral, Qwen2-MoE) reproduces the evaluation-time
                        routing, or None; hf_import: the router Hugging Face MoE models are imported with
  balance_options       the balancing options (BALANCE_OPTIONS, megavq.moe.routers.balance) it takes, and
  balance_refusal       why it takes no others (the one-line error for an option it refuses)
  health(), view(), experts_per_token: diagnostics; init_from_data() (init_from_data_needed): upcycling
  learned_buffers       buffers that hold what the router learned, beside its parameters (vq's codebook): a router
                        put on a trained model without them routes at random; init_from_routing() builds them
                        from hidden states and another router's choices (router swap)

Router state changes after the optimizer step, never inside forward: a router that keeps state records what
forward observed (only in training mode, and not while a forward is recomputed for activation checkpointing:
`observing`), and `post_step()` applies it once per optimizer step on every rank. A one-time lazy
initialisation before first use (vq's k-means start) is allowed. Random draws in forward come from
`generator()`, keyed by (seed, step, layer, micro-batch): a recomputed forward draws the same numbers.
Router.post_step() calls post_step() of its child modules that have one (the balancing component, vq's continuous
router): a router that overrides it calls super().post_step().
`place()` tells a router its layer, the seed and the run's length (train.max_steps, through the MoESpec), so that
a schedule can be a fraction of the run (compete's warmup_frac); `set_step()` the step about to run.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError
from megavq.moe.registry import Registry

ROUTERS = Registry("router", "router")
_RECOMPUTING = contextvars.ContextVar("megavq_recomputing", default=False)
_MASK64 = (1 << 64) - 1
# The balancing options of routers that score experts per token (megavq.moe.routers.balance), with their defaults:
# today's Switch loss per micro-batch on softmax scores, no bias.
BALANCE_OPTIONS = {"balance_scope": "micro_batch", "bias_rate": 0.0, "bias_centre": False, "score": "softmax",
                   "route_scale": 1.0, "groups": 0, "group_top": 0}


class RouterOutput(NamedTuple):
    """What a router returns. A NamedTuple, so that DeepSpeed's ZeRO-3 hooks see the tensors inside it
    (and re-gather the router's parameters for the backward pass)."""
    weights: torch.Tensor  # (T, K) fp32, >= 0
    indices: torch.Tensor  # (T, K) int64 in [0, E), or -1 for an unused slot
    scores: torch.Tensor  # (T, E) probability-like, for balance statistics
    aux_loss: torch.Tensor  # scalar, coefficients applied
    metrics: dict  # detached tensors for logging


class HealthLimits(NamedTuple):
    """Thresholds of the training-time collapse checks (train.collapse_share, dead_code_frac, code_usage_min)."""
    share: float = 0.9
    dead_code_frac: float = 0.5
    code_usage_min: float = 0.5


def is_recomputing() -> bool:
    """Whether the forward running now is a recomputation (activation checkpointing)."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def recomputing():
    """Forwards run inside this context are recomputations (activation checkpointing): routers observe nothing."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def mix64(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained): the same on every rank and in every process."""
    h = 0
    for v in values:
        h = ((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """In a distributed run, the sum over all ranks (routers are replicated on every rank), in place."""
    if distributed():
        dist.all_reduce(t)
    return t


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """In a distributed run, rank 0's value on every rank, in place."""
    if distributed():
        dist.broadcast(t, src=0)
    return t


class Router(nn.Module):
    """Base class. Subclasses implement `forward(x_TD, [seq_len=], [expert_fn=]) -> RouterOutput` and declare
    what differs from the defaults below (see the module docstring)."""

    name: ClassVar[str]
    layer_kind: ClassVar[str] = "token"
    causal: ClassVar[bool] = True
    needs_seq_len: ClassVar[bool] = False
    needs_expert_outputs: ClassVar[bool] = False
    state: ClassVar[tuple[str, ...]] = ()
    eval_variants: ClassVar[dict[str, dict]] = {}
    hf_import: ClassVar[bool] = False
    legacy_options: ClassVar[dict] = {}  # options whose default changed, with the value saved runs that do not
    #                                      record them were trained with (see recorded_options)
    init_from_data_needed: ClassVar[bool] = False  # upcycling must give calibration data (init_from_data)
    balance_options: ClassVar[tuple[str, ...]] = ()  # the BALANCE_OPTIONS it takes (passed as **balance)
    balance_refusal: ClassVar[str] = "it scores no experts per token"  # why it takes no other balancing option
    learned_buffers: ClassVar[tuple[str, ...]] = ()  # learned state kept in buffers (see learned_tensors)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.layer_index, self.num_moe_layers, self.seed, self.max_steps = 0, 1, 0, 0
        self.step, self.micro_batch = 0, 0

    @classmethod
    def is_causal(cls, options: dict) -> bool:
        """Whether a router built with these options is causal (checked before any router is built)."""
        return cls.causal

    # ---- what the MoE layer and the trainer call --------------------------------------------------------
    def route(self, x_TD: torch.Tensor, seq_len: int | None = None, expert_fn=None) -> RouterOutput:
        """forward with the inputs this router declares it needs."""
        kwargs = {}
        if self.needs_seq_len:
            kwargs["seq_len"] = seq_len
        if self.needs_expert_outputs:
            kwargs["expert_fn"] = expert_fn
        return self(x_TD, **kwargs)

    def place(self, layer_index: int, num_moe_layers: int, seed: int, max_steps: int = 0) -> None:
        """Its index among the model's MoE layers, their number, the seed of its random draws, and the run's length
        in optimizer steps (train.max_steps; 0 = unknown), for schedules given as fractions of the run."""
        assert 0 <= layer_index < num_moe_layers, (layer_index, num_moe_layers)
        self.layer_index, self.num_moe_layers, self.seed = layer_index, num_moe_layers, seed
        self.max_steps = max_steps

    def set_step(self, step: int, micro_batch: int = 0) -> None:
        """The optimizer step about to run and the global index of this rank's micro-batch within it."""
        self.step, self.micro_batch = step, micro_batch

    def post_step(self) -> None:
        """Apply what forward observed since the last call (once per optimizer step, on every rank): here, the
        post_step of the child modules that have one."""
        for child in self.children():
            if callable(getattr(child, "post_step", None)):
                child.post_step()

    @property
    def observing(self) -> bool:
        """Whether forward records observations: training mode, and not a recomputed forward."""
        return self.training and not is_recomputing()

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator keyed by (seed, step, layer, micro-batch) for random draws in forward."""
        key = mix64(self.seed, self.step, self.layer_index, self.micro_batch) & ((1 << 63) - 1)
        return torch.Generator(device=device).manual_seed(key)

    # ---- evaluation, health checks, export, calibration -------------------------------------------------
    @property
    def experts_per_token(self) -> float:
        """Experts that compute on a token (mean for routers that give tokens 0..E experts: see metrics)."""
        return float(self.top_k)

    @property
    def sweeps_top_k(self) -> bool:
        """Whether evaluation may change top_k: causal token choice with top_k experts per token."""
        return self.layer_kind == "token" and self.causal

    def view(self, x_TD: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(what it is, (T, R) scores the router ranks its choices by) for diagnostics; None: its output scores."""
        gate = self._modules.get("gate")
        if isinstance(gate, nn.Linear):
            return "logits x W_g^T, (T, E)", gate(x_TD)
        return None

    def health(self, metrics: dict, limits: HealthLimits) -> dict[str, str | None]:
        """{check: problem or None} from one layer's logged metrics (keys without the moe/L{i}/ prefix)."""
        return {"load": load_problem(metrics.get("load"), metrics.get("experts_per_token", self.experts_per_token),
                                     limits.share)}

    def hf_routing(self) -> dict | None:
        """{"normalize": bool, "jitter": float} when Hugging Face's softmax top-k MoE routes as this router does at
        evaluation (same logits, same top-k, same weights); None otherwise."""
        return None

    def init_from_data(self, x_ND: torch.Tensor, seed: int = 0) -> float | None:
        """Initialise from hidden states entering the layer (upcycling); the fraction of codes used, or None
        when the router does not initialise from data."""
        return None

    def learned_tensors(self) -> list[str]:
        """State-dict names of what training taught the router: its parameters and its learned buffers."""
        return [n for n, _ in self.named_parameters()] + [n for n in self.learned_buffers if n in self._buffers]

    def init_from_routing(self, x_ND: torch.Tensor, weights_NE: torch.Tensor, seed: int = 0) -> float | None:
        """Build the learned buffers from hidden states x_ND and another router's routing weights of them, (N, E)
        (router swap; parameters are fitted by gradient steps afterwards); a figure of the fit, or None."""
        return None


def load_problem(load: list | None, slots_per_token: float, share: float) -> str | None:
    """One expert receives more than `share` of the tokens: its fraction of routed slots times slots per token.

    For top-k the largest share an expert can reach is 1 (every token); layers where every token uses every
    expert (k >= E) are skipped."""
    if load is None or slots_per_token >= len(load):
        return None
    top = max(range(len(load)), key=lambda e: load[e])
    token_share = min(1.0, load[top] * slots_per_token)
    if token_share <= share:
        return None
    return f"expert {top} gets {token_share:.0%} of the tokens (train.collapse_share={share})"


class FP32Linear(nn.Linear):
    """A linear map computed in fp32 whatever the parameters' dtype: routing math runs in fp32.

    Routers call it as a module (never read its weight directly), so that ZeRO-3 gathers the weight for
    the forward and the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def linear_gate(hidden_size: int, num_experts: int) -> FP32Linear:
    """The router's gate W_g (E, D): no bias, normal std 0.02."""
    gate = FP32Linear(hidden_size, num_experts, bias=False)
    nn.init.normal_(gate.weight, std=0.02)
    return gate


def top_k_weights(probs_TE: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k), indices (T, k)): the top-k probabilities, divided by their sum when `normalize`."""
    weights_TK, indices_TK = probs_TE.topk(k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK, indices_TK


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    return logits_TE.logsumexp(-1).pow(2).mean()


register = ROUTERS.register


def available_routers() -> list[str]:
    return ROUTERS.names()


def router_class(name: str) -> type[Router]:
    return ROUTERS.get(name)


def option_names(name: str) -> list[str]:
    """The options a router takes (its constructor's parameters beyond the shape, and its balancing options)."""
    cls = router_class(name)
    params = inspect.signature(cls.__init__).parameters
    own = [p for p, v in params.items() if p not in ("self", "hidden_size", "num_experts", "top_k")
           and v.kind != inspect.Parameter.VAR_KEYWORD]
    return own + list(cls.balance_options)


DERIVED_OPTIONS = ("balance_coef", "z_loss_coef")  # taken from moe.aux_loss_coef / moe.z_loss_coef unless given


def recorded_options(name: str, options: dict, saved: bool = False) -> dict:
    """Every option of router `name` with its value: `options`, else the default. A saved configuration records
    them all, so that changing a default later does not change what a saved run means. With saved=True
    (`options` read from a run saved before options were recorded in full) a missing option whose default has
    changed since takes the value it had then (the router's `legacy_options`)."""
    params = inspect.signature(router_class(name).__init__).parameters
    defaults = {k: params[k].default if k in params else BALANCE_OPTIONS[k] for k in option_names(name)
                if k not in DERIVED_OPTIONS}
    if saved:
        defaults.update(router_class(name).legacy_options)
    return {**defaults, **options}


def own_balance(name: str, cls: type[Router], balance: dict) -> dict:
    """The balancing options of `balance` that router class `cls` takes (for a router built inside another, as vq's
    continuous router); one it does not take is refused unless it has its default value."""
    for k, v in balance.items():
        if k not in cls.balance_options and v != BALANCE_OPTIONS[k]:
            raise ConfigError(f"{name}: {k}={v!r} does not apply: {cls.balance_refusal}")
    return {k: v for k, v in balance.items() if k in cls.balance_options}


def build_router(name: str, hidden_size: int, num_experts: int, top_k: int, **options) -> Router:
    cls = router_class(name)
    unknown = [k for k in options if k not in option_names(name)]
    if unknown and unknown[0] in BALANCE_OPTIONS:
        raise ConfigError(f"router '{name}' takes no {unknown[0]!r}: {cls.balance_refusal}")
    if unknown:
        raise ConfigError(f"router '{name}' has no option {unknown[0]!r} (valid: {option_names(name)})")
    return cls(hidden_size=hidden_size, num_experts=num_experts, top_k=top_k, **options)


def hf_router_name() -> str:
    """The router that Hugging Face's softmax top-k MoE models (Mixtral, Qwen2-MoE) are imported with."""
    return next(name for name in available_routers() if router_class(name).hf_import)


def expert_keys(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The flat expert id of every (token, slot), unused slots (-1) keyed num_experts: they sort last and a
    bincount of minlength E + 1 counts them apart. No host sync (a boolean-mask index would wait for its count)."""
    return torch.where(indices_TK >= 0, indices_TK, num_experts).reshape(-1)


def expert_counts(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed (token, slot) pairs per expert, int64 (E,); unused slots (-1) not counted."""
    return torch.bincount(expert_keys(indices_TK, num_experts), minlength=num_experts + 1)[:num_experts]


def switch_loss(counts_E: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e the fraction of the routed (token, slot) pairs `counts_E` counts that chose e (no
    gradient), P_e the mean of probs_TE[:, e] over tokens."""
    f_E = counts_E.float() / counts_E.sum().clamp(min=1)
    return probs_TE.shape[-1] * (f_E * probs_TE.float().mean(0)).sum()


def load_balance_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """Switch balance loss E * sum_e f_e * P_e; f_e over routed (token, slot) pairs, P_e mean probability."""
    return switch_loss(expert_counts(indices_TK, probs_TE.shape[-1]), probs_TE)


def load_metrics(load_E: torch.Tensor, probs: torch.Tensor) -> dict:
    """Expert load (fractions summing to 1), its coefficient of variation and max/mean, and the entropy of the
    routing distribution `probs` (..., E or slots), averaged over tokens. No gradient."""
    with torch.no_grad():
        p = probs.float().clamp(min=1e-12)
        return {
            "load": load_E,
            "load_cv": load_E.std(unbiased=False) / load_E.mean().clamp(min=1e-12),
            "load_max": load_E.max() * load_E.numel(),
            "entropy": -(p * p.log()).sum(-1).mean(),
        }


def routing_metrics(indices_TK: torch.Tensor, probs_TE: torch.Tensor) -> dict:
    """load_metrics with the load counted over routed (token, slot) pairs."""
    with torch.no_grad():
        counts_E = expert_counts(indices_TK, probs_TE.shape[-1]).float()
        return load_metrics(counts_E / counts_E.sum().clamp(min=1), probs_TE)
