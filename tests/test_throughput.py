"""The throughput work: activation checkpointing, the chunked head loss, host syncs in a step, MFU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_expert_parallel import EP_SMALL, losses, run_distributed, trained_model
from torch.overrides import TorchFunctionMode

import megavq
from megavq.config import load_config
from megavq.model import Transformer
from megavq.model import loss as head_loss
from megavq.model.flops import flops_per_token, utilisation
from megavq.moe.routers import available_routers, router_class
from megavq.train.engine import prepare_model

CAUSAL = [r for r in available_routers() if router_class(r).causal]
SYNCS = {"item", "tolist", "cpu", "__bool__", "nonzero", "__int__", "__float__"}
TORCH_DIR, MEGAVQ_DIR = str(Path(torch.__file__).parent), str(Path(megavq.__file__).parent)


# ---- the chunked head loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_chunked_head_loss_equals_the_plain_loss(monkeypatch, dtype, tol):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 1000 * 37)  # 37 rows per chunk: 9 chunks, the last short
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 64, generator=g) * 0.3).to(dtype).requires_grad_()
    w = (torch.randn(1000, 64, generator=g) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(1000, (300,), generator=g)
    loss = head_loss.head_cross_entropy(h, w, y)
    (2 * loss).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T).float(), y)
    (2 * ref).backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= tol * ref.item()
    for got, want in zip(grads, (h.grad, w.grad)):
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    with torch.no_grad():
        assert abs(head_loss.head_cross_entropy(h, w, y).item() - ref.item()) <= tol * ref.item()


def test_model_loss_equals_cross_entropy_of_its_logits():
    cfg = load_config("tiny", ["model.vocab_size=512"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x, y = torch.randint(512, (2, 64)), torch.randint(512, (2, 64))
    out = model(x, y)
    assert out.logits is None  # the (B, S, V) logits are never made in training
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(out.lm_loss.item() - ref.item()) < 1e-5


# ---- activation checkpointing ----------------------------------------------------------------------------
def saved_bytes(model, x, y) -> int:
    """Bytes of the storages saved for the backward by one training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.data_ptr() not in params:
            seen.add(s.data_ptr())
            total[0] += s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y).loss.backward()
    return total[0]


IMPORTED = ["model.head_dim=40", "model.qk_norm=proj", "model.clip_qkv=0.5", "moe.shared_experts=1",
            "moe.shared_gate=true", "moe.dense_layers=[2]"]  # the options of imported MoE models


@pytest.mark.parametrize("extra", [[], IMPORTED], ids=["tiny", "imported-options"])
def test_activation_checkpointing_saves_less_and_keeps_gradients(extra):
    results = {}
    for every in (0, 1, 2):
        cfg = load_config("tiny", ["model.vocab_size=512", f"train.activation_checkpointing={every}", *extra])
        torch.manual_seed(0)
        model = prepare_model(Transformer(cfg), cfg).train()
        model.set_step(0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randint(512, (4, 64), generator=g), torch.randint(512, (4, 64), generator=g)
        nbytes = saved_bytes(model, x, y)
        results[every] = nbytes, [p.grad.clone() for p in model.parameters()]
    assert results[1][0] < 0.5 * results[0][0] and results[1][0] < results[2][0] < results[0][0], \
        {k: v[0] for k, v in results.items()}
    for every in (1, 2):
        for a, b in zip(results[0][1], results[every][1]):
            assert torch.equal(a, b)


def ac_job(data: str, out_dir: str, overrides: list[str]) -> dict:
    """A pre-training run through trainer.run; its losses and the trained routers' state."""
    model = trained_model(data, out_dir, ["train.max_steps=20", *overrides])
    state = {k: v.clone() for k, v in model.state_dict().items() if ".router." in k}
    return {"losses": losses(out_dir), "state": state}


def ac_jobs(plan):
    return {name: ac_job(**kwargs) for name, kwargs in plan}


@pytest.fixture(scope="module")
def ac_runs(builtin_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ac")
    plan = [(f"{r}/{every}", dict(data=str(builtin_data), out_dir=str(tmp / f"{r}-{every}"),
                                  overrides=[f"moe.router={r}", f"train.activation_checkpointing={every}"]))
            for r in CAUSAL for every in (0, 1)]
    return run_distributed(ac_jobs, 1, plan)[0]


@pytest.mark.slow
@pytest.mark.parametrize("router", CAUSAL)
def test_activation_checkpointing_keeps_losses_and_router_state(ac_runs, router):
    """20 steps with and without recomputation: the same losses (1e-6) and router state (vq's codebook, compete's
    counters: routers observe nothing in the recompute)."""
    off, on = ac_runs[f"{router}/0"], ac_runs[f"{router}/1"]
    assert len(off["losses"]) == len(on["losses"]) == 20
    assert max(abs(a - b) for a, b in zip(off["losses"], on["losses"])) < 1e-6
    assert off["state"].keys() == on["state"].keys()
    for k in off["state"]:
        assert torch.allclose(off["state"][k].float(), on["state"][k].float(), atol=1e-6), k


# ---- host syncs in a step --------------------------------------------------------------------------------
class SyncCounter(TorchFunctionMode):
    """Records the host-syncing tensor calls (.item(), .tolist(), .cpu(), bool(), nonzero, indexing by a boolean
    mask, ...) made from megavq's own frames."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1:2] if len(args) < 2 or not isinstance(args[1], tuple) else args[1]
        masked = name in ("__getitem__", "__setitem__") and any(
            torch.is_tensor(a) and a.dtype == torch.bool for a in index)
        if masked:
            name = "mask index"
        if name in SYNCS or masked:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(MEGAVQ_DIR):
                self.calls.append(f"{name} {frame.f_code.co_filename[len(MEGAVQ_DIR) + 1:]}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def sync_job(data: str, out_dir: str, overrides: list[str]) -> list[str]:
    """The syncing calls of the second step (not a logging step) of a 3-step run."""
    import megavq.train.trainer as trainer
    original, counter = trainer.Trainer.train_step_checked, SyncCounter()

    def counted(self, step, start, stop):
        if step != 1:
            return original(self, step, start, stop)
        with counter:
            return original(self, step, start, stop)
    trainer.Trainer.train_step_checked = counted
    try:
        cfg = load_config("tiny", [*EP_SMALL, f"data.source={data}", "train.max_steps=3", "train.log_every=100",
                                   *overrides])
        trainer.run(cfg, ROOT / "ds_configs" / "zero2.json", out_dir)
    finally:
        trainer.Trainer.train_step_checked = original
    return counter.calls


def sync_jobs(plan):
    return {name: sync_job(**kwargs) for name, kwargs in plan}


@pytest.mark.slow
def test_host_syncs_of_a_step_are_pinned(builtin_data, tmp_path):
    """A non-logging step of 2 MoE layers waits on the host only for the step's end (one tolist) and for the
    dropless layers' row counts (one tolist per MoE forward: the loop over experts splits by them); with expert
    parallelism one read per MoE forward too: the counts sent and received, read together after their exchange
    (the lists made from them then are host tensors already). (A recompute of activation checkpointing
    sorts again, in the backward, where a TorchFunctionMode does not see it.)"""
    plan = [(name, dict(data=str(builtin_data), out_dir=str(tmp_path / name), overrides=o)) for name, o in
            [("topk", []), ("vq", ["moe.router=vq"])]]
    calls = run_distributed(sync_jobs, 1, plan)[0]
    plan = [("ep2", dict(data=str(builtin_data), out_dir=str(tmp_path / "ep2"), overrides=["moe.ep_size=2"]))]
    calls.update(run_distributed(sync_jobs, 2, plan)[0])

    def where(name):
        return sorted({c.split(":")[0] for c in calls[name]})
    assert where("topk") == ["tolist moe/dispatch/native.py", "tolist train/preempt.py"], calls["topk"]
    assert len(calls["topk"]) == 2 + 1, calls["topk"]  # the row counts of 2 MoE layers + the step's end
    assert calls["vq"] == calls["topk"]  # vq's dead-code restarts are masked, not indexed
    assert "tolist train/preempt.py" in where("ep2") and "tolist moe/dispatch/native.py" not in where("ep2")
    ep2 = [c.split(":")[0] for c in calls["ep2"]]
    assert ep2.count("cpu moe/dispatch/expert_parallel.py") == 2, calls["ep2"]  # 2 MoE layers


# ---- MFU --------------------------------------------------------------------------------------------------
def test_flops_count_the_active_matrix_products():
    cfg = load_config("tiny", ["model.vocab_size=512"])
    model = Transformer(cfg)
    m = cfg.model
    per_token = flops_per_token(model)
    lookups = model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    head = model.lm_head.weight.numel() if m.tie_embeddings else 0
    assert per_token == 6 * (model.num_params(active=True) - lookups + head) + 12 * m.n_layers * m.d_model * m.seq_len
    got = utilisation(per_token, 1000.0, 2, 100.0)
    assert got["tflops_per_device"] == pytest.approx(per_token * 500 / 1e12)
    assert got["mfu"] == pytest.approx(got["tflops_per_device"] / 100.0)
    assert "mfu" not in utilisation(per_token, 1000.0, 1, None)


@pytest.mark.slow
def test_summary_and_metrics_have_mfu_with_peak_tflops(builtin_data, tmp_path):
    from test_train import SMALL, pretrain
    out = tmp_path / "run"
    pretrain(["--data", str(builtin_data), "--out_dir", str(out), *SMALL, "train.max_steps=2", "train.save_every=2",
              "train.peak_tflops=1.0", "train.final_eval_tokens=256"])
    summary = json.loads((out / "summary.json").read_text())
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < summary["mfu"] < 1 and summary["mfu"] == pytest.approx(summary["tflops_per_device"] / 1.0)
    assert record["mfu"] == summary["mfu"]
