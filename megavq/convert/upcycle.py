"""Sparse upcycling (Komatsuzaki et al. 2023): a dense model becomes an MoE model that starts where it stopped.

The MLP of every `every`-th block (zero-based i with (i + 1) % every == 0, as moe.every; by default every other
block starting with the second) becomes an MoE layer whose E experts are exact copies of that MLP (weights
and biases, no noise). The router is new, initialised as the router initialises itself (normal std 0.02 for
topk). Every other tensor is copied. Optimizer state is not carried over.

A router that declares `init_from_data_needed` (vq) initialises from the dense model's hidden states entering
that block's MLP (after mlp_norm) on calibration batches (vq: a k-means codebook).

With identical experts the MoE output is sum_k w_k MLP(x) = (sum_k w_k) MLP(x): the upcycled model computes
the dense model's function wherever the router's weights sum to 1 per token (docs/upcycling.md, per router).

Legend: B batch, S sequence, N rows (tokens), D hidden, H MLP hidden, E experts.
"""
from __future__ import annotations

import copy
import math
import re

import torch

from megavq.config import Config, config_from_dict, parse_override
from megavq.data import TokenData, prepare_data
from megavq.errors import MegavqError
from megavq.model import Transformer
from megavq.moe.routers import router_class
from megavq.moe.spec import is_moe_layer, moe_blocks

# ModelConfig fields that fix the shapes of the copied tensors
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "d_ff", "mlp", "norm", "pos", "qkv_bias",
              "out_bias", "mlp_bias", "tie_embeddings")


# ---- config ---------------------------------------------------------------------------------------------------
def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def upcycle_config(dense: Config, num_experts: int, top_k: int, router: str, every: int = 2,
                   overrides: list[str] = ()) -> Config:
    """The MoE config: the dense config, its MoE section set as asked, then dotted key=value overrides."""
    if dense.moe.every != 0:
        raise MegavqError(f"the model is already an MoE model (moe.every={dense.moe.every}); "
                          f"upcycling starts from a dense one (moe.every=0)")
    if every < 1:
        raise MegavqError(f"every must be >= 1 (1 = every block, 2 = every other block), got {every}")
    moe = {"router": router, "num_experts": num_experts, "top_k": top_k, "every": every, "d_expert": 0,
           "router_options": {}}
    data = _merge(dense.to_dict(), {"moe": moe})
    for text in overrides:
        data = _merge(data, parse_override(text))
    cfg = config_from_dict(data)  # validated: a non-causal router is refused now, not when training starts
    _check_shapes(dense, cfg)
    return cfg


def _check_shapes(dense: Config, cfg: Config) -> None:
    keys = SHAPE_KEYS + (("seq_len",) if dense.model.pos == "learned" else ())  # learned positions: (S, D)
    for key in keys:
        if getattr(cfg.model, key) != getattr(dense.model, key):
            raise MegavqError(f"model.{key} cannot change when upcycling (dense model: "
                              f"{getattr(dense.model, key)!r}, asked: {getattr(cfg.model, key)!r})")
    if cfg.moe.every < 1:
        raise MegavqError(f"moe.every must be >= 1 for an upcycled model, got {cfg.moe.every}")
    if cfg.moe.d_expert not in (0, cfg.model.d_ff):
        raise MegavqError(f"experts are copies of the dense MLP: moe.d_expert must be 0 or model.d_ff "
                          f"({cfg.model.d_ff}), got {cfg.moe.d_expert}")


def moe_layer_ids(cfg: Config) -> list[int]:
    return moe_blocks(cfg.model.n_layers, cfg.moe.every, cfg.moe.dense_layers)


# ---- the state-dict transformation ------------------------------------------------------------------------
def expert_tensors(mlp_sd: dict, num_experts: int) -> dict:
    """One dense MLP's tensors ({gate,up,down}_proj.{weight,bias}) as the Experts tensors of E exact copies."""
    def copies(t: torch.Tensor) -> torch.Tensor:
        return t.expand(num_experts, *t.shape).contiguous()
    ins = [p for p in ("gate", "up") if f"{p}_proj.weight" in mlp_sd]  # swiglu: [gate, up]; gelu: [up]
    out = {"w_in": copies(torch.stack([mlp_sd[f"{p}_proj.weight"].t() for p in ins])),  # (E, 1|2, D, H)
           "w_out": copies(mlp_sd["down_proj.weight"].t())}  # (E, H, D)
    if "down_proj.bias" in mlp_sd:
        out["b_in"] = copies(torch.stack([mlp_sd[f"{p}_proj.bias"] for p in ins]))  # (E, 1|2, H)
        out["b_out"] = copies(mlp_sd["down_proj.bias"])  # (E, D)
    return out


def upcycle_state_dict(dense_sd: dict, cfg: Config) -> dict:
    """The MoE model's state dict without its routers: MLPs of MoE blocks become experts, the rest is copied."""
    out, mlps = {}, {}
    for key, value in dense_sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.mlp\.(.+)", key)
        if m and is_moe_layer(int(m[1]), cfg.moe.every, cfg.moe.dense_layers):
            mlps.setdefault(int(m[1]), {})[m[2]] = value
        else:
            out[key] = value
    for i, mlp_sd in sorted(mlps.items()):
        out.update({f"blocks.{i}.mlp.experts.{k}": v for k, v in expert_tensors(mlp_sd, cfg.moe.num_experts).items()})
    return out


def build_upcycled(dense_sd: dict, cfg: Config) -> Transformer:
    """The MoE Transformer (native backend, one process) with fresh routers and the upcycled tensors."""
    build_cfg = copy.deepcopy(cfg)
    build_cfg.moe.backend, build_cfg.moe.ep_size = "native", 1
    torch.manual_seed(cfg.train.seed)  # router initialisation
    model = Transformer(build_cfg)
    missing, unexpected = model.load_state_dict(upcycle_state_dict(dense_sd, cfg), strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    new = [k for k in missing if not _is_routing_key(k, cfg) and k not in tied]
    assert not unexpected and not new, f"upcycled state does not fit: unexpected {unexpected[:3]}, missing {new[:3]}"
    return model.eval()


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
def upcycle(dense: Transformer, cfg: Config, calib_batches=None, calib_tokens: int = 8192) -> tuple:
    """(MoE Transformer, report) from a dense Transformer and the upcycled config (see upcycle_config).

    calib_batches: (x_BS, y_BS) batches for routers that initialise from data (vq); needed only by those.
    The report holds the MoE blocks, the code usage per block and the step-0 logit check.
    """
    model = build_upcycled(dense.state_dict(), cfg)
    report = {"moe_layers": moe_layer_ids(cfg), "code_usage": {}}
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
