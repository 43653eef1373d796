"""A balancing check: a top-k gate that starts with expert 0's logit `skew` above the others (a learnable gate
bias initialised (skew, 0, ..., 0)), trained on a token store; the expert load's coefficient of variation per step.

Legend: D hidden, E experts.
"""
from __future__ import annotations

import torch

from megavq.config import Config
from megavq.data import TokenData
from megavq.errors import ConfigError
from megavq.model import Transformer
from megavq.moe.routers.base import FP32Linear
from megavq.train.engine import prepare_model


def skew_gates(model: Transformer, skew: float) -> None:
    """Give every router's gate a learnable bias (skew, 0, ..., 0): expert 0's logit starts `skew` above the others."""
    for router in model.routers():
        gate = router._modules.get("gate")
        if not isinstance(gate, FP32Linear):
            raise ConfigError(f"the balancing check needs routers with a linear gate, got moe.router={router.name}")
        skewed = FP32Linear(gate.in_features, gate.out_features, bias=True)
        with torch.no_grad():
            skewed.weight.copy_(gate.weight)
            skewed.bias.zero_()[0] = skew
        router.gate = skewed


def load_cv_curve(cfg: Config, data: TokenData, steps: int, skew: float = 1.0) -> list[float]:
    """Train for `steps` optimizer steps (AdamW at train.lr, one micro-batch per step); the largest load_cv over
    the MoE layers at each step, as the routers measured it on the step's tokens."""
    torch.manual_seed(cfg.model.init_seed)
    model = prepare_model(Transformer(cfg), cfg).train()
    skew_gates(model, skew)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    curve, B = [], cfg.data.micro_batch_size
    for step in range(steps):
        x, y = data.batch("train", step, B, cfg.model.seq_len, cfg.train.seed)
        model.set_step(step)
        out = model(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.post_step()
        curve.append(max(m["load_cv"].item() for m in out.router_metrics))
    return curve


def first_below(curve: list[float], limit: float, window: int = 10) -> int | None:
    """The first step (1-based) from which the mean of `window` steps' load_cv is below `limit`; None if never."""
    for i in range(len(curve) - window + 1):
        if sum(curve[i:i + window]) / window < limit:
            return i + window
    return None
