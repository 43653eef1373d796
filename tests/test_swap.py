"""Routers changed on a trained model: rebuilt at evaluation (what carries over, what is refused), the budget sweep,
built from data and distilled (router swap), and the scripts."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_eval import hand_made_data, tiny_model

from megavq.convert.load import load_model
from megavq.convert.swap import (
    agreement,
    change_routers,
    distil_routers,
    parse_router_spec,
    routed_config,
    swap_routers,
    with_routers,
)
from megavq.errors import MegavqError
from megavq.eval import evaluate, lm, write_report
from megavq.moe.routers import build_router
from megavq.store.model_dir import save_model
from megavq.train.trainer import build_model

VOCAB, SEQ = 64, 8


def trained_like(*overrides, seed=0):
    """A tiny topk model with weights large enough that routing and logits depend on the input."""
    model = tiny_model(*overrides, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model


def token_batches(n=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(VOCAB, (batch, SEQ), generator=g), torch.randint(VOCAB, (batch, SEQ), generator=g))
            for _ in range(n)]


def routing_keys(model) -> set:
    return {k for k in model.state_dict() if ".router." in k}


# ---- changing the routers without training -----------------------------------------------------------------------
def test_parse_router_spec():
    assert parse_router_spec("usmoe:budget=0.5,mix=0.3") == ("usmoe", {"budget": 0.5, "mix": 0.3})
    assert parse_router_spec("usmoe:selection=token:normalize=false") == ("usmoe", {"selection": "token",
                                                                                   "normalize": False})
    assert parse_router_spec("xmoe") == ("xmoe", {})


def test_changed_routers_keep_the_experts_and_take_the_gate():
    model = trained_like()
    x = token_batches(1)[0][0]
    compete = change_routers(model, "compete")  # at evaluation compete routes as softmax top-k on the same gate
    assert compete.cfg.moe.router == "compete" and model.cfg.moe.router == "topk"
    assert torch.equal(compete(x), model(x))
    usmoe = change_routers(model, "usmoe:selection=token,mix=0.0,normalize=false")
    for old, new in zip(model.routers(), usmoe.routers()):
        assert torch.equal(old.gate.weight, new.gate.weight)
    sd, old_sd = usmoe.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], old_sd[k]) for k in old_sd if k not in routing_keys(model))
    with torch.no_grad():  # softmax top-k without renormalisation = topk with normalize=false
        assert torch.allclose(usmoe(x), change_routers(model, "topk:normalize=false")(x), atol=1e-6)
    assert change_routers(model, "topk:top_k=1").routers()[0].top_k == 1


@pytest.mark.parametrize("spec, message", [
    ("vq", "router 'vq' needs trained .*codebook.* which the model's topk routers lack .*scripts/swap_router.py"),
    ("xmoe", "router 'xmoe' needs trained .*proj.weight"),
    ("soft", "router 'soft' needs trained phi, scale"),
    ("nope", "unknown moe.router 'nope' \\(valid: "),
    ("usmoe:foo=1", "router 'usmoe' has no option 'foo' \\(valid: "),
    ("usmoe:budget", "'budget' is not OPTION=VALUE"),
    ("topk:top_k=9", "moe.top_k \\(9\\) exceeds moe.num_experts"),
])
def test_routers_that_cannot_be_changed_are_refused_in_one_line(spec, message):
    with pytest.raises(MegavqError, match=message) as e:
        change_routers(tiny_model(), spec)
    assert "\n" not in str(e.value)


def test_the_budget_sweep_needs_a_router_with_a_budget():
    with pytest.raises(MegavqError, match="--sweep_router xmoe: the budget sweep needs a router with a `budget`"):
        lm.budget_sweep(tiny_model(), token_batches(1), [0.5], "xmoe")


def test_a_dense_model_has_no_routers_to_change():
    with pytest.raises(MegavqError, match="dense"):
        change_routers(tiny_model("moe.every=0"), "usmoe")


def model_dir(tmp_path, *overrides):
    data = hand_made_data(tmp_path / "data", tokens=800)
    model = trained_like(f"data.source={data}", *overrides)
    save_model(model.state_dict(), model.cfg, tmp_path / "model")
    return tmp_path / "model"


def test_evaluate_with_another_router_and_the_budget_sweep(tmp_path):
    path = model_dir(tmp_path)
    kw = {"diag_tokens": 64, "max_batches": 2}
    plain = evaluate(path, **kw)
    r = evaluate(path, router="compete", budgets=[0.25, 0.5, 1.0], **kw)
    assert (r["router"], r["trained_router"], plain["trained_router"]) == ("compete", "topk", "topk")
    assert r["loss"] == plain["loss"]  # compete routes as topk at evaluation
    sweep = r["budget_sweep"]
    assert [p["budget"] for p in sweep["points"]] == [0.25, 0.5, 1.0] and sweep["causal"] is False
    assert [p["experts_per_token"] for p in sweep["points"]] == pytest.approx([0.5, 1.0, 2.0])  # budget * k
    assert sweep["original"] == {"router": "compete", "experts_per_token": 2.0, "loss": r["loss"],
                                 "perplexity": r["perplexity"]}
    usmoe = evaluate(path, router="usmoe", **kw)
    assert sweep["points"][-1]["loss"] == pytest.approx(usmoe["loss"], rel=1e-9)
    assert usmoe["causal"] is False and usmoe["warnings"]
    paths = write_report(r, tmp_path / "eval")
    text = (tmp_path / "eval" / "eval.md").read_text()
    assert "trained with `topk`" in text and "not a causal language model's" in text
    assert "| compete (original) | 2 |" in text
    assert tmp_path / "eval" / "budget_sweep.png" in paths


def test_evaluate_script_refuses_bad_routers_in_one_line(tmp_path):
    path = model_dir(tmp_path)
    base = [sys.executable, "scripts/evaluate.py", "--max_batches", "1", "--diag_tokens", "64"]
    for args, message in [(["--checkpoint", str(path), "--router", "nope"], "error: unknown moe.router 'nope'"),
                          (["--checkpoint", str(tmp_path / "missing"), "--router", "usmoe"],
                           f"error: {tmp_path / 'missing'} holds no megavq model"),
                          (["--checkpoint", str(path), "--budget_sweep", "0,1"], "error: --budget_sweep '0,1'")]:
        p = subprocess.run([*base, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith(message), p.stderr


# ---- building routers from data, distillation ---------------------------------------------------------------------
def test_vq_codes_point_to_the_expert_preferred_in_their_cell():
    g = torch.Generator().manual_seed(0)
    centres_QD = 10 * torch.randn(4, 16, generator=g)
    cluster_N = torch.arange(400) % 4
    x_ND = centres_QD[cluster_N] + torch.randn(400, 16, generator=g)
    preferred = torch.tensor([2, 0, 3, 2])  # cluster -> the expert the old router prefers there
    weights_NE = torch.zeros(400, 4).scatter_(1, preferred[cluster_N, None], 0.7)
    weights_NE.scatter_(1, ((preferred[cluster_N] + 1) % 4)[:, None], 0.3)
    router = build_router("vq", 16, 4, 2)
    assert router.init_from_routing(x_ND, weights_NE) == 1.0
    codes = torch.cdist(centres_QD, router.codebook).argmin(-1)
    assert torch.equal(router.code_map[codes], preferred) and bool(router.initialized)


@pytest.mark.parametrize("router", ["vq", "xmoe"])
def test_swap_builds_routers_that_agree_with_the_old_ones(router):
    model, batches = trained_like(), token_batches(8)
    cfg = routed_config(model.cfg, router, {})
    fresh, lacking = with_routers(model, cfg)
    assert all(lacking.values())  # nothing learned carried over
    new, report = swap_routers(model, cfg, batches, fit_steps=60, lr=3e-2)
    sd, old_sd = new.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], old_sd[k]) for k in old_sd if k not in routing_keys(model))
    before, after = agreement(model, fresh, batches[:4]), agreement(model, new, batches[:4])
    print(f"{router}: top-1 agreement {before['top1']} at initialisation, {after['top1']} after the fit; {report}")
    assert min(after["top1"]) > max(before["top1"]) and min(after["top1"]) > 0.5


def test_distillation_trains_only_the_routers():
    model, batches = trained_like(), token_batches(2)
    new, _ = swap_routers(model, routed_config(model.cfg, "xmoe", {}), batches, fit_steps=0)
    start = {k: v.clone() for k, v in new.state_dict().items()}
    losses = distil_routers(model, new, batches * 15, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]
    changed = {k for k, v in new.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and changed <= routing_keys(new)
    assert all(p.requires_grad for p in new.parameters() if not p.is_meta)


def test_swap_router_script_writes_a_model_pretrain_starts_from(tmp_path):
    path = model_dir(tmp_path)
    out = tmp_path / "swapped"
    p = subprocess.run([sys.executable, "scripts/swap_router.py", "--model", str(path), "--out", str(out), "--router",
                        "vq:num_codes=8", "--calib_tokens", "128", "--fit_steps", "5", "--distil_steps", "2",
                        "--batch_size", "4", "--eval_batches", "2", "train.lr=1e-4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "before distillation: held-out loss" in p.stdout and "after distillation" in p.stdout
    swapped = load_model(out)
    assert swapped.cfg.moe.router == "vq" and swapped.cfg.train.lr == 1e-4
    assert swapped.routers()[0].num_codes == 8 and bool(swapped.routers()[0].initialized)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["swapped"]["from"] == "topk" and manifest["swapped"]["after"]["top1"]
    started = build_model(swapped.cfg, init_from=str(out)).eval()  # what pretrain.py --init_from builds
    x = token_batches(1)[0][0]
    with torch.no_grad():
        assert torch.equal(started(x), swapped(x))
    bad = subprocess.run([sys.executable, "scripts/swap_router.py", "--model", str(path), "--out", str(tmp_path / "x"),
                          "--router", "soft", "moe.allow_noncausal=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: router soft does not route tokens to experts")
