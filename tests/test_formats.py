"""Versioned formats: what today's code writes carries a manifest, what earlier code wrote still loads (the
committed fixtures of tests/fixtures/ec4c2b2), and a version this megavq does not read is refused with the
command that converts it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_train import last_line, losses, pretrain

import megavq
from megavq.errors import MegavqError
from megavq.store.manifest import FORMATS, read_manifest
from megavq.store.model_dir import model_tokenizer, save_model

FIXTURES = ROOT / "tests" / "fixtures" / "ec4c2b2"


def fixture_logits(run_dir):
    """The largest difference from the logits the fixture's code computed. The same weights and the same code
    path give the same values on one machine; across CPUs (AVX2 or AVX-512 kernels of the same product) fp32
    results differ in the last bits, about 3e-8 here, so the tests allow 1e-6 and no more."""
    ref = load_file(FIXTURES / "logits.safetensors")
    with torch.no_grad():
        return (megavq.load_model(run_dir)(ref["tokens"]) - ref["logits"]).abs().max().item()


def test_run_of_format_0_loads_with_its_logits():
    assert not (FIXTURES / "run" / "manifest.json").exists()
    assert fixture_logits(FIXTURES / "run") < 1e-6


def upgrade(run):
    proc = subprocess.run([sys.executable, "scripts/upgrade.py", str(run)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_upgrade_writes_manifests_and_keeps_the_model(tmp_path):
    """Format 0 -> the current formats: manifests, and the checkpoint rewritten sharded (format 2) without
    DeepSpeed's pickled files; the model is the same to the bit."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    upgrade(run)
    assert read_manifest(run, ("run",))["format_version"] == FORMATS["run"]
    ckpt = read_manifest(run / "checkpoints" / "step_0000004", ("checkpoint",))
    assert ckpt["upgraded_from"] == 0 and ckpt["config"]["moe"]["router"] == "vq" and ckpt["tokenizer"] is None
    assert ckpt["format_version"] == FORMATS["checkpoint"] == 2 and ckpt["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints" / "step_0000004").iterdir()) == [
        "config.json", "manifest.json", "rank_00000.safetensors"]
    assert fixture_logits(run) < 1e-6


@pytest.mark.parametrize("version, message", [(FORMATS["model"] + 1,
                                               r"newer than this megavq reads \(0-1\): update megavq"),
                                              (FORMATS["model"] - 2, "convert it with: python scripts/upgrade.py")])
def test_unreadable_versions_are_refused_with_what_to_do(tmp_path, version, message):
    model = megavq.load_model(FIXTURES / "run")
    save_model(model.state_dict(), model.cfg, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(MegavqError, match=message):
        megavq.load_model(tmp_path / "m")


def test_manifest_records_versions_config_and_tokenizer(tmp_path):
    model = megavq.load_model(FIXTURES / "run")
    tokenizer = FIXTURES / "data" / "tokenizer.model"
    save_model(model.state_dict(), model.cfg, tmp_path / "m", tokenizer)
    manifest = read_manifest(tmp_path / "m", ("model",))
    assert manifest["format"] == "megavq-model" and manifest["versions"]["torch"] == torch.__version__
    assert manifest["config"] == model.cfg.to_dict()
    assert model_tokenizer(tmp_path / "m").read_bytes() == tokenizer.read_bytes()
    (tmp_path / "m" / "tokenizer.model").write_bytes(b"altered")
    with pytest.raises(MegavqError, match="is not the tokenizer the manifest"):
        model_tokenizer(tmp_path / "m")


@pytest.mark.slow
def test_format_0_run_resumes_and_new_runs_write_manifests(tmp_path):
    """Today's trainer continues a run written by ec4c2b2 (its data directory is format 1) once
    scripts/upgrade.py has converted its checkpoint (refused before, with that command), and writes the
    current formats into it."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"] = str(tmp_path / "data")
    (run / "config.json").write_text(json.dumps(config))
    args = ["--config", str(run / "config.json"), "--out_dir", str(run), "--resume", "train.max_steps=6",
            "train.save_every=2"]
    refused = pretrain(args, check=False)
    assert refused.returncode == 2 and "python scripts/upgrade.py" in last_line(refused), refused.stderr[-2000:]
    upgrade(run)
    pretrain(args, launcher=("deepspeed",))
    assert len(losses(run)) == 6 and all(v == v for v in losses(run))
    assert read_manifest(run, ("run",))["format_version"] == FORMATS["run"]
    ckpt = run / "checkpoints" / "step_0000006"
    assert read_manifest(ckpt, ("checkpoint",))["step"] == 6
    assert model_tokenizer(ckpt).read_bytes() == (FIXTURES / "data" / "tokenizer.model").read_bytes()


@pytest.mark.slow
def test_data_of_today_carries_its_manifest(builtin_data):
    meta = json.loads((builtin_data / "meta.json").read_text())
    assert meta["format"] == "megavq-data" and meta["versions"]["megavq"] == megavq.__version__


def resume_fixture(run: str, steps: int) -> dict:
    """trainer.run continuing a fixture run strictly from its newest checkpoint; returns {step: loss}."""
    import megavq.train.trainer as trainer
    from megavq.config import load_config
    cfg = load_config(f"{run}/config.json", [f"train.max_steps={steps}", "train.save_every=2"])
    trainer.run(cfg, ROOT / "ds_configs" / "zero2.json", run, resume="strict")
    records = map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/lm_loss"] for r in records}


@pytest.mark.slow
def test_format_1_checkpoint_resumes_as_it_is_like_the_upgraded_one(tmp_path):
    """The previous checkpoint format (model.safetensors + train_state.*, here the ec4c2b2 checkpoint given a
    version-1 manifest) resumes without conversion, and continues exactly as its format-2 conversion does."""
    from test_expert_parallel import jobs, run_distributed

    from megavq.config import saved_config
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    runs = {}
    for name in ("v1", "v2"):
        run = runs[name] = tmp_path / name
        shutil.copytree(FIXTURES / "run", run)
        config = json.loads((run / "config.json").read_text())
        config["data"]["source"] = str(tmp_path / "data")
        if name == "v1":  # format 1 records every router option, with the values the run was trained with
            config = saved_config(config).to_dict()
        (run / "config.json").write_text(json.dumps(config))
    ckpt = runs["v1"] / "checkpoints" / "step_0000004"
    (ckpt / "manifest.json").write_text(json.dumps({"format": "megavq-checkpoint", "format_version": 1,
                                                    "config": config, "tokenizer": None, "step": 4}))
    upgrade(runs["v2"])
    out = run_distributed(jobs, 1, [(n, resume_fixture, {"run": str(r), "steps": 7}) for n, r in runs.items()])[0]
    assert sorted(out["v1"]) == list(range(1, 8)) and all(v == v for v in out["v1"].values())
    assert all(abs(out["v1"][s] - out["v2"][s]) < 1e-6 for s in (5, 6, 7)), out


def test_saved_configs_record_every_router_option_and_older_ones_keep_their_meaning(tmp_path):
    """A default changed since (vq's continuous_weight) does not change what a saved run means: today's saves
    record every option; a config.json that does not record it gets the value it was trained with."""
    from megavq.config import load_config, saved_config
    saved = load_config("tiny", ["moe.router=vq"]).to_dict()["moe"]["router_options"]
    assert saved["continuous_weight"] == "ratio" and "dead_code_steps" in saved and "balance_coef" not in saved
    old = json.loads((FIXTURES / "run" / "config.json").read_text())
    assert "continuous_weight" not in old["moe"]["router_options"]
    assert saved_config(old).moe.router_options["continuous_weight"] == "prob"
    assert saved_config({**old, "moe": {**old["moe"], "router_options": saved}}).moe.router_options == saved
