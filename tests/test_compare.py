"""scripts/compare_routers.py and megavq.tools.compare: per-router options and seeds, the baseline, the table."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from megavq.config import MoEConfig
from megavq.errors import ConfigError
from megavq.moe.routers import recorded_options
from megavq.tools.compare import Entry, check_entries, markdown_table, parse_entries, parse_entry, summarize


def test_entries_carry_their_own_options_and_seeds():
    e = parse_entry("vq:continuous=xmoe:beta=0.25@1+3")
    assert (e.name, e.options, e.seeds) == ("vq", (("continuous", "xmoe"), ("beta", "0.25")), (1, 3))
    assert e.option_values() == {"continuous": "xmoe", "beta": 0.25}
    assert e.overrides(3) == ["moe.router=vq", "moe.router_options.continuous=xmoe", "moe.router_options.beta=0.25",
                              "train.seed=3"]
    assert parse_entry("topk").overrides(None) == ["moe.router=topk"]
    assert e.run_dir(ROOT, 1).relative_to(ROOT).parts == ("vq_continuous-xmoe_beta-0.25_1_3", "seed1")
    for bad in ("vq:continuous", "vq@one"):
        with pytest.raises(ConfigError):
            parse_entry(bad)


def test_the_baseline_is_the_default_router_first_and_at_every_seed():
    entries = parse_entries("vq,xmoe@2,topk@1", [1, 2])
    assert [e.label for e in entries] == [MoEConfig.router, "vq", "xmoe@2"]
    assert entries[0].seeds is None and entries[2].seeds == (2,)
    assert parse_entries("usmoe:selection=token", [None])[0] == Entry(MoEConfig.router, MoEConfig.router)
    with pytest.raises(ConfigError, match="seeds outside"):
        parse_entries("vq@3", [1, 2])


def test_causality_comes_from_the_router_options():
    check_entries(parse_entries("usmoe:selection=token,vq:continuous_weight=prob", [1]), [1], "tiny", "builtin", [])
    with pytest.raises(ConfigError, match="allow_noncausal"):  # load_config refuses it first
        check_entries(parse_entries("usmoe", [1]), [1], "tiny", "builtin", [])
    with pytest.raises(ConfigError, match="not causal"):  # and the comparison even when it is allowed
        check_entries(parse_entries("usmoe", [1]), [1], "tiny", "builtin", ["moe.allow_noncausal=true"])
    with pytest.raises(ConfigError, match="no option"):
        check_entries(parse_entries("vq:selection=token", [1]), [1], "tiny", "builtin", [])


def run(seed, val, bpb, train=None, speed=100.0):
    return {"seed": seed, "val_loss": val, "test_bits_per_byte": bpb, "train_loss": train or val,
            "tokens_per_s": speed, "load_cv": 0.1, "vq_code_perplexity": None, "vq_dead_codes": None}


def test_paired_differences_are_a_gain_or_a_loss_only_when_every_seed_agrees():
    base = {1: run(1, 3.0, 1.5), 2: run(2, 3.2, 1.6), 3: run(3, 3.1, 1.55)}
    better = summarize("a", [run(1, 2.9, 1.45), run(2, 3.1, 1.59), run(3, 3.05, 1.50)], base)
    assert better["val_loss_diff"]["verdict"] == "gain" and better["val_loss_diff"]["n"] == 3
    assert better["val_loss_diff"]["mean"] == pytest.approx(-0.25 / 3)
    assert better["val_loss"]["mean"] == pytest.approx(9.05 / 3) and better["val_loss"]["std"] > 0
    mixed = summarize("b", [run(1, 2.9, 1.6), run(2, 3.3, 1.7)], base)
    assert mixed["val_loss_diff"]["verdict"] == "mixed" and mixed["test_bits_per_byte_diff"]["verdict"] == "loss"
    megatron = summarize("m", [run(1, 2.9, None), run(2, 3.1, None)], {1: run(1, 3.0, None), 2: run(2, 3.2, None)})
    assert megatron["test_bits_per_byte"]["n"] == megatron["test_bits_per_byte_diff"]["n"] == 0  # no bytes known
    one = summarize("c", [run(2, 3.3, 1.7, speed=50.0)], base)
    assert one["val_loss"]["std"] is None and one["step_time_ratio"]["mean"] == 2.0
    table = markdown_table([summarize("topk", list(base.values()), base), better, mixed, one])
    lines = table.splitlines()
    assert "Δ val loss vs topk" in lines[0] and len(lines) == 6
    assert "-0.0833 ± " in lines[3] and "(gain)" in lines[3] and "(mixed)" in lines[4]
    assert "| c | 2 | 3.3000 | 1.7000 | +0.1000 (loss) |" in lines[5]


@pytest.mark.slow
def test_compare_routers_script_trains_each_router_and_seed_once(builtin_data, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "scripts/compare_routers.py", "--launcher", "python", "--routers",
           "usmoe:selection=token@2", "--seeds", "1,2", "--data", str(builtin_data), "--out_dir", str(out),
           "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32",
           "data.micro_batch_size=4", "data.eval_batches=2", "train.max_steps=3", "train.eval_every=3",
           "train.log_every=1", "train.save_every=100", "train.warmup_steps=1"]
    first = subprocess.run([*cmd, "--jobs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["topk_seed1.log", "topk_seed2.log",
                                                                 "usmoe_selection-token_2_seed2.log"]
    result = json.loads((out / "compare.json").read_text())
    assert result["baseline"] == "topk" and [r["router"] for r in result["rows"]] == ["topk", "usmoe:selection=token@2"]
    assert result["rows"][0]["seeds"] == [1, 2] and result["rows"][1]["seeds"] == [2]
    cfg = json.loads((out / "usmoe_selection-token_2" / "seed2" / "config.json").read_text())
    assert cfg["train"]["seed"] == 2
    assert cfg["moe"]["router_options"] == recorded_options("usmoe", {"selection": "token"})  # saved in full
    assert first.stdout.count("scripts/pretrain.py") == 3
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing the finished run") == 3
    assert (out / "compare.md").read_text() in again.stdout
    alone = tmp_path / "alone"  # one run at a time, with this machine's threads: the same result
    cmd_alone = [*cmd[:4], "--routers", "topk", "--seeds", "1", *cmd[8:10], "--out_dir", str(alone), *cmd[12:]]
    one = subprocess.run(cmd_alone, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    val_loss = [json.loads((d / "topk" / "seed1" / "summary.json").read_text())["val_loss"] for d in (out, alone)]
    assert val_loss[1] == pytest.approx(val_loss[0], rel=1e-5)
