"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE and GPT-2 <-> megavq Transformer.

Import (`load_hf_model(dir) -> (Config, state_dict)`) reads config.json and the weights (model.safetensors, sharded
safetensors, or pytorch_model.bin through `torch.load(weights_only=True)`, which unpickles no code) without
needing transformers; it also reads back megavq's own remote-code exports (model_type megavq).
Export (`save_hf(model, dir, tokenizer)`, needs transformers: the `hf` extra) writes, in the layout of the
checkpoints on the Hub, the architecture that the routers' declarations (`Router.hf_routing()`) allow:
a dense Llama-family model as Llama (Qwen2 when only q, k, v carry biases); a model whose routers route at
evaluation as softmax top-k (topk, compete) with an MoE layer in every block and renormalised weights as
Mixtral; any other such MoE model (MoE every n-th block, Switch-style unnormalised weights, q/k/v biases) as
Qwen2-MoE, whose `decoder_sparse_step` is moe.every and whose shared expert has width 0 (it adds exactly 0).
Any other causal model (vq, xmoe, usmoe with token selection, LayerNorm, learned positions, GELU, biases) is
written with its own modelling code when `remote_code=True` (megavq.convert.hf.remote). Configs are built with
transformers' config classes, weights written as safetensors shards with an index when large, and the tokenizer
(megavq.convert.hf.tokenizer) and a generation config that stops at its end-of-document id go beside them.

Legend: E experts, D hidden, H MLP hidden. Linear weights are (out, in); GPT-2's Conv1D weights are (in, out).
Experts: megavq stacks w_in (E, 2, D, H) = [gate, up] and w_out (E, H, D); the Hub stores per expert
gate (H, D), up (H, D) and down (D, H) (Mixtral calls them w1, w3, w2).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from megavq.config import Config, ModelConfig, config_from_dict, saved_config
from megavq.convert.hf.remote import megavq_state_dict
from megavq.errors import MegavqError
from megavq.moe.routers import hf_router_name
from megavq.store.model_dir import HF_CONFIG

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "gpt2", "megavq")
DEFAULT_THETA = {"mixtral": 1e6}  # rope_theta when config.json has none; 10000 otherwise
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# (Hugging Face name, megavq name); {i} layer, {p} projection, {w} weight|bias
LLAMA_KEYS = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    ("model.layers.{i}.self_attn.{p}_proj.{w}", "blocks.{i}.attn.{p}_proj.{w}"),
    ("model.layers.{i}.mlp.{p}_proj.{w}", "blocks.{i}.mlp.{p}_proj.{w}"),
]
GPT2_KEYS = [
    ("wte.weight", "embed.weight"),
    ("wpe.weight", "pos_embed.weight"),
    ("ln_f.{w}", "norm.{w}"),
    ("lm_head.weight", "lm_head.weight"),
    ("h.{i}.ln_1.{w}", "blocks.{i}.attn_norm.{w}"),
    ("h.{i}.ln_2.{w}", "blocks.{i}.mlp_norm.{w}"),
    ("h.{i}.attn.c_proj.{w}", "blocks.{i}.attn.o_proj.{w}"),
    ("h.{i}.mlp.c_fc.{w}", "blocks.{i}.mlp.up_proj.{w}"),
    ("h.{i}.mlp.c_proj.{w}", "blocks.{i}.mlp.down_proj.{w}"),
]
# MoE blocks: router name, expert tensor name, the names of (gate, up, down)
MOE_KEYS = {
    "mixtral": ("model.layers.{i}.block_sparse_moe.gate.weight",
                "model.layers.{i}.block_sparse_moe.experts.{e}.{n}.weight", ("w1", "w3", "w2")),
    "qwen2_moe": ("model.layers.{i}.mlp.gate.weight",
                  "model.layers.{i}.mlp.experts.{e}.{n}.weight", ("gate_proj", "up_proj", "down_proj")),
}
EXPERT_KEY = re.compile(r"model\.layers\.\d+\.(block_sparse_moe|mlp)\.(gate\.weight|experts\..+)")
IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)")  # buffers of old checkpoints
SHARED_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.shared_expert(_gate)?\..+")  # Qwen2-MoE, width 0 only


# ---- names ------------------------------------------------------------------------------------------------
def _pattern(template: str) -> re.Pattern:
    groups = {"i": r"(?P<i>\d+)", "p": r"(?P<p>[a-z]+)", "w": r"(?P<w>weight|bias)"}
    parts = re.split(r"\{(\w)\}", template)  # literal, group, literal, ...
    return re.compile("".join(groups[s] if n % 2 else re.escape(s) for n, s in enumerate(parts)))


def rename(key: str, table: list, to_megavq: bool = True) -> str | None:
    """The name of `key` on the other side of `table`, or None when no row matches."""
    for hf, ours in table:
        src, dst = (hf, ours) if to_megavq else (ours, hf)
        m = _pattern(src).fullmatch(key)
        if m:
            return dst.format(**m.groupdict())
    return None


# ---- reading a Hugging Face directory ---------------------------------------------------------------------
def read_hf_config(path: Path) -> dict:
    data = json.loads((path / HF_CONFIG).read_text())
    if data.get("model_type") not in SUPPORTED:
        raise MegavqError(f"{path}: Hugging Face model_type {data.get('model_type')!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED)})")
    return data


def _load_file(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def read_hf_weights(path: Path) -> dict:
    """All tensors of a Hugging Face directory: single-file or sharded, safetensors preferred over .bin."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (path / single).is_file():
            return _load_file(path / single)
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _load_file(path / shard).items()}
    raise MegavqError(f"{path} has a config.json but no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, "
                      f"{TORCH_BIN} or {TORCH_BIN_INDEX})")


def load_hf_model(path: str | Path) -> tuple[Config, dict]:
    """The megavq Config and state dict of a Hugging Face model directory."""
    path = Path(path)
    hf = read_hf_config(path)
    sd = {k: v for k, v in read_hf_weights(path).items() if not IGNORED.fullmatch(k)}
    if hf["model_type"] == "megavq":  # megavq's own remote-code export: its config and names, prefixed
        return megavq_export_config(hf, path), megavq_state_dict(sd)
    cfg = hf_to_config(hf)
    if hf["model_type"] == "gpt2":
        return cfg, gpt2_weights(sd, cfg, path)
    return cfg, llama_weights(sd, cfg, hf["model_type"], path)


# ---- config: Hugging Face -> megavq -----------------------------------------------------------------------
def megavq_export_config(hf: dict, path: Path) -> Config:
    if not isinstance(hf.get("megavq_config"), dict):
        raise MegavqError(f"{path / HF_CONFIG} (model_type megavq) lacks megavq_config")
    return saved_config(hf["megavq_config"])


def _need(hf: dict, key: str):
    if hf.get(key) is None:
        raise MegavqError(f"Hugging Face config ({hf['model_type']}) lacks {key!r}")
    return hf[key]


def _unsupported(hf: dict, what: str) -> MegavqError:
    return MegavqError(f"Hugging Face {hf['model_type']} model with {what} is not supported by megavq")


def rope_theta(hf: dict) -> float:
    """rope_theta from a transformers 4 (top level, rope_scaling) or 5 (rope_parameters) config; plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise _unsupported(hf, f"rope_type {kind!r} (only plain RoPE)")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported(hf, "partial_rotary_factor != 1")
    return float(params.get("rope_theta") or hf.get("rope_theta") or DEFAULT_THETA.get(hf["model_type"], 1e4))


def context_length(hf: dict) -> int:
    """max_position_embeddings, or the sliding window when smaller (within it, windowed attention is causal)."""
    n = _need(hf, "max_position_embeddings")
    uses_window = hf["model_type"] in ("mistral", "mixtral") or hf.get("use_sliding_window", False)
    window = hf.get("sliding_window") if uses_window else None
    return min(n, window) if window else n


def llama_model_config(hf: dict) -> ModelConfig:
    d, nh = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(hf, f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("head_dim") not in (None, d // nh):
        raise _unsupported(hf, f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({d // nh})")
    qwen = hf["model_type"] in ("qwen2", "qwen2_moe")  # biases on q, k, v but not o
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        n_layers=_need(hf, "num_hidden_layers"), d_model=d, n_heads=nh, n_kv_heads=hf.get("num_key_value_heads") or nh,
        vocab_size=_need(hf, "vocab_size"), seq_len=context_length(hf), d_ff=_need(hf, "intermediate_size"),
        mlp="swiglu", norm="rmsnorm", pos="rope", rope_theta=rope_theta(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=bool(hf.get("qkv_bias", True)) if qwen else bias, out_bias=bias and not qwen,
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02))


def gpt2_model_config(hf: dict) -> ModelConfig:
    d = _need(hf, "n_embd")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise _unsupported(hf, f"activation_function {hf['activation_function']!r} (only the tanh GELU)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise _unsupported(hf, f"{key}={hf[key]}")
    return ModelConfig(
        n_layers=_need(hf, "n_layer"), d_model=d, n_heads=_need(hf, "n_head"), vocab_size=_need(hf, "vocab_size"),
        seq_len=_need(hf, "n_positions"), d_ff=hf.get("n_inner") or 4 * d, mlp="gelu", norm="layernorm",
        pos="learned", norm_eps=hf.get("layer_norm_epsilon", 1e-5), qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=hf.get("initializer_range", 0.02))


def moe_config(hf: dict) -> dict:
    """The moe section: dense (every 0), Mixtral (every block, renormalised top-k) or Qwen2-MoE."""
    if hf["model_type"] == "mixtral":  # renormalises the top-k probabilities, also for k = 1
        jitter = hf.get("router_jitter_noise") or 0.0
        return {"every": 1, "router": hf_router_name(), "num_experts": _need(hf, "num_local_experts"),
                "top_k": _need(hf, "num_experts_per_tok"), "aux_loss_coef": hf.get("router_aux_loss_coef", 0.02),
                "router_options": {"normalize": True, **({"jitter": float(jitter)} if jitter else {})}}
    if hf["model_type"] != "qwen2_moe":
        return {"every": 0}
    if hf.get("shared_expert_intermediate_size") or hf.get("mlp_only_layers"):
        raise _unsupported(hf, "a shared expert or mlp_only_layers")
    return {"every": hf.get("decoder_sparse_step", 1), "router": hf_router_name(),
            "num_experts": _need(hf, "num_experts"), "top_k": _need(hf, "num_experts_per_tok"),
            "d_expert": _need(hf, "moe_intermediate_size"),
            "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
            "router_options": {"normalize": bool(hf.get("norm_topk_prob", False))}}


def hf_to_config(hf: dict) -> Config:
    model = gpt2_model_config(hf) if hf["model_type"] == "gpt2" else llama_model_config(hf)
    return config_from_dict({"model": dataclasses.asdict(model), "moe": moe_config(hf)})


# ---- weights: Hugging Face -> megavq ----------------------------------------------------------------------
def _unknown(keys: list, path: Path) -> MegavqError:
    return MegavqError(f"{path}: weights not understood: {sorted(keys)[:5]} ({len(keys)} in all)")


def llama_weights(sd: dict, cfg: Config, model_type: str, path: Path) -> dict:
    moe = {k: sd.pop(k) for k in list(sd) if EXPERT_KEY.fullmatch(k) or SHARED_EXPERT.fullmatch(k)}
    names = {key: rename(key, LLAMA_KEYS) for key in sd}
    left = [key for key, name in names.items() if name is None]
    if left:
        raise _unknown(left, path)
    out = {names[key]: value for key, value in sd.items()}
    if model_type in MOE_KEYS:
        out.update(moe_weights(moe, cfg, model_type))
    elif moe:
        raise _unknown(list(moe), path)
    if cfg.model.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def moe_weights(sd: dict, cfg: Config, model_type: str) -> dict:
    """Routers and per-expert gate/up/down (or transformers 5's fused gate_up_proj/down_proj) -> stacked experts."""
    out, router = {}, MOE_KEYS[model_type][0]
    for i in range(cfg.model.n_layers):
        if not (cfg.moe.every and (i + 1) % cfg.moe.every == 0):
            continue
        fused = f"model.layers.{i}.mlp.experts."
        if fused + "gate_up_proj" in sd:
            gate_EHD, up_EHD = sd[fused + "gate_up_proj"].chunk(2, dim=1)
            down_EDH = sd[fused + "down_proj"]
        else:
            gate_EHD, up_EHD, down_EDH = _stack_experts(sd, i, cfg.moe.num_experts, model_type)
        out[f"blocks.{i}.mlp.experts.w_in"] = torch.stack([gate_EHD, up_EHD], 1).transpose(2, 3)  # (E, 2, D, H)
        out[f"blocks.{i}.mlp.experts.w_out"] = down_EDH.transpose(1, 2)  # (E, H, D)
        out[f"blocks.{i}.mlp.router.gate.weight"] = _get(sd, router.format(i=i))
    return out


def _get(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise MegavqError(f"Hugging Face weights lack {key}")
    return sd[key]


def _stack_experts(sd: dict, i: int, E: int, model_type: str) -> list:
    _, name, kinds = MOE_KEYS[model_type]
    return [torch.stack([_get(sd, name.format(i=i, e=e, n=n)) for e in range(E)]) for n in kinds]


def gpt2_weights(sd: dict, cfg: Config, path: Path) -> dict:
    """Conv1D weights are (in, out): transposed; the fused c_attn is split into q, k, v."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out, left = {}, []
    for key, value in sd.items():
        m = re.fullmatch(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", key)
        name = rename(key, GPT2_KEYS)
        conv1d = key.startswith("h.") and value.dim() == 2
        if m:
            for p, part in zip("qkv", value.chunk(3, dim=-1)):
                out[f"blocks.{m[1]}.attn.{p}_proj.{m[2]}"] = part.t() if conv1d else part
        elif name is None:
            left.append(key)
        else:
            out[name] = value.t() if conv1d else value
    if left:
        raise _unknown(left, path)
    if cfg.model.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


