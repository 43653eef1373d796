"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, GPT-2, and the MoE models Mixtral, Qwen2-MoE (with
its gated shared expert and mlp_only_layers), Qwen3-MoE (per-head QK-norm, head_dim apart from hidden / heads) and
OLMoE (QK-norm over the whole q and k projections, clip_qkv) <-> megavq Transformer.

Import (`load_hf_model(dir) -> (Config, state_dict)`) reads config.json and the weights (model.safetensors, sharded
safetensors, or pytorch_model.bin through `torch.load(weights_only=True)`, which unpickles no code) without
needing transformers; it also reads back megavq's own remote-code exports (model_type megavq). Experts come per
expert (the names of the released checkpoints, transformers' default `save_original_format=True`) or fused
(transformers 5's `gate_up_proj` (E, 2H, D) and `down_proj` (E, D, H), `save_original_format=False`; Mixtral's
`block_sparse_moe` is then `mlp`).
Export (`save_hf(model, dir, tokenizer)`, needs transformers: the `hf` extra) writes, in the per-expert layout of
the checkpoints on the Hub, the architecture that the model's settings and the routers' declarations
(`Router.hf_routing()`) allow: a dense Llama-family model as Llama (Qwen2 when only q, k, v carry biases); a model
whose routers route at evaluation as softmax top-k (topk, compete) as OLMoE when it has QK-norm over the
projections (model.qk_norm=proj), as Qwen3-MoE with per-head QK-norm (model.qk_norm=head), as Mixtral with an MoE
layer in every block, renormalised weights, no shared experts and no biases, and as Qwen2-MoE otherwise (MoE every
n-th block (`decoder_sparse_step`), moe.dense_layers as `mlp_only_layers`, a gated shared expert, Switch-style
unnormalised weights, q/k/v biases; without shared experts its shared expert has width 0 and adds exactly 0).
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
from megavq.moe.spec import moe_blocks
from megavq.store.model_dir import HF_CONFIG

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt2", "megavq")
TOPK_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # softmax top-k MoE models
QK_NORM = {"olmoe": "proj", "qwen3_moe": "head"}  # model.qk_norm of the models that normalise queries and keys
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
    ("model.layers.{i}.self_attn.{p}_norm.weight", "blocks.{i}.attn.{p}_norm.weight"),
    ("model.layers.{i}.mlp.{p}_proj.{w}", "blocks.{i}.mlp.{p}_proj.{w}"),
    ("model.layers.{i}.mlp.shared_expert.{p}_proj.weight", "blocks.{i}.mlp.shared_expert.{p}_proj.weight"),
    ("model.layers.{i}.mlp.shared_expert_gate.weight", "blocks.{i}.mlp.shared_expert_gate.weight"),
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
# MoE blocks, per expert: router name, expert tensor name, the names of (gate, up, down). Qwen2-MoE's names are
# those of Qwen3-MoE and OLMoE too, and the names import reads (Mixtral's are renamed to them: MIXTRAL_NAMES).
MOE_KEYS = {
    "mixtral": ("model.layers.{i}.block_sparse_moe.gate.weight",
                "model.layers.{i}.block_sparse_moe.experts.{e}.{n}.weight", ("w1", "w3", "w2")),
    "qwen2_moe": ("model.layers.{i}.mlp.gate.weight",
                  "model.layers.{i}.mlp.experts.{e}.{n}.weight", ("gate_proj", "up_proj", "down_proj")),
}
MIXTRAL_NAMES = [(r"\.block_sparse_moe\.", ".mlp."), (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
                 (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."), (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj.")]
EXPERT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.(gate\.weight|experts\..+)")
IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)")  # buffers of old checkpoints
SHARED_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.shared_expert(_gate)?\..+")  # Qwen2-MoE's


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
        raise MegavqError(f"{path / HF_CONFIG}: Hugging Face model_type {data.get('model_type')!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED)})")
    return data


def _load_file(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def weights_file(path: Path) -> Path:
    """The weights of a Hugging Face directory: the single file or the shards' index, safetensors preferred."""
    for name in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX):
        if (path / name).is_file():
            return path / name
    raise MegavqError(f"{path} has a config.json but no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, "
                      f"{TORCH_BIN} or {TORCH_BIN_INDEX})")


def read_hf_weights(path: Path) -> dict:
    """All tensors of a Hugging Face directory: single-file or sharded, safetensors preferred over .bin."""
    file = weights_file(path)
    if not file.name.endswith(".index.json"):
        return _load_file(file)
    shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in _load_file(path / shard).items()}


def load_hf_model(path: str | Path) -> tuple[Config, dict]:
    """The megavq Config and state dict of a Hugging Face model directory."""
    path = Path(path)
    hf = read_hf_config(path)
    sd = {k: v for k, v in read_hf_weights(path).items() if not IGNORED.fullmatch(k)}
    if hf["model_type"] == "megavq":  # megavq's own remote-code export: its config and names, prefixed
        return megavq_export_config(hf, path), megavq_state_dict(sd)
    cfg = hf_to_config(hf, path)
    if hf["model_type"] == "gpt2":
        return cfg, gpt2_weights(sd, cfg, path)
    return cfg, llama_weights(sd, cfg, hf["model_type"], weights_file(path))


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


def head_dim(hf: dict) -> int:
    """model.head_dim: 0 where the head size is hidden_size / num_attention_heads (the default)."""
    d, nh = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    hs = hf.get("head_dim") or d // nh
    if hf["model_type"] == "olmoe" and hs * nh != d:
        raise _unsupported(hf, f"head_dim {hs} x {nh} heads != hidden_size {d} (its q_norm spans hidden_size)")
    return 0 if hs * nh == d else hs


def llama_model_config(hf: dict) -> ModelConfig:
    d, nh = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(hf, f"hidden_act {hf['hidden_act']!r} (only silu)")
    qwen = hf["model_type"] in ("qwen2", "qwen2_moe")  # biases on q, k, v but not o
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        n_layers=_need(hf, "num_hidden_layers"), d_model=d, n_heads=nh, n_kv_heads=hf.get("num_key_value_heads") or nh,
        head_dim=head_dim(hf), qk_norm=QK_NORM.get(hf["model_type"], "none"), clip_qkv=float(hf.get("clip_qkv") or 0),
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
    """The moe section: dense (every 0), Mixtral (every block, renormalised top-k), OLMoE (every block), or
    Qwen2-MoE / Qwen3-MoE (every decoder_sparse_step-th block but mlp_only_layers; Qwen2-MoE's shared expert)."""
    kind = hf["model_type"]
    if kind == "mixtral":  # renormalises the top-k probabilities, also for k = 1
        jitter = hf.get("router_jitter_noise") or 0.0
        return {"every": 1, "router": hf_router_name(), "num_experts": _need(hf, "num_local_experts"),
                "top_k": _need(hf, "num_experts_per_tok"), "aux_loss_coef": hf.get("router_aux_loss_coef", 0.02),
                "router_options": {"normalize": True, **({"jitter": float(jitter)} if jitter else {})}}
    if kind not in TOPK_MOE:
        return {"every": 0}
    experts = hf.get("num_experts") or _need(hf, "num_local_experts")  # released configs and transformers 5's
    moe = {"every": 1, "router": hf_router_name(), "num_experts": experts,
           "top_k": _need(hf, "num_experts_per_tok"), "aux_loss_coef": hf.get("router_aux_loss_coef", 0.01),
           "router_options": {"normalize": bool(hf.get("norm_topk_prob", False))}}
    if kind == "olmoe":  # its intermediate_size is the experts' (it has no dense MLP)
        return {**moe, "d_expert": _need(hf, "intermediate_size")}
    shared = (hf.get("shared_expert_intermediate_size") or 0) if kind == "qwen2_moe" else 0
    return {**moe, "every": hf.get("decoder_sparse_step", 1), "d_expert": _need(hf, "moe_intermediate_size"),
            "dense_layers": list(hf.get("mlp_only_layers") or []), "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
            "shared_experts": int(shared > 0), "d_shared": shared, "shared_gate": shared > 0}


def hf_to_config(hf: dict, path: Path) -> Config:
    """The megavq Config of a Hugging Face config (path's); what megavq cannot hold is refused naming the file."""
    try:
        model = gpt2_model_config(hf) if hf["model_type"] == "gpt2" else llama_model_config(hf)
        return config_from_dict({"model": dataclasses.asdict(model), "moe": moe_config(hf)})
    except MegavqError as e:
        raise MegavqError(f"{path / HF_CONFIG}: {e}") from None


# ---- weights: Hugging Face -> megavq ----------------------------------------------------------------------
def _unknown(keys: list, path: Path) -> MegavqError:
    return MegavqError(f"{path}: weights not understood: {sorted(keys)[:5]} ({len(keys)} in all)")


def moe_names(key: str) -> str:
    """Mixtral's names of MoE tensors as Qwen2-MoE's (block_sparse_moe -> mlp, w1 w3 w2 -> gate up down)."""
    for pattern, to in MIXTRAL_NAMES:
        key = re.sub(pattern, to, key)
    return key


def llama_weights(sd: dict, cfg: Config, model_type: str, file: Path) -> dict:
    """The state dict of a Llama-family model; `file`, where the weights come from, is named in errors."""
    sd = {moe_names(k): v for k, v in sd.items()} if model_type == "mixtral" else sd
    moe = {k: sd.pop(k) for k in list(sd) if EXPERT_KEY.fullmatch(k)}
    if not cfg.moe.shared_experts:  # Qwen2-MoE's shared expert of width 0 adds exactly 0
        moe.update({k: sd.pop(k) for k in list(sd) if SHARED_EXPERT.fullmatch(k)})
    names = {key: rename(key, LLAMA_KEYS) for key in sd}
    left = [key for key, name in names.items() if name is None]
    if left:
        raise _unknown(left, file)
    out = {names[key]: value for key, value in sd.items()}
    if model_type in TOPK_MOE:
        out.update(moe_weights(moe, cfg, file))
    elif moe:
        raise _unknown(list(moe), file)
    if cfg.model.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def moe_weights(sd: dict, cfg: Config, file: Path) -> dict:
    """Routers and per-expert gate/up/down (or transformers 5's fused gate_up_proj/down_proj) -> stacked experts."""
    out, router = {}, MOE_KEYS["qwen2_moe"][0]
    for i in moe_blocks(cfg.model.n_layers, cfg.moe.every, cfg.moe.dense_layers):
        fused = f"model.layers.{i}.mlp.experts."
        if fused + "gate_up_proj" in sd:
            gate_EHD, up_EHD = sd[fused + "gate_up_proj"].chunk(2, dim=1)
            down_EDH = _get(sd, fused + "down_proj", file)
        else:
            gate_EHD, up_EHD, down_EDH = _stack_experts(sd, i, cfg.moe.num_experts, file)
        out[f"blocks.{i}.mlp.experts.w_in"] = torch.stack([gate_EHD, up_EHD], 1).transpose(2, 3)  # (E, 2, D, H)
        out[f"blocks.{i}.mlp.experts.w_out"] = down_EDH.transpose(1, 2)  # (E, H, D)
        out[f"blocks.{i}.mlp.router.gate.weight"] = _get(sd, router.format(i=i), file)
    return out


def _get(sd: dict, key: str, file: Path) -> torch.Tensor:
    if key not in sd:
        raise MegavqError(f"{file}: the Hugging Face weights lack tensor {key}")
    return sd[key]


def _stack_experts(sd: dict, i: int, E: int, file: Path) -> list:
    _, name, kinds = MOE_KEYS["qwen2_moe"]
    return [torch.stack([_get(sd, name.format(i=i, e=e, n=n), file) for e in range(E)]) for n in kinds]


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


