"""Language-model figures: loss and perplexity over evaluation batches, robustness to corrupted input, and
the same evaluation with the routing changed (top-k sweep, the routers' declared variants: vq `discrete_only`).

Legend: B batch, S sequence, E experts.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from megavq.convert.swap import change_routers, parse_router_spec
from megavq.errors import MegavqError
from megavq.moe.routers import available_routers, router_class
from megavq.moe.routers.base import option_names


def corrupt_tokens(x_BS: torch.Tensor, p: float, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Each token replaced, with probability p, by a token drawn uniformly from [0, vocab_size)."""
    if p == 0:
        return x_BS
    replace_BS = (torch.rand(x_BS.shape, generator=generator) < p).to(x_BS.device)  # drawn on the CPU: the same
    random_BS = torch.randint(vocab_size, x_BS.shape, generator=generator).to(x_BS.device)  # on any device
    return torch.where(replace_BS, random_BS, x_BS)


def _accumulate(sums: list | None, per_layer: list[dict], n: int) -> list[dict]:
    """Token-weighted running sums of every router metric (vectors element-wise)."""
    batch = [{k: v.detach().double().cpu() * n for k, v in m.items() if torch.is_tensor(v)} for m in per_layer]
    if sums is None:
        return batch
    return [{k: s[k] + b[k] for k in s if k in b} for s, b in zip(sums, batch)]


@torch.no_grad()
def lm_eval(model, batches: list, corrupt: float = 0.0, vocab_size: int = 0, seed: int = 0) -> dict:
    """Token-weighted mean loss, perplexity and router metrics (mean over tokens of each batch's figure)."""
    generator = torch.Generator().manual_seed(seed)
    total, count, sums = 0.0, 0, None
    for x_BS, y_BS in batches:
        out = model(corrupt_tokens(x_BS, corrupt, vocab_size, generator), y_BS)
        n = y_BS.numel()
        total, count = total + out.lm_loss.double().item() * n, count + n
        sums = _accumulate(sums, out.router_metrics, n)
    loss = total / count
    metrics = [{k: v / count for k, v in layer.items()} for layer in sums or []]
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "router_metrics": metrics}


def robustness(model, batches: list, ps: list[float], vocab_size: int, seed: int = 0) -> list[dict]:
    """Perplexity with a fraction p of the input tokens replaced by random ones (targets unchanged)."""
    rows = []
    for p in ps:
        r = lm_eval(model, batches, corrupt=p, vocab_size=vocab_size, seed=seed)
        rows.append({"p": p, "loss": r["loss"], "perplexity": r["perplexity"]})
    return rows


# ---- evaluation with the routing changed -------------------------------------------------------------------

def sweep_ks(num_experts: int) -> list[int]:
    """1, 2, 4, ... below E, then E."""
    return [2 ** i for i in range(num_experts.bit_length()) if 2 ** i < num_experts] + [num_experts]


@contextmanager
def routers_set(model, **attrs):
    """Set attributes on every MoE layer's router for the duration, then restore them."""
    routers = model.routers()
    saved = [{k: getattr(r, k) for k in attrs} for r in routers]
    try:
        for r in routers:
            for k, v in attrs.items():
                setattr(r, k, v)
        yield
    finally:
        for r, old in zip(routers, saved):
            for k, v in old.items():
                setattr(r, k, v)


def topk_sweep(model, batches: list) -> list[dict] | None:
    """Loss and perplexity at k = 1, 2, 4, ..., E experts per token (all MoE layers); None unless every router
    declares that its top_k may change (causal token choice). Each router keeps its weight normalisation."""
    routers = model.routers()
    if not routers or not all(r.sweeps_top_k for r in routers):
        return None
    rows = []
    for k in sweep_ks(routers[0].num_experts):
        with routers_set(model, top_k=k):
            r = lm_eval(model, batches)
        rows.append({"k": k, "loss": r["loss"], "perplexity": r["perplexity"]})
    return rows


def variant_names() -> list[str]:
    """Every evaluation variant a registered router declares (vq: discrete_only)."""
    return sorted({v for name in available_routers() for v in router_class(name).eval_variants})


def variant_evals(model, batches: list) -> dict[str, dict | None]:
    """{variant: loss, perplexity and experts per token with the variant's router settings} for every declared
    variant; None where the model's routers do not declare it."""
    routers, out = model.routers(), {}
    for name in variant_names():
        if not routers or not all(name in r.eval_variants for r in routers):
            out[name] = None
            continue
        trained_k = routers[0].experts_per_token
        with routers_set(model, **routers[0].eval_variants[name]):
            k, r = routers[0].experts_per_token, lm_eval(model, batches)
        out[name] = {"loss": r["loss"], "perplexity": r["perplexity"], "experts_per_token": k,
                     "experts_per_token_trained": trained_k, "expert_compute_saved": 1 - k / trained_k}
    return out


def experts_per_token(model, metrics: list[dict]) -> float:
    """Mean experts per token over the MoE layers: as the routers measured it (usmoe, expert_choice), else declared."""
    values = [m["experts_per_token"].item() if "experts_per_token" in m else r.experts_per_token
              for r, m in zip(model.routers(), metrics)]
    return sum(values) / len(values)


def budget_sweep(model, batches: list, budgets: list[float], spec: str = "usmoe", base: dict | None = None) -> dict:
    """Loss against experts per token for a router with a `budget` option (usmoe) put on the model's routers at
    each budget (experts kept, nothing trained; megavq.convert.swap.change_routers), beside the model's own router
    (`original`, from `base`, its lm_eval result, when given)."""
    name, options = parse_router_spec(spec)
    if name not in available_routers() or "budget" not in option_names(name):
        raise MegavqError(f"--sweep_router {spec}: the budget sweep needs a router with a `budget` option "
                          f"(usmoe), got {name!r}")
    points = []
    for budget in budgets:
        swept = change_routers(model, spec, budget=budget)
        r = lm_eval(swept, batches)
        points.append({"budget": budget, "experts_per_token": experts_per_token(swept, r["router_metrics"]),
                       "loss": r["loss"], "perplexity": r["perplexity"],
                       "unrouted_tokens": _layer_mean(r["router_metrics"], "unrouted_tokens")})
    causal = router_class(name).is_causal(options)
    original = None if base is None else {
        "router": model.cfg.moe.router, "experts_per_token": experts_per_token(model, base["router_metrics"]),
        "loss": base["loss"], "perplexity": base["perplexity"]}
    return {"router": spec, "causal": causal, "original": original, "points": points}


def _layer_mean(metrics: list[dict], key: str) -> float | None:
    values = [m[key].item() for m in metrics if key in m]
    return sum(values) / len(values) if values else None
