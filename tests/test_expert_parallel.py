"""Expert parallelism on CPU with gloo: the sharded run equals the single-process run.

Training runs go through `megavq.train.trainer.run` inside spawned ranks (one process group, several runs),
so a world of 2 ranks pays the start-up once. A 2-rank run with micro-batch 4 and moe.ep_size=2 sees the
same global batch as a 1-rank run with 2 accumulation steps and moe.ep_size=1; their losses agree to 1e-4
(measured: 1e-6 or better). Gradient clipping is off in these runs (train.grad_clip=0) but in the clipping
runs, which show that ZeRO-0 and ZeRO-2 clip by the norm of all gradients with every expert counted once
(megavq.compat.deepspeed.clip_by_global_norm). The deepspeed backend runs with capacity large enough to drop
nothing.
"""
from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from megavq.train.launch import free_port

TOL = 1e-4
STEPS = 10
EP_SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32",
            "data.micro_batch_size=4", "data.eval_batches=2", "train.log_every=1", "train.eval_every=100",
            "train.warmup_steps=2", "train.lr=3e-3", f"train.max_steps={STEPS}", "train.save_every=100",
            "train.grad_clip=0", "moe.capacity_factor=4", "moe.eval_capacity_factor=4",
            "data.sampler=random"]  # the batches these 10-step checks were sized on (clipping visibly acts in them)
# vq with a learned codebook: an EMA codebook moves once per forward, so 2 accumulation steps on 1 rank
# update it twice where 2 ranks update it once (test_routers checks EMA across ranks on the same tokens).
ROUTERS = {"topk": [], "vq": ["moe.router=vq", "moe.router_options={ema: false, beta: 0.25}"],
           "xmoe": ["moe.router=xmoe"],
           "compete": ["moe.router=compete", "moe.router_options.rate=1.0", "moe.router_options.warmup_steps=0"]}


# ---- a small run_distributed_test helper (OLMo-core style) ------------------------------------------------
def _worker(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WANDB_MODE="offline")
    torch.set_num_threads(1)
    try:
        from megavq.train.engine import init_distributed
        init_distributed()
        buf = io.BytesIO()
        torch.save(fn(*args), buf)  # bytes: tensors in shared memory would die with this process
        results.put((rank, None, buf.getvalue()))
    except BaseException:  # noqa: BLE001  (reported to the parent)
        results.put((rank, traceback.format_exc(), None))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 500):
    """Run fn(*args) on world_size spawned ranks (gloo); returns the results by rank, raises a rank's error."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out = [None] * world_size
    try:
        for _ in range(world_size):
            rank, error, value = results.get(timeout=timeout)
            if error:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty:
        raise AssertionError(f"ranks did not finish within {timeout} s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return out


# ---- what the ranks run ---------------------------------------------------------------------------------
def logits_batch(vocab_size: int = 4096) -> torch.Tensor:
    return torch.randint(vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))


def trained_model(data: str, out_dir: str, overrides: list[str], ds_config: str = "zero2", resume: bool = False):
    """One pre-training run through trainer.run (tiny preset, EP_SMALL); returns the trained model."""
    import megavq.train.trainer as trainer
    from megavq.config import load_config
    models, build = [], trainer.build_engine

    def keep_model(model, cfg, ds):
        models.append(model)
        return build(model, cfg, ds)
    trainer.build_engine = keep_model
    try:
        cfg = load_config("tiny", [*EP_SMALL, f"data.source={data}", *overrides])
        trainer.run(cfg, ROOT / "ds_configs" / f"{ds_config}.json", out_dir, resume=resume)
    finally:
        trainer.build_engine = build
    return models[0]


def train_job(data: str, out_dir: str, overrides: list[str], ds_config: str = "zero2", resume: bool = False) -> dict:
    """One pre-training run; returns the losses and the trained model's logits (eval)."""
    model = trained_model(data, out_dir, overrides, ds_config, resume)
    with torch.no_grad():
        logits = model.eval()(logits_batch())
    return {"logits": logits, "losses": losses(out_dir)}


def jobs(plan: list[tuple]) -> dict:
    """Run a list of (name, function, kwargs) one after the other in this process group."""
    return {name: fn(**kwargs) for name, fn, kwargs in plan}


def losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/lm_loss"] for line in lines]


def one_rank(data, out, extra):
    return ("train", train_job, dict(data=data, out_dir=out, overrides=[*extra, "train.grad_accum_steps=2"]))


def two_ranks(data, out, extra):
    return ("train", train_job, dict(data=data, out_dir=out, overrides=[*extra, "moe.ep_size=2"]))


def named(name, job):
    return (name, job[1], job[2])


@pytest.fixture(scope="module")
def ep_runs(builtin_data, tmp_path_factory):
    """All training runs of this module: 1 rank (ep 1), then 2 ranks (ep 2), then 1 rank again (resumes)."""
    data, tmp = str(builtin_data), tmp_path_factory.mktemp("ep")
    first = [named(f"ref/{r}", one_rank(data, tmp / f"ref-{r}", x)) for r, x in ROUTERS.items()]
    first.append(named("part/ep1", one_rank(data, tmp / "part-ep1", ["train.stop_at_step=5", "train.save_every=5"])))
    first.append(named("clip/ref", one_rank(data, tmp / "clip-ref", ["train.grad_clip=1.0"])))
    second = [named(f"{b}/{r}", two_ranks(data, tmp / f"{b}-{r}", [f"moe.backend={b}", *x]))
              for b in ("native", "deepspeed") for r, x in ROUTERS.items()]
    second += [named(f"part/{b}", two_ranks(data, tmp / f"part-{b}", [f"moe.backend={b}", "train.stop_at_step=5",
                                                                     "train.save_every=5"]))
               for b in ("native", "deepspeed")]
    for stage in ("zero0", "zero2"):
        second.append(named(f"clip/{stage}", two_ranks(data, tmp / f"clip-{stage}", ["train.grad_clip=1.0"])))
        second[-1][2]["ds_config"] = stage
    second.append(named("resume/ep1->ep2", two_ranks(data, tmp / "part-ep1", ["train.save_every=5"])))
    second[-1][2]["resume"] = True
    third = [named(f"resume/{b}:ep2->ep1", one_rank(data, tmp / f"part-{b}", [f"moe.backend={b}",
                                                                              "train.save_every=5"]))
             for b in ("native", "deepspeed")]
    for job in third:
        job[2]["resume"] = True
    results = run_distributed(jobs, 1, first)[0]
    results.update(run_distributed(jobs, 2, second)[0])
    results.update(run_distributed(jobs, 1, third)[0])
    return {**results, "dirs": {"native/topk": tmp / "native-topk", "deepspeed/compete": tmp / "deepspeed-compete"}}


def assert_losses_match(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b), (a, b)
    assert max(abs(x - y) for x, y in zip(a, b)) < TOL, (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_clipping_at_ep2_uses_the_global_norm(ep_runs, stage):
    """train.grad_clip=1.0: 2 ranks at ep 2 equal 1 rank at ep 1, and clipping acted (the losses differ from the
    unclipped run's)."""
    clipped, unclipped = ep_runs["clip/ref"]["losses"], ep_runs["ref/topk"]["losses"]
    assert max(abs(a - b) for a, b in zip(clipped, unclipped)) > 1e-3
    assert_losses_match(ep_runs[f"clip/{stage}"]["losses"], clipped)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "deepspeed"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_ep2_on_two_ranks_matches_ep1_on_one_rank(ep_runs, backend, router):
    ref, sharded = ep_runs[f"ref/{router}"]["losses"], ep_runs[f"{backend}/{router}"]["losses"]
    assert len(ref) == STEPS and ref[-1] < ref[0]
    assert_losses_match(sharded, ref)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["native/topk", "deepspeed/compete"])
def test_exported_checkpoint_loads_with_the_training_logits(ep_runs, run):
    """The checkpoint holds every expert in the canonical layout; load_model (native, ep 1) agrees."""
    from megavq import load_model
    model = load_model(ep_runs["dirs"][run])
    with torch.no_grad():
        logits = model(logits_batch())
    torch.testing.assert_close(logits, ep_runs[run]["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["ep1->ep2", "native:ep2->ep1", "deepspeed:ep2->ep1"])
def test_resume_with_another_ep_size_matches_the_uninterrupted_run(ep_runs, resume):
    """Weights and Adam moments are re-sharded through the sharded, layout-free checkpoint."""
    ref = ep_runs["ref/topk"]["losses"]
    resumed = ep_runs[f"resume/{resume}"]["losses"]
    assert len(resumed) == STEPS  # steps 1-5 from the first run, 6-10 after the resume
    assert_losses_match(resumed[5:], ref[5:])


@pytest.mark.slow
def test_two_simulated_nodes_with_torchrun_match_one_rank(ep_runs, builtin_data, tmp_path):
    """Two `torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1` processes, moe.ep_size=2."""
    port, out = free_port(), tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port)]
    args = ["scripts/pretrain.py", "--ds_config", "ds_configs/zero2.json", "--data", str(builtin_data),
            "--out_dir", str(out), *EP_SMALL, "moe.ep_size=2"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*cmd, "--node_rank", str(r), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-3000:] for log in logs)
    assert_losses_match(losses(out), ep_runs["ref/topk"]["losses"])


# ---- the sharded layer against the single-process layer, on 2 ranks -----------------------------------
def layer_job(router: str, options: dict) -> dict:
    """Rank r runs rows r of a batch through a native layer sharded over 2 ranks; returns outputs and local
    expert grads."""
    import torch.distributed as dist

    from megavq.config import MoEConfig
    from megavq.moe.dispatch.expert_parallel import new_ep_group
    from megavq.moe.layer import build_moe_layer
    from megavq.moe.spec import MoESpec
    cfg = MoEConfig(router=router, num_experts=4, top_k=2, ep_size=2, router_options=options)
    torch.manual_seed(0)
    layer = build_moe_layer(MoESpec(cfg, 16, 24, seed=3))
    layer.set_ep_group(new_ep_group(2))
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))[dist.get_rank():dist.get_rank() + 1]
    x.requires_grad_()
    y, aux, _ = layer(x)
    (y.square().sum() + aux).backward()
    return {"y": y.detach(), "x_grad": x.grad, "state": layer.to_canonical("", dict(layer.state_dict())),
            "w_in_grad": layer.experts.w_in.grad, "router_grads": router_grads(layer)}


def router_grads(layer) -> dict:
    """The router's parameter gradients (route weights' gradient included: it crosses the all-to-all)."""
    return {name: p.grad for name, p in layer.router.named_parameters() if p.grad is not None}


def single_layer(router: str, options: dict):
    from megavq.config import MoEConfig
    from megavq.moe.layer import build_moe_layer
    from megavq.moe.spec import MoESpec
    torch.manual_seed(0)
    layer = build_moe_layer(MoESpec(MoEConfig(router=router, num_experts=4, top_k=2, router_options=options), 16, 24,
                                    seed=3))
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    outs = [layer(x[b:b + 1]) for b in range(2)]  # one sequence per "rank", as the sharded run does
    sum(y.square().sum() + aux for y, aux, _ in outs).backward()
    return layer, torch.cat([y.detach() for y, _, _ in outs]), x.grad


GROUPS = {"groups": 2, "group_top": 1}  # 4 experts in 2 groups, one per rank: a token uses one group
LAYER_CASES = {"topk": ("topk", {}), "topk/groups": ("topk", GROUPS), "expert_choice": ("expert_choice", {}),
               "compete": ("compete", {"rate": 1.0, "warmup_steps": 0})}


def traffic_job(options: dict, tokens: int = 512) -> dict:
    """A topk layer (4 experts, top-2) sharded over 2 ranks on `tokens` tokens of this rank: its routing and what
    the row exchanges sent to the other rank (expert_parallel.TRAFFIC), after the forward and after the backward."""
    import torch.distributed as dist

    from megavq.config import MoEConfig
    from megavq.moe.dispatch.expert_parallel import TRAFFIC, new_ep_group
    from megavq.moe.layer import build_moe_layer
    from megavq.moe.spec import MoESpec
    torch.manual_seed(0)
    layer = build_moe_layer(MoESpec(MoEConfig(num_experts=4, top_k=2, ep_size=2, router_options=options), 16, 24,
                                    seed=3))
    layer.set_ep_group(new_ep_group(2))
    x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(10 + dist.get_rank())).requires_grad_()
    TRAFFIC.reset()
    y, _, _ = layer(x)
    forward = (TRAFFIC.rows, TRAFFIC.bytes)
    y.square().sum().backward()
    return {"indices": layer.route(x).indices, "forward": forward, "total": (TRAFFIC.rows, TRAFFIC.bytes)}


TRAFFIC_CASES = {"traffic/top2": {}, "traffic/groups": GROUPS}


@pytest.fixture(scope="module")
def layer_runs():
    plan = [(name, layer_job, dict(router=r, options=o)) for name, (r, o) in LAYER_CASES.items()]
    plan += [(name, traffic_job, dict(options=o)) for name, o in TRAFFIC_CASES.items()]
    return run_distributed(jobs, 2, plan)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_sharded_layer_equals_single_process_layer(layer_runs, case):
    """Forward, input, expert and router gradients (1e-6) and the gathered (canonical) state dict."""
    router, options = LAYER_CASES[case]
    layer, y, x_grad = single_layer(router, options)
    ranks = [r[case] for r in layer_runs]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["w_in_grad"] for r in ranks]), layer.experts.w_in.grad,
                               rtol=1e-5, atol=1e-6)
    grads = router_grads(layer)
    assert grads.keys() == ranks[0]["router_grads"].keys() and (grads or router != "topk")
    for name, grad in grads.items():  # each rank's gradient from its own sequence: they sum to the whole batch's
        torch.testing.assert_close(sum(r["router_grads"][name] for r in ranks), grad, rtol=1e-5, atol=1e-6)
    for key, value in layer.named_parameters():  # buffers (compete's counter) count forwards per rank
        torch.testing.assert_close(ranks[0]["state"][key], value.detach(), msg=key)


def off_rank(indices_TK: torch.Tensor, rank: int) -> tuple[int, int]:
    """(tokens with an expert on the other of 2 ranks, slots there): rows sent off-rank once per (token, rank),
    and once per (token, slot) as the dispatch did before."""
    other_TK = indices_TK // 2 != rank  # experts 0, 1 on rank 0; 2, 3 on rank 1
    return int(other_TK.any(1).sum()), int(other_TK.sum())


@pytest.mark.slow
def test_each_token_reaches_each_rank_once_and_groups_halve_the_rows(layer_runs):
    """The rows the dispatch sent to the other rank (counted at all_to_all_single) are the tokens with an expert
    there; with one group of 2 per rank and group_top=1 every token's experts lie on one rank (one group), so about
    half the tokens cross, where top-2 without groups sends 5/6 of them (and the per-slot dispatch 1 row a token)."""
    sent = {}
    for case in TRAFFIC_CASES:
        ranks = [r[case] for r in layer_runs]
        tokens, slots = (sum(x) for x in zip(*(off_rank(r["indices"], i) for i, r in enumerate(ranks))))
        assert sum(r["forward"][0] for r in ranks) == 2 * tokens  # dispatch and combine, one row per token
        assert sum(r["total"][0] for r in ranks) == 4 * tokens  # and their backward
        sent[case] = (tokens, slots, sum(r["total"][1] for r in ranks))
    for r in (r["traffic/groups"] for r in layer_runs):
        group_TG = torch.zeros(r["indices"].shape[0], 2).scatter_(1, r["indices"] // 2, 1.0)
        assert group_TG.sum(1).eq(1).all()  # every token's experts in group_top = 1 group
    n = 2 * 512
    print(f"rows sent off-rank by the dispatch, 2 ranks x 512 tokens: {sent['traffic/top2'][0]} for top-2 "
          f"({sent['traffic/top2'][1]} one per slot), {sent['traffic/groups'][0]} with groups=2 group_top=1")
    assert sent["traffic/groups"][0] < 0.6 * n < 0.75 * n < sent["traffic/top2"][0] < sent["traffic/top2"][1]
    assert sent["traffic/top2"][1] > 0.9 * n


@pytest.mark.slow
def test_the_estimator_predicts_the_measured_all_to_all_bytes(layer_runs):
    """megavq.tools.estimate's all-to-all bytes (groups over none) against the bytes measured at all_to_all_single,
    within 10% (the gate's scores are not uniform over the experts, as the estimate assumes)."""
    from megavq.config import load_config
    from megavq.tools.estimate import Cluster, all_to_all
    tiny = ["moe.num_experts=4", "moe.top_k=2", "moe.ep_size=2", "model.d_model=16", "model.seq_len=512"]
    predicted = {}
    for case, options in TRAFFIC_CASES.items():
        cfg = load_config("tiny", [*tiny, *(f"moe.router_options.{k}={v}" for k, v in options.items())])
        a = all_to_all(cfg, Cluster(2), micro_batch=1, b=4)
        predicted[case] = a.sent_per_step / (a.exchanges_per_step / 4)  # one MoE layer, forward and backward
    measured = {case: sum(r[case]["total"][1] for r in layer_runs) / 2 for case in TRAFFIC_CASES}
    ratio_p, ratio_m = (x["traffic/groups"] / x["traffic/top2"] for x in (predicted, measured))
    print(f"all-to-all bytes sent to the other rank per rank, 4 experts, top-2, ep 2, 512 tokens, d 16, fp32: "
          f"top-2 {measured['traffic/top2']:.0f} measured, {predicted['traffic/top2']:.0f} estimated; "
          f"groups=2 group_top=1 {measured['traffic/groups']:.0f} measured, {predicted['traffic/groups']:.0f} "
          f"estimated; ratio {ratio_m:.3f} measured, {ratio_p:.3f} estimated")
    assert ratio_p == pytest.approx(0.6, rel=1e-3)  # 1 rank a token against 5/3 (rows rounded)
    assert ratio_m == pytest.approx(ratio_p, rel=0.1)
    for case in TRAFFIC_CASES:
        assert measured[case] == pytest.approx(predicted[case], rel=0.15)


def test_received_rows_are_grouped_by_local_expert():
    from megavq.moe.dispatch.expert_parallel import source_to_expert_order
    recv_RL = torch.tensor([[1, 2], [0, 3]])  # rows from rank 0: 1 for expert 0, 2 for expert 1; rank 1: 0, 3
    # received order: [r0e0, r0e1, r0e1, r1e1, r1e1, r1e1] -> expert 0 rows, then expert 1 rows by source
    assert source_to_expert_order(recv_RL).tolist() == [0, 1, 2, 3, 4, 5]
    recv_RL = torch.tensor([[1, 1], [2, 1]])  # [r0e0, r0e1, r1e0, r1e0, r1e1]
    assert source_to_expert_order(recv_RL).tolist() == [0, 2, 3, 1, 4]


def test_ep_size_must_divide_the_ranks_and_zero3_names_what_works():
    from megavq.config import load_config
    from megavq.errors import ConfigError
    from megavq.train.engine import reconcile_ds_config
    zero3 = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match=r"moe.ep_size=2 must divide the number of ranks, got 3"):
        reconcile_ds_config({}, load_config("tiny", ["moe.ep_size=2"]), 3)
    for overrides in (["moe.ep_size=2"], ["moe.backend=deepspeed"]):
        with pytest.raises(ConfigError, match=r"ZeRO-3 runs MoE with moe.backend=native \(or reference\) and "
                                              r"moe.ep_size=1 only"):
            reconcile_ds_config(zero3, load_config("tiny", overrides), 2)
    reconcile_ds_config(zero3, load_config("tiny", []), 2)  # native, ep_size 1: fine
