"""MegaBlocks' dropless MoE (`megablocks.layers.dmoe.dMoE`, grouped GEMM) driven by any megavq router. GPU only.

Legend: B batch, S sequence, T = B*S tokens, D hidden, H expert hidden, E experts, K slots per token.

The layer's experts are MegaBlocks' dMoE module. It builds its own `LearnedRouter` in its constructor; that
is replaced by `RouterSeam`, which runs the megavq router and returns what MegaBlocks' router returns:
(scores[T,E], weights[T,K], indices[T,K]). MegaBlocks' load-balancing loss is off (moe_loss_weight=0,
moe_zloss_weight=0): the router's own aux loss is used, and MegaBlocks' module-level loss lists are cleared at
every forward. Unused slots (-1) become expert 0 with weight 0 (MegaBlocks' kernels need an expert per slot).
The slot count K of each routing is given to MegaBlocks per forward (expert_choice and usmoe have K = E).

Expert weights: MegaBlocks keeps w1, v1, w2 as (E*H, D) (state-dict keys `experts.mlp.w1` inside the dMoE);
canonical `experts.w_in[e]` = [w1[e]^T, v1[e]^T] (swiglu) or [w1[e]^T] (gelu), `experts.w_out[e]` = w2[e].
Experts are re-initialised by global expert id (the native dispatcher's weights for the same seed).
moe.ep_size must be 1; per-expert biases are not supported. Install: `pip install 'megavq[megablocks]'` on a CUDA machine (it builds CUDA extensions).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError
from megavq.moe.dispatch.base import Dispatcher, dropless_rows, register_dispatcher
from megavq.moe.experts import Experts

MB_MLP = "experts.mlp"  # where the dMoE module keeps the expert weights


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
    """Stands in for MegaBlocks' LearnedRouter; holds no parameters (the megavq router is the layer's child).
    The dispatcher sets `route` (x_TD -> RouterOutput) before each forward; after it, `last` holds the output."""

    def __init__(self, args):
        super().__init__()
        self.args, self.route, self.last = args, None, None

    def forward(self, x: torch.Tensor):
        x_TD = x.reshape(-1, x.shape[-1])
        r = self.route(x_TD)
        self.last = r
        self.args.moe_top_k = r.indices.shape[1]  # MegaBlocks' gather/scatter take K from here
        valid = r.indices >= 0
        indices_TK = torch.where(valid, r.indices, 0)
        weights_TK = torch.where(valid, r.weights, 0.0).to(x.dtype)
        return r.scores, weights_TK, indices_TK


@register_dispatcher("megablocks")
class MegaBlocksDispatcher(Dispatcher):
    """moe.backend=megablocks: MegaBlocks' dropless grouped-GEMM experts (CUDA, ep_size 1, no biases)."""

    zero3 = False
    layer_kinds = ("token",)
    biases = False
    row_counts = staticmethod(dropless_rows)  # dropless; its grouped kernels' own saved tensors are not measured

    def build_experts(self) -> nn.Module:
        s, moe = self.spec, self.spec.moe
        dMoE, Arguments = require_megablocks()
        act = F.silu if s.mlp == "swiglu" else functools.partial(F.gelu, approximate="tanh")
        args = Arguments(hidden_size=s.d_model, ffn_hidden_size=s.d_hidden, moe_num_experts=moe.num_experts,
                         moe_top_k=moe.top_k, mlp_type="glu" if s.mlp == "swiglu" else "mlp", mlp_impl="grouped",
                         activation_fn=act, bias=False, return_bias=False, moe_loss_weight=0.0,
                         moe_zloss_weight=0.0, fp16=False, bf16=False, device=torch.cuda.current_device())
        with torch.random.fork_rng(devices=[]):  # MegaBlocks draws its own weights: keep the native RNG stream
            experts = dMoE(args)
        experts.router = RouterSeam(args)
        with torch.no_grad():
            ref = Experts.for_spec(s)
            for name, w_EHD in self._weight_views(experts).items():
                w_EHD.copy_(self._from_stacked(name, ref.w_in, ref.w_out))
        return experts

    def _weight_views(self, experts) -> dict[str, torch.Tensor]:
        """MegaBlocks' weights as (E, H, D) views."""
        m = experts.experts.mlp
        names = ("w1", "v1", "w2") if self.spec.mlp == "swiglu" else ("w1", "w2")
        return {n: getattr(m, n).view(self.num_experts, self.spec.d_hidden, -1) for n in names}

    @staticmethod
    def _from_stacked(name: str, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """MegaBlocks' (E, H, D) weight `name` from canonical w_in (E, 1|2, D, H) and w_out (E, H, D)."""
        if name == "w2":
            return w_out
        return w_in[:, 0 if name == "w1" else 1].transpose(1, 2)  # w1: the gate (or only) input, v1: the up one

    def forward(self, x_BSD, route, experts):
        seam = experts.router
        seam.route = route
        y_BSD = experts(x_BSD)
        r, seam.route, seam.last = seam.last, None, None
        clear_megablocks_losses()
        return y_BSD, r, {"dropped_frac": x_BSD.new_zeros((), dtype=torch.float32)}

    def all_experts(self, x_TD, experts):
        """Every expert on every token, (E, T, D), in plain torch: the competition step."""
        w = self._weight_views(experts)
        h_ETH = torch.einsum("td,ehd->eth", x_TD, w["w1"])
        a = F.silu(h_ETH) * torch.einsum("td,ehd->eth", x_TD, w["v1"]) if self.spec.mlp == "swiglu" \
            else F.gelu(h_ETH, approximate="tanh")
        return torch.einsum("eth,ehd->etd", a, w["w2"])

    # ---- canonical (native) layout --------------------------------------------------------------------
    def to_canonical(self, experts, prefix, sd):
        mlp = f"{prefix}{MB_MLP}"
        if f"{mlp}.w1" not in sd:
            return sd
        E, H = self.num_experts, self.spec.d_hidden
        w = {n: sd.pop(f"{mlp}.{n}").view(E, H, -1) for n in ("w1", "v1", "w2") if f"{mlp}.{n}" in sd}
        gates = [w["w1"], w["v1"]] if "v1" in w else [w["w1"]]
        sd[f"{prefix}w_in"] = torch.stack([g.transpose(1, 2) for g in gates], dim=1)  # (E, 1|2, D, H)
        sd[f"{prefix}w_out"] = w["w2"]
        return sd

    def from_canonical(self, experts, prefix, sd):
        if f"{prefix}w_in" not in sd:
            return sd
        w_in, w_out = sd.pop(f"{prefix}w_in"), sd.pop(f"{prefix}w_out")
        for name in self._weight_views(experts):
            sd[f"{prefix}{MB_MLP}.{name}"] = self._from_stacked(name, w_in, w_out).reshape(-1, w_in.shape[2])
        return sd
