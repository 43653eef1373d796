"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE and GPT-2 <-> megavq Transformer.

Import (`load_hf(dir) -> (Config, state_dict)`) reads config.json and the weights (model.safetensors, sharded
safetensors, or pytorch_model.bin through `torch.load(weights_only=True)`, which unpickles no code) without
needing transformers; it also reads back megavq's own remote-code exports (model_type megavq).
Export (`save_hf(model, dir, tokenizer)`, needs transformers: the `hf` extra) writes, in the layout of the
checkpoints on the Hub, the architecture that the routers' declarations (`Router.hf_routing()`) allow:
a dense Llama-family model as Llama (Qwen2 when only q, k, v carry biases); a model whose routers route at
evaluation as softmax top-k (topk, compete) with an MoE layer in every block and renormalised weights as
Mixtral; any other such MoE model (MoE every n-th block, Switch-style unnormalised weights, q/k/v biases) as
Qwen2-MoE, whose `decoder_sparse_step` is moe.every and whose shared expert has width 0 (it adds exactly 0).
Any other causal model (vq, xmoe, usmoe with token selection, LayerNorm, learned positions, GELU, biases) is
written with its own modelling code when `remote_code=True` (megavq.hf_remote). Configs are built with
transformers' config classes, weights written as safetensors shards with an index when large, and the tokenizer
(megavq.hf_tokenizer) and a generation config that stops at its end-of-document id go beside them.

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

from megavq.errors import MegavqError
from megavq.config import Config, ModelConfig, config_from_dict, saved_config
from megavq.hf_remote import check_remote, megavq_state_dict, save_remote
from megavq.moe.routers import hf_router_name

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "gpt2", "megavq")
DEFAULT_THETA = {"mixtral": 1e6}  # rope_theta when config.json has none; 10000 otherwise
HF_CONFIG, SAFETENSORS, SAFETENSORS_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
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
def is_hf_dir(path: str | Path) -> bool:
    """True when path holds a Hugging Face config.json (one with a model_type)."""
    try:
        data = json.loads((Path(path) / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data


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


def load_hf(path: str | Path) -> tuple[Config, dict]:
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


# ---- export: megavq -> Hugging Face -----------------------------------------------------------------------
def _refuse(why: str) -> MegavqError:
    return MegavqError(f"cannot export to Hugging Face: {why}; export it with its own modelling code "
                       f"(--remote_code: loaded with trust_remote_code=True) or with --format megavq instead")


def hf_model_type(model) -> str:
    """llama | qwen2 for a dense model; mixtral | qwen2_moe for a top-k MoE model (see the module docstring)."""
    m, moe = model.cfg.model, model.cfg.moe
    for ok, what in ((m.norm == "rmsnorm", f"model.norm={m.norm}"), (m.pos == "rope", f"model.pos={m.pos}"),
                     (m.mlp == "swiglu", f"model.mlp={m.mlp}")):
        if not ok:
            raise _refuse(f"{what} is not a Llama-family backbone (rmsnorm, rope, swiglu)")
    if moe.every == 0:
        if m.qkv_bias and not m.out_bias and not m.mlp_bias:
            return "qwen2"
        if m.qkv_bias != m.out_bias:
            raise _refuse(f"model.qkv_bias={m.qkv_bias} with model.out_bias={m.out_bias} has no Llama equivalent")
        return "llama"
    if m.out_bias or m.mlp_bias:
        raise _refuse("Hugging Face MoE models (Mixtral, Qwen2-MoE) have no biases but on q, k, v "
                      "(model.out_bias and model.mlp_bias must be false)")
    normalized = [hf_routing(i, b.mlp.router)["normalize"] for i, b in enumerate(model.blocks) if b.is_moe]
    return "mixtral" if moe.every == 1 and not m.qkv_bias and all(normalized) else "qwen2_moe"


def hf_routing(i: int, router) -> dict:
    """Block i's routing as Hugging Face's softmax top-k MoE expresses it ({"normalize", "jitter"})."""
    routing = router.hf_routing()
    if routing is None:
        raise _refuse(f"block {i} routes with {router.name!r}; Hugging Face MoE models (Mixtral, Qwen2-MoE) route "
                      f"by softmax top-k (moe.router={hf_router_name()})")
    return routing


def hf_config(model, model_type: str) -> dict:
    m, moe = model.cfg.model, model.cfg.moe
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM"}[model_type]
    out = {"architectures": [arch], "model_type": model_type, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "intermediate_size": (moe.d_expert or m.d_ff) if model_type == "mixtral" else m.d_ff,
           "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
           "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": m.d_model // m.n_heads, "hidden_act": "silu",
           "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
           "rope_scaling": None, "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
           "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32"}
    if model_type == "llama":
        out.update(attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias)
    if model_type in ("qwen2", "qwen2_moe", "mixtral"):
        out.update(use_sliding_window=False, sliding_window=None)
    if model_type in ("mixtral", "qwen2_moe"):
        out.update(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef, output_router_logits=False)
    if model_type in ("mixtral", "qwen2_moe"):
        routing = next(hf_routing(i, b.mlp.router) for i, b in enumerate(model.blocks) if b.is_moe)
    if model_type == "mixtral":
        out.update(num_local_experts=moe.num_experts, router_jitter_noise=routing["jitter"])
    if model_type == "qwen2_moe":
        out.update(num_experts=moe.num_experts, moe_intermediate_size=moe.d_expert or m.d_ff,
                   decoder_sparse_step=moe.every, mlp_only_layers=[], shared_expert_intermediate_size=0,
                   norm_topk_prob=routing["normalize"], qkv_bias=True, max_window_layers=m.n_layers)
    return out


def hf_state_dict(model, model_type: str) -> dict:
    cfg, out, skipped = model.cfg, {}, router_state_keys(model)
    for key, value in model.state_dict().items():
        if key in skipped:
            continue  # what a router keeps for training (compete's counter): not part of its evaluation routing
        m = re.fullmatch(r"blocks\.(\d+)\.mlp\.(experts\.w_in|experts\.w_out|router\.gate\.weight)", key)
        if m:
            out.update(_moe_tensors(int(m[1]), m[2], value, model_type))
            continue
        name = rename(key, LLAMA_KEYS, to_megavq=False)
        assert name is not None, f"no Hugging Face name for {key}"
        out[name] = value
    if model_type == "qwen2_moe":
        out.update(_qwen2_moe_extras(cfg, out))
    if cfg.model.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def router_state_keys(model) -> set[str]:
    return {f"{prefix}router.{name}" for prefix, layer in model.moe_layers() for name in layer.router.state}


def _moe_tensors(i: int, kind: str, w: torch.Tensor, model_type: str) -> dict:
    router, name, (gate, up, down) = MOE_KEYS[model_type]
    if kind == "router.gate.weight":
        return {router.format(i=i): w}
    if kind == "experts.w_out":  # (E, H, D) -> down (D, H)
        return {name.format(i=i, e=e, n=down): w[e].t() for e in range(w.shape[0])}
    return {name.format(i=i, e=e, n=n): w[e, j].t() for e in range(w.shape[0]) for j, n in ((0, gate), (1, up))}


def _qwen2_moe_extras(cfg: Config, out: dict) -> dict:
    """Zero q/k/v biases where the model has none; a shared expert of width 0 (and its gate) in MoE blocks."""
    extras, D = {}, cfg.model.d_model
    for i in range(cfg.model.n_layers):
        for p in "qkv":
            weight = out[f"model.layers.{i}.self_attn.{p}_proj.weight"]
            extras.setdefault(f"model.layers.{i}.self_attn.{p}_proj.bias", weight.new_zeros(weight.shape[0]))
        if (i + 1) % cfg.moe.every == 0:
            s = f"model.layers.{i}.mlp.shared_expert"
            extras.update({f"{s}.gate_proj.weight": torch.zeros(0, D), f"{s}.up_proj.weight": torch.zeros(0, D),
                           f"{s}.down_proj.weight": torch.zeros(D, 0), f"{s}_gate.weight": torch.zeros(1, D)})
    return {k: v for k, v in extras.items() if k not in out}


def require_transformers() -> None:
    try:
        import huggingface_hub  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MegavqError(f"the Hugging Face export needs transformers ({e}): pip install 'megavq[hf]'") from None


def export_kind(model, remote_code: bool = False) -> str:
    """The model_type an export writes: llama | qwen2 | mixtral | qwen2_moe, or megavq (its own modelling code)
    where none of them holds the model and remote_code allows it."""
    try:
        return hf_model_type(model)
    except MegavqError:
        if not remote_code:
            raise
    check_remote(model.cfg)
    return "megavq"


def native_config(model, model_type: str, special_ids: dict):
    """The transformers config (LlamaConfig, Qwen2Config, MixtralConfig, Qwen2MoeConfig) of the export."""
    from transformers import AutoConfig
    fields = {k: v for k, v in hf_config(model, model_type).items() if k not in ("model_type", "torch_dtype")}
    return AutoConfig.for_model(model_type, **fields, **special_ids)


def special_ids(tokenizer: str | Path | None) -> dict:
    """The bos/eos ids a config records: the tokenizer's (none without a tokenizer)."""
    if tokenizer is None:
        return {}
    from megavq.data.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer)
    bos = tok.sp.bos_id()
    return {"bos_token_id": bos if bos >= 0 else None, "eos_token_id": tok.eos_id}


def check_tokenizer(model, tokenizer: str | Path) -> None:
    from megavq.data.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer)
    if tok.vocab_size != model.cfg.model.vocab_size:
        raise MegavqError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocabulary is "
                          f"{model.cfg.model.vocab_size}: pass the model's own tokenizer")


def clear_weights(out_dir: Path) -> None:
    """Remove the weight files of an earlier export, so that a single file and shards never mix."""
    for file in [*out_dir.glob("model*.safetensors"), out_dir / SAFETENSORS_INDEX]:
        file.unlink(missing_ok=True)


def save_hf(model, out_dir: str | Path, tokenizer: str | Path | None = None, remote_code: bool = False,
            max_shard_size: int | str = "5GB") -> Path:
    """Write `model` (a megavq Transformer) as a Hugging Face Llama, Qwen2, Mixtral or Qwen2-MoE directory, or
    (remote_code) with its own modelling code where none of them holds it; with `tokenizer` (a SentencePiece
    model), its tokenizer files and a generation config beside it. Weights in shards of at most max_shard_size."""
    model_type = export_kind(model, remote_code)
    require_transformers()
    from huggingface_hub import save_torch_state_dict
    from megavq.hf_tokenizer import save_generation_config, save_hf_tokenizer
    if tokenizer is not None:
        check_tokenizer(model, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_weights(out_dir)
    if model_type == "megavq":
        save_remote(model, out_dir, special_ids(tokenizer), max_shard_size)
    else:
        native_config(model, model_type, special_ids(tokenizer)).save_pretrained(out_dir)
        save_torch_state_dict(hf_state_dict(model, model_type), out_dir, max_shard_size=max_shard_size,
                              metadata={"format": "pt"})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out_dir, model.cfg.model.seq_len)
        save_generation_config(tokenizer, out_dir)
    return out_dir
