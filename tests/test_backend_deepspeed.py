"""moe.backend=deepspeed (DeepSpeed-MoE with the megavq gate adapter) and moe.backend=megablocks, in one process.

Multi-rank runs of both backends are in test_expert_parallel.py. The megablocks tests need a CUDA GPU.
"""
import dataclasses

import pytest
import torch

from megavq.compat import deepspeed as ds_compat
from megavq.config import MoEConfig
from megavq.errors import ConfigError
from megavq.moe.dispatch.deepspeed import DeepSpeedDispatcher, RouterGate
from megavq.moe.layer import build_moe_layer
from megavq.moe.routers import available_routers, build_router, router_class
from megavq.moe.spec import MoESpec

TOKEN_ROUTERS = [r for r in available_routers() if router_class(r).layer_kind == "token"]
OPTIONS = {"compete": {"rate": 1.0, "warmup_steps": 0}}
DEEPSEEK = {"score": "sigmoid", "route_scale": 2.5, "bias_rate": 0.01, "groups": 2, "group_top": 1}  # balancing
SHARED = {"shared_experts": 2, "d_shared": 8, "shared_gate": True}  # Qwen2-MoE's gated shared expert
CASES = {**{r: (r, OPTIONS.get(r, {}), {}) for r in TOKEN_ROUTERS}, "topk-balancing": ("topk", DEEPSEEK, {}),
         "topk-shared": ("topk", {}, SHARED)}  # id: (router, router options, MoE settings)


def layer_pair(router: str, backend: str = "deepspeed", d_model: int = 16, d_hidden: int = 24, options=None, **moe):
    """A native MoE layer and one of `backend` built from the same seeds (same weights)."""
    options = OPTIONS.get(router, {}) if options is None else options
    cfg = MoEConfig(router=router, num_experts=4, top_k=2, capacity_factor=8.0, router_options=options, **moe)
    layers = []
    for name in ("native", backend):
        torch.manual_seed(0)
        layers.append(build_moe_layer(MoESpec(dataclasses.replace(cfg, backend=name), d_model, d_hidden, seed=3)))
    return layers


@pytest.mark.parametrize("router, options, moe", CASES.values(), ids=CASES.keys())
def test_deepspeed_backend_equals_native(router, options, moe):
    """Forward, aux loss and gradients (inputs, router, experts, shared experts) with capacity large enough to drop
    nothing."""
    native, ds = layer_pair(router, options=options, **moe)
    assert isinstance(ds.dispatcher, DeepSpeedDispatcher)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for layer in (native, ds):
        xi = x.clone().requires_grad_()
        y, aux, metrics = layer(xi)
        (y.square().sum() + aux).backward()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()
                 if p.requires_grad}
        canon = layer.to_canonical("", grads) if layer is ds else grads
        results.append((y.detach(), aux.detach(), xi.grad, canon, metrics))
    (y0, a0, g0, p0, _), (y1, a1, g1, p1, m1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1, a0)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    assert sorted(p0) == sorted(p1)
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], rtol=1e-5, atol=1e-6, msg=name)
    assert m1["dropped_frac"] == 0


def test_canonical_layout_round_trip():
    native, ds = layer_pair("xmoe")  # xmoe's expert_emb: a router name with "expert" in it
    canon = ds.to_canonical("", dict(ds.state_dict()))
    assert sorted(canon) == sorted(native.state_dict())
    for k, v in native.state_dict().items():
        torch.testing.assert_close(canon[k], v, msg=k)
    assert not [k for k in ds.state_dict() if k.startswith("experts.") and "deepspeed_experts" not in k], \
        "the DeepSpeed MoE module must hold nothing but experts (its checkpointing splits keys on 'expert')"
    _, fresh = layer_pair("xmoe")
    torch.nn.init.zeros_(ds_compat.moe_local_experts(fresh.experts)[1].w_out)
    fresh.load_state_dict(fresh.from_canonical("", canon))
    for (k, a), b in zip(ds.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("k, factor, policy", [(1, 8.0, "position"), (2, 8.0, "position"), (3, 8.0, "probs"),
                                               (2, 0.5, "position"), (3, 0.5, "probs")])
def test_topk_router_routes_like_deepspeed_topkgate(k, factor, policy):
    """Same weights: same experts, gates and, under capacity drops, the same kept routes (DeepSpeed renormalises
    the kept gates of a token whose other route was dropped; megavq keeps the router's weights)."""
    from deepspeed.moe.sharded_moe import TopKGate
    D, E, T = 16, 4, 40
    torch.manual_seed(0)
    theirs = TopKGate(D, E, k, capacity_factor=factor, eval_capacity_factor=factor, min_capacity=1,
                      noisy_gate_policy=None, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    torch.nn.init.normal_(theirs.wg.weight, std=0.5)
    router = build_router("topk", hidden_size=D, num_experts=E, top_k=k)
    router.gate.weight.data.copy_(theirs.wg.weight.data)
    ours = RouterGate(MoEConfig(num_experts=E, top_k=k, capacity_factor=factor, eval_capacity_factor=factor,
                                min_capacity=1, drop_policy=policy))
    ours.route = router
    x = torch.randn(T, D)
    _, C0, _, idx0, _, gates0, counts0 = theirs(x, None, True)
    _, C1, _, idx1, loc1, gates1, counts1 = ours(x, None, True)
    assert int(C0) == C1 and torch.equal(counts0, counts1)
    assert torch.equal(idx0, idx1)
    kept = idx1 >= 0
    assert (loc1[kept] < C1).all()
    pairs = idx1[kept].long() * C1 + loc1[kept].long()
    assert pairs.unique().numel() == pairs.numel(), "an (expert, location) pair used twice"
    if factor >= 8:
        torch.testing.assert_close(gates1, gates0)
        assert ours.dropped_frac == 0
    else:
        assert 0 < ours.dropped_frac < 1
        assert ours.dropped_frac == pytest.approx((~kept).float().mean().item())


def test_layer_equals_deepspeed_moe_with_its_own_gate():
    """DeepSpeed's MoE with its TopKGate and our layer (topk router, same weights) give the same output."""
    from deepspeed.moe.layer import MoE
    _, ds = layer_pair("topk")
    local = ds_compat.moe_local_experts(ds.experts)
    theirs = MoE(16, local[0], num_experts=4, k=2, capacity_factor=8.0, eval_capacity_factor=8.0,
                 top2_2nd_expert_sampling=False, use_rts=False)
    ds_compat.moe_local_experts(theirs).load_state_dict(local.state_dict())
    theirs.deepspeed_moe.gate.wg.weight.data.copy_(ds.router.gate.weight.data)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(ds(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-6)


def test_capacity_drops_and_eval_capacity():
    _, ds = layer_pair("topk", min_capacity=1)
    gate = ds_compat.moe_gate(ds.experts)
    gate.capacity_factor, gate.eval_capacity_factor = 0.25, 8.0
    x = torch.randn(2, 16, 16)
    _, _, metrics = ds(x)
    assert metrics["dropped_frac"] > 0.5  # capacity ceil(0.25 * 32 * 2 / 4) = 4 of 64 routes per expert-ish
    ds.eval()
    assert ds(x)[2]["dropped_frac"] == 0
    ds.train()
    gate.drop_tokens = False  # dropless: capacity = the largest expert load
    assert ds(x)[2]["dropped_frac"] == 0


def test_pre_0_19_4_dense_gate_contract_gives_the_same_output():
    """gate(x, used_token) -> (l_aux, combine[T,E,C], dispatch_mask, exp_counts), computed as old MOELayer did."""
    _, ds = layer_pair("usmoe", allow_noncausal=True)  # 0..E experts per token: -1 slots
    x = torch.randn(2, 9, 16)
    gate = ds_compat.moe_gate(ds.experts)
    gate.route = ds.router_fn(9)
    _, combine_TEC, dispatch_TEC, _ = gate(x.view(-1, 16), None)
    dispatched_ECD = torch.einsum("sec,sm->ecm", dispatch_TEC.float(), x.view(-1, 16))
    local = ds_compat.moe_local_experts(ds.experts)
    out_ECD = torch.stack([expert(dispatched_ECD[e]) for e, expert in enumerate(local)])
    old = torch.einsum("sec,ecm->sm", combine_TEC, out_ECD)
    torch.testing.assert_close(old.view_as(x), ds(x)[0], rtol=1e-5, atol=1e-6)


def test_unsupported_combinations_say_what_works():
    with pytest.raises(ConfigError, match="moe.router=soft runs on moe.backend=native or reference"):
        build_moe_layer(MoESpec(MoEConfig(router="soft", backend="deepspeed", allow_noncausal=True), 16, 24))
    with pytest.raises(ConfigError, match="moe.ep_size=2 runs on moe.backend=native or deepspeed"):
        build_moe_layer(MoESpec(MoEConfig(backend="reference", ep_size=2), 16, 24))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_megablocks_on_cpu_names_the_gpu_and_the_extra():
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU and the megablocks extra"):
        build_moe_layer(MoESpec(MoEConfig(backend="megablocks"), 16, 24))


# ---- MegaBlocks (GPU) -------------------------------------------------------------------------------------
def megablocks_pair(router: str):
    return [layer.cuda().to(torch.bfloat16) for layer in layer_pair(router, "megablocks", 64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["topk", "vq", "expert_choice"])
def test_megablocks_equals_native(router):
    native, mb = megablocks_pair(router)
    x = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16)
    (y0, a0, _), (y1, a1, metrics) = native(x), mb(x)
    assert metrics["dropped_frac"] == 0
    torch.testing.assert_close(y1.float(), y0.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(a1.float(), a0.float(), rtol=1e-3, atol=1e-5)
    (y1.float().square().sum() + a1).backward()
    assert all(p.grad is not None for p in mb.experts.parameters())
    canon = mb.to_canonical("", dict(mb.state_dict()))
    for k, v in native.state_dict().items():
        torch.testing.assert_close(canon[k].float(), v.float(), msg=k)


@pytest.mark.gpu
def test_megablocks_runs_the_competition_step():
    """Every expert on every token (in plain torch), winners routed through MegaBlocks' kernels."""
    _, mb = megablocks_pair("compete")
    x = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16)
    y, aux, metrics = mb(x)
    assert metrics["competed"] == 1 and torch.isfinite(y).all()
    (y.float().square().sum() + aux).backward()
    assert mb.router.gate.weight.grad is not None  # the distillation loss reaches the router


@pytest.mark.gpu
def test_megablocks_router_seam_equals_learned_router():
    """The megavq topk router, fed MegaBlocks' LearnedRouter weights, returns what LearnedRouter returns."""
    from megablocks.layers.router import LearnedRouter
    native, mb = megablocks_pair("topk")
    seam = mb.experts.router
    theirs = LearnedRouter(seam.args).cuda().to(torch.bfloat16)
    theirs.args.moe_normalize_expert_weights = 1  # megavq topk renormalises the k > 1 weights to sum 1
    theirs.layer.weight.data.copy_(mb.router.gate.weight.data)
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    scores0, w0, i0 = theirs(x)
    seam.route = mb.router
    scores1, w1, i1 = seam(x)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(w1.float(), w0.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(scores1.float(), scores0.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.gpu
def test_megablocks_model_loads_native_weights():
    """A whole model with MegaBlocks MoE layers loads native weights (from_canonical) and gives close logits."""
    import tempfile

    from megavq.config import load_config
    from megavq.model import Transformer
    from megavq.store.model_dir import load_weights, save_model
    cfg = load_config("tiny", ["model.vocab_size=256", "model.n_layers=2", "model.d_model=64"])
    torch.manual_seed(0)
    native = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_model(native.state_dict(), cfg, d)
        cfg.moe.backend = "megablocks"
        mb = Transformer(cfg)
        load_weights(mb, d)
    idx = torch.randint(256, (2, 32))
    with torch.no_grad():
        ref = native.cuda().to(torch.bfloat16)(idx.cuda()).float()
        out = mb.cuda().to(torch.bfloat16)(idx.cuda()).float()
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


def test_deepspeed_version_range_is_the_tested_one():
    """pyproject pins the range the suite ran on; anything else gets one warning at start-up."""
    import re

    from conftest import ROOT
    pin = re.search(r'"deepspeed==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and (pin[1], pin[1]) == ds_compat.TESTED
    assert ds_compat.is_tested("0.19.8") and ds_compat.is_tested("0.19.8+cpu")
    assert not ds_compat.is_tested("0.19.4") and not ds_compat.is_tested("0.20.0")
    assert ds_compat.is_tested(ds_compat.check_deepspeed_version())  # the installed one: no warning here
