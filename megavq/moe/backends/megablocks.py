"""MegaBlocks' dropless MoE (`megablocks.layers.dmoe.dMoE`, grouped GEMM) driven by any megavq router. GPU only.

Legend: B batch, S sequence, T = B*S tokens, D hidden, H expert hidden, E experts, K slots per token.

MegaBlocks builds its own `LearnedRouter` in the layer's constructor; it is replaced by `RouterSeam`, which
runs the megavq router and returns what MegaBlocks' router returns: (scores[T,E], weights[T,K],
indices[T,K]). MegaBlocks' load-balancing loss is off (moe_loss_weight=0, moe_zloss_weight=0): the
router's own aux loss is used, and MegaBlocks' module-level loss lists are cleared at every forward. Unused
slots (-1) become expert 0 with weight 0 (MegaBlocks' kernels need an expert per slot). The slot count K
of each routing is given to MegaBlocks per forward (expert_choice and usmoe have K = E).

Expert weights: MegaBlocks keeps w1, v1, w2 as (E*H, D); canonical `experts.w_in[e]` = [w1[e]^T, v1[e]^T]
(swiglu) or [w1[e]^T] (gelu), `experts.w_out[e]` = w2[e]. Experts are re-initialised by global expert id
(the native backend's weights for the same seed). moe.ep_size must be 1; per-expert biases are not
supported. Install: `pip install 'megavq[megablocks]'` on a CUDA machine (it builds CUDA extensions).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError
from megavq.config import MoEConfig
from megavq.moe.experts import Experts
from megavq.moe.layer import layer_router, router_kwargs

MB_MLP = "dmoe.experts.mlp"  # where MegaBlocks keeps the expert weights


def require_megablocks():
    """MegaBlocks' dMoE and Arguments, or a ConfigError that says what is missing."""
    if not torch.cuda.is_available():
        raise ConfigError("moe.backend=megablocks needs a CUDA GPU and the megablocks extra "
                          "(pip install 'megavq[megablocks]'); on this machine use moe.backend=native or deepspeed")
    try:
        from megablocks import grouped_gemm_util
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError as e:
        raise ConfigError(f"moe.backend=megablocks needs the megablocks extra "
                          f"(pip install 'megavq[megablocks]'): {e}") from None
    if not grouped_gemm_util.grouped_gemm_is_available():
        raise ConfigError("moe.backend=megablocks runs MegaBlocks' grouped MLP, which needs grouped_gemm "
                          "(pip install 'megavq[megablocks]' on the GPU machine)")
    return dMoE, Arguments


def clear_megablocks_losses() -> None:
    """Empty MegaBlocks' module-level aux-loss lists (unused here, but they would grow every step)."""
    from megablocks.layers import moe, router
    moe.clear_load_balancing_loss()
    router.clear_router_zloss()


class RouterSeam(nn.Module):
    """Stands in for MegaBlocks' LearnedRouter; holds no parameters (the megavq router is the layer's child)."""

    def __init__(self, router: nn.Module, args):
        super().__init__()
        self._router, self.args = (router,), args  # a tuple: not registered twice
        self.context, self.last = {}, None

    def forward(self, x: torch.Tensor):
        x_TD = x.reshape(-1, x.shape[-1])
        r = self._router[0](x_TD, **self.context)
        self.last = r
        self.args.moe_top_k = r.indices.shape[1]  # MegaBlocks' gather/scatter take K from here
        valid = r.indices >= 0
        indices_TK = torch.where(valid, r.indices, 0)
        weights_TK = torch.where(valid, r.weights, 0.0).to(x.dtype)
        return r.scores, weights_TK, indices_TK


class MegaBlocksMoELayer(nn.Module):
    """MoE layer on MegaBlocks' dMoE (moe.backend=megablocks): `forward(x_BSD) -> (y_BSD, aux_loss, metrics)`."""

    def __init__(self, cfg: MoEConfig, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False,
                 init_std: float = 0.02, out_std: float | None = None, seed: int = 0):
        super().__init__()
        if cfg.ep_size != 1:
            raise ConfigError(f"moe.backend=megablocks runs with moe.ep_size=1, got {cfg.ep_size}; "
                              f"expert parallelism: moe.backend=native or deepspeed")
        if bias:
            raise ConfigError("moe.backend=megablocks has no per-expert biases: set model.mlp_bias=false")
        dMoE, Arguments = require_megablocks()
        self.num_experts, self.d_hidden, self.mlp = cfg.num_experts, d_hidden, mlp
        self.router = layer_router(cfg, d_model)
        act = F.silu if mlp == "swiglu" else functools.partial(F.gelu, approximate="tanh")
        self.args = Arguments(hidden_size=d_model, ffn_hidden_size=d_hidden, moe_num_experts=cfg.num_experts,
                              moe_top_k=cfg.top_k, mlp_type="glu" if mlp == "swiglu" else "mlp", mlp_impl="grouped",
                              activation_fn=act, bias=False, return_bias=False, moe_loss_weight=0.0,
                              moe_zloss_weight=0.0, fp16=False, bf16=False, device=torch.cuda.current_device())
        with torch.random.fork_rng(devices=[]):  # MegaBlocks draws its own weights: keep the native RNG stream
            self.dmoe = dMoE(self.args)
        self.dmoe.router = RouterSeam(self.router, self.args)
        self.reset_experts(Experts(cfg.num_experts, d_model, d_hidden, mlp, False, init_std, out_std, seed))

    @property
    def experts(self) -> nn.Module:  # an MoE layer has `router` and `experts` (see assign_moe_layers)
        return self.dmoe.experts.mlp

    def _weight_views(self) -> dict[str, torch.Tensor]:
        """MegaBlocks' weights as (E, H, D) views."""
        m = self.dmoe.experts.mlp
        names = ("w1", "v1", "w2") if self.mlp == "swiglu" else ("w1", "w2")
        return {n: getattr(m, n).view(self.num_experts, self.d_hidden, -1) for n in names}

    @torch.no_grad()
    def reset_experts(self, ref: Experts) -> None:
        for name, w_EHD in self._weight_views().items():
            w_EHD.copy_(self._from_stacked(name, ref.w_in, ref.w_out))

    @staticmethod
    def _from_stacked(name: str, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """MegaBlocks' (E, H, D) weight `name` from canonical w_in (E, 1|2, D, H) and w_out (E, H, D)."""
        if name == "w2":
            return w_out
        return w_in[:, 0 if name == "w1" else 1].transpose(1, 2)  # w1: the gate (or only) input, v1: the up one

    def all_experts(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, (E, T, D), in plain torch: the competition step."""
        w = self._weight_views()
        h_ETH = torch.einsum("td,ehd->eth", x_TD, w["w1"])
        a = F.silu(h_ETH) * torch.einsum("td,ehd->eth", x_TD, w["v1"]) if self.mlp == "swiglu" \
            else F.gelu(h_ETH, approximate="tanh")
        return torch.einsum("eth,ehd->etd", a, w["w2"])

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        seam = self.dmoe.router
        seam.context = router_kwargs(self.router, x_BSD, lambda: self.all_experts(x_TD))
        y_BSD = self.dmoe(x_BSD)
        r, seam.context, seam.last = seam.last, {}, None
        clear_megablocks_losses()
        return y_BSD, r.aux_loss, {**r.metrics, "dropped_frac": x_TD.new_zeros((), dtype=torch.float32)}

    # ---- canonical (native) layout --------------------------------------------------------------------
    def to_canonical(self, prefix: str, sd: dict) -> dict:
        if f"{prefix}{MB_MLP}.w1" not in sd:
            return sd
        E, H = self.num_experts, self.d_hidden
        w = {n: sd.pop(f"{prefix}{MB_MLP}.{n}").view(E, H, -1) for n in ("w1", "v1", "w2") if
             f"{prefix}{MB_MLP}.{n}" in sd}
        gates = [w["w1"], w["v1"]] if "v1" in w else [w["w1"]]
        sd[f"{prefix}experts.w_in"] = torch.stack([g.transpose(1, 2) for g in gates], dim=1)  # (E, 1|2, D, H)
        sd[f"{prefix}experts.w_out"] = w["w2"]
        return sd

    def from_canonical(self, prefix: str, sd: dict) -> dict:
        if f"{prefix}experts.w_in" not in sd:
            return sd
        w_in, w_out = sd.pop(f"{prefix}experts.w_in"), sd.pop(f"{prefix}experts.w_out")
        for name in self._weight_views():
            sd[f"{prefix}{MB_MLP}.{name}"] = self._from_stacked(name, w_in, w_out).reshape(-1, w_in.shape[2])
        return sd
