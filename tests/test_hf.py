"""Hugging Face import and export: tiny random models built locally, logits compared with transformers on CPU."""
import json
import math
import re

import pytest
import torch

from megavq.config import config_from_dict
from megavq.convert.hf.export import save_hf
from megavq.convert.load import load_model
from megavq.errors import MegavqError
from megavq.model import Transformer
from megavq.store.model_dir import resolve_model_dir

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Qwen2-MoE's empty shared expert

V, S = 101, 12
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-5)


def tiny_hf(family: str, **kw):
    """A tiny random Hugging Face causal LM of `family`, with non-trivial norms and biases."""
    T = transformers
    configs = {
        "llama": lambda: T.LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=500.0, **kw),
        "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=1, **{"sliding_window": None, **kw}),
        "qwen2": lambda: T.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True, **kw),
        "gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64, **kw),
        "mixtral": lambda: T.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, **kw),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=24, decoder_sparse_step=2, norm_topk_prob=False,
                                              **{"shared_expert_intermediate_size": 0, **kw}),
        # a gated shared expert, and block 2 kept dense among the MoE blocks (decoder_sparse_step 1)
        "qwen2_moe_shared": lambda: T.Qwen2MoeConfig(**COMMON, num_key_value_heads=2, num_experts=4,
                                                     num_experts_per_tok=2, moe_intermediate_size=24,
                                                     shared_expert_intermediate_size=40, mlp_only_layers=[2],
                                                     norm_topk_prob=True, **kw),
        # heads of 12 (not 32 / 4), per-head QK-norm, MoE in every other block but block 3
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, num_key_value_heads=2, head_dim=12, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                                              mlp_only_layers=[3], norm_topk_prob=True, **kw),
        # QK-norm over the whole projections, clip_qkv, unnormalised top-k weights
        "olmoe": lambda: T.OlmoeConfig(**{**COMMON, "intermediate_size": 24}, num_key_value_heads=4, num_experts=4,
                                       num_experts_per_tok=2, clip_qkv=1.5, norm_topk_prob=False, eos_token_id=None,
                                       **kw),
    }
    cfg = configs[family]()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize(model)
    return model


@torch.no_grad()
def randomize(model, std: float = 0.15) -> None:
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or ".ln_" in name):
            p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
        else:
            p.normal_(0, std)


def tokens(batch: int = 2, seq: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, idx):
    return model(idx).logits.float()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "mixtral", "qwen2_moe"])
def test_import_matches_transformers(family, tmp_path):
    hf = tiny_hf(family)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    idx = tokens()
    diff = (model(idx) - hf_logits(hf, idx)).abs().max().item()
    print(f"{family}: max |logit diff| megavq vs transformers = {diff:.2e}")
    assert diff < 1e-4


MOE_FAMILIES = {"mixtral": "MixtralForCausalLM", "qwen2_moe_shared": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


@pytest.mark.parametrize("original", [True, False], ids=["per-expert", "fused"])
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_import_export_round_trip(family, original, tmp_path):
    """Released MoE architectures saved per expert (the Hub's names) or fused (transformers 5's gate_up_proj):
    imported logits equal transformers' to 1e-5 in fp32; exported back, transformers loads the same architecture
    and its logits equal megavq's; greedy generations agree."""
    hf = tiny_hf(family)
    hf.save_pretrained(tmp_path / "in", save_original_format=original, max_shard_size="40KB")
    names = json.loads((tmp_path / "in" / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.endswith("experts.gate_up_proj") for k in names) != original  # the layout asked for
    model = load_model(tmp_path / "in")
    idx = tokens()
    diff = (model(idx) - hf_logits(hf, idx)).abs().max().item()
    save_hf(model, tmp_path / "out")
    back = getattr(transformers, MOE_FAMILIES[family]).from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        diff_back = (hf_logits(back.eval(), idx) - model(idx)).abs().max().item()
    prompt = idx[:1, :5]
    back.generation_config.eos_token_id = None  # 8 tokens, as megavq's generate without eos_id
    ours = model.generate(prompt.tolist(), 8, greedy=True)[0]
    theirs = back.generate(prompt, max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    print(f"{family} ({'per-expert' if original else 'fused'}): max |logit diff| imported {diff:.2e}, "
          f"exported {diff_back:.2e}; greedy tokens {ours} / {theirs}")
    assert diff < 1e-5 and diff_back < 1e-5 and ours == theirs


def test_import_details(tmp_path):
    """GQA, qkv bias, tied embeddings and rope_theta land in the config; Qwen2 gets bias on q, k, v only."""
    tiny_hf("qwen2").save_pretrained(tmp_path)
    m = load_model(tmp_path).cfg.model
    assert (m.n_kv_heads, m.qkv_bias, m.out_bias, m.tie_embeddings, m.norm_eps) == (2, True, False, True, 1e-5)
    tiny_hf("llama").save_pretrained(tmp_path / "l")
    assert load_model(tmp_path / "l").cfg.model.rope_theta == 500.0


def test_gpt2_bin_without_prefix_and_sharded(tmp_path):
    """pytorch_model.bin (weights_only) with the original GPT-2 key names, and sharded safetensors."""
    hf = tiny_hf("gpt2")
    hf.config.save_pretrained(tmp_path / "bin")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the causal-mask buffer of old checkpoints
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    idx = tokens()
    for d in ("bin", "sharded"):
        assert (load_model(tmp_path / d)(idx) - hf_logits(hf, idx)).abs().max() < 1e-4


def test_sliding_window_limits_context(tmp_path):
    """Within the window, windowed attention is plain causal attention: the context becomes the window."""
    hf = tiny_hf("mistral", sliding_window=S)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.cfg.model.seq_len == S
    assert (model(tokens()) - hf_logits(hf, tokens())).abs().max() < 1e-4


@pytest.mark.parametrize("change, message", [
    ({"model_type": "falcon"}, "model_type 'falcon' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "olmoe", "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2}, "head_dim 16 x 4 heads"),
])
def test_import_refuses_unsupported(tmp_path, change, message):
    tiny_hf("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(MegavqError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: .*{message}") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("original", [True, False], ids=["per-expert", "fused"])
def test_a_missing_tensor_is_named_with_its_file(tmp_path, original):
    from safetensors.torch import load_file, save_file
    tiny_hf("olmoe").save_pretrained(tmp_path, save_original_format=original)
    file = tmp_path / "model.safetensors"
    sd = load_file(file)
    missing = "model.layers.1.mlp.experts.2.up_proj.weight" if original else "model.layers.1.mlp.experts.down_proj"
    del sd[missing]
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(MegavqError, match=f"^{re.escape(str(file))}: the Hugging Face weights lack tensor "
                                          f"{re.escape(missing)}$"):
        load_model(tmp_path)


OLMOE_PUBLISHED = {  # allenai/OLMoE-1B-7B-0924, config.json (but the token ids, which are the tokenizer's)
    "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
    "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "vocab_size": 50304, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "clip_qkv": None,
    "attention_bias": False, "hidden_act": "silu", "tie_word_embeddings": False, "router_aux_loss_coef": 0.01,
    "output_router_logits": False, "initializer_range": 0.02}


def test_olmoe_preset_exports_olmoes_config_and_checkpoint_names():
    """The olmoe_1b_7b preset, built on the meta device: its export config holds OLMoE's published values, and its
    tensors have the names and shapes of OLMoE's checkpoint (OlmoeForCausalLM's, through transformers'
    conversion mapping back to the per-expert names)."""
    from transformers.core_model_loading import revert_weight_conversion

    from megavq.config import load_config
    from megavq.convert.hf.export import export_kind, hf_state_dict, native_config
    with torch.device("meta"):
        model = Transformer(load_config("olmoe_1b_7b"))
    assert export_kind(model) == "olmoe"
    config = native_config(model, "olmoe", {})
    assert {k: getattr(config, k) for k in OLMOE_PUBLISHED} == OLMOE_PUBLISHED
    assert config.rope_parameters["rope_theta"] == 10000.0
    with torch.device("meta"):
        hf = transformers.OlmoeForCausalLM(config)
    theirs = {k: tuple(v.shape) for k, v in revert_weight_conversion(hf, hf.state_dict()).items()}
    ours = {k: tuple(v.shape) for k, v in hf_state_dict(model, "olmoe").items()}
    print(f"olmoe_1b_7b: {len(ours)} tensors, {sum(math.prod(s) for s in ours.values()):,} parameters")
    assert ours == theirs and "model.layers.15.mlp.experts.63.down_proj.weight" in ours


def test_hf_dir_is_not_a_megavq_dir(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)
    with pytest.raises(MegavqError, match="is a Hugging Face model"):
        resolve_model_dir(tmp_path)


# ---- export ------------------------------------------------------------------------------------------------
def megavq_model(model: dict = {}, **moe) -> Transformer:
    model = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": V, "seq_len": 32, "d_ff": 48,
             "rope_theta": 1000.0, **model}
    torch.manual_seed(0)
    m = Transformer(config_from_dict({"model": model, "moe": {"every": 1, "num_experts": 4, "top_k": 2, **moe}}))
    randomize(m, std=0.2)  # distinct experts and a router far from uniform: routing matters
    return m.eval()


@pytest.mark.parametrize("model, moe, arch", [
    ({}, {}, "MixtralForCausalLM"),
    ({"tie_embeddings": False}, {"top_k": 1, "router_options": {"normalize": True}}, "MixtralForCausalLM"),
    ({}, {"every": 2}, "Qwen2MoeForCausalLM"),  # dense blocks between MoE blocks (the upcycling default)
    ({}, {"top_k": 1}, "Qwen2MoeForCausalLM"),  # Switch: unnormalised top-1
    ({"qkv_bias": True}, {"every": 1, "d_expert": 24}, "Qwen2MoeForCausalLM"),
    ({}, {"every": 0}, "LlamaForCausalLM"),
    ({"qkv_bias": True, "out_bias": True, "mlp_bias": True}, {"every": 0}, "LlamaForCausalLM"),
    ({"qkv_bias": True}, {"every": 0}, "Qwen2ForCausalLM"),
])
def test_export_round_trip(tmp_path, model, moe, arch):
    model = megavq_model(model, **moe)
    save_hf(model, tmp_path)
    hf = getattr(transformers, arch).from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = tokens()
    with torch.no_grad():
        ours = model(idx)
    diff = (hf_logits(hf, idx) - ours).abs().max().item()
    back = (load_model(tmp_path)(idx) - ours).abs().max().item()
    print(f"export {arch}: max |logit diff| transformers vs megavq = {diff:.2e}, re-imported = {back:.2e}")
    assert diff < 1e-4 and back < 1e-5


@pytest.mark.parametrize("change, message", [
    ({"moe": {"router": "xmoe"}}, "block 0 routes with 'xmoe'"),
    ({"model": {"mlp": "gelu"}}, "model.mlp=gelu"),
    ({"model": {"pos": "learned"}}, "model.pos=learned"),
    ({"model": {"out_bias": True}}, "no biases but on q, k, v"),
    ({"moe": {"shared_experts": 1}}, "Qwen2-MoE's shared expert is gated"),
    ({"model": {"qk_norm": "head"}, "moe": {"shared_experts": 1, "shared_gate": True}},
     "shared experts are Qwen2-MoE's, and model.qk_norm=head makes the model Qwen3MoeForCausalLM"),
    ({"model": {"qk_norm": "proj"}, "moe": {"every": 2}}, "OLMoE has an MoE layer in every block"),
    ({"model": {"clip_qkv": 1.0}}, "model.clip_qkv is OLMoE's"),
    ({"model": {"qk_norm": "proj", "qkv_bias": True}}, "OlmoeForCausalLM has one attention_bias"),
])
def test_export_refuses_what_hugging_face_cannot_express(tmp_path, change, message):
    model = {"n_layers": 2, "d_model": 32, "n_heads": 4, "vocab_size": V, "seq_len": 32, "d_ff": 48}
    cfg = config_from_dict({"model": {**model, **change.get("model", {})},
                            "moe": {"every": 1, "num_experts": 4, "top_k": 2, **change.get("moe", {})}})
    with pytest.raises(MegavqError, match=message):
        save_hf(Transformer(cfg), tmp_path)


def test_export_script(tmp_path):
    from test_upcycle import run_script

    from megavq.data.dataset import BUILTIN_TOKENIZER
    from megavq.store.model_dir import save_model
    model = megavq_model({"vocab_size": 4096})  # the shipped tokenizer's: an export writes the checkpoint's tokenizer
    save_model(model.state_dict(), model.cfg, tmp_path / "moe", BUILTIN_TOKENIZER)
    r = run_script("export.py", "--checkpoint", tmp_path / "moe", "--out", tmp_path / "hf", "--format", "hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    model = megavq_model(router="xmoe")
    save_model(model.state_dict(), model.cfg, tmp_path / "xmoe")
    r = run_script("export.py", "--checkpoint", tmp_path / "xmoe", "--out", tmp_path / "x", "--format", "hf")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot export to Hugging Face: block 0"), r.stderr
