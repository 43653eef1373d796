"""The native dropless dispatcher equals the reference loop over experts; one-expert MoE equals a dense MLP."""
import pytest
import torch

from megavq.config import ModelConfig, MoEConfig
from megavq.model.layers import MLP
from megavq.moe.dispatch import dispatcher_class
from megavq.moe.dispatch.native import grouped_moe, native_moe, sort_by_expert
from megavq.moe.dispatch.reference import reference_moe
from megavq.moe.experts import Experts
from megavq.moe.layer import MoELayer
from megavq.moe.routers import RouterOutput
from megavq.moe.spec import MoESpec


def random_routing(T, E, K, seed=0, unused=0.0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g, dtype=torch.float64)
    if unused:
        drop = torch.rand(T, K, generator=g) < unused
        indices[drop], weights[drop] = -1, 0.0
    return indices, weights.requires_grad_()


def backend_results(backends, x, r, experts):
    """Each backend's output and the gradients of x, the weights and the expert parameters."""
    results = []
    for backend in backends:
        y = backend(x, r, experts)
        y.pow(2).sum().backward()
        results.append([y.detach()] + [t.grad.clone() for t in (x, r.weights, *experts.parameters())])
        for t in (x, r.weights, *experts.parameters()):
            t.grad = None
    return results


@pytest.mark.parametrize("mlp, bias", [("swiglu", False), ("gelu", True)])
@pytest.mark.parametrize("unused", [0.0, 0.3])
def test_native_equals_reference(mlp, bias, unused):
    torch.manual_seed(0)
    T, D, H, E, K = 37, 16, 24, 5, 2
    experts = Experts(E, D, H, mlp, bias, seed=3).double()
    if bias:
        torch.nn.init.normal_(experts.b_in)
        torch.nn.init.normal_(experts.b_out)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    indices, weights = random_routing(T, E, K, unused=unused)
    r = RouterOutput(weights, indices, None, None, {})
    for a, b in zip(*backend_results((reference_moe, native_moe), x, r, experts)):  # outputs, then gradients
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


@needs_grouped_mm
@pytest.mark.parametrize("mlp, bias", [("swiglu", False), ("gelu", True)])
@pytest.mark.parametrize("unused", [0.0, 0.3])
def test_grouped_products_equal_the_loop(mlp, bias, unused):
    """The sync-free grouped path (CUDA's by default) on CPU fp32: unused slots and an empty expert included."""
    torch.manual_seed(0)
    T, D, H, E, K = 37, 16, 24, 6, 2
    experts = Experts(E, D, H, mlp, bias, seed=3)
    if bias:
        torch.nn.init.normal_(experts.b_in)
        torch.nn.init.normal_(experts.b_out)
    x = torch.randn(T, D, requires_grad=True)
    indices, weights = random_routing(T, E - 1, K, unused=unused)  # expert E - 1 gets no rows
    r = RouterOutput(weights.detach().float().requires_grad_(), indices, None, None, {})
    loop, grouped = backend_results((native_moe, grouped_moe), x, r, experts)
    for a, b in zip(loop, grouped):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@needs_grouped_mm
@pytest.mark.gpu
@pytest.mark.parametrize("unused", [0.0, 0.3])
def test_grouped_products_equal_the_loop_on_cuda_bf16(unused):
    from megavq.moe.experts import grouped_products
    T, D, H, E, K = 512, 64, 128, 8, 2
    experts = Experts(E, D, H, seed=3).cuda().to(torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert grouped_products(x, experts)
    indices, weights = random_routing(T, E, K, unused=unused)
    r = RouterOutput(weights.detach().cuda().float().requires_grad_(), indices.cuda(), None, None, {})
    grouped = backend_results([grouped_moe], x, r, experts)[0]
    loop = backend_results([reference_moe], x, r, experts)[0]
    for a, b in zip(loop, grouped):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_native_layer_runs_without_host_sync_on_cuda():
    """The whole native layer at ep_size 1 in bf16: no device-to-host synchronisation in forward or backward."""
    spec = MoESpec(MoEConfig(num_experts=8, top_k=2), d_model=64, d_hidden=128)
    layer = MoELayer(spec).cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # warm-up: lazy initialisation may read the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux, _ = layer(x)
        (y.float().square().sum() + aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_native_equals_reference_fp32_layer():
    torch.manual_seed(0)
    spec = MoESpec(MoEConfig(num_experts=6, top_k=2), d_model=32, d_hidden=48)
    layer = MoELayer(spec)
    x = torch.randn(2, 9, 32, requires_grad=True)
    results = []
    for backend in ("reference", "native"):  # the same Experts layout: swap the dispatcher only
        layer.dispatcher = dispatcher_class(backend)(spec)
        y, aux, _ = layer(x)
        (y.square().sum() + aux).backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]))
        x.grad = None
        layer.zero_grad()
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx0, gx1, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sort_by_expert_groups_slots():
    indices = torch.tensor([[2, 0], [1, -1], [2, 1]])
    token, slot, counts = sort_by_expert(indices, 3)
    assert counts == [1, 2, 2]
    assert indices.reshape(-1)[slot].tolist() == [0, 1, 1, 2, 2]
    assert token.tolist() == [0, 1, 2, 0, 2]


def test_one_expert_equals_dense_mlp():
    """An MoE layer of one expert with weight 1 computes the dense MLP it was copied from."""
    torch.manual_seed(0)
    mcfg = ModelConfig(d_model=16, d_ff=32, mlp="swiglu")
    dense = MLP(mcfg)
    experts = Experts(1, 16, 32, "swiglu")
    with torch.no_grad():
        experts.w_in[0, 0].copy_(dense.gate_proj.weight.t())
        experts.w_in[0, 1].copy_(dense.up_proj.weight.t())
        experts.w_out[0].copy_(dense.down_proj.weight.t())
    x = torch.randn(10, 16)
    r = RouterOutput(torch.ones(10, 1), torch.zeros(10, 1, dtype=torch.long), None, None, {})
    torch.testing.assert_close(native_moe(x, r, experts), dense(x), rtol=1e-5, atol=1e-6)


def test_experts_initialised_independently_and_by_global_id():
    full = Experts(4, 8, 16, seed=7)
    assert not torch.allclose(full.w_in[0], full.w_in[1])
    half = Experts(2, 8, 16, seed=7, first_expert=2)  # the second shard of an expert-parallel split
    torch.testing.assert_close(half.w_in, full.w_in[2:])
