"""Routers: the contract for every registered router, each router against a hand-written reference, the
reference and native backends against each other, and a short training run per causal router.

Legend: B batch, S sequence, T = B*S tokens, D hidden, H expert hidden, E experts, K slots per token.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megavq.config import MoEConfig, load_config
from megavq.errors import ConfigError
from megavq.model.transformer import Transformer
from megavq.moe.config import check_causal
from megavq.moe.layer import SoftMoELayer, build_moe_layer
from megavq.moe.routers import available_routers, build_router, load_balance_loss
from megavq.moe.routers.compete import competing_layers
from megavq.moe.routers.xmoe import default_proj_dim
from megavq.moe.spec import MoESpec
from megavq.train.engine import prepare_model

B, S, D, H, E, K = 2, 8, 16, 24, 4, 2
ROUTERS = available_routers()
# Extra option sets so that every routing path meets the contract, not only the defaults.
VARIANTS = [(name, {}) for name in ROUTERS] + [
    ("compete", {"rate": 1.0, "warmup_steps": 0}),  # competes on every training step
    ("compete", {"rate": 1.0, "warmup_steps": 0, "affinity": "norm", "winner_coef": 0.0}),
    ("compete", {"rate": 1.0, "warmup_steps": 0, "weights": "linear"}),  # the 2025 code's winner weights
    ("compete", {"rate": 1.0, "warmup_steps": 0, "affinity": "norm", "combine": 0.5, "distill_target": "topk",
                 "winner_coef": 0.0, "distill_coef": 0.05, "diversity_coef": 0.0, "affinity_balance_coef": 0.0}),
    ("usmoe", {"selection": "token"}),
    ("usmoe", {"normalize": False, "budget": 0.75}),
    ("xmoe", {"mode": "torchscale"}),
    ("vq", {"discrete_only": True}),
    ("vq", {"continuous_weight": "offset"}),
    ("vq", {"continuous_weight": "prob"}),
    ("vq", {"ema": False, "codebook_init": "random", "beta": 0.25, "normalize": False, "dead_code_steps": 0,
            "num_codes": 8}),  # the paper's settings
    ("vq", {"continuous": "xmoe"}),
    ("expert_choice", {"group": "sequence"}),
    ("soft", {"slots_per_expert": 2}),
    ("topk", {"bias_rate": 0.01, "score": "sigmoid", "route_scale": 2.5, "balance_scope": "sequence"}),  # DeepSeek-V3
    ("topk", {"balance_scope": "global", "groups": 2, "group_top": 1}),
    ("vq", {"code_bias_rate": 0.1, "bias_rate": 0.01}),
]
VARIANT_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in VARIANTS]
COMPETING = {"rate": 1.0, "warmup_steps": 0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run fastest on one thread, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_layer(name, options=None, backend="native", top_k=K, seed=0):
    """A layer of E experts; on capacity backends the capacity is large enough to drop nothing."""
    torch.manual_seed(seed)
    cfg = MoEConfig(router=name, backend=backend, num_experts=E, top_k=top_k, router_options=dict(options or {}),
                    capacity_factor=8.0, eval_capacity_factor=8.0)
    return build_moe_layer(MoESpec(cfg, D, H, seed=seed))


def inputs(seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g).requires_grad_(requires_grad)


def routing(layer, x_BSD):
    """The RouterOutput the layer routes with (for Soft MoE, the router's token-level view)."""
    if isinstance(layer, SoftMoELayer):
        return layer.router(x_BSD.reshape(-1, D), seq_len=S)
    captured = []
    handle = layer.router.register_forward_hook(lambda module, args, out: captured.append(out))
    layer(x_BSD)
    handle.remove()
    return captured[0]


def state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


# ---- the contract, for every router (and for routers or dispatchers added by plugins: test_plugins.py) -----
def check_output_contract(name, options, backend="native"):
    layer = make_layer(name, options, backend)
    r = routing(layer, inputs())
    T = B * S
    assert r.weights.dtype == torch.float32 and r.indices.dtype == torch.int64
    assert r.weights.shape == r.indices.shape and r.weights.shape[0] == T
    assert r.scores.shape == (T, E) and r.aux_loss.dim() == 0 and torch.isfinite(r.aux_loss)
    assert torch.isfinite(r.weights).all() and (r.weights >= 0).all()
    assert ((r.indices >= -1) & (r.indices < E)).all()
    assert (r.weights[r.indices == -1] == 0).all()
    for key in ("load", "load_cv", "entropy"):
        assert key in r.metrics, key
    assert all(not v.requires_grad for v in r.metrics.values())
    torch.testing.assert_close(r.metrics["load"].sum(), torch.tensor(1.0))


def check_parameters_fit_deepspeed(name, options, backend="native"):
    """DeepSpeed broadcasts parameters as bytes (no 0-dim tensors) and sorts MoE checkpoint keys by the
    substring 'expert' (no router parameter or buffer may contain it)."""
    router = make_layer(name, options, backend).router
    for key, p in router.named_parameters():
        assert p.dim() > 0, f"{name}: parameter {key} is 0-dim"
    for key in router.state_dict():
        assert "expert" not in key, f"{name}: {key} contains 'expert'"


def check_gradients_reach_every_router_parameter(name, options, backend="native"):
    layer = make_layer(name, options, backend)
    x = inputs(requires_grad=True)
    y, aux, _ = layer(x)
    (y.square().sum() + aux).backward()
    for pname, p in layer.router.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), pname
    assert x.grad.abs().sum() > 0


def check_deterministic_under_fixed_seed(name, options, backend="native"):
    outs = []
    for _ in range(2):
        layer = make_layer(name, options, backend)
        torch.manual_seed(5)
        y, aux, _ = layer(inputs())
        outs.append((y, aux, state(layer)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for k in outs[0][2]:
        assert torch.equal(outs[0][2][k], outs[1][2][k]), k


def check_eval_mode_changes_no_state(name, options, backend="native"):
    layer = make_layer(name, options, backend).eval()
    before = state(layer)
    with torch.no_grad():
        layer(inputs())
        _, _, metrics = layer(inputs(seed=2))
    after = state(layer)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{name}: eval forward changed {k}"
    assert metrics.get("competed", 0) == 0


def check_training_forward_changes_no_state(name, options, backend="native"):
    """Router state changes in post_step only: after a first forward (a lazy initialisation may run in it), two
    training forwards of the same input give the same output and leave every buffer as it was."""
    layer = make_layer(name, options, backend).train()
    x = inputs()
    layer(x)
    before = state(layer)
    (y1, a1, _), (y2, a2, _) = layer(x), layer(x)
    assert torch.equal(y1, y2) and torch.equal(a1, a2)
    for k, v in state(layer).items():
        assert torch.equal(before[k], v), f"{name}: a training forward changed {k}"


def check_backends_agree(name, options, backend="native", reference="reference"):
    """`backend` equals the reference loop over experts: forward, aux loss, input and parameter gradients."""
    ref = make_layer(name, options, reference)
    other = make_layer(name, options, backend)
    other.load_state_dict(other.from_canonical("", ref.to_canonical("", dict(ref.state_dict()))))
    results = []
    for layer in (ref, other):
        x = inputs(requires_grad=True)
        torch.manual_seed(3)
        y, aux, _ = layer(x)
        (y.square().sum() + aux).backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), aux.detach(), x.grad, layer.to_canonical("", grads)))
    (y0, a0, gx0, g0), (y1, a1, gx1, g1) = results
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a0, a1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx0, gx1, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-5, msg=f"{name}: gradient of {n}")


CONTRACT = [check_output_contract, check_parameters_fit_deepspeed, check_gradients_reach_every_router_parameter,
            check_deterministic_under_fixed_seed, check_eval_mode_changes_no_state,
            check_training_forward_changes_no_state, check_backends_agree]
NO_GRADIENT = [v for v in VARIANTS if not v[1].get("discrete_only")]  # discrete_only: nothing learns by gradient
NO_GRADIENT_IDS = [i for i, v in zip(VARIANT_IDS, VARIANTS) if v in NO_GRADIENT]


@pytest.mark.parametrize("name, options", VARIANTS, ids=VARIANT_IDS)
def test_router_output_contract(name, options):
    check_output_contract(name, options)


@pytest.mark.parametrize("name", ROUTERS)
def test_parameters_fit_deepspeed(name):
    check_parameters_fit_deepspeed(name, {})


@pytest.mark.parametrize("name, options", NO_GRADIENT, ids=NO_GRADIENT_IDS)
def test_gradients_reach_every_router_parameter(name, options):
    check_gradients_reach_every_router_parameter(name, options)


@pytest.mark.parametrize("name, options", VARIANTS, ids=VARIANT_IDS)
def test_deterministic_under_fixed_seed(name, options):
    check_deterministic_under_fixed_seed(name, options)


@pytest.mark.parametrize("name, options", VARIANTS, ids=VARIANT_IDS)
def test_eval_mode_changes_no_state(name, options):
    check_eval_mode_changes_no_state(name, options)


@pytest.mark.parametrize("name, options", VARIANTS, ids=VARIANT_IDS)
def test_training_forward_changes_no_state(name, options):
    check_training_forward_changes_no_state(name, options)


@pytest.mark.parametrize("name, options", VARIANTS, ids=VARIANT_IDS)
def test_reference_and_native_backends_agree(name, options):
    check_backends_agree(name, options)


# ---- checks of options and causality ----------------------------------------------------------------
@pytest.mark.parametrize("name, options", [("compete", {"affinity": "l1"}), ("vq", {"codebook_init": "pca"}),
                                           ("usmoe", {"selection": "expert"}), ("expert_choice", {"group": "x"}),
                                           ("xmoe", {"temperature": 0.0}), ("soft", {"slots_per_expert": 0}),
                                           ("vq", {"nonsense": 1}), ("vq", {"continuous": "soft"}),
                                           ("vq", {"continuous_weight": "one"}), ("compete", {"weights": "cubic"}),
                                           ("compete", {"warmup_frac": 0.1, "warmup_steps": 5}),
                                           ("compete", {"warmup_frac": 1.0}), ("compete", {"distill_target": "x"}),
                                           ("compete", {"combine": 0.5, "weights": "linear"}),
                                           ("usmoe", {"budget": 0.5, "selection": "token"}),
                                           ("usmoe", {"budget": 0.0}), ("xmoe", {"mode": "fairseq"})])
def test_bad_options_raise(name, options):
    with pytest.raises(ConfigError):
        build_router(name, hidden_size=D, num_experts=E, top_k=K, **options)


@pytest.mark.parametrize("name", ROUTERS)
def test_check_causal_refuses_noncausal_routers(name):
    if name in ("expert_choice", "usmoe", "soft"):
        with pytest.raises(ConfigError, match="allow_noncausal"):  # load_config validates: it refuses already
            check_causal(load_config("tiny", [f"moe.router={name}"]).moe)
        check_causal(load_config("tiny", [f"moe.router={name}", "moe.allow_noncausal=true"]).moe)
    else:
        check_causal(load_config("tiny", [f"moe.router={name}"]).moe)
    check_causal(load_config("tiny", ["moe.router=usmoe", "moe.router_options.selection=token"]).moe)


# ---- xmoe -------------------------------------------------------------------------------------------
def test_xmoe_is_invariant_to_input_scale_and_balances_with_fixed_tau():
    torch.manual_seed(0)
    router = build_router("xmoe", hidden_size=D, num_experts=E, top_k=K, balance_coef=1.0)
    x = torch.randn(20, D)
    r1, r2 = router(x), router(7.3 * x)
    assert torch.equal(r1.indices, r2.indices)
    torch.testing.assert_close(r1.weights, r2.weights)
    h = F.normalize(x @ router.proj.weight.t(), dim=-1)
    s = h @ F.normalize(router.centroids, dim=-1).t()
    torch.testing.assert_close(r1.scores, (s / 0.07).softmax(-1))
    torch.testing.assert_close(r1.aux_loss, load_balance_loss((s / 0.3).softmax(-1), r1.indices))
    assert router.proj.weight.shape == (min(D, 16), D)
    torch.testing.assert_close(r1.metrics["temperature"], torch.tensor(0.07))


@pytest.mark.parametrize("hidden, experts, proj_dim", [(768, 32, 16), (768, 64, 32), (768, 4, 16), (8, 4, 8)])
def test_xmoe_routing_dimension_is_half_the_experts_at_least_16(hidden, experts, proj_dim):
    assert default_proj_dim(hidden, experts) == proj_dim
    router = build_router("xmoe", hidden_size=hidden, num_experts=experts, top_k=2, proj_dim=3)
    assert router.proj.weight.shape == (3, hidden)


# ---- vq ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("continuous, normalize", [("xmoe", True), ("topk", True), ("topk", False)])
def test_vq_routes_by_brute_force_nearest_code_with_the_full_softmax_probability_of_one_continuous_expert(
        continuous, normalize):
    torch.manual_seed(0)
    router = build_router("vq", hidden_size=D, num_experts=E, top_k=2, num_codes=8, continuous=continuous,
                          normalize=normalize, continuous_weight="prob").eval()  # the first landing's form
    x = torch.randn(30, D)
    r = router(x)
    dist = torch.stack([((x[t][None] - router.codebook.detach()) ** 2).sum(-1) for t in range(30)])  # (T, codes)
    codes = dist.argmin(-1)
    assert torch.equal(r.indices[:, -1], codes % E)
    g = torch.softmax(x @ router.mix.weight.t() + router.mix.bias, -1)
    if continuous == "topk":
        p = torch.softmax(x @ router.continuous.gate.weight.t(), -1)
    else:  # cosine scores over the learned temperature
        cont = router.continuous
        s = F.normalize(x @ cont.proj.weight.t(), dim=-1) @ F.normalize(cont.centroids, dim=-1).t()
        p = torch.softmax(s / cont.log_temperature.exp(), -1)
    assert torch.equal(r.indices[:, 0], p.argmax(-1))
    w = torch.stack([g[:, 0] * p.max(-1).values, g[:, 1]], dim=1)  # full-softmax probability, not 1
    torch.testing.assert_close(r.weights, w / w.sum(-1, keepdim=True) if normalize else w)


@pytest.mark.parametrize("options, top_k", [({"discrete_only": True}, 3), ({}, 1)])
def test_vq_discrete_routing_gives_one_expert_per_token(options, top_k):
    torch.manual_seed(0)
    router = build_router("vq", hidden_size=D, num_experts=E, top_k=top_k, **options)
    x = torch.randn(25, D)
    r = router(x)
    assert r.indices.shape == (25, 1) and (r.weights == 1).all()
    dist = ((x[:, None] - router.codebook[None].detach()) ** 2).sum(-1)
    assert torch.equal(r.indices[:, 0], dist.argmin(-1) % E)
    assert hasattr(router, "continuous") == (top_k > 1)


def test_vq_straight_through_and_losses():
    torch.manual_seed(0)
    router = build_router("vq", hidden_size=D, num_experts=E, top_k=K, ema=False, beta=0.25)
    z = torch.randn(10, D, requires_grad=True)
    codes, z_q, loss = router.quantize(z)
    c = router.codebook[codes]
    torch.testing.assert_close(z_q, c)
    z_q.sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    expected = F.mse_loss(c, z.detach()) + 0.25 * F.mse_loss(c.detach(), z)
    torch.testing.assert_close(loss, expected)


def test_vq_kmeans_init_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(E, D, generator=g) * 10
    x = centres.repeat(25, 1) + 0.01 * torch.randn(25 * E, D, generator=g)
    router = build_router("vq", hidden_size=D, num_experts=E, top_k=K)
    assert router.init_from_data(x) == 1.0  # every code is some cluster's nearest
    dist = torch.cdist(centres, router.codebook.detach())
    assert (dist.min(-1).values < 0.1).all()
    assert len(set(dist.argmin(-1).tolist())) == E


def test_vq_restarts_dead_codes_from_recent_inputs():
    torch.manual_seed(0)
    router = build_router("vq", hidden_size=D, num_experts=E, top_k=K, dead_code_steps=2,
                          codebook_init="random", ema=False).train()
    with torch.no_grad():
        router.codebook[0] = 1e3  # never the nearest
    x = torch.randn(16, D)
    router(x)
    router(x)  # forwards change no state: usage counts optimizer steps (post_step)
    router.post_step()
    assert router.unused_steps[0] == 1 and (router.codebook[0] == 1e3).all()
    router(x)
    router.post_step()  # unused for 2 optimizer steps: restarted from this step's inputs
    assert router.unused_steps[0] == 0 and (router.codebook[0].detach() == x).all(-1).any()
    router.restart_dead_codes = False
    with torch.no_grad():
        router.codebook[0] = 1e3
    for _ in range(2):
        router(x)
        router.post_step()
    assert router.unused_steps[0] == 2 and router(x).metrics["dead_codes"] >= 1


def test_vq_ema_codebook_moves_to_cluster_means():
    torch.manual_seed(0)
    router = build_router("vq", hidden_size=D, num_experts=E, top_k=K, ema_decay=0.5,
                          codebook_init="random").train()
    assert "codebook" not in dict(router.named_parameters())
    x = torch.randn(40, D)
    for _ in range(40):
        r = router(x)
        router.post_step()
    codes = ((x[:, None] - router.codebook[None]) ** 2).sum(-1).argmin(-1)
    for j in codes.unique():
        torch.testing.assert_close(router.codebook[j], x[codes == j].mean(0), rtol=1e-3, atol=1e-3)
    assert r.metrics["code_perplexity"] > 1


def test_vq_post_step_applies_the_observed_update_once():
    """Forwards record code counts; post_step moves the EMA statistics once with the sum over the forwards."""
    layer = make_layer("vq", {"ema_decay": 0.5}).train()
    router, x = layer.router, inputs()
    layer(x)  # initialises the codebook (k-means on this batch)
    before = state(layer)
    layer(x), layer(x)
    codes = ((x.reshape(-1, D)[:, None] - router.codebook[None]) ** 2).sum(-1).argmin(-1)
    counts = torch.bincount(codes, minlength=router.num_codes).float() * 3  # three forwards, one codebook
    router.post_step()
    expected = 0.5 * before["router.ema_count"] + 0.5 * counts
    torch.testing.assert_close(router.ema_count, expected)
    router.post_step()  # nothing observed since: nothing changes
    torch.testing.assert_close(router.ema_count, expected)


def test_vq_codebook_statistics_stay_fp32_under_a_bf16_cast():
    """model.bfloat16() (or DeepSpeed's data_types.buffer_dtype) casts parameters; the EMA statistics stay fp32 and
    exact, so that EMA steps of 1 - decay = 0.01 are not lost to bf16 rounding."""
    layer = make_layer("vq").train()
    x = inputs()
    layer(x)
    before = {k: v.clone() for k, v in layer.router.state_dict().items()}
    layer.to(torch.bfloat16)
    router = layer.router
    assert router.mix.weight.dtype == torch.bfloat16
    for k in ("codebook", "ema_count", "ema_sum"):
        assert getattr(router, k).dtype == torch.float32 and torch.equal(getattr(router, k), before[k]), k
    layer(x.bfloat16())
    router.post_step()
    assert router.ema_sum.dtype == torch.float32 and not torch.equal(router.ema_sum, before["ema_sum"])


@pytest.mark.slow
def test_vq_codebook_stays_fp32_and_tracks_in_a_bf16_deepspeed_run(builtin_data, tmp_path):
    """scripts/pretrain.py with ds_configs/zero2_bf16.json (DeepSpeed casts the parameters, not the buffers), and the
    same with data_types.buffer_dtype=bf16 (DeepSpeed casts the buffers too): the saved codebook and EMA statistics
    are fp32, the EMA count equals its exact recursion Q d^n + tokens (1 - d^n) after n steps to 1e-5 (in bf16 it
    drifts by about 6e-4), and the codebook is the EMA sum over the smoothed counts."""
    import json

    from test_train import ROOT, SMALL, pretrain

    from megavq.store.manifest import read_manifest
    from megavq.store.model_dir import load_state_dict
    steps, Q, d, tokens = 6, E, 0.99, 4 * 32  # fewer steps than dead_code_steps (10): no restart resets a count
    cast = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    cast["data_types"] = {"buffer_dtype": "bf16"}
    (tmp_path / "buffers_bf16.json").write_text(json.dumps(cast))
    for ds in (ROOT / "ds_configs" / "zero2_bf16.json", tmp_path / "buffers_bf16.json"):
        out = tmp_path / ds.stem
        pretrain(["--ds_config", str(ds), "--data", str(builtin_data), "--out_dir", str(out), *SMALL,
                  f"train.max_steps={steps}", "train.save_every=100", "moe.router=vq"], launcher=("deepspeed",))
        ckpt = out / "checkpoints" / f"step_{steps:07d}"
        assert read_manifest(ckpt, ("checkpoint",))["layout"]["dtype"] == "torch.bfloat16"  # bf16 parameters
        sd = load_state_dict(ckpt)  # the buffers as the run held them (and the fp32 master weights)
        for layer in (0, 1):
            key = f"blocks.{layer}.mlp.router."
            count, total, codebook = (sd[key + k] for k in ("ema_count", "ema_sum", "codebook"))
            assert count.dtype == total.dtype == codebook.dtype == torch.float32
            expected = Q * d ** steps + tokens * (1 - d ** steps)
            assert abs(count.sum().item() - expected) < 1e-5 * expected, (ds.stem, count.sum().item(), expected)
            n = count.sum()
            torch.testing.assert_close(codebook, total / ((count + 1e-5) / (n + Q * 1e-5) * n)[:, None])


def _vq_rank(rank, world, store, out_dir, option_sets):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for i, options in enumerate(option_sets):
        torch.manual_seed(0)
        router = build_router("vq", hidden_size=D, num_experts=E, top_k=K, **options).train()
        torch.manual_seed(10 + rank)  # ranks draw different random rows: the router must still agree
        for x_TD in vq_batches():
            router(x_TD.chunk(world)[rank])
            router.post_step()
        torch.save(router.state_dict(), f"{out_dir}/rank{rank}-{i}.pt")
    dist.destroy_process_group()


def vq_batches(steps=6, tokens=32):
    return torch.randn(steps, tokens, D, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_vq_codebook_upkeep_keeps_ranks_identical(tmp_path):
    """EMA, usage counters, k-means init and dead-code restarts see every rank's tokens and agree."""
    import torch.multiprocessing as mp
    restarts = {"ema": True, "codebook_init": "kmeans", "dead_code_steps": 2, "num_codes": 24}
    single = {"codebook_init": "random", "dead_code_steps": 0}  # nothing random: 2 ranks equal 1 process on all tokens
    mp.spawn(_vq_rank, args=(2, tmp_path / "store", tmp_path, [restarts, single]), nprocs=2)
    s0, s1 = (torch.load(tmp_path / f"rank{r}-0.pt") for r in range(2))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    torch.manual_seed(0)
    one = build_router("vq", hidden_size=D, num_experts=E, top_k=K, **single).train()
    for x_TD in vq_batches():
        one(x_TD)
        one.post_step()
    two = torch.load(tmp_path / "rank0-1.pt")
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two[k], v, msg=k)


# ---- compete ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("affinity, winner_coef", [("softplus", 0.2), ("norm", 0.0)])
def test_compete_step_routes_by_affinity_and_distills_in_expert_order(affinity, winner_coef):
    opts = dict(COMPETING, affinity=affinity, winner_coef=winner_coef, balance_coef=0.0, distill_coef=0.5,
                diversity_coef=0.0, affinity_balance_coef=0.0)  # the distillation alone
    layer = make_layer("compete", opts).train()
    x = inputs()
    r = routing(layer, x)
    x_TD = x.reshape(-1, D)
    y_ETD = torch.stack([layer.experts.expert(e, x_TD) for e in range(E)])
    a = y_ETD.norm(dim=-1).t() if affinity == "norm" else F.softplus(y_ETD).mean(-1).t()
    winners = a.topk(K, dim=-1).indices
    assert torch.equal(r.indices.sort(-1).values, winners.sort(-1).values)
    torch.testing.assert_close(r.weights, a.gather(1, r.indices).softmax(-1))
    p = torch.softmax(x_TD @ layer.router.gate.weight.t(), -1)
    q = torch.softmax(a, -1)
    T = x_TD.shape[0]
    full = sum((p[t, e] - q[t, e]) ** 2 for t in range(T) for e in range(E)) / (T * E)
    win = sum((p[t, e] - q[t, e]) ** 2 for t in range(T) for e in winners[t].tolist()) / (T * K)
    torch.testing.assert_close(r.metrics["distill_loss"], (full + winner_coef * win).detach())
    torch.testing.assert_close(r.aux_loss, 0.5 * (full + winner_coef * win))
    assert r.metrics["competed"] == 1 and 0 <= r.metrics["agreement"] <= 1


def test_compete_schedule_is_a_pure_capped_function_of_seed_step_layer():
    args = dict(rate=0.07, warmup_steps=50, max_competing=3)
    assert all(competing_layers(0, s, 12, **args) == [] for s in range(50))
    assert competing_layers(0, 777, 12, **args) == competing_layers(0, 777, 12, **args)
    assert len(competing_layers(0, 60, 8, rate=1.0, warmup_steps=0, max_competing=3)) == 3
    assert len(competing_layers(0, 60, 8, rate=1.0, warmup_steps=0, max_competing=0)) == 8
    draws = [competing_layers(1, s, 6, **args) for s in range(50, 4050)]
    assert max(len(d) for d in draws) <= 3
    per_layer = [sum(l in d for d in draws) / len(draws) for l in range(6)]
    assert all(0.05 < f < 0.09 for f in per_layer), per_layer
    assert any(d and len(d) < 6 for d in draws)  # layers are not in lockstep


def test_compete_router_follows_the_schedule_and_never_reuses_a_stale_loss():
    layer = make_layer("compete", {"rate": 0.5, "warmup_steps": 2, "balance_coef": 0.0}).train()
    router, x = layer.router, inputs()
    for step in range(12):
        layer.router.set_step(step)
        _, aux, metrics = layer(x)
        router.post_step()
        expected = step in range(2, 12) and competing_layers(0, step, 1, 0.5, 2, 3) == [0]
        assert bool(metrics["competed"]) == expected, step
        if not expected:
            assert aux == 0 and "distill_loss" not in metrics
    assert router.competitions == sum(competing_layers(0, s, 1, 0.5, 2, 3) == [0] for s in range(12))


def test_compete_warmup_is_a_fraction_of_the_run_length_from_the_spec():
    """warmup_frac * train.max_steps optimizer steps without competition; the training engine passes max_steps."""
    cfg = load_config("tiny", ["model.vocab_size=32", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                               "model.d_ff=48", "train.max_steps=40", "moe.router=compete",
                               "moe.router_options={rate: 1.0, warmup_frac: 0.25}"])
    model = prepare_model(Transformer(cfg), cfg).train()
    router = model.blocks[0].mlp.router
    assert router.max_steps == 40 and router.warmup == 10
    x = torch.randint(32, (1, 8))
    for step, competes in [(9, False), (10, True)]:
        model.set_step(step)
        assert bool(model(x, x).router_metrics[0]["competed"]) == competes, step
    orphan = make_layer("compete", {"rate": 1.0, "warmup_frac": 0.25}).train()  # built without a run length
    with pytest.raises(ConfigError, match="warmup_frac needs the run's length"):
        orphan(inputs())
    assert make_layer("compete", {"rate": 1.0, "warmup_frac": 0.25}).eval()(inputs())[2]["competed"] == 0


# ---- expert_choice, usmoe, soft ---------------------------------------------------------------------
@pytest.mark.parametrize("group", ["batch", "sequence"])
def test_expert_choice_gives_every_expert_its_capacity(group):
    layer = make_layer("expert_choice", {"group": group})
    r = routing(layer, inputs())
    G = B * S if group == "batch" else S
    chosen = (r.indices >= 0).view(-1, G, E)
    assert (chosen.sum(1) == math.ceil(G * 2 / E)).all()
    torch.testing.assert_close(r.weights, torch.where(r.indices >= 0, r.scores, 0.0))


def test_usmoe_selects_exactly_T_times_k_pairs_per_sequence():
    layer = make_layer("usmoe")
    x = inputs()
    r = routing(layer, x)
    logits = x.reshape(-1, D) @ layer.router.gate.weight.t()
    w = 0.5 * logits.softmax(-1) + 0.5 * logits.sigmoid() * 2 / E
    chosen = r.indices >= 0
    assert (chosen.view(B, S * E).sum(-1) == S * K).all()
    for b in range(B):
        top = w[b * S:(b + 1) * S].flatten().topk(S * K).indices
        assert torch.equal(chosen[b * S:(b + 1) * S].flatten().nonzero().squeeze(-1), top.sort().values)
    torch.testing.assert_close(r.weights, torch.where(chosen, w / w.sum(-1, keepdim=True), 0.0))


def test_usmoe_token_variant_is_causal_top_k():
    layer = make_layer("usmoe", {"selection": "token"})
    r = routing(layer, inputs())
    assert layer.router.causal and r.indices.shape == (B * S, K) and (r.indices >= 0).all()


def test_soft_moe_dispatch_and_combine_normalise_and_match_a_hand_computation():
    layer = make_layer("soft", {"slots_per_expert": 2})
    x = inputs()
    dispatch, combine = layer.router.dispatch_combine(x)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(B, E * 2))
    torch.testing.assert_close(combine.sum(-1), torch.ones(B, S))
    y, aux, _ = layer(x)
    for b in range(B):
        slots = dispatch[b].t() @ x[b]  # (N, D)
        y_slots = torch.stack([layer.experts.expert(n // 2, slots[n:n + 1])[0] for n in range(E * 2)])
        torch.testing.assert_close(y[b], combine[b] @ y_slots, rtol=1e-5, atol=1e-5)
    assert aux == 0 and not layer.router.causal


# ---- a short training run for each causal router ----------------------------------------------------
TRAINED = [("topk", []), ("xmoe", []), ("vq", []), ("usmoe", ["moe.router_options.selection=token"]),
           ("compete", ["moe.router_options={warmup_steps: 10, rate: 0.5}"])]


def pattern_batches(vocab, batch, seq, steps, seed=0):
    """Rows cut at random offsets from one repeating pattern of distinct tokens: next token = f(token)."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randperm(vocab, generator=g)[:11]
    stream = pattern.repeat(seq // len(pattern) + 3)
    for _ in range(steps):
        starts = torch.randint(len(pattern), (batch,), generator=g)
        rows = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]


@pytest.mark.parametrize("name, overrides", TRAINED, ids=[t[0] for t in TRAINED])
def test_causal_router_trains_a_tiny_transformer(name, overrides):
    cfg = load_config("tiny", ["model.vocab_size=32", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                               "model.seq_len=24", "model.d_ff=48", f"moe.router={name}", *overrides])
    check_causal(cfg.moe)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step, (x, y) in enumerate(pattern_batches(32, 8, 24, steps=50)):
        model.set_step(step)
        out = model(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.post_step()
        losses.append(out.lm_loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0], (losses[0], losses[-5:])
    if name == "compete":
        assert [block.mlp.router.layer_index for block in model.blocks] == [0, 1]
        assert all(block.mlp.router.competitions > 0 for block in model.blocks)
