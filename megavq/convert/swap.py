"""Another kind of router in front of a trained model's experts: everything but the routers is kept.

`change_routers(model, spec)`: the routers rebuilt as another kind (or with other options) without training; each
new router takes the old one's tensors of the same name and shape (a topk gate serves usmoe, compete and
expert_choice), and a router whose learned tensors (`Router.learned_tensors`) are not all carried is refused.

`swap_routers(model, cfg, states)`: new routers built from data instead, per MoE layer, from the hidden states
entering the layer (states) and the old router's routing of them: first the router's own construction from data
(`Router.init_from_routing`; vq: k-means codebook, each code pointing to the expert the old router prefers in its
cell), then `fit_steps` Adam steps of its parameters on `routing_loss` against the old routing. `distil_routers`
then trains only the router parameters of the whole model on the old model's routing of the same tokens (each
model routing its own hidden states). `agreement` measures how often the two models route alike.

Legend: B batch, S sequence, N rows (tokens), D hidden, E experts, K slots per token.
"""
from __future__ import annotations

import copy
import math

import torch
import yaml

from megavq.config import Config, config_from_dict, parse_override
from megavq.convert.upcycle import calibration_batches, merge_dicts, mlp_inputs
from megavq.data import TokenData, prepare_data
from megavq.errors import ConfigError, MegavqError
from megavq.model import Transformer
from megavq.moe.routers import router_class

FIT_ROWS = 1024  # rows per Adam step of the fit from data


# ---- which router, with which options --------------------------------------------------------------------------
def parse_router_spec(text: str) -> tuple[str, dict]:
    """'usmoe:budget=0.5,mix=0.3' (or 'usmoe:budget=0.5:mix=0.3') -> ('usmoe', {'budget': 0.5, 'mix': 0.3});
    values are read as YAML; `top_k` is moe.top_k, the other keys the router's options."""
    name, _, rest = text.strip().partition(":")
    options = {}
    for item in filter(None, rest.replace(",", ":").split(":")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"router '{text}': '{item}' is not OPTION=VALUE (NAME[:OPTION=VALUE,...])")
        options[key] = yaml.safe_load(value) if value else ""
    return name, options


def routed_config(cfg: Config, name: str, options: dict, allow_noncausal: bool = False,
                  overrides: list[str] = ()) -> Config:
    """cfg with router `name` and `options` (merged into the old options when the router is the same; `top_k` sets
    moe.top_k), then dotted key=value overrides, validated: an unknown router or option is refused in one line.
    allow_noncausal: set moe.allow_noncausal (evaluation)."""
    if cfg.moe.every == 0:
        raise MegavqError("the model is dense (moe.every=0): it has no routers to change")
    data = cfg.to_dict()
    moe, options = data["moe"], dict(options)
    moe["top_k"] = options.pop("top_k", moe["top_k"])
    moe["router_options"] = {**(moe["router_options"] if name == moe["router"] else {}), **options}
    moe["router"] = name
    moe["allow_noncausal"] = moe["allow_noncausal"] or allow_noncausal
    for text in overrides:
        data = merge_dicts(data, parse_override(text))
    return config_from_dict(data)


# ---- rebuilding the routers ---------------------------------------------------------------------------------------
def with_routers(model: Transformer, cfg: Config) -> tuple[Transformer, dict]:
    """A Transformer of cfg (model's shapes, other routers; native backend, eval mode) holding model's tensors,
    each new router with the old router's tensors of the same name and shape. Returns it and {block: the new
    router's learned tensors that were not carried}."""
    cfg = copy.deepcopy(cfg)
    cfg.moe.backend, cfg.moe.ep_size = "native", 1
    new = Transformer(cfg)
    routers = {prefix + "router." for prefix, _ in model.moe_layers()}
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(routers))}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(tuple(routers)) or k == "lm_head.weight" for k in missing), missing
    lacking = {}
    for (prefix, old), (_, layer) in zip(model.moe_layers(), new.moe_layers()):
        own = layer.router.state_dict()
        carried = {k: v for k, v in old.router.state_dict().items() if k in own and v.shape == own[k].shape}
        layer.router.load_state_dict(carried, strict=False)
        lacking[int(prefix.split(".")[1])] = [k for k in layer.router.learned_tensors() if k not in carried]
    return new.to(next(model.parameters()).device).eval(), lacking


def change_routers(model: Transformer, spec: str, **options) -> Transformer:
    """The model with its routers rebuilt from spec (NAME[:OPTION=VALUE,...], then `options`) without training;
    refused in one line when the new routers need learned tensors the old ones lack."""
    name, parsed = parse_router_spec(spec)
    cfg = routed_config(model.cfg, name, {**parsed, **options}, allow_noncausal=True)
    new, lacking = with_routers(model, cfg)
    block, names = next(((b, n) for b, n in lacking.items() if n), (None, None))
    if names:
        raise MegavqError(f"router '{spec}' needs trained {', '.join(names)}, which the model's "
                          f"{model.cfg.moe.router} routers lack (block {block}): build them from data with "
                          f"scripts/swap_router.py")
    return new


# ---- routing of the same tokens -------------------------------------------------------------------------------------
def dense_weights(route, num_experts: int) -> torch.Tensor:
    """A RouterOutput's weights as (N, E): the weight of every expert for every row, 0 where not routed."""
    weights_NK = torch.where(route.indices >= 0, route.weights, 0.0)
    return weights_NK.new_zeros(weights_NK.shape[0], num_experts).scatter_add_(1, route.indices.clamp(min=0),
                                                                              weights_NK)


def routing_loss(route, target_NE: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the router's scores to the old routing's choices (its weights, normalised per row), plus
    the squared error of its routing weights to the old ones, summed over experts and averaged over rows."""
    choice_NE = target_NE / target_NE.sum(-1, keepdim=True).clamp(min=1e-9)
    ce = -(choice_NE * route.scores.float().clamp(min=1e-9).log()).sum(-1).mean()
    return ce + (dense_weights(route, target_NE.shape[1]) - target_NE).pow(2).sum(-1).mean()


@torch.no_grad()
def old_routing(layer, x_BSD: torch.Tensor) -> torch.Tensor:
    """(B*S, E): the routing weights of a layer on its inputs."""
    return dense_weights(layer.route(x_BSD), layer.router.num_experts)


# ---- building from data -----------------------------------------------------------------------------------------
def layer_states(model: Transformer, batches: list) -> dict:
    """{block: (B', S, D) hidden states entering its MoE layer} on whole batches of equal length."""
    blocks = [int(prefix.split(".")[1]) for prefix, _ in model.moe_layers()]
    S, tokens = batches[0][0].shape[1], sum(x.numel() for x, _ in batches)
    return {i: x_ND.view(-1, S, x_ND.shape[-1]) for i, x_ND in mlp_inputs(model, blocks, batches, tokens).items()}


def fit_router(layer, x_BSD: torch.Tensor, target_NE: torch.Tensor, steps: int, lr: float, seed: int) -> dict:
    """Build the layer's router from data: its own construction (init_from_routing), then `steps` Adam steps of
    its parameters on routing_loss over random whole sequences of x_BSD. Returns {"init": figure, "loss": last}."""
    router = layer.router
    x_ND = x_BSD.reshape(-1, x_BSD.shape[-1])
    report = {"init": router.init_from_routing(x_ND, target_NE, seed), "loss": None}
    params = [p for p in router.parameters() if p.requires_grad]
    if not steps or not params:
        return report
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    per_step = max(1, FIT_ROWS // x_BSD.shape[1])
    target_BSE = target_NE.view(x_BSD.shape[0], x_BSD.shape[1], -1)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(x_BSD.shape[0], (per_step,), generator=g)
            loss = routing_loss(layer.route(x_BSD[rows]), target_BSE[rows].reshape(-1, target_NE.shape[1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    report["loss"] = loss.item()
    return report


def check_swap(old: Config, cfg: Config) -> None:
    if cfg.moe.every != old.moe.every or cfg.moe.num_experts != old.moe.num_experts:
        raise MegavqError("a router swap keeps the experts: moe.every and moe.num_experts cannot change")
    if router_class(cfg.moe.router).layer_kind != "token":
        raise MegavqError(f"router {cfg.moe.router} does not route tokens to experts: it cannot be fitted to "
                          f"another router's choices")


def swap_routers(model: Transformer, cfg: Config, batches: list, fit_steps: int = 200, lr: float = 1e-2,
                 seed: int = 0) -> tuple[Transformer, dict]:
    """(model with cfg's routers built from data, {block: fit report}); batches: (x_BS, y_BS) of equal length."""
    check_swap(model.cfg, cfg)
    new, _ = with_routers(model, cfg)
    states, report = layer_states(model, batches), {}
    for (prefix, old), (_, layer) in zip(model.moe_layers(), new.moe_layers()):
        block = int(prefix.split(".")[1])
        report[block] = fit_router(layer, states[block], old_routing(old, states[block]), fit_steps, lr,
                                   seed + block)
    return new.eval(), report


# ---- distillation ---------------------------------------------------------------------------------------------
class RouteRecorder:
    """Records every router output of a model's forward (hooks on its routers), in MoE-layer order."""

    def __init__(self, model: Transformer):
        self.routes = []
        self.hooks = [r.register_forward_hook(lambda m, a, out: self.routes.append(out)) for r in model.routers()]

    def take(self) -> list:
        routes, self.routes = self.routes, []
        return routes

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def router_parameters(model: Transformer) -> list:
    return [p for r in model.routers() for p in r.parameters() if p.requires_grad]


def distil_routers(old: Transformer, new: Transformer, batches, lr: float = 1e-3) -> list[float]:
    """Train only new's router parameters (Adam) so that each of its routers routes as old's does on the same
    tokens (routing_loss summed over layers), one step per batch; both models stay in eval mode (no router
    state changes). Returns the loss of every step."""
    E, trained = old.cfg.moe.num_experts, router_parameters(new)
    opt = torch.optim.Adam(trained, lr=lr)
    frozen = [p for p in new.parameters() if p.requires_grad and id(p) not in set(map(id, trained))]
    for p in frozen:
        p.requires_grad_(False)
    rec_old, rec_new, losses = RouteRecorder(old), RouteRecorder(new), []
    try:
        for x_BS, _ in batches:
            with torch.no_grad():
                old(x_BS)
            targets = [dense_weights(r, E) for r in rec_old.take()]
            new(x_BS)
            loss = sum(routing_loss(r, t) for r, t in zip(rec_new.take(), targets))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        rec_old.close()
        rec_new.close()
        for p in frozen:
            p.requires_grad_(True)
    return losses


# ---- figures ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def agreement(old: Transformer, new: Transformer, batches) -> dict:
    """Per MoE layer, over the tokens of batches (each model routing its own hidden states): `top1`, the fraction
    of tokens whose largest-weight expert is the same; `topk`, the mean fraction of the old routing's experts that
    the new routing also uses."""
    E = old.cfg.moe.num_experts
    rec_old, rec_new = RouteRecorder(old), RouteRecorder(new)
    top1, overlap, n = None, None, 0
    try:
        for x_BS, _ in batches:
            old(x_BS)
            new(x_BS)
            pairs = [(dense_weights(a, E), dense_weights(b, E)) for a, b in zip(rec_old.take(), rec_new.take())]
            t1 = torch.tensor([(a.argmax(-1) == b.argmax(-1)).float().sum().item() for a, b in pairs])
            ov = torch.tensor([(((a > 0) & (b > 0)).sum(-1) / (a > 0).sum(-1).clamp(min=1)).sum().item()
                               for a, b in pairs])
            top1, overlap = (t1, ov) if top1 is None else (top1 + t1, overlap + ov)
            n += x_BS.numel()
    finally:
        rec_old.close()
        rec_new.close()
    return {"top1": (top1 / n).tolist(), "topk": (overlap / n).tolist()}


@torch.no_grad()
def heldout_loss(model: Transformer, batches) -> float:
    """Token-weighted mean cross-entropy (nats) over batches."""
    total, count = 0.0, 0
    for x_BS, y_BS in batches:
        total += model(x_BS, y_BS).lm_loss.double().item() * y_BS.numel()
        count += y_BS.numel()
    return total / count if count else math.nan


# ---- the whole recipe -------------------------------------------------------------------------------------------
def swap_and_distil(old: Transformer, cfg: Config, source: str, calib_tokens: int = 8192, fit_steps: int = 200,
                    fit_lr: float = 1e-2, distil_steps: int = 0, distil_lr: float = 1e-3, batch_size: int = 8,
                    eval_batches: int = 8, seed: int = 0) -> tuple[Transformer, dict]:
    """(new model, report): routers of cfg built from the train split of `source` (calib_tokens tokens), then
    distilled for distil_steps batches of it; agreement with the old routing and loss on eval_batches batches of
    the val split, before and after the distillation (the old model's loss as `original_loss`)."""
    check_swap(old.cfg, cfg)
    m = old.cfg.model
    calib = calibration_batches(source, m.vocab_size, m.seq_len, calib_tokens, batch_size)
    new, fit = swap_routers(old, cfg, calib, fit_steps, fit_lr, seed)
    data = TokenData(prepare_data(source))
    S = calib[0][0].shape[1]
    heldout = list(data.eval_batches("val", batch_size, S, eval_batches))
    report = {"fit": fit, "original_loss": heldout_loss(old, heldout),
              "before": {"loss": heldout_loss(new, heldout), **agreement(old, new, heldout)}, "after": None}
    if distil_steps:
        train = (data.batch("train", step, batch_size, S, seed + 1) for step in range(distil_steps))
        losses = distil_routers(old, new, train, distil_lr)
        report["after"] = {"loss": heldout_loss(new, heldout), **agreement(old, new, heldout),
                           "distil_loss_first": losses[0], "distil_loss_last": losses[-1]}
    return new.eval(), report
