"""A megavq transformer for Hugging Face transformers: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`, `generate()` with transformers' KV cache.

Written by megavq's export (`python scripts/export.py --format hf --remote_code`) for models whose routing
no transformers architecture reproduces (vq, xmoe, usmoe with token selection, any other causal router) or
whose backbone is not Llama's (LayerNorm, learned positions, GELU, biases). Self-contained: it needs torch and
transformers only. The routers are megavq's own code, copied into megavq_routers_<sha>.py beside this file
when the model was exported (the import below names it); everything else mirrors megavq/model and megavq/moe
(the export's tests check that the logits are megavq's). The weights keep megavq's names under `model.` (and
`lm_head.weight`), with the experts of an MoE layer stacked: w_in (E, 1|2, D, H) = [gate, up] or [up],
w_out (E, H, D).

Legend: B batch, S new tokens, L keys so far (cached + new), D hidden, nh heads, nkv key/value heads, hs head
size, V vocabulary, T = B*S tokens, E experts, K slots per token, N routed rows, H expert hidden.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megavq import MegavqConfig
from .megavq_routers import build_router

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# the cache's name in model outputs and forward arguments: `cache` in recent transformers, `past_key_values` before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ---- the blocks (megavq/model/layers.py) ------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(config: MegavqConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, config.norm_eps)


def rope_cos_sin(pos_BS: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, S, hs/2) of each position, in the half-split (Llama) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = pos_BS.float()[..., None] * inv_freq.to(pos_BS.device)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, S, hs); rotate the two halves of each head."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: MegavqConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_size = config.head_dim
        D, kv_dim = config.hidden_size, self.n_kv * self.head_size
        self.q_proj = nn.Linear(D, D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(D, D, bias=config.out_bias)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """mask None: plain causal attention over x; else (B|1, 1, S, L) bool, True where a query may attend."""
        B, S, D = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, S, hs)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_size).transpose(1, 2)  # (B, nkv, S, hs)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_size).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, L, hs)
        gqa = self.n_kv != self.n_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    """Dense MLP: SwiGLU or tanh GELU."""

    def __init__(self, config: MegavqConfig):
        super().__init__()
        D, H, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.up_proj = nn.Linear(D, H, bias=bias)
        self.gate_proj = nn.Linear(D, H, bias=bias) if config.mlp == "swiglu" else None
        self.down_proj = nn.Linear(H, D, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


# ---- the MoE layer (megavq/moe/experts.py, the native dispatcher) ------------------------------------------
class Experts(nn.Module):
    """E expert MLPs as stacked weights; forward runs each expert on its contiguous rows."""

    def __init__(self, E: int, D: int, H: int, mlp: str, bias: bool):
        super().__init__()
        self.num_experts, self.mlp, n_in = E, mlp, 2 if mlp == "swiglu" else 1
        self.w_in = nn.Parameter(torch.zeros(E, n_in, D, H))  # (E, 1|2, D, H)
        self.w_out = nn.Parameter(torch.zeros(E, H, D))  # (E, H, D)
        self.b_in = nn.Parameter(torch.zeros(E, n_in, H)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(E, D)) if bias else None

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        w_in = self.w_in[e]
        h = (x_ND @ w_in.transpose(0, 1).flatten(1)).unflatten(-1, (w_in.shape[0], w_in.shape[-1]))  # (N, 1|2, H)
        if self.b_in is not None:
            h = h + self.b_in[e]
        h = F.silu(h[..., 0, :]) * h[..., 1, :] if self.mlp == "swiglu" else F.gelu(h[..., 0, :], approximate="tanh")
        y = h @ self.w_out[e]
        return y + self.b_out[e] if self.b_out is not None else y

    def forward(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Rows sorted by expert; counts_E[e] rows belong to expert e."""
        outs = [self.expert(e, x) for e, x in enumerate(torch.split(x_ND, counts_E)) if x.shape[0]]
        return torch.cat(outs) if outs else x_ND.new_zeros(0, self.w_out.shape[-1])

    def every_expert(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, (E, T, D)."""
        T = x_TD.shape[0]
        return self(x_TD.repeat(self.num_experts, 1), [T] * self.num_experts).view(self.num_experts, T, -1)


def sort_by_expert(indices_TK: torch.Tensor, num_experts: int):
    """(token_N, flat_slot_N, counts_E): the routed (token, slot) pairs in expert order; unused slots (-1) dropped."""
    flat_e = indices_TK.reshape(-1)
    flat_slot = (flat_e >= 0).nonzero().squeeze(-1)
    flat_slot = flat_slot[torch.argsort(flat_e[flat_slot], stable=True)]
    counts_E = torch.bincount(flat_e[flat_slot], minlength=num_experts)
    return flat_slot // indices_TK.shape[1], flat_slot, counts_E


class MoE(nn.Module):
    """Router (megavq's, in evaluation mode) + experts: y_t = sum_k w_tk * expert_{i_tk}(x_t)."""

    def __init__(self, config: MegavqConfig):
        super().__init__()
        moe = config.moe
        self.router = build_router(moe["router"], hidden_size=config.hidden_size, num_experts=moe["num_experts"],
                                   top_k=moe["top_k"], **moe["router_options"])
        self.experts = Experts(moe["num_experts"], config.hidden_size, moe["d_expert"] or config.intermediate_size,
                               config.mlp, config.mlp_bias)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.router.route(x_TD, x_BSD.shape[1], lambda: self.experts.every_expert(x_TD))
        token_N, slot_N, counts_E = sort_by_expert(r.indices, self.experts.num_experts)
        y_ND = self.experts(x_TD[token_N], counts_E.tolist())
        y_ND = y_ND * r.weights.reshape(-1)[slot_N, None].to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND).view_as(x_BSD)


class Block(nn.Module):
    def __init__(self, config: MegavqConfig, i: int):
        super().__init__()
        every = (config.moe or {}).get("every", 0)
        self.attn_norm, self.attn = make_norm(config), Attention(config, i)
        self.mlp_norm = make_norm(config)
        self.mlp = MoE(config) if every and (i + 1) % every == 0 else MLP(config)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None, cache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


# ---- positions and masks -----------------------------------------------------------------------------------
def positions(attention_mask: torch.Tensor | None, past: int, B: int, S: int, device) -> torch.Tensor:
    """(B, S) absolute positions of the new tokens: left padding (attention_mask 0) does not count."""
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
    return torch.arange(past, past + S, device=device)[None].expand(B, S)


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, S: int, device) -> torch.Tensor | None:
    """(B|1, 1, S, L) bool, True where query slot q may attend key slot j: j <= q and j is not padding (a padding
    query sees itself, so that no row is empty); None for plain causal attention (no cache, no padding)."""
    if past == 0 and (attention_mask is None or bool(attention_mask.all())):
        return None
    L = past + S
    q = torch.arange(past, L, device=device)[:, None]  # (S, 1)
    j = torch.arange(L, device=device)[None]  # (1, L)
    if attention_mask is None:
        return (j <= q)[None, None]
    real_BL = attention_mask[:, -L:].bool()
    return ((j <= q)[None] & (real_BL[:, None, :] | (j == q)[None]))[:, None]


def new_cache(config: MegavqConfig):
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4 before the config argument
        return DynamicCache()


# ---- the model ---------------------------------------------------------------------------------------------
class MegavqPreTrainedModel(PreTrainedModel):
    config_class = MegavqConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4: generate() gives the model a DynamicCache
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: every module sets its own weights when built (the routers as megavq does), and a checkpoint
        holds every tensor."""


class MegavqModel(nn.Module):
    def __init__(self, config: MegavqConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        learned = config.pos == "learned"
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Hidden states (B, S, D) after the final norm; the cache (if any) is read and extended."""
        B, S = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        pos_BS = position_ids if position_ids is not None else positions(attention_mask, past, B, S, input_ids.device)
        mask = attention_mask_4d(attention_mask, past, S, input_ids.device)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos_BS)
        rope = rope_cos_sin(pos_BS, self.config.head_dim, self.config.rope_theta) if self.config.pos == "rope" else None
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        return self.norm(x)


class MegavqForCausalLM(MegavqPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: MegavqConfig):
        super().__init__(config)
        self.model = MegavqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # ties lm_head to the embedding when config.tie_word_embeddings

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, past_key_values=None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, S, V) of the next token after each of input_ids (B, S); with labels, the mean next-token
        cross-entropy (labels -100 ignored). attention_mask (B, L) marks left padding; the cache holds the
        keys and values of earlier tokens (generation)."""
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = new_cache(self.config)
        x = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
