"""Pre-training through the real scripts and launchers: ranks, resume, ZeRO configs, bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from megavq.train.launch import free_port

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32",
         "data.micro_batch_size=4", "data.eval_batches=2", "train.log_every=1", "train.eval_every=4",
         "train.warmup_steps=2", "train.lr=3e-3"]


def pretrain(args, launcher=("python",), check=True, env=None):
    """Run scripts/pretrain.py; launcher is ('python',), ('deepspeed',) or ('deepspeed', '--num_gpus', '2')."""
    if launcher[0] == "python":
        cmd = [sys.executable, *launcher[1:]]
    else:  # a free port, so that launches running side by side do not collide on DeepSpeed's default
        cmd = [launcher[0], "--master_port", str(free_port()), *launcher[1:]]
    cmd += ["scripts/pretrain.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [m["train/lm_loss"] for m in metrics(run_dir)]


@pytest.mark.slow
def test_main_job_writes_the_run_directory(builtin_data, tmp_path):
    out = tmp_path / "run"
    pretrain(["--ds_config", "ds_configs/zero2.json", "--data", str(builtin_data), "--out_dir", str(out),
              *SMALL, "train.max_steps=8", "train.save_every=4", "train.wandb=true"], launcher=("deepspeed",))
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 4096
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ["step", "train/loss", "lr", "tokens_per_s", "train/aux_loss", "moe/L0/load", "moe/L1/load_cv"]:
        assert key in records[0], key
    assert "val/loss" in records[3] and "val/loss" not in records[2]
    summary = json.loads((out / "summary.json").read_text())
    for key in ["steps", "val_loss", "test_loss", "test_ppl", "test_bits_per_byte", "tokens_per_s"]:
        assert summary[key] is not None, key
    assert summary["steps"] == 8
    test_tokens = json.loads((builtin_data / "meta.json").read_text())["splits"]["test"]["tokens"]
    assert summary["test_tokens"] == (test_tokens - 1) // 32 * 32  # the whole split: every full window
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000004", "step_0000008"]
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run missing"


@pytest.mark.slow
def test_two_ranks_match_one_rank(builtin_data, tmp_path):
    """2 ranks x micro-batch 4 and 1 rank x 2 accumulation steps x 4 see the same global batch (of a mixture of
    two sources, read under document masking)."""
    common = ["--ds_config", "ds_configs/zero2.json", f"data.source={builtin_data}@0.7,{builtin_data}@0.3", *SMALL,
              "train.max_steps=6", "train.save_every=100", "data.document_mask=true"]
    pretrain([*common, "--out_dir", str(tmp_path / "two")], launcher=("deepspeed", "--num_gpus", "2"))
    pretrain([*common, "--out_dir", str(tmp_path / "one"), "train.grad_accum_steps=2"], launcher=("deepspeed",))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 6
    assert two[-1] < two[0]
    assert max(abs(a - b) for a, b in zip(two, one)) < 1e-4, (two, one)
    assert {"val/loss", f"val/{builtin_data.name}#1/loss"} <= set(metrics(tmp_path / "two")[3])


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(builtin_data, tmp_path):
    """A run of the random sampler whose checkpoint does not record it (written before data.sampler existed)
    resumes, with data.sampler left at auto, to the batches of the uninterrupted run."""
    common = ["--ds_config", "ds_configs/zero1.json", "--data", str(builtin_data), *SMALL, "train.max_steps=8",
              "train.save_every=4", "moe.router_options.jitter=0.01"]
    pretrain([*common, "--out_dir", str(tmp_path / "full"), "data.sampler=random"])
    pretrain([*common, "--out_dir", str(tmp_path / "part"), "train.stop_at_step=4", "data.sampler=random"])
    assert [m["step"] for m in metrics(tmp_path / "part")][-1] == 4
    manifest = tmp_path / "part" / "checkpoints" / "step_0000004" / "manifest.json"
    old = json.loads(manifest.read_text())
    assert old["data"].pop("sampler") == "random"
    manifest.write_text(json.dumps(old))
    pretrain([*common, "--out_dir", str(tmp_path / "part"), "--resume"])
    assert json.loads((tmp_path / "part" / "config.json").read_text())["data"]["sampler"] == "random"
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["step"] for m in part] == list(range(1, 9))
    assert abs(full[-1]["train/lm_loss"] - part[-1]["train/lm_loss"]) < 1e-5
    assert abs(full[-1]["val/loss"] - part[-1]["val/loss"]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("ds_config, router", [("zero0", "topk"), ("zero3", "vq"), ("zero2_bf16", "xmoe")])
def test_ds_configs_train(builtin_data, tmp_path, ds_config, router):
    out = tmp_path / ds_config
    pretrain(["--ds_config", f"ds_configs/{ds_config}.json", "--data", str(builtin_data), "--out_dir", str(out),
              *SMALL, "train.max_steps=4", "train.save_every=4", f"moe.router={router}",
              "data.sampler=random"])  # in 4 steps the loss falls by about the noise between batches: these fall
    first, last = losses(out)[0], losses(out)[-1]
    assert last < first
    from megavq import load_model
    model = load_model(out)  # the consolidated weights are written under every ZeRO stage
    assert model.embed.weight.abs().sum() > 0


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--config", "nosuch"], "error: unknown config 'nosuch'"),
    (["moe.router=nosuch"], "error: unknown moe.router 'nosuch'"),
    (["train.lr=abc"], "error: train.lr: expected float, got 'abc'"),
    (["--data", "/nonexistent"], "error: data source '/nonexistent'"),
    (["--ds_config", "/nonexistent.json"], "error: DeepSpeed config /nonexistent.json does not exist"),
    (["--resume", "--out_dir", "/tmp/megavq-no-such-run"], "error: --resume: no checkpoint"),
])
def test_bad_input_is_one_line_error(builtin_data, args, message):
    proc = pretrain(["--data", str(builtin_data), *args, "train.max_steps=1"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert last_line(proc).startswith(message), last_line(proc)


def test_contradicting_ds_config_names_both_values(builtin_data, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    proc = pretrain(["--ds_config", str(ds), "--data", str(builtin_data), "data.micro_batch_size=4"], check=False)
    assert proc.returncode == 2
    assert last_line(proc) == ("error: DeepSpeed config train_micro_batch_size_per_gpu=8 contradicts "
                               "data.micro_batch_size=4")


def test_truncated_token_file_is_reported(builtin_data, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(builtin_data, broken)
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(broken / "train.bin") - 3)
    proc = pretrain(["--data", str(broken), "--out_dir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2
    assert "train.bin" in last_line(proc) and "Traceback" not in proc.stderr


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(builtin_data, tmp_path):
    """A diverging run (infinite learning rate) stops at the first non-finite loss; earlier checkpoints stay.
    Resumed, it fails at the same step again: that is fatal (exit 3), so a requeue loop stops retrying."""
    from megavq import load_model
    from megavq.store.manifest import read_manifest
    out = tmp_path / "run"
    args = ["--data", str(builtin_data), "--out_dir", str(out), *SMALL, "train.lr=inf", "train.warmup_steps=1",
            "train.max_steps=4", "train.save_every=1"]
    proc = pretrain(args, check=False)
    assert proc.returncode == 2
    assert last_line(proc).startswith("error: non-finite loss at step 2"), last_line(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert read_manifest(out / "checkpoints" / "step_0000001", ("checkpoint",))["step"] == 1
    assert load_model(out / "checkpoints" / "step_0000001").embed.weight.shape == (4096, 32)  # the model is there
    again = pretrain([*args, "--resume", "auto"], check=False)
    assert again.returncode == 3, again.stderr[-2000:]
    assert last_line(again).startswith("error: non-finite loss at step 2 again after resuming from step 1")


@pytest.mark.slow
def test_vq_dead_code_counters_count_optimizer_steps(builtin_data, tmp_path):
    """With 4 accumulation steps a code unused for the whole run has been unused for 3 optimizer steps, not 12
    forwards: router state changes once per optimizer step (post_step)."""
    from megavq.convert.load import read_model
    out = tmp_path / "run"
    pretrain(["--data", str(builtin_data), "--out_dir", str(out), *SMALL, "train.max_steps=3", "train.save_every=3",
              "train.grad_accum_steps=4", "moe.router=vq", "moe.router_options.codebook_init=random",
              "moe.router_options.num_codes=32", "moe.router_options.restart_dead_codes=false"])
    sd = read_model(out / "checkpoints" / "step_0000003")[1]
    unused = [v for k, v in sd.items() if k.endswith("router.unused_steps")]
    assert len(unused) == 2 and max(int(u.max()) for u in unused) == 3, unused


def test_final_evaluation_is_bounded_by_final_eval_tokens(builtin_data, tmp_path):
    out = tmp_path / "run"
    pretrain(["--data", str(builtin_data), "--out_dir", str(out), *SMALL, "train.max_steps=2", "train.save_every=2",
              "train.final_eval_tokens=300"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_tokens"] == summary["val_tokens"] == 384  # ceil(300 / (4 x 32)) = 3 batches of 4 x 32
