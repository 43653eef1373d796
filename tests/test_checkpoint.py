"""Checkpoints: the sharded file format, resharding across layouts, faults at every point of a save, pre-emption
by signals, damaged checkpoints, run directories, wandb resume.

The distributed runs use a model whose parameter sizes are odd (d_model 33, vocabulary 4097), so ZeRO's
partitions cut parameters at uneven points, and the reference run `ref` (2 ranks, native, ep_size 2, ZeRO-2,
14 steps, a checkpoint every 2) is the uninterrupted run every interrupted or re-laid-out run is compared with.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_expert_parallel import EP_SMALL, jobs, run_distributed
from test_train import last_line, pretrain
from torch import nn

from megavq.moe.dispatch.base import BankDispatcher, register_dispatcher
from megavq.moe.dispatch.native import native_moe
from megavq.moe.experts import Experts, every_expert, expert_mlp
from megavq.train.launch import free_port

TOL = 1e-5
ODD = ["model.d_model=33", "model.n_heads=3", "model.pos=learned", "model.vocab_size=4097",
       # an imported model's options: heads of 10 (not 33 / 3), per-head QK-norm, a gated shared expert
       "model.head_dim=10", "model.qk_norm=head", "moe.shared_experts=1", "moe.d_shared=24", "moe.shared_gate=true"]
RUN = [*EP_SMALL, *ODD, "train.max_steps=14", "train.save_every=2"]


def step_losses(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/lm_loss"] for r in map(json.loads, lines)}


def assert_steps_match(got: dict, ref: dict, steps) -> None:
    steps = list(steps)
    assert all(s in got for s in steps), (sorted(got), steps)
    diffs = {s: abs(got[s] - ref[s]) for s in steps}
    assert max(diffs.values()) < TOL, diffs


def published_steps(run_dir) -> list[int]:
    from megavq.store.shards import published
    return [int(p.name.removeprefix("step_")) for p in published(Path(run_dir) / "checkpoints")]


# ---- the file format ---------------------------------------------------------------------------------------
def test_rank_files_are_plain_safetensors_read_by_range(tmp_path):
    from safetensors import safe_open

    from megavq.files import file_entry
    from megavq.store.shards import TensorFile, write_tensors
    a, b = torch.randn(7, 3), torch.arange(5)
    info = write_tensors(tmp_path / "f.safetensors", [("fp32/a@0", a.view(-1)), ("buffer/b@2", b)], {"rank": 0})
    assert info == file_entry(tmp_path / "f.safetensors")
    with safe_open(tmp_path / "f.safetensors", "pt") as f:
        torch.testing.assert_close(f.get_tensor("fp32/a@0"), a.view(-1))
        torch.testing.assert_close(f.get_tensor("buffer/b@2"), b)
    tf, out = TensorFile(tmp_path / "f.safetensors"), torch.empty(4)
    tf.read("fp32/a@0", 9, out)
    torch.testing.assert_close(out, a.view(-1)[9:13])
    tf.close()


def test_fragments_cover_each_tensor_once_and_read_across_files(tmp_path):
    from megavq.errors import CheckpointError
    from megavq.store.shards import Fragments, TensorFile, write_tensors
    w = torch.randn(11)
    write_tensors(tmp_path / "r0.safetensors", [("fp32/w@0", w[:4]), ("fp32/w@9", w[9:])])
    write_tensors(tmp_path / "r1.safetensors", [("fp32/w@4", w[4:9])])
    frags = Fragments({"w": {"shape": [11], "dtype": "float32", "kind": "param"}})
    for name in ("r0", "r1"):
        frags.add_file(name, TensorFile(tmp_path / f"{name}.safetensors"))
    frags.check_coverage(tmp_path)
    out = torch.empty(7)
    frags.read_range("fp32", "w", 3, out)  # spans three fragments in two files
    torch.testing.assert_close(out, w[3:10])
    torch.testing.assert_close(frags.tensor("fp32", "w"), w)
    gap = Fragments({"w": {"shape": [11], "dtype": "float32", "kind": "param"}})
    gap.add_file("r0", TensorFile(tmp_path / "r0.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete: fp32/w has 4 of 11"):
        gap.check_coverage(tmp_path)


def test_fault_specs_command_line_and_slurm_environment():
    from megavq.train.faults import _parse
    from megavq.train.launch import resume_argv, slurm_env
    assert _parse("save.write:1:4:kill,step::7") == [("save.write", 1, 4, "kill"), ("step", None, 7, "raise")]
    with pytest.raises(ValueError, match="POINT"):
        _parse("nowhere:0")
    assert resume_argv(["--resume", "train.max_steps=6"]) == ["--resume=strict", "train.max_steps=6"]
    assert resume_argv(["--resume", "auto", "x=1"]) == ["--resume=auto", "x=1"]
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert slurm_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                              "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert slurm_env({**env, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # one task: a launcher starts the ranks


class TransposedExperts(nn.Module):
    """Experts keeping w_out as (E, D, H): not a row range of the canonical (E, H, D) (like MegaBlocks' layout)."""

    def __init__(self, ref: Experts):
        super().__init__()
        self.num_experts, self.mlp = ref.num_experts, ref.mlp
        self.w_in = nn.Parameter(ref.w_in.detach().clone())
        self.w_out_t = nn.Parameter(ref.w_out.detach().transpose(1, 2).contiguous())

    def forward(self, x_ND, counts_E):
        outs = [expert_mlp(x, self.w_in[e], self.w_out_t[e].t(), None, None, self.mlp)
                for e, x in enumerate(torch.split(x_ND, counts_E)) if x.shape[0]]
        return torch.cat(outs) if outs else x_ND.new_zeros(0, self.w_in.shape[2])


class TransposedDispatcher(BankDispatcher):
    layer_kinds, biases, zero3 = ("token",), False, False

    def build_experts(self):
        return TransposedExperts(Experts.for_spec(self.spec))

    def run(self, x_TD, r, experts):
        return native_moe(x_TD, r, experts)

    def all_experts(self, x_TD, experts):
        return every_expert(experts, self.num_experts, x_TD)

    def to_canonical(self, experts, prefix, sd):
        if prefix + "w_out_t" in sd:
            sd[prefix + "w_out"] = sd.pop(prefix + "w_out_t").transpose(1, 2)
        return sd

    def from_canonical(self, experts, prefix, sd):
        if prefix + "w_out" in sd:
            sd[prefix + "w_out_t"] = sd.pop(prefix + "w_out").transpose(1, 2)
        return sd


def register_transposed() -> None:
    """Registered on demand (here and in the spawned ranks), so that other tests never see it."""
    from megavq.moe.dispatch import available_dispatchers
    if "test_transposed" not in available_dispatchers():
        register_dispatcher("test_transposed")(TransposedDispatcher)


@pytest.mark.parametrize("backend", ["native", "test_transposed"])
def test_layout_maps_local_tensors_onto_canonical_ones(backend):
    """Native experts are canonical rows; a dispatcher in another arrangement is saved through to_canonical."""
    from megavq.config import load_config
    register_transposed()
    from megavq.model import Transformer
    from megavq.train.layout import build_layout
    model = Transformer(load_config("tiny", ["model.vocab_size=64", f"moe.backend={backend}"]))
    layout = build_layout(model, 1)
    experts = [s for s in layout.slots if ".experts." in s.name]
    canonical = Transformer(load_config("tiny", ["model.vocab_size=64"])).state_dict()
    assert {k: v["shape"] for k, v in layout.tensors.items()} == {
        k: list(v.shape) for k, v in canonical.items() if k != "lm_head.weight"}
    if backend == "native":
        assert not layout.fallback and all(s.canonical == s.name and s.offset == 0 for s in experts)
    else:
        assert not experts and [p for p, _, _ in layout.fallback] == [f"blocks.{i}.mlp." for i in range(4)]


IMPORTED = ["model.head_dim=20", "model.qk_norm=proj", "moe.shared_experts=1", "moe.shared_gate=true",
            "moe.dense_layers=[1]"]  # the options of imported MoE models


@pytest.mark.parametrize("extra", [[], IMPORTED], ids=["tiny", "imported-options"])
@pytest.mark.parametrize("backend", ["native", "deepspeed", "reference"])
def test_declared_expert_rows_equal_the_probed_ones(backend, extra):
    """native and deepspeed declare their canonical rows; reference declares none and is probed."""
    from megavq.config import load_config
    from megavq.model import Transformer
    from megavq.train.layout import expert_rows, local_tensors, probed_rows
    model = Transformer(load_config("tiny", ["model.vocab_size=64", f"moe.backend={backend}", *extra]))
    local = local_tensors(model)
    for prefix, layer in model.moe_layers():
        assert (layer.canonical_rows(prefix) is None) == (backend == "reference")
        rows = expert_rows(prefix, layer, local)
        assert rows and rows == probed_rows(prefix, layer, local)
        assert set(rows) == {n for n in local if n.startswith(f"{prefix}experts.")}


# ---- jobs of the spawned process groups ------------------------------------------------------------------------
def train_run(data: str, out: str, overrides: list[str], ds: str = "zero2", resume: str | None = None) -> dict:
    """trainer.run on every rank of the group; returns {step: loss}."""
    import megavq.train.trainer as trainer
    from megavq.config import load_config
    register_transposed()
    cfg = load_config("tiny", [*RUN, f"data.source={data}", *overrides])
    summary = trainer.run(cfg, ROOT / "ds_configs" / f"{ds}.json", out, resume=resume)
    return {**step_losses(out), "resumed_from": summary["resumed_from"]}


def fork_run(src: str, dst: str, step: int) -> None:
    """Copy a run directory keeping only its checkpoints up to `step` (rank 0; the others wait)."""
    import torch.distributed as dist
    if dist.get_rank() == 0:
        def later(_, names):
            return [n for n in names if re.fullmatch(r"step_\d+", n) and int(n[5:]) > step] + ["latest"]
        shutil.copytree(src, dst, ignore=later)
    dist.barrier()


def fragments_job(data: str, ds: str, overrides: list[str]) -> list:
    """[(kind, canonical name, start, numel)] of what this rank writes, and the canonical shapes (no training)."""
    import torch.distributed as dist

    from megavq.config import load_config
    from megavq.model import Transformer
    from megavq.train.fragments import owned_entries
    from megavq.train.layout import build_layout
    from megavq.train.engine import build_engine, read_ds_config, reconcile_ds_config
    cfg = load_config("tiny", [*RUN, f"data.source={data}", *overrides])
    world = dist.get_world_size()
    engine = build_engine(Transformer(cfg), cfg, reconcile_ds_config(read_ds_config(
        ROOT / "ds_configs" / f"{ds}.json"), cfg, world))
    layout = build_layout(engine.module, cfg.moe.ep_size)
    entries = owned_entries(engine, layout, dist.get_rank(), world, cfg.moe.ep_size)
    return {"entries": [(k, t.numel()) for k, t in entries], "tensors": layout.tensors}


def run_job(name, fn, **kwargs):
    return (name, fn, kwargs)


@pytest.fixture(scope="module")
def runs(builtin_data, tmp_path_factory):
    """The reference run, the sources of the layout changes and their resumes; 2 ranks, then 1 rank."""
    data, tmp = str(builtin_data), tmp_path_factory.mktemp("ckpt")
    d = {name: str(tmp / name) for name in ("ref", "z3", "ds", "z3-z2ep2", "ds-native", "z2ep2-z3", "2-1")}
    ep2 = ["moe.ep_size=2"]
    two = [run_job("ref", train_run, data=data, out=d["ref"], overrides=[*ep2, "train.keep_checkpoints=10"]),
           run_job("z3", train_run, data=data, out=d["z3"], overrides=["train.stop_at_step=4"], ds="zero3"),
           run_job("ds", train_run, data=data, out=d["ds"], overrides=[*ep2, "moe.backend=deepspeed",
                                                                       "train.stop_at_step=4"]),
           run_job("fork1", fork_run, src=d["z3"], dst=d["z3-z2ep2"], step=4),
           run_job("z3-z2ep2", train_run, data=data, out=d["z3-z2ep2"], overrides=ep2, resume="strict"),
           run_job("fork2", fork_run, src=d["ds"], dst=d["ds-native"], step=4),
           run_job("ds-native", train_run, data=data, out=d["ds-native"], overrides=ep2, ds="zero1",
                   resume="strict"),
           run_job("frag/zero2", fragments_job, data=data, ds="zero2", overrides=["moe.router=xmoe"]),
           run_job("frag/zero3", fragments_job, data=data, ds="zero3", overrides=["moe.router=xmoe"])]
    accum = ["train.grad_accum_steps=2"]
    one = [run_job("fork3", fork_run, src=d["ref"], dst=d["z2ep2-z3"], step=4),
           run_job("z2ep2-z3", train_run, data=data, out=d["z2ep2-z3"], overrides=accum, ds="zero3", resume="auto"),
           run_job("fork4", fork_run, src=d["ref"], dst=d["2-1"], step=4),
           run_job("2-1", train_run, data=data, out=d["2-1"], overrides=accum, ds="zero0", resume="auto")]
    results = run_distributed(jobs, 2, two)
    results[0].update(run_distributed(jobs, 1, one)[0])
    return {**results[0], "frag_ranks": [r["frag/zero2"] for r in results[:2]],
            "frag3_ranks": [r["frag/zero3"] for r in results[:2]], "dirs": d, "data": data}


def coverage(ranks: list[dict]) -> dict:
    """{(kind, name): sorted [(start, numel, rank)]} over every rank's entries."""
    out = {}
    for rank, r in enumerate(ranks):
        for key, n in r["entries"]:
            kind, rest = key.split("/", 1)
            name, start = rest.rsplit("@", 1)
            out.setdefault((kind, name), []).append((int(start), n, rank))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["frag_ranks", "frag3_ranks"])
def test_ranks_write_disjoint_fragments_that_cover_every_tensor(runs, stage):
    """ZeRO-2: the flat partitions cut parameters at uneven points; ZeRO-3: per-parameter partitions, the last
    one shorter (padding cut off); every element is written by exactly one rank, buffers once."""
    ranks, tensors = runs[stage], runs[stage][0]["tensors"]
    cov = coverage(ranks)
    for name, info in tensors.items():
        for kind in (("fp32", "exp_avg", "exp_avg_sq") if info["kind"] == "param" else ("buffer",)):
            frags, pos = cov[(kind, name)], 0
            for start, n, _ in frags:
                assert start == pos, (kind, name, frags)
                pos += n
            numel = 1
            for s in info["shape"]:
                numel *= s
            assert pos == numel, (kind, name, pos, numel)
    split = [(name, f) for (kind, name), f in cov.items() if kind == "fp32" and len({r for _, _, r in f}) == 2]
    assert split, "no parameter is shared between the ranks"
    assert any(f[0][1] % 2 or f[-1][1] != f[0][1] for _, f in split), split[:3]  # uneven cuts


@pytest.mark.slow
@pytest.mark.parametrize("case, first", [("z3-z2ep2", 5), ("ds-native", 5), ("z2ep2-z3", 5), ("2-1", 5)])
def test_resume_in_another_layout_equals_the_uninterrupted_run(runs, case, first):
    """ZeRO-3 (2 ranks, ep 1) -> ZeRO-2 ep 2; deepspeed backend ep 2 -> native ep 2 (ZeRO-1); ZeRO-2 ep 2 on 2
    ranks -> ZeRO-3 ep 1 on 1 rank; 2 ranks (ZeRO-2, ep 2) -> 1 rank (ZeRO-0, a plain optimizer)."""
    ref = runs["ref"]
    assert ref["resumed_from"] == 0 and ref[14] < ref[1]
    assert runs[case]["resumed_from"] == first - 1  # not a fresh start that happens to match
    assert_steps_match(runs[case], ref, range(first, 15))


@pytest.mark.slow
def test_layout_sources_match_the_reference_before_the_change(runs):
    assert_steps_match(runs["z3"], runs["ref"], range(1, 5))
    assert_steps_match(runs["ds"], runs["ref"], range(1, 5))


@pytest.mark.slow
def test_a_dispatcher_in_another_arrangement_resumes_in_its_own_and_the_native_layout(builtin_data, tmp_path):
    data, d = str(builtin_data), {n: str(tmp_path / n) for n in ("t", "t-native", "t-t")}
    t = ["moe.backend=test_transposed", "train.max_steps=6"]
    plan = [run_job("t", train_run, data=data, out=d["t"], overrides=[*t, "train.keep_checkpoints=3"]),
            run_job("fork1", fork_run, src=d["t"], dst=d["t-native"], step=2),
            run_job("t-native", train_run, data=data, out=d["t-native"], overrides=["train.max_steps=6"], ds="zero1",
                    resume="strict"),
            run_job("fork2", fork_run, src=d["t"], dst=d["t-t"], step=2),
            run_job("t-t", train_run, data=data, out=d["t-t"], overrides=t, resume="strict")]
    r = run_distributed(jobs, 1, plan)[0]
    assert r["t-native"]["resumed_from"] == r["t-t"]["resumed_from"] == 2
    assert_steps_match(r["t-native"], r["t"], range(3, 7))
    assert_steps_match(r["t-t"], r["t"], range(3, 7))


# ---- faults: a chain of launches, each killed at another point and resumed by the next -----------------------
def launch(args, env=None, ranks=2, check=False):
    return pretrain(args, launcher=("deepspeed", "--num_gpus", str(ranks)), check=check,
                    env={"OMP_NUM_THREADS": "1", **(env or {})})


def cli_args(runs, out, *extra):
    return ["--ds_config", "ds_configs/zero2.json", "--data", runs["data"], "--out_dir", str(out), *RUN,
            "moe.ep_size=2", *extra]


@pytest.mark.slow
def test_every_fault_point_resumes_to_the_uninterrupted_run(runs, tmp_path):
    """2 ranks. Killed while writing its rank file, after every file but before publishing, while pruning,
    mid-step; then a rank's disk is full at the last save (fatal, the previous checkpoint intact). After each,
    `--resume auto` continues from the newest complete checkpoint and its steps equal the reference run's."""
    from megavq.store.shards import open_checkpoint
    out, ref = tmp_path / "run", runs["ref"]
    chain = [("save.write:1:4:kill", None, 2), ("save.publish:0:6:kill", 2, 4), ("save.prune:0:8:kill", 4, 8),
             ("step:1:12:kill", 8, 10), ("save.enospc:1:14", 10, 12), (None, 12, 14)]
    for fault, resumed_from, published_after in chain:
        proc = launch(cli_args(runs, out, *(["--resume", "auto"] if resumed_from else [])),
                      env={"MEGAVQ_FAULT": fault} if fault else None)
        steps = step_losses(out)
        assert published_steps(out)[-1] == published_after, (fault, published_steps(out), proc.stderr[-2000:])
        if resumed_from is not None:
            assert f"resuming from {out / 'checkpoints' / f'step_{resumed_from:07d}'} " in proc.stderr, fault
        if resumed_from is None:
            assert_steps_match(steps, ref, steps)
        else:
            redone = [s for s in steps if s > resumed_from]
            assert len(redone) >= (3 if fault or resumed_from < 12 else 2), (fault, steps)
            assert_steps_match(steps, ref, redone)
        assert not list((out / "checkpoints").glob(".tmp-*")) or fault in ("save.write:1:4:kill",
                                                                           "save.publish:0:6:kill")
        if fault == "save.enospc:1:14":
            assert proc.returncode == 3, proc.stderr[-2000:]
            assert re.match(r"error: could not write checkpoint step_0000014: .*rank_00001.safetensors: No space "
                            r"left on device; step_0000012 is intact$", last_line(proc)), last_line(proc)
            open_checkpoint(out / "checkpoints" / "step_0000012").close()  # every sha256 checks
        elif fault:
            assert proc.returncode != 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_steps_match(step_losses(out), ref, range(1, 15))
    assert json.loads((out / "summary.json").read_text())["steps"] == 14


def rank_processes(proc) -> list:
    import psutil
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any("pretrain.py" in a for a in p.cmdline()) and any(a.startswith("--local_rank") for a in p.cmdline())]


def wait_for_step(out, step: int, timeout: float = 300) -> None:
    t = time.time()
    while time.time() - t < timeout:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"{out} did not reach step {step}")


@pytest.mark.slow
def test_a_kill_at_a_random_moment_resumes_to_the_uninterrupted_run(runs, tmp_path):
    """SIGKILL of a random rank at a random moment (seed printed), then `--resume auto`."""
    import psutil
    seed = int(os.environ.get("MEGAVQ_KILL_SEED", time.time_ns() % 10**6))
    rng, out = random.Random(seed), tmp_path / "run"
    print(f"random kill seed {seed} (MEGAVQ_KILL_SEED reproduces it)")
    cmd = ["deepspeed", "--master_port", str(free_port()), "--num_gpus", "2", "scripts/pretrain.py",
           *cli_args(runs, out)]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MEGAVQ_FAULT": "step:::sleep0.2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, rng.randint(1, 8))  # steps of 0.2 s or more: the kill lands before step 11
    time.sleep(rng.uniform(0, 0.4))
    victims = rank_processes(proc)
    assert len(victims) == 2
    rng.choice(victims).kill()
    proc.communicate(timeout=120)
    psutil.wait_procs(victims, timeout=60)
    start = published_steps(out)[-1] if published_steps(out) else 0
    proc = launch(cli_args(runs, out, "--resume", "auto"), check=True)
    assert (f"resuming from {out / 'checkpoints' / f'step_{start:07d}'} " in proc.stderr) == (start > 0)
    assert start <= 11, start  # at least 3 steps after the resume
    assert_steps_match(step_losses(out), runs["ref"], range(start + 1, 15))


def collective_timeout_job() -> dict:
    """Rank 0 waits in an all_reduce that rank 1 never joins, on a group with a 2 s timeout."""
    import datetime

    import torch.distributed as dist

    from megavq.train.launch import lost_rank
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    if dist.get_rank() == 1:
        time.sleep(5)
        return {}
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except Exception as e:  # noqa: BLE001
        return {"retryable": lost_rank(e), "message": str(e)[:200]}
    return {"retryable": None}


@pytest.mark.slow
def test_a_collective_timeout_is_retryable():
    result = run_distributed(collective_timeout_job, 2)[0]
    assert result["retryable"] is True, result


def test_errors_of_a_lost_rank_are_retryable_and_bugs_are_not():
    from megavq.train.launch import lost_rank
    gloo = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:46780: Connection reset "
            "by peer. This is typically caused by a remote worker hanging")
    assert lost_rank(RuntimeError(gloo)) and not lost_rank(RuntimeError("shape mismatch")) and \
        not lost_rank(ValueError("Timed out"))


# ---- pre-emption ------------------------------------------------------------------------------------------------
def stopped_at(out) -> int:
    state = json.loads((out / "run.json").read_text())["exit"]
    assert state["code"] == 75, state
    assert published_steps(out)[-1] == state["step"] == max(step_losses(out)), (state, published_steps(out))
    return state["step"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_saves_exits_75_and_the_resumed_run_equals_the_uninterrupted_one(runs, tmp_path, launcher):
    """The launcher gets SIGTERM (deepspeed: the whole process group, as a scheduler or Ctrl-C sends it;
    torchrun: its own process): every rank finishes its step, saves, exits with 75 (recorded in run.json: both
    launchers exit 1 themselves after forwarding a signal); `--resume auto` continues to the reference losses."""
    import psutil
    out, port = tmp_path / "run", str(free_port())
    head = ["deepspeed", "--master_port", port, "--num_gpus", "2"] if launcher == "deepspeed" else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MEGAVQ_FAULT": "step:::sleep0.3"}
    proc = subprocess.Popen([*head, "scripts/pretrain.py", *cli_args(runs, out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(out, 3)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    if launcher == "deepspeed":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    psutil.wait_procs(ranks, timeout=60)
    step = stopped_at(out)
    assert 3 <= step <= 11, step
    assert "SIGTERM received: stopping after this step and saving" in err
    proc = launch(cli_args(runs, out, "--resume", "auto"), check=True)
    assert f"resuming from {out / 'checkpoints' / f'step_{step:07d}'} " in proc.stderr
    assert_steps_match(step_losses(out), runs["ref"], range(1, 15))


@pytest.mark.slow
def test_srun_tasks_stop_together_on_sigusr1_to_one_rank(runs, tmp_path):
    """Two `srun`-style tasks (SLURM_* environment, no launcher); SIGUSR1 reaches rank 1 only: both ranks stop
    after the same step, save once and exit 75 themselves."""
    out, port = tmp_path / "run", str(free_port())
    procs = []
    for r in (0, 1):
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MEGAVQ_FAULT": "step:::sleep0.3",
               "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "127.0.0.1", "MASTER_PORT": port}
        env.pop("RANK", None)
        procs.append(subprocess.Popen([sys.executable, "scripts/pretrain.py", *cli_args(runs, out)], cwd=ROOT,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    wait_for_step(out, 3)
    procs[1].send_signal(signal.SIGUSR1)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], [e[-1500:] for e in errs]
    step = stopped_at(out)
    assert errs[0].strip().splitlines()[-1].startswith(f"error: stopped by SIGUSR1 after step {step}"), errs[0]
    assert_steps_match(step_losses(out), runs["ref"], range(1, step + 1))


# ---- damaged checkpoints, run directories, wandb: one rank -------------------------------------------------------
ONE = ["--ds_config", "ds_configs/zero2.json", *RUN, "train.max_steps=6", "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def one_rank_run(builtin_data, tmp_path_factory):
    """6 steps, checkpoints at 2, 4, 6, started by `--resume auto` in an empty directory (nothing to resume)."""
    out = tmp_path_factory.mktemp("one") / "run"
    proc = pretrain([*ONE, "--data", str(builtin_data), "--out_dir", str(out), "--resume", "auto"])
    return {"out": out, "losses": step_losses(out), "stderr": proc.stderr, "data": str(builtin_data)}


def test_auto_resume_with_nothing_to_resume_starts_fresh(one_rank_run):
    assert sorted(one_rank_run["losses"]) == [1, 2, 3, 4, 5, 6] and "resuming from" not in one_rank_run["stderr"]
    assert json.loads((one_rank_run["out"] / "summary.json").read_text())["resumed_from"] == 0
    assert published_steps(one_rank_run["out"]) == [2, 4, 6]
    assert (one_rank_run["out"] / "checkpoints" / "latest").read_text().strip() == "step_0000006"


def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    shard = dst / "checkpoints" / "step_0000006" / "rank_00000.safetensors"
    if how == "truncate":
        os.truncate(shard, shard.stat().st_size - 100)
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how, message", [("truncate", "has .* bytes, the manifest records .* \\(truncated"),
                                          ("alter", "does not match its sha256 in the manifest")])
def test_a_damaged_file_is_named_on_load(one_rank_run, tmp_path, how, message):
    import megavq
    from megavq.errors import CheckpointError
    shard = damaged_copy(one_rank_run["out"], tmp_path / "run", how)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(shard))} {message}"):
        megavq.load_model(tmp_path / "run")


def test_strict_resume_of_a_damaged_checkpoint_is_one_fatal_line(one_rank_run, tmp_path):
    shard = damaged_copy(one_rank_run["out"], tmp_path / "run", "alter")
    proc = pretrain([*ONE, "--data", one_rank_run["data"], "--out_dir", str(tmp_path / "run"), "--resume"],
                    check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_line(proc) == (f"error: {shard} does not match its sha256 in the manifest (altered or damaged); "
                               f"`--resume auto` falls back to the previous checkpoint")


def test_auto_resume_falls_back_past_a_truncated_checkpoint(one_rank_run, tmp_path):
    out = tmp_path / "run"
    shard = damaged_copy(one_rank_run["out"], out, "truncate")
    proc = pretrain([*ONE, "--data", one_rank_run["data"], "--out_dir", str(out), "--resume", "auto"])
    assert f"warning: {shard} has" in proc.stderr and "falling back to the previous checkpoint" in proc.stderr
    assert f"resuming from {out / 'checkpoints' / 'step_0000004'} (step 4)" in proc.stderr
    assert_steps_match(step_losses(out), one_rank_run["losses"], range(1, 7))  # 5 and 6 re-done from step 4
    from megavq.store.shards import open_checkpoint
    open_checkpoint(out / "checkpoints" / "step_0000006").close()  # rewritten whole


def test_a_fresh_run_into_a_used_directory_is_refused_and_overwrite_starts_over(one_rank_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_rank_run["out"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = pretrain([*ONE, "--data", one_rank_run["data"], "--out_dir", str(out)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc) == (f"error: {out} already holds a run: continue it with --resume (or --resume auto, "
                               f"which also starts it when it has no checkpoint), or delete it and start again with "
                               f"--overwrite")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    pretrain([*ONE, "--data", one_rank_run["data"], "--out_dir", str(out), "--overwrite", "train.max_steps=2",
              "train.save_every=1"])
    assert sorted(step_losses(out)) == [1, 2] and published_steps(out) == [1, 2]


@pytest.mark.slow
def test_wandb_offline_resume_continues_the_same_run(one_rank_run, tmp_path):
    out, args = tmp_path / "run", [*ONE, "--data", one_rank_run["data"], "train.wandb=true"]
    pretrain([*args, "--out_dir", str(out), "train.stop_at_step=3"])
    shutil.rmtree(out / "checkpoints" / "step_0000003")  # as if the attempt had died after logging step 3
    run_id = json.loads((out / "run.json").read_text())["wandb_id"]
    pretrain([*args, "--out_dir", str(out), "--resume", "auto"])
    dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in dirs), dirs
    assert json.loads((out / "run.json").read_text())["wandb_id"] == run_id
    first, second = (wandb_history(d) for d in dirs)
    assert [h["step"] for h in first] == [1, 2, 3]
    assert second[0] == {"step": 2, "resumed_from": 2}  # the mark, then step 3 again: not dropped
    assert [h["step"] for h in second[1:]] == [3, 4, 5, 6]


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows ({"step", "resumed_from"}) of an offline wandb run: its .wandb file is a LevelDB-style
    log (7-byte header, 32 KiB blocks of records: crc32, length, type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, raw, buf = next(run_dir.glob("run-*.wandb")).read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            raw, buf = raw + [buf], b""
    rows = []
    for r in raw:
        record = pb.Record()
        record.ParseFromString(r)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "step" in items:
                rows.append({k: items[k] for k in ("step", "resumed_from") if k in items})
    return rows
