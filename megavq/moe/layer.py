"""The MoE layer: a router and a bank of experts, run by a backend.

Legend: B batch, S sequence, T = B*S tokens, D hidden, E experts, K slots per token.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from megavq.errors import ConfigError
from megavq.config import MoEConfig
from megavq.moe.backends import token_backend
from megavq.moe.experts import Experts
from megavq.moe.routers import Router, build_router, router_class


def router_options(cfg: MoEConfig) -> dict:
    """router_options, with moe.aux_loss_coef / moe.z_loss_coef passed to routers that take them."""
    params = inspect.signature(router_class(cfg.router).__init__).parameters
    opts = dict(cfg.router_options)
    if "balance_coef" in params:
        opts.setdefault("balance_coef", cfg.aux_loss_coef)
    if "z_loss_coef" in params:
        opts.setdefault("z_loss_coef", cfg.z_loss_coef)
    return opts


def layer_router(cfg: MoEConfig, d_model: int) -> Router:
    """The router of an MoE layer of any kind, built from the config."""
    return build_router(cfg.router, hidden_size=d_model, num_experts=cfg.num_experts, top_k=cfg.top_k,
                        **router_options(cfg))


def router_kwargs(router: Router, x_BSD: torch.Tensor, all_experts) -> dict:
    """The keyword arguments a router asks for: expert_fn (competition routing), seq_len (per-sequence routing)."""
    kwargs = {}
    if router.needs_expert_outputs:
        kwargs["expert_fn"] = all_experts
    if getattr(router, "needs_seq_len", False):
        kwargs["seq_len"] = x_BSD.shape[1]
    return kwargs


def router_is_causal(name: str, options: dict) -> bool:
    """A router class's `causal`, or `causal_for(options)` where an option decides it (usmoe's selection)."""
    cls = router_class(name)
    return cls.causal_for(options) if hasattr(cls, "causal_for") else cls.causal


def check_causal(cfg) -> None:
    """Refuse a non-causal router for causal language-model training unless moe.allow_noncausal is set."""
    moe = cfg.moe
    if moe.every == 0 or router_is_causal(moe.router, moe.router_options) or moe.allow_noncausal:
        return
    raise ConfigError(f"moe.router={moe.router} is not causal: a token's routing depends on later tokens of "
                      f"its sequence, which leaks the future into next-token prediction (training loss looks "
                      f"better than any causal model can do); set moe.allow_noncausal=true to run it anyway")


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False,
                 init_std: float = 0.02, out_std: float | None = None, seed: int = 0):
        super().__init__()
        if cfg.ep_size != 1:
            raise ConfigError(f"moe.ep_size={cfg.ep_size} needs an expert-parallel backend; "
                              f"moe.backend={cfg.backend} runs with moe.ep_size=1")
        if getattr(router_class(cfg.router), "layer_kind", "token") != "token":
            raise ConfigError(f"moe.router={cfg.router} is its own layer kind: build it with build_moe_layer")
        self.router = layer_router(cfg, d_model)
        self.experts = Experts(cfg.num_experts, d_model, d_hidden, mlp, bias, init_std, out_std, seed)
        self.backend = cfg.backend
        self.run_experts = token_backend(cfg.backend)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.router(x_TD, **router_kwargs(self.router, x_BSD, lambda: self.experts.all_experts(x_TD)))
        y_TD = self.run_experts(x_TD, r, self.experts)
        return y_TD.view_as(x_BSD), r.aux_loss, r.metrics


def build_moe_layer(cfg: MoEConfig, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False,
                    init_std: float = 0.02, out_std: float | None = None, seed: int = 0) -> nn.Module:
    """The MoE layer for cfg.backend (and cfg.router, for layer-kind routers).

    Every kind has the same interface: `forward(x_BSD) -> (y_BSD, aux_loss, metrics)`.
    """
    args = (cfg, d_model, d_hidden, mlp, bias, init_std, out_std, seed)
    if getattr(router_class(cfg.router), "layer_kind", "token") == "soft":
        if cfg.backend not in ("reference", "native"):
            raise ConfigError(f"moe.router=soft runs on moe.backend=native or reference, got {cfg.backend}")
        from megavq.moe.soft import SoftMoELayer
        return SoftMoELayer(*args)
    if cfg.backend == "deepspeed":
        from megavq.moe.backends.deepspeed import DeepSpeedMoELayer
        return DeepSpeedMoELayer(*args)
    if cfg.backend == "megablocks":
        from megavq.moe.backends.megablocks import MegaBlocksMoELayer
        return MegaBlocksMoELayer(*args)
    if cfg.ep_size > 1:
        if cfg.backend != "native":
            raise ConfigError(f"moe.ep_size={cfg.ep_size} runs on moe.backend=native or deepspeed, got {cfg.backend}")
        from megavq.moe.backends.expert_parallel import ExpertParallelMoELayer
        return ExpertParallelMoELayer(*args)
    return MoELayer(*args)


def assign_moe_layers(model: nn.Module) -> None:
    """Tell each router that schedules per layer (compete) its index among the model's MoE layers and their count."""
    routers = [m.router for m in model.modules() if isinstance(getattr(m, "router", None), Router)]  # one per layer
    for i, router in enumerate(routers):
        if hasattr(router, "set_layer"):
            router.set_layer(i, len(routers))
