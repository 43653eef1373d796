"""Export to Hugging Face: `save_hf(model, dir, tokenizer)` (needs transformers: the `hf` extra) writes, in the
layout of the checkpoints on the Hub, the architecture that the routers' declarations (`Router.hf_routing()`)
allow; the module docstring of megavq.convert.hf.load says which (the names and layouts are shared with import).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from megavq.config import Config
from megavq.convert.hf.load import LLAMA_KEYS, MOE_KEYS, SAFETENSORS_INDEX, rename
from megavq.convert.hf.remote import check_remote, save_remote
from megavq.convert.hf.tokenizer import save_generation_config, save_hf_tokenizer
from megavq.data.tokenizer import Tokenizer
from megavq.errors import MegavqError
from megavq.moe.routers import hf_router_name
from megavq.moe.spec import is_moe_layer


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def _refuse(why: str) -> MegavqError:
    return MegavqError(f"cannot export to Hugging Face: {why}; export it with its own modelling code "
                       f"(--remote_code: loaded with trust_remote_code=True) or with --format megavq instead")


def hf_model_type(model) -> str:
    """llama | qwen2 for a dense model; mixtral | qwen2_moe | qwen3_moe | olmoe for a top-k MoE model (see the
    module docstring of megavq.convert.hf.load)."""
    m, moe = model.cfg.model, model.cfg.moe
    for ok, what in ((m.norm == "rmsnorm", f"model.norm={m.norm}"), (m.pos == "rope", f"model.pos={m.pos}"),
                     (m.mlp == "swiglu", f"model.mlp={m.mlp}")):
        if not ok:
            raise _refuse(f"{what} is not a Llama-family backbone (rmsnorm, rope, swiglu)")
    if m.clip_qkv and m.qk_norm != "proj":
        raise _refuse("model.clip_qkv is OLMoE's, whose queries and keys are normalised over the projections "
                      "(model.qk_norm=proj)")
    if moe.every == 0:
        if m.qk_norm != "none":
            raise _refuse(f"model.qk_norm={m.qk_norm} on a dense model (Llama and Qwen2 have no QK-norm)")
        if m.qkv_bias and not m.out_bias and not m.mlp_bias:
            return "qwen2"
        if m.qkv_bias != m.out_bias:
            raise _refuse(f"model.qkv_bias={m.qkv_bias} with model.out_bias={m.out_bias} has no Llama equivalent")
        return "llama"
    kind = moe_model_type(model)
    for bad, why in moe_refusals(model.cfg, kind):
        if bad:
            raise _refuse(why)
    return kind


def moe_model_type(model) -> str:
    """OLMoE or Qwen3-MoE by the QK-norm; Mixtral for the plainest models; Qwen2-MoE for the others."""
    m, moe = model.cfg.model, model.cfg.moe
    normalized = [hf_routing(i, b.mlp.router)["normalize"] for i, b in enumerate(model.blocks) if b.is_moe]
    if m.qk_norm != "none":
        return {"proj": "olmoe", "head": "qwen3_moe"}[m.qk_norm]
    plain = moe.every == 1 and not moe.dense_layers and not moe.shared_experts and not m.qkv_bias
    return "mixtral" if plain and all(normalized) else "qwen2_moe"


def moe_refusals(cfg: Config, kind: str) -> list[tuple[bool, str]]:
    """(whether it applies, why) of what the MoE architecture `kind` cannot hold."""
    m, moe, arch = cfg.model, cfg.moe, ARCHITECTURES[kind]
    one_bias = kind in ("olmoe", "qwen3_moe")  # attention_bias: q, k, v and o together
    return [
        (m.mlp_bias or (m.out_bias and not one_bias),
         "Hugging Face MoE models (Mixtral, Qwen2-MoE) have no biases but on q, k, v "
         "(model.out_bias and model.mlp_bias must be false)"),
        (one_bias and m.qkv_bias != m.out_bias,
         f"{arch} has one attention_bias for q, k, v and o (model.qkv_bias={m.qkv_bias}, model.out_bias={m.out_bias})"),
        (moe.shared_experts > 0 and kind != "qwen2_moe",
         f"shared experts are Qwen2-MoE's, and model.qk_norm={m.qk_norm} makes the model {arch}"),
        (moe.shared_experts > 0 and not moe.shared_gate, "Qwen2-MoE's shared expert is gated (moe.shared_gate=false)"),
        (kind == "olmoe" and (moe.every != 1 or bool(moe.dense_layers)),
         f"OLMoE has an MoE layer in every block (moe.every={moe.every}, moe.dense_layers={moe.dense_layers})"),
        (kind == "olmoe" and m.n_heads * m.head_size() != m.d_model,
         f"OLMoE's q_norm spans hidden_size: model.n_heads x model.head_dim ({m.n_heads} x {m.head_size()}) must "
         f"equal model.d_model ({m.d_model})"),
    ]


def hf_routing(i: int, router) -> dict:
    """Block i's routing as Hugging Face's softmax top-k MoE expresses it ({"normalize", "jitter"})."""
    routing = router.hf_routing()
    if routing is None:
        raise _refuse(f"block {i} routes with {router.name!r}; Hugging Face MoE models (Mixtral, Qwen2-MoE, "
                      f"Qwen3-MoE, OLMoE) route by softmax top-k (moe.router={hf_router_name()})")
    return routing


def hf_config(model, model_type: str) -> dict:
    m, moe = model.cfg.model, model.cfg.moe
    d_expert = moe.d_expert or m.d_ff
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": m.vocab_size,
           "hidden_size": m.d_model, "intermediate_size": d_expert if model_type in ("mixtral", "olmoe") else m.d_ff,
           "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
           "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": m.head_size(), "hidden_act": "silu",
           "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
           "rope_scaling": None, "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
           "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32"}
    if model_type in ("llama", "olmoe", "qwen3_moe"):
        out.update(attention_bias=m.qkv_bias)
    if model_type == "llama":
        out.update(mlp_bias=m.mlp_bias)
    if model_type in ("qwen2", "qwen2_moe", "qwen3_moe", "mixtral"):
        out.update(use_sliding_window=False, sliding_window=None)
    if model_type in ("qwen2", "qwen2_moe", "qwen3_moe"):
        out.update(max_window_layers=m.n_layers)
    if model_type in ("llama", "qwen2"):
        return out
    routing = next(hf_routing(i, b.mlp.router) for i, b in enumerate(model.blocks) if b.is_moe)
    out.update(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef, output_router_logits=False)
    if model_type == "mixtral":
        return {**out, "num_local_experts": moe.num_experts, "router_jitter_noise": routing["jitter"]}
    out.update(num_experts=moe.num_experts, norm_topk_prob=routing["normalize"])
    if model_type == "olmoe":
        return {**out, "clip_qkv": m.clip_qkv or None}
    out.update(moe_intermediate_size=d_expert, decoder_sparse_step=moe.every, mlp_only_layers=list(moe.dense_layers))
    if model_type == "qwen2_moe":
        out.update(shared_expert_intermediate_size=moe.shared_experts * (moe.d_shared or d_expert), qkv_bias=True)
    return out


def hf_state_dict(model, model_type: str) -> dict:
    """The model's tensors under the Hugging Face names of `model_type`, per expert (detached, where they are:
    on the meta device for a model built there)."""
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
    return {k: v.detach() for k, v in out.items()}


def router_state_keys(model) -> set[str]:
    return {f"{prefix}router.{name}" for prefix, layer in model.moe_layers() for name in layer.router.state}


def _moe_tensors(i: int, kind: str, w: torch.Tensor, model_type: str) -> dict:
    router, name, (gate, up, down) = MOE_KEYS.get(model_type, MOE_KEYS["qwen2_moe"])
    if kind == "router.gate.weight":
        return {router.format(i=i): w}
    if kind == "experts.w_out":  # (E, H, D) -> down (D, H)
        return {name.format(i=i, e=e, n=down): w[e].t() for e in range(w.shape[0])}
    return {name.format(i=i, e=e, n=n): w[e, j].t() for e in range(w.shape[0]) for j, n in ((0, gate), (1, up))}


def _qwen2_moe_extras(cfg: Config, out: dict) -> dict:
    """Zero q/k/v biases where the model has none; without shared experts, a shared expert of width 0 (and its
    gate) in MoE blocks."""
    extras, D, moe = {}, cfg.model.d_model, cfg.moe
    for i in range(cfg.model.n_layers):
        for p in "qkv":
            weight = out[f"model.layers.{i}.self_attn.{p}_proj.weight"]
            extras.setdefault(f"model.layers.{i}.self_attn.{p}_proj.bias", weight.new_zeros(weight.shape[0]))
        if not moe.shared_experts and is_moe_layer(i, moe.every, moe.dense_layers):
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
    """The model_type an export writes: llama | qwen2 | mixtral | qwen2_moe | qwen3_moe | olmoe, or megavq (its own
    modelling code) where none of them holds the model and remote_code allows it."""
    try:
        return hf_model_type(model)
    except MegavqError:
        if not remote_code:
            raise
    check_remote(model.cfg)
    return "megavq"


def native_config(model, model_type: str, special_ids: dict):
    """The transformers config (LlamaConfig, Qwen2Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig)
    of the export."""
    from transformers import AutoConfig
    fields = {k: v for k, v in hf_config(model, model_type).items() if k not in ("model_type", "torch_dtype")}
    return AutoConfig.for_model(model_type, **fields, **special_ids)


def special_ids(tokenizer: str | Path | None) -> dict:
    """The bos/eos ids a config records: the tokenizer's (none without a tokenizer)."""
    if tokenizer is None:
        return {}
    tok = Tokenizer(tokenizer)
    bos = tok.sp.bos_id()
    return {"bos_token_id": bos if bos >= 0 else None, "eos_token_id": tok.eos_id}


def check_tokenizer(model, tokenizer: str | Path) -> None:
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
    """Write `model` (a megavq Transformer) as a Hugging Face Llama, Qwen2, Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE
    directory, or (remote_code) with its own modelling code where none of them holds it; with `tokenizer` (a
    SentencePiece model), its tokenizer files and a generation config beside it. Weights in shards of at most max_shard_size."""
    model_type = export_kind(model, remote_code)
    require_transformers()
    from huggingface_hub import save_torch_state_dict
    if tokenizer is not None:
        check_tokenizer(model, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_weights(out_dir)
    if model_type == "megavq":
        save_remote(model, out_dir, special_ids(tokenizer), max_shard_size)
    else:
        native_config(model, model_type, special_ids(tokenizer)).save_pretrained(out_dir)
        tensors = {k: v.contiguous().cpu() for k, v in hf_state_dict(model, model_type).items()}
        save_torch_state_dict(tensors, out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out_dir, model.cfg.model.seq_len)
        save_generation_config(tokenizer, out_dir)
    return out_dir
