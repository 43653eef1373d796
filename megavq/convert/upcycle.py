"""Sparse upcycling (Komatsuzaki et al. 2023): a dense model becomes an MoE model that starts where it stopped.

The MLP of every `every`-th block (zero-based i with (i + 1) % every == 0, as moe.every; by default every other
block starting with the second) becomes an MoE layer whose E experts are exact copies of that MLP (weights
and biases). The router is new, initialised as the router initialises itself (normal std 0.02 for
topk). Every other tensor is copied. Optimizer state is not carried over.

Variants (a `Recipe`): Gaussian noise on the copies (std `noise` times the std of the dense tensor); Drop-Upcycling
(Nakamura et al. 2025, arXiv 2502.19261): in each expert a seeded set of a fraction `drop` of its hidden units,
the same units in its gate, up and down projections (and input biases), re-initialised from a normal with the mean
and std of the dense tensor; granular upcycling: with `granularity` G, expert e holds segment e % G of the dense
hidden units (H / G of them) with its output projection times G, and the G experts of one copy share a router
gate row, so that a renormalised top-k (top_k a multiple of G) picks whole copies and the sum of the segments
is the dense output.

A router that declares `init_from_data_needed` (vq) initialises from the dense model's hidden states entering
that block's MLP (after mlp_norm) on calibration batches (vq: a k-means codebook).

With identical experts the MoE output is sum_k w_k MLP(x) = (sum_k w_k) MLP(x): the upcycled model computes
the dense model's function wherever the router's weights sum to 1 per token (docs/upcycling.md, per router).

Legend: B batch, S sequence, N rows (tokens), D hidden, H MLP hidden, E experts, G granularity.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass

import torch

from megavq.config import Config, config_from_dict, parse_override
from megavq.data import TokenData, prepare_data
from megavq.errors import MegavqError
from megavq.model import Transformer
from megavq.moe.routers import router_class
from megavq.moe.routers.base import mix64
from megavq.moe.spec import is_moe_layer, moe_blocks

# ModelConfig fields that fix the shapes of the copied tensors
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "d_ff", "mlp", "norm", "pos", "qkv_bias",
              "out_bias", "mlp_bias", "tie_embeddings")


@dataclass
class Recipe:
    """How the experts start besides exact copies (the module docstring): noise, Drop-Upcycling, granularity."""
    noise: float = 0.0  # std of the Gaussian noise on each copy's weights, times the dense tensor's std
    drop: float = 0.0  # Drop-Upcycling: the fraction r of each expert's hidden units re-initialised
    granularity: int = 1  # G: each expert one of G segments of the dense hidden units
    seed: int = 0  # of the noise and of the dropped units

    def check(self) -> None:
        if self.noise < 0 or not 0.0 <= self.drop <= 1.0 or self.granularity < 1:
            raise MegavqError(f"upcycling: noise must be >= 0, drop in [0, 1] and granularity >= 1, got "
                              f"noise={self.noise}, drop={self.drop}, granularity={self.granularity}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- config ---------------------------------------------------------------------------------------------------
def merge_dicts(base: dict, extra: dict) -> dict:
    """base with extra merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def upcycle_config(dense: Config, num_experts: int, top_k: int, router: str, every: int = 2,
                   overrides: list[str] = (), granularity: int = 1) -> Config:
    """The MoE config: the dense config, its MoE section set as asked, then dotted key=value overrides. With
    granularity G > 1 the experts are d_ff / G wide, and G divides num_experts and top_k (whole copies)."""
    if dense.moe.every != 0:
        raise MegavqError(f"the model is already an MoE model (moe.every={dense.moe.every}); "
                          f"upcycling starts from a dense one (moe.every=0)")
    if every < 1:
        raise MegavqError(f"every must be >= 1 (1 = every block, 2 = every other block), got {every}")
    _check_granularity(granularity, dense.model.d_ff, num_experts, top_k)
    moe = {"router": router, "num_experts": num_experts, "top_k": top_k, "every": every,
           "d_expert": 0 if granularity == 1 else dense.model.d_ff // granularity, "router_options": {}}
    data = merge_dicts(dense.to_dict(), {"moe": moe})
    for text in overrides:
        data = merge_dicts(data, parse_override(text))
    cfg = config_from_dict(data)  # validated: a non-causal router is refused now, not when training starts
    _check_shapes(dense, cfg, granularity)
    return cfg


def _check_granularity(granularity: int, d_ff: int, num_experts: int, top_k: int) -> None:
    if granularity < 1 or d_ff % granularity or num_experts % granularity or top_k % granularity:
        raise MegavqError(f"granularity must be >= 1 and divide model.d_ff ({d_ff}), num_experts ({num_experts}) "
                          f"and top_k ({top_k}), got {granularity}")


def _check_shapes(dense: Config, cfg: Config, granularity: int = 1) -> None:
    keys = SHAPE_KEYS + (("seq_len",) if dense.model.pos == "learned" else ())  # learned positions: (S, D)
    for key in keys:
        if getattr(cfg.model, key) != getattr(dense.model, key):
            raise MegavqError(f"model.{key} cannot change when upcycling (dense model: "
                              f"{getattr(dense.model, key)!r}, asked: {getattr(cfg.model, key)!r})")
    if cfg.moe.every < 1:
        raise MegavqError(f"moe.every must be >= 1 for an upcycled model, got {cfg.moe.every}")
    width = cfg.model.d_ff // granularity
    if (cfg.moe.d_expert or cfg.model.d_ff) != width:
        raise MegavqError(f"experts are copies of the dense MLP (or of 1/granularity of it): moe.d_expert must be "
                          f"{'0 or ' if granularity == 1 else ''}{width}, got {cfg.moe.d_expert}")


def moe_layer_ids(cfg: Config) -> list[int]:
    return moe_blocks(cfg.model.n_layers, cfg.moe.every, cfg.moe.dense_layers)


# ---- the state-dict transformation ------------------------------------------------------------------------
def expert_tensors(mlp_sd: dict, num_experts: int, granularity: int = 1) -> dict:
    """One dense MLP's tensors ({gate,up,down}_proj.{weight,bias}) as the Experts tensors of E copies; with
    granularity G, expert e holds hidden units [s h, (s + 1) h) (s = e % G, h = H / G), output projection times G."""
    G = granularity
    ins = [p for p in ("gate", "up") if f"{p}_proj.weight" in mlp_sd]  # swiglu: [gate, up]; gelu: [up]
    w_in = torch.stack([mlp_sd[f"{p}_proj.weight"].t() for p in ins])  # (1|2, D, H)
    h = w_in.shape[-1] // G

    def experts(t: torch.Tensor, dim: int) -> torch.Tensor:  # expert e: segment e % G of `dim`, stacked first
        return torch.stack([t.narrow(dim, (e % G) * h, h) for e in range(num_experts)]).contiguous()
    w_out = mlp_sd["down_proj.weight"].t() * G  # (H, D)
    out = {"w_in": experts(w_in, -1), "w_out": experts(w_out, 0)}  # (E, 1|2, D, h), (E, h, D)
    if "down_proj.bias" in mlp_sd:
        out["b_in"] = experts(torch.stack([mlp_sd[f"{p}_proj.bias"] for p in ins]), -1)  # (E, 1|2, h)
        out["b_out"] = mlp_sd["down_proj.bias"].expand(num_experts, -1).contiguous()  # (E, D)
    return out


def expert_generator(seed: int, block: int, expert: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix64(seed, block, expert) & ((1 << 63) - 1))


def dropped_units(recipe: Recipe, block: int, expert: int, hidden: int) -> torch.Tensor:
    """Drop-Upcycling: the round(drop * hidden) hidden units of an expert that are re-initialised, sorted."""
    g = expert_generator(recipe.seed, block, expert)
    return torch.randperm(hidden, generator=g)[:round(recipe.drop * hidden)].sort().values


@torch.no_grad()
def vary_experts(experts: dict, recipe: Recipe, block: int) -> dict:
    """The copies with the recipe's noise and Drop-Upcycling applied (each expert from its own generator). The
    means and stds are the dense tensors' (every segment appears equally often among the E experts)."""
    if not recipe.noise and not recipe.drop:
        return experts
    out = {k: v.clone() for k, v in experts.items()}
    w_in, w_out, b_in = out["w_in"], out["w_out"], out.get("b_in")  # (E, 1|2, D, h), (E, h, D), (E, 1|2, h)
    std_in, mean_in = torch.std_mean(w_in, dim=(0, 2, 3))  # per projection: gate, up
    std_out, mean_out = torch.std_mean(w_out)
    if b_in is not None:
        std_b, mean_b = torch.std_mean(b_in, dim=(0, 2))
    for e in range(w_in.shape[0]):
        g = expert_generator(recipe.seed + 1, block, e)  # apart from the dropped units' draw
        if recipe.noise:
            w_in[e] += recipe.noise * std_in[:, None, None] * torch.randn(w_in[e].shape, generator=g)
            w_out[e] += recipe.noise * std_out * torch.randn(w_out[e].shape, generator=g)
        idx = dropped_units(recipe, block, e, w_out.shape[1])
        if idx.numel():
            n_in, D = w_in.shape[1], w_in.shape[2]
            w_in[e][:, :, idx] = mean_in[:, None, None] + std_in[:, None, None] * torch.randn(n_in, D, len(idx),
                                                                                             generator=g)
            w_out[e][idx] = mean_out + std_out * torch.randn(len(idx), w_out.shape[2], generator=g)
            if b_in is not None:
                b_in[e][:, idx] = mean_b[:, None] + std_b[:, None] * torch.randn(n_in, len(idx), generator=g)
    return out


def upcycle_state_dict(dense_sd: dict, cfg: Config, recipe: Recipe | None = None) -> dict:
    """The MoE model's state dict without its routers: MLPs of MoE blocks become experts, the rest is copied."""
    recipe = recipe or Recipe()
    out, mlps = {}, {}
    for key, value in dense_sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.mlp\.(.+)", key)
        if m and is_moe_layer(int(m[1]), cfg.moe.every, cfg.moe.dense_layers):
            mlps.setdefault(int(m[1]), {})[m[2]] = value
        else:
            out[key] = value
    for i, mlp_sd in sorted(mlps.items()):
        experts = vary_experts(expert_tensors(mlp_sd, cfg.moe.num_experts, recipe.granularity), recipe, i)
        out.update({f"blocks.{i}.mlp.experts.{k}": v for k, v in experts.items()})
    return out


def build_upcycled(dense_sd: dict, cfg: Config, recipe: Recipe | None = None) -> Transformer:
    """The MoE Transformer (native backend, one process) with fresh routers and the upcycled tensors."""
    recipe = recipe or Recipe()
    build_cfg = copy.deepcopy(cfg)
    build_cfg.moe.backend, build_cfg.moe.ep_size = "native", 1
    torch.manual_seed(cfg.train.seed)  # router initialisation
    model = Transformer(build_cfg)
    missing, unexpected = model.load_state_dict(upcycle_state_dict(dense_sd, cfg, recipe), strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    new = [k for k in missing if not _is_routing_key(k, cfg) and k not in tied]
    assert not unexpected and not new, f"upcycled state does not fit: unexpected {unexpected[:3]}, missing {new[:3]}"
    for router in model.routers():
        share_gate_rows(router, recipe.granularity)
    return model.eval()


@torch.no_grad()
def share_gate_rows(router, granularity: int) -> None:
    """Granular upcycling: the G experts of one copy (e // G) get the same router gate row, so that a top-k over
    them keeps or drops whole copies. Routers without a linear gate of E rows keep their own start."""
    gate = getattr(router, "gate", None)
    if granularity > 1 and isinstance(gate, torch.nn.Linear) and gate.out_features == router.num_experts:
        E = router.num_experts
        gate.weight.copy_(gate.weight[torch.arange(E) // granularity * granularity])


def _is_routing_key(key: str, cfg: Config) -> bool:
    """A parameter or buffer of an MoE layer other than its experts: the new router."""
    m = re.fullmatch(r"blocks\.(\d+)\.mlp\.(.+)", key)
    return bool(m) and is_moe_layer(int(m[1]), cfg.moe.every, cfg.moe.dense_layers) and not m[2].startswith("experts.")


# ---- router initialisation from data -----------------------------------------------------------------------
def needs_calibration(cfg: Config) -> bool:
    """Whether cfg's router initialises from the dense model's hidden states."""
    return router_class(cfg.moe.router).init_from_data_needed


@torch.no_grad()
def mlp_inputs(dense: Transformer, layer_ids: list[int], batches, max_tokens: int) -> dict:
    """Hidden states entering the MLP of each listed block (after mlp_norm), (N, D) with N <= max_tokens."""
    rows = {i: [] for i in layer_ids}

    def keep(i):
        return lambda module, args, output: rows[i].append(args[0].reshape(-1, args[0].shape[-1]).float())
    hooks = [dense.blocks[i].mlp.register_forward_hook(keep(i)) for i in layer_ids]
    try:
        seen = 0
        for x_BS, _ in batches:
            dense(x_BS)
            seen += x_BS.numel()
            if seen >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise MegavqError("the calibration data gave no batches")
    return {i: torch.cat(r)[:max_tokens] for i, r in rows.items()}


@torch.no_grad()
def init_routers_from_data(model: Transformer, states: dict, seed: int = 0) -> dict:
    """Routers that initialise from data do (vq: k-means codebooks); returns {block: fraction of codes used}."""
    usage = {}
    for i, x_ND in states.items():
        used = model.blocks[i].mlp.router.init_from_data(x_ND, seed=seed + i)
        if used is not None:
            usage[i] = used
    return usage


# ---- the whole recipe ----------------------------------------------------------------------------------------
def upcycle(dense: Transformer, cfg: Config, calib_batches=None, calib_tokens: int = 8192,
            recipe: Recipe | None = None) -> tuple:
    """(MoE Transformer, report) from a dense Transformer and the upcycled config (see upcycle_config).

    calib_batches: (x_BS, y_BS) batches for routers that initialise from data (vq); needed only by those.
    recipe: noise, Drop-Upcycling, granularity (the granularity must be the one upcycle_config was given).
    The report holds the MoE blocks, the code usage per block and the step-0 logit check.
    """
    recipe = recipe or Recipe()
    recipe.check()
    _check_granularity(recipe.granularity, cfg.model.d_ff, cfg.moe.num_experts, cfg.moe.top_k)
    if (cfg.moe.d_expert or cfg.model.d_ff) * recipe.granularity != cfg.model.d_ff:
        raise MegavqError(f"granularity {recipe.granularity} does not match moe.d_expert={cfg.moe.d_expert} "
                          f"(model.d_ff={cfg.model.d_ff}): give upcycle_config the same granularity")
    model = build_upcycled(dense.state_dict(), cfg, recipe)
    report = {"moe_layers": moe_layer_ids(cfg), "code_usage": {}, "recipe": recipe.to_dict()}
    if needs_calibration(cfg):
        if calib_batches is None:
            raise MegavqError(f"moe.router={cfg.moe.router} initialises from the dense model's hidden states: "
                              f"give calibration data")
        calib_batches = list(calib_batches)
        states = mlp_inputs(dense, report["moe_layers"], calib_batches, calib_tokens)
        report["code_usage"] = init_routers_from_data(model, states, cfg.train.seed)
    idx = calib_batches[0][0][:2] if calib_batches else check_tokens(cfg)
    report["max_logit_diff"], report["logit_scale"] = logit_difference(dense, model, idx)
    return model, report


def check_tokens(cfg: Config, batch: int = 2, seq: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.train.seed)
    return torch.randint(0, cfg.model.vocab_size, (batch, min(seq, cfg.model.seq_len)), generator=g)


@torch.no_grad()
def logit_difference(dense: Transformer, moe: Transformer, idx_BS: torch.Tensor) -> tuple[float, float]:
    """(max |moe logits - dense logits|, max |dense logits|) on idx_BS, both models in eval mode."""
    a, b = dense.eval()(idx_BS), moe.eval()(idx_BS)
    return (b - a).abs().max().item(), a.abs().max().item()


def preserves_function(report: dict, rtol: float = 1e-4) -> bool:
    return report["max_logit_diff"] <= rtol * max(1.0, report["logit_scale"])


def calibration_batches(source: str, vocab_size: int, seq_len: int, tokens: int, batch_size: int = 8) -> list:
    """Batches of the train split of a data source (builtin or a tokenized data directory) for calibration."""
    data = TokenData(prepare_data(source))
    if data.vocab_size > vocab_size:
        raise MegavqError(f"calibration data {source!r} has vocab_size {data.vocab_size}, more than the model's "
                          f"{vocab_size}: tokenize it with the model's tokenizer")
    seq = min(seq_len, 256)
    return list(data.eval_batches("train", batch_size, seq, max(1, math.ceil(tokens / (batch_size * seq)))))
