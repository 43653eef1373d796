"""Sparse upcycling: exact expert copies, new routers, step-0 function preservation, k-means codebooks, scripts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavq.config import config_from_dict
from megavq.convert.load import load_model
from megavq.convert.upcycle import (
    Recipe,
    calibration_batches,
    dropped_units,
    mlp_inputs,
    preserves_function,
    upcycle,
    upcycle_config,
    upcycle_state_dict,
)
from megavq.errors import MegavqError
from megavq.model import Transformer
from megavq.moe.routers import available_routers
from megavq.store.model_dir import save_model

ROOT = Path(__file__).resolve().parents[1]
V = 101

# (router, top_k) -> whether the router's weights sum to 1 per token at step 0, so that the upcycled model
# computes the dense function (docs/upcycling.md explains each line)
PRESERVES = {
    ("topk", 2): True,  # renormalised top-k (Mixtral)
    ("topk", 1): False,  # Switch: the weight is the softmax probability, about 1/E
    ("xmoe", 2): True,  # renormalised over the chosen k
    ("xmoe", 1): False,
    ("compete", 2): True,  # softmax over the top-k logits (competition steps: over the top-k affinities)
    ("vq", 1): True,  # the code's expert alone, weight 1
    ("vq", 2): True,  # [g_c * p_cont, g_d] divided by their sum (the default normalize=True)
    ("vq", 3): True,  # g_c * (renormalised top-2) + g_d = 1
    ("expert_choice", 2): False,  # a token gets 0..E experts
    ("usmoe", 2): False,  # 0..E experts; weights normalised over all E experts, not the chosen ones
    ("soft", 1): False,  # experts run on mixtures of tokens
}


@torch.no_grad()
def randomize(model, std: float = 0.15) -> None:
    """Weights large enough that a wrong function shows in the logits."""
    for name, p in model.named_parameters():
        p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else std * torch.randn_like(p))


def dense_megavq(vocab_size: int = V, **model) -> Transformer:
    m = {"n_layers": 4, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab_size, "seq_len": 32,
         "d_ff": 48, **model}
    torch.manual_seed(0)
    dense = Transformer(config_from_dict({"model": m, "moe": {"every": 0}}))
    randomize(dense)
    return dense.eval()


def dense_model(family: str, tmp_path) -> Transformer:
    if family == "megavq":
        return dense_megavq()
    pytest.importorskip("transformers")
    from test_hf import tiny_hf
    tiny_hf(family).save_pretrained(tmp_path / family)
    return load_model(tmp_path / family)


def random_batches(n: int = 4, batch: int = 8, seq: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (batch, seq), generator=g), None) for _ in range(n)]


def need_router(name: str) -> None:
    if name not in available_routers():
        pytest.skip(f"router '{name}' is not registered (available: {available_routers()})")


def upcycled(dense, router, top_k, every=2, overrides=()):
    cfg = upcycle_config(dense.cfg, 4, top_k, router, every, list(overrides))
    return upcycle(dense, cfg, random_batches())


# ---- structure -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mlp, bias", [("swiglu", False), ("gelu", True)])
def test_experts_are_exact_copies(mlp, bias):
    dense = dense_megavq(mlp=mlp, mlp_bias=bias, norm="layernorm" if bias else "rmsnorm")
    cfg = upcycle_config(dense.cfg, 3, 2, "topk", every=2)
    sd, dsd = upcycle_state_dict(dense.state_dict(), cfg), dense.state_dict()
    assert [i for i, b in enumerate(Transformer(cfg).blocks) if b.is_moe] == [1, 3]
    w_in, w_out = sd["blocks.1.mlp.experts.w_in"], sd["blocks.1.mlp.experts.w_out"]
    ins = ["gate", "up"] if mlp == "swiglu" else ["up"]
    for e in range(3):
        for j, p in enumerate(ins):
            assert torch.equal(w_in[e, j], dsd[f"blocks.1.mlp.{p}_proj.weight"].t())
            if bias:
                assert torch.equal(sd["blocks.1.mlp.experts.b_in"][e, j], dsd[f"blocks.1.mlp.{p}_proj.bias"])
        assert torch.equal(w_out[e], dsd["blocks.1.mlp.down_proj.weight"].t())
    assert "blocks.1.mlp.up_proj.weight" not in sd and torch.equal(sd["blocks.0.mlp.up_proj.weight"],
                                                                     dsd["blocks.0.mlp.up_proj.weight"])
    model, _ = upcycle(dense, cfg)
    assert model.blocks[1].mlp.router.gate.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_every_one_upcycles_every_block():
    _, report = upcycled(dense_megavq(), "topk", 2, every=1)
    assert report["moe_layers"] == [0, 1, 2, 3]


# ---- step-0 function preservation -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["megavq", "llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("router, top_k", [("topk", 2), ("xmoe", 2), ("vq", 3), ("vq", 2)])
def test_upcycled_logits_equal_dense(family, router, top_k, tmp_path):
    need_router(router)
    dense = dense_model(family, tmp_path)
    _, report = upcycled(dense, router, top_k)
    print(f"{family} {router} k={top_k}: max |logit diff| {report['max_logit_diff']:.2e} "
          f"(logits up to {report['logit_scale']:.1f})")
    assert preserves_function(report) == PRESERVES[router, top_k]
    if PRESERVES[router, top_k]:
        assert report["max_logit_diff"] < 1e-4


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_upcycled_hugging_face_model_exports_with_the_same_logits(tmp_path):
    """Llama -> upcycled (MoE every other block) -> Qwen2-MoE: transformers computes the original Llama's logits."""
    transformers = pytest.importorskip("transformers")
    from test_hf import hf_logits, tiny_hf

    from megavq.convert.hf.export import save_hf
    llama = tiny_hf("llama")
    llama.save_pretrained(tmp_path / "llama")
    moe, _ = upcycled(load_model(tmp_path / "llama"), "topk", 2)
    save_hf(moe, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    idx = random_batches(1)[0][0]
    diff = (hf_logits(hf, idx) - hf_logits(llama, idx)).abs().max().item()
    print(f"{type(hf).__name__} exported from an upcycled Llama: max |logit diff| vs the Llama = {diff:.2e}")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and diff < 1e-4


@pytest.mark.parametrize("router, top_k", sorted(PRESERVES))
def test_preservation_per_router(router, top_k):
    """What docs/upcycling.md states for each router, measured on a megavq dense model."""
    need_router(router)
    _, report = upcycled(dense_megavq(), router, top_k, overrides=["moe.allow_noncausal=true"])
    assert preserves_function(report) == PRESERVES[router, top_k], report


# ---- variants: granular upcycling, noise, Drop-Upcycling ------------------------------------------------------
@pytest.mark.parametrize("mlp, bias", [("swiglu", False), ("gelu", True)])
@pytest.mark.parametrize("router, E, k, G, exact", [
    ("topk", 8, 4, 2, True),  # 4 copies split in 2; top-4 = 2 whole copies, renormalised
    ("topk", 4, 4, 4, True),  # one copy split in 4, every expert active
    ("topk", 8, 2, 2, True),  # top-2 of shared gate rows = one whole copy
    ("compete", 8, 4, 2, True),  # softmax over the top-k logits: the same weights at evaluation
    ("xmoe", 8, 4, 2, False),  # no gate rows to share: its top-k splits copies
])
def test_granular_upcycling_starts_at_the_dense_function(mlp, bias, router, E, k, G, exact):
    dense = dense_megavq(mlp=mlp, mlp_bias=bias, norm="layernorm" if bias else "rmsnorm")
    cfg = upcycle_config(dense.cfg, E, k, router, every=1, granularity=G)
    assert cfg.moe.d_expert == 48 // G
    _, report = upcycle(dense, cfg, recipe=Recipe(granularity=G))
    print(f"{mlp} {router} E={E} k={k} G={G}: max |logit diff| {report['max_logit_diff']:.2e}")
    assert preserves_function(report) == exact
    if exact:
        assert report["max_logit_diff"] < 1e-5 * max(1.0, report["logit_scale"])


def test_noise_on_the_copies():
    dense = dense_megavq()
    cfg = upcycle_config(dense.cfg, 4, 2, "topk")
    exact = upcycle_state_dict(dense.state_dict(), cfg)["blocks.1.mlp.experts.w_in"]
    noisy = upcycle_state_dict(dense.state_dict(), cfg, Recipe(noise=0.01))["blocks.1.mlp.experts.w_in"]
    rel_E = (noisy - exact).flatten(1).std(1) / exact[0].std()
    assert torch.allclose(rel_E, torch.full((4,), 0.01), rtol=0.1), rel_E
    assert not torch.equal(noisy[0], noisy[1])
    again = upcycle_state_dict(dense.state_dict(), cfg, Recipe(noise=0.01))["blocks.1.mlp.experts.w_in"]
    assert torch.equal(noisy, again)
    _, report = upcycle(dense, cfg, recipe=Recipe(noise=0.01))
    assert not preserves_function(report)


def changed_units(sd: dict, exact: dict, prefix: str, e: int) -> tuple:
    """The hidden units of expert e that differ from the exact copy: in each input projection, and in the output."""
    w_in, w_out = sd[prefix + "w_in"][e], sd[prefix + "w_out"][e]  # (1|2, D, h), (h, D)
    ins = [(w_in[j] != exact[prefix + "w_in"][e][j]).any(0).nonzero().flatten() for j in range(w_in.shape[0])]
    return ins, (w_out != exact[prefix + "w_out"][e]).any(1).nonzero().flatten()


@pytest.mark.parametrize("mlp, bias, G", [("swiglu", False, 1), ("gelu", True, 1), ("swiglu", False, 2)])
def test_drop_upcycling_reinitialises_the_chosen_units(mlp, bias, G):
    dense = dense_megavq(mlp=mlp, mlp_bias=bias, norm="layernorm" if bias else "rmsnorm", d_ff=64)
    cfg = upcycle_config(dense.cfg, 4, 2, "topk", granularity=G)
    exact = upcycle_state_dict(dense.state_dict(), cfg, Recipe(granularity=G))
    recipe = Recipe(drop=0.5, granularity=G, seed=3)
    sd = upcycle_state_dict(dense.state_dict(), cfg, recipe)
    h, sets = 64 // G, []
    for block in (1, 3):
        prefix = f"blocks.{block}.mlp.experts."
        for e in range(4):
            chosen = dropped_units(recipe, block, e, h)
            assert chosen.numel() == h // 2
            ins, out = changed_units(sd, exact, prefix, e)
            for units in ins + [out]:
                assert torch.equal(units, chosen)  # the same units in gate, up and down, and only those
            if bias:
                assert torch.equal((sd[prefix + "b_in"][e] != exact[prefix + "b_in"][e]).any(0).nonzero().flatten(),
                                   chosen)
            sets.append(tuple(chosen.tolist()))
    assert len(set(sets)) == len(sets)  # every expert of every block its own set
    dense_up = dense.state_dict()["blocks.1.mlp.up_proj.weight"]
    new = torch.cat([sd["blocks.1.mlp.experts.w_in"][e, -1][:, dropped_units(recipe, 1, e, h)].flatten()
                     for e in range(4)])
    scale = dense_up.std()
    assert abs(new.mean() - dense_up.mean()) < 0.1 * scale and abs(new.std() / scale - 1) < 0.1
    assert all(torch.equal(v, upcycle_state_dict(dense.state_dict(), cfg, recipe)[k]) for k, v in sd.items())
    other = upcycle_state_dict(dense.state_dict(), cfg, Recipe(drop=0.5, granularity=G, seed=4))
    assert not torch.equal(other["blocks.1.mlp.experts.w_in"], sd["blocks.1.mlp.experts.w_in"])


@pytest.mark.parametrize("kw, message", [
    ({"granularity": 3}, "granularity must be >= 1 and divide model.d_ff"),
    ({"granularity": 2, "top_k": 1}, "divide .* top_k"),
])
def test_bad_granularity(kw, message):
    args = {"num_experts": 4, "top_k": 2, "router": "topk", **kw}
    with pytest.raises(MegavqError, match=message):
        upcycle_config(dense_megavq().cfg, **args)


def test_bad_recipe():
    dense = dense_megavq()
    with pytest.raises(MegavqError, match="drop in"):
        upcycle(dense, upcycle_config(dense.cfg, 4, 2, "topk"), recipe=Recipe(drop=1.5))
    with pytest.raises(MegavqError, match="granularity 2 does not match moe.d_expert=0"):
        upcycle(dense, upcycle_config(dense.cfg, 4, 2, "topk"), recipe=Recipe(granularity=2))


# ---- k-means codebooks ---------------------------------------------------------------------------------
def test_kmeans_codebook_uses_most_codes_on_calibration_data():
    need_router("vq")
    dense = dense_megavq(vocab_size=4096, d_model=64, n_heads=4, seq_len=64)
    batches = calibration_batches("builtin", 4096, dense.cfg.model.seq_len, tokens=4096)
    cfg = upcycle_config(dense.cfg, 8, 2, "vq", overrides=["moe.router_options.num_codes=16"])
    model, report = upcycle(dense, cfg, batches, calib_tokens=4096)
    states = mlp_inputs(dense, [1], batches, 4096)[1]
    router = model.blocks[1].mlp.router
    def usage(codebook):
        return torch.cdist(states, codebook.float()).argmin(-1).unique().numel() / router.num_codes
    used, random_init = usage(router.codebook), usage(torch.randn_like(router.codebook))
    print(f"k-means codebook: {used:.0%} of {router.num_codes} codes used on {len(states)} calibration tokens "
          f"(a random normal codebook: {random_init:.0%}); report {report['code_usage']}")
    assert used >= 0.75 and min(report["code_usage"].values()) >= 0.75
    assert bool(router.initialized)


def test_vq_without_calibration_data_is_refused():
    need_router("vq")
    dense = dense_megavq()
    with pytest.raises(MegavqError, match="calibration data"):
        upcycle(dense, upcycle_config(dense.cfg, 4, 2, "vq"))


# ---- user errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"overrides": ["model.d_model=64"]}, "model.d_model cannot change"),
    ({"overrides": ["moe.d_expert=16"]}, "moe.d_expert must be 0"),
    ({"every": 0}, "every must be >= 1"),
    ({"router": "nope"}, "unknown"),
])
def test_bad_requests(kw, message):
    args = {"num_experts": 4, "top_k": 2, "router": "topk", "every": 2, **kw}
    with pytest.raises(MegavqError, match=message):
        upcycle_config(dense_megavq().cfg, **args)


def test_already_moe_is_refused():
    moe = upcycle_config(dense_megavq().cfg, 4, 2, "topk")
    with pytest.raises(MegavqError, match="already an MoE"):
        upcycle_config(moe, 4, 2, "topk")


# ---- scripts ---------------------------------------------------------------------------------------------------
def run_script(name: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_upcycle_and_export_scripts(tmp_path):
    dense = dense_megavq()
    save_model(dense.state_dict(), dense.cfg, tmp_path / "dense")
    r = run_script("upcycle.py", "--dense", tmp_path / "dense", "--out", tmp_path / "moe", "--num_experts", 4,
                   "--top_k", 2, "--router", "topk", "--every", 1, "train.lr=1e-4")
    assert r.returncode == 0, r.stderr
    assert "the dense function" in r.stdout and "NOT" not in r.stdout
    moe = load_model(tmp_path / "moe")
    assert moe.cfg.train.lr == 1e-4 and moe.cfg.moe.every == 1
    idx = random_batches(1)[0][0]
    with torch.no_grad():
        assert (moe(idx) - dense(idx)).abs().max() < 1e-4
    r = run_script("export.py", "--checkpoint", tmp_path / "moe", "--out", tmp_path / "copy")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == moe.cfg.to_dict()
    bad = run_script("upcycle.py", "--dense", tmp_path / "moe", "--out", tmp_path / "x", "--num_experts", 4,
                     "--top_k", 2, "--router", "topk")
    assert bad.returncode == 2 and bad.stderr.startswith("error: the model is already an MoE model")
    r = run_script("upcycle.py", "--dense", tmp_path / "dense", "--out", tmp_path / "fine", "--num_experts", 8,
                   "--top_k", 4, "--router", "topk", "--granularity", 2, "--drop", 0.25, "--seed", 5)
    assert r.returncode == 0, r.stderr
    assert "NOT the dense function" in r.stdout  # dropped units
    manifest = json.loads((tmp_path / "fine" / "manifest.json").read_text())
    assert manifest["upcycled"] == {"dense": str(tmp_path / "dense"), "noise": 0.0, "drop": 0.25, "granularity": 2,
                                    "seed": 5}
    assert load_model(tmp_path / "fine").cfg.moe.d_expert == 24


@pytest.mark.slow
def test_continue_training_upcycled_model_with_deepspeed(tmp_path):
    """Upcycle (vq, k-means on the builtin corpus) and train a few steps with the deepspeed launcher."""
    need_router("vq")
    dense = dense_megavq(vocab_size=4096, n_layers=2)
    save_model(dense.state_dict(), dense.cfg, tmp_path / "dense")
    r = run_script("upcycle.py", "--dense", tmp_path / "dense", "--out", tmp_path / "moe", "--num_experts", 4,
                   "--top_k", 3, "--router", "vq", "--calib_tokens", 2048, "data.micro_batch_size=4",
                   "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3",
                   "train.save_every=3", "data.eval_batches=2")
    assert r.returncode == 0, r.stderr
    assert "k-means codebook uses" in r.stdout, r.stdout
    cmd = ["deepspeed", str(ROOT / "scripts" / "pretrain.py"), "--ds_config", str(ROOT / "ds_configs" / "zero2.json"),
           "--init_from", str(tmp_path / "moe"), "--out_dir", str(tmp_path / "run")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["test_loss"] == summary["test_loss"]  # finite, not NaN
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    from megavq.data import TokenData, prepare_data
    x, y = TokenData(prepare_data("builtin")).batch("train", 0, 4, dense.cfg.model.seq_len, dense.cfg.train.seed)
    with torch.no_grad():
        dense_loss = dense(x, y).lm_loss.item()
    print(f"step-1 training loss of the upcycled model {first['train/lm_loss']:.6f}, dense model {dense_loss:.6f}")
    assert first["train/lm_loss"] == pytest.approx(dense_loss, rel=1e-5)  # vq with top_k 3 preserves the function
    trained = load_model(tmp_path / "run")
    assert trained.cfg.moe.router == "vq" and trained.blocks[1].is_moe
