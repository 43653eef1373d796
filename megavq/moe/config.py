"""The MoE settings of a model (`moe.*` of a run configuration) and every check of them that needs no world size.

`MoEConfig.check(mlp_bias, zero_stage)` refuses, naming the key, what cannot run: sizes, an unknown router or
backend, router x backend x ep_size (x ZeRO stage when given), the router's own options, a non-causal router for
causal training (unless moe.allow_noncausal).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from megavq.errors import ConfigError, check, check_positive
from megavq.moe.dispatch import available_dispatchers, dispatcher_class, dispatchers_where
from megavq.moe.routers import available_routers, build_router, router_class


@dataclass
class MoEConfig:
    router: str = "topk"
    backend: str = "native"  # reference | native | deepspeed | megablocks
    num_experts: int = 4
    top_k: int = 2
    every: int = 1  # 1 = every layer, 2 = every other starting with the second, 0 = dense
    d_expert: int = 0  # hidden size of one expert; 0 = model.d_ff
    dense_layers: list = field(default_factory=list)  # blocks kept dense among those `every` makes MoE (mlp_only_layers)
    shared_experts: int = 0  # experts every token of an MoE layer goes through, beside the routed ones
    d_shared: int = 0  # hidden size of one shared expert; 0 = the routed experts'
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x W_g) (Qwen2-MoE)
    ep_size: int = 1
    capacity_factor: float = 1.25  # capacity backends only
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    drop_policy: str = "position"  # capacity backends: position (first slots, then token order) | probs
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    allow_noncausal: bool = False
    router_options: dict = field(default_factory=dict)

    def check(self, d_model: int, mlp_bias: bool = False, zero_stage: int | None = None) -> None:
        """Every check of these settings (in a model of width d_model) that does not need the world size."""
        check_positive([(f"moe.{key}", getattr(self, key)) for key in ("num_experts", "top_k", "ep_size")])
        check(self.every >= 0, f"moe.every must be >= 0, got {self.every}")
        check(all(isinstance(i, int) and not isinstance(i, bool) for i in self.dense_layers),
              f"moe.dense_layers must be a list of block indices, got {self.dense_layers!r}")
        check(self.shared_experts >= 0 and self.d_shared >= 0,
              f"moe.shared_experts and moe.d_shared must be >= 0, got {self.shared_experts} and {self.d_shared}")
        check(self.shared_experts > 0 or not self.shared_gate, "moe.shared_gate needs moe.shared_experts > 0")
        check(self.top_k <= self.num_experts, f"moe.top_k ({self.top_k}) exceeds moe.num_experts ({self.num_experts})")
        check(self.num_experts % self.ep_size == 0,
              f"moe.num_experts ({self.num_experts}) must be divisible by moe.ep_size ({self.ep_size})")
        check(self.drop_policy in ("position", "probs"),
              f"moe.drop_policy must be position or probs, got {self.drop_policy!r}")
        check(self.router in available_routers(), f"unknown moe.router '{self.router}' (valid: {available_routers()})")
        check(self.backend in available_dispatchers(),
              f"unknown moe.backend '{self.backend}' (valid: {available_dispatchers()})")
        if self.every == 0:
            return
        check_layer(self, mlp_bias)
        check_causal(self)
        with torch.device("meta"):  # the router's own checks of its options, without allocating anything
            build_router(self.router, d_model, self.num_experts, self.top_k, **router_options(self))
        if zero_stage == 3:
            check_zero3(self)


def router_options(moe: MoEConfig) -> dict:
    """moe.router_options, with moe.aux_loss_coef / moe.z_loss_coef passed to routers that take them."""
    params = inspect.signature(router_class(moe.router).__init__).parameters
    opts = dict(moe.router_options)
    if "balance_coef" in params:
        opts.setdefault("balance_coef", moe.aux_loss_coef)
    if "z_loss_coef" in params:
        opts.setdefault("z_loss_coef", moe.z_loss_coef)
    return opts


def check_layer(moe: MoEConfig, bias: bool = False) -> None:
    """Refuse a router x dispatcher x ep_size combination that cannot run, naming what works."""
    router, disp = router_class(moe.router), dispatcher_class(moe.backend)
    if router.layer_kind not in disp.layer_kinds:
        serving = dispatchers_where(lambda d: router.layer_kind in d.layer_kinds)
        raise ConfigError(f"moe.router={moe.router} runs on moe.backend={' or '.join(serving)} "
                          f"(a {router.layer_kind!r} layer), got moe.backend={moe.backend}")
    if moe.ep_size > 1 and not disp.expert_parallel:
        parallel = dispatchers_where(lambda d: d.expert_parallel)
        raise ConfigError(f"moe.ep_size={moe.ep_size} runs on moe.backend={' or '.join(parallel)}, "
                          f"got moe.backend={moe.backend}")
    if moe.ep_size > 1 and router.layer_kind != "token":
        raise ConfigError(f"moe.router={moe.router} runs with moe.ep_size=1, got {moe.ep_size}")
    if bias and not disp.biases:
        raise ConfigError(f"moe.backend={moe.backend} has no per-expert biases: set model.mlp_bias=false")


def check_causal(moe: MoEConfig) -> None:
    """Refuse a non-causal router for causal language-model training unless moe.allow_noncausal is set."""
    if moe.every == 0 or router_class(moe.router).is_causal(moe.router_options) or moe.allow_noncausal:
        return
    raise ConfigError(f"moe.router={moe.router} is not causal: a token's routing depends on later tokens of "
                      f"its sequence, which leaks the future into next-token prediction (training loss looks "
                      f"better than any causal model can do); set moe.allow_noncausal=true to run it anyway")


def check_zero3(moe: MoEConfig) -> None:
    """ZeRO-3 partitions every parameter: only dispatchers that declare `zero3`, with ep_size 1."""
    if moe.ep_size == 1 and dispatcher_class(moe.backend).zero3:
        return
    zero3 = dispatchers_where(lambda d: d.zero3)
    choices = zero3[0] + "".join(f" (or {n})" for n in zero3[1:])
    raise ConfigError(f"ZeRO-3 runs MoE with moe.backend={choices} and moe.ep_size=1 only, got "
                      f"moe.backend={moe.backend} moe.ep_size={moe.ep_size}; for expert parallelism or the "
                      f"other backends use ZeRO-0/1/2 (ds_configs/zero2.json)")
