"""A router and a dispatcher defined outside megavq, each in one file: registered by importing the file, they
meet the contract tests and train through the real launcher on every CPU backend."""
import textwrap

import pytest

from megavq.moe.dispatch import available_dispatchers
from megavq.moe.routers import available_routers
from megavq.plugins import load_plugins
from test_routers import CONTRACT
from test_train import SMALL, losses, pretrain

ROUTER_FILE = '''
"""Sigmoid top-k routing: independent expert scores, top-k renormalised."""
import torch
from megavq.moe.routers.base import (Router, RouterOutput, linear_gate, load_balance_loss, register,
                                     routing_metrics, top_k_weights)


@register("sigmoid_topk")
class SigmoidTopK(Router):
    def __init__(self, hidden_size, num_experts, top_k, balance_coef=0.01):
        super().__init__(hidden_size, num_experts, top_k)
        self.gate = linear_gate(hidden_size, num_experts)
        self.balance_coef = balance_coef

    def forward(self, x_TD):
        scores_TE = self.gate(x_TD).sigmoid()
        weights_TK, indices_TK = top_k_weights(scores_TE, self.top_k, normalize=True)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        aux = self.balance_coef * load_balance_loss(probs_TE, indices_TK)
        return RouterOutput(weights_TK, indices_TK, probs_TE, aux, routing_metrics(indices_TK, probs_TE))
'''

DISPATCHER_FILE = '''
"""The reference loop over experts, as a dispatcher of its own."""
import torch
from megavq.moe.dispatch.base import BankDispatcher, register_dispatcher
from megavq.moe.experts import Experts, every_expert


@register_dispatcher("loop")
class LoopDispatcher(BankDispatcher):
    def build_experts(self):
        return Experts.for_spec(self.spec)

    def run(self, x_TD, r, experts):
        out_TD = torch.zeros_like(x_TD)
        for e in range(experts.num_experts):
            tok, slot = (r.indices == e).nonzero(as_tuple=True)
            y = experts.expert(e, x_TD[tok]) * r.weights[tok, slot, None].to(x_TD.dtype)
            out_TD = out_TD.index_add(0, tok, y)
        return out_TD

    def all_experts(self, x_TD, experts):
        return every_expert(experts, self.num_experts, x_TD)
'''
CPU_BACKENDS = ["reference", "native", "deepspeed"]


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "sigmoid_router.py").write_text(textwrap.dedent(ROUTER_FILE))
    (folder / "loop_dispatcher.py").write_text(textwrap.dedent(DISPATCHER_FILE))
    paths = [str(folder / "sigmoid_router.py"), str(folder / "loop_dispatcher.py")]
    load_plugins(paths)
    return paths


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("check", CONTRACT, ids=[c.__name__ for c in CONTRACT])
def test_plugin_router_meets_the_contract(plugins, check, backend):
    assert "sigmoid_topk" in available_routers()
    check("sigmoid_topk", {}, backend)


@pytest.mark.parametrize("router, options", [("topk", {}), ("vq", {}), ("expert_choice", {}), ("soft", {}),
                                             ("compete", {"rate": 1.0, "warmup_steps": 0})])
def test_plugin_dispatcher_equals_the_reference(plugins, router, options):
    assert "loop" in available_dispatchers()
    for check in CONTRACT:
        check(router, options, "loop")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["moe.backend=deepspeed", "moe.router=sigmoid_topk"],
                                       ["moe.backend=loop", "moe.router=vq"]], ids=["deepspeed", "loop-vq"])
def test_plugins_train_through_the_launcher(plugins, builtin_data, tmp_path, overrides):
    """A plugin router and a plugin dispatcher load in the launched ranks and train (the router meets the contract on
    every backend in-process above)."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", "--data", str(builtin_data), "--out_dir", str(out), *SMALL,
            "train.max_steps=10", "train.save_every=10", *overrides]
    pretrain([*args, *(f"--plugin={p}" for p in plugins)], launcher=("deepspeed",))
    loss = losses(out)
    assert sum(loss[-3:]) < sum(loss[:3]), loss
