"""Versioned formats: what today's code writes carries a manifest, what earlier code wrote still loads (the
committed fixtures of tests/fixtures/ec4c2b2), and a version this megavq does not read is refused with the
command that converts it."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import megavq
from conftest import ROOT
from megavq.errors import MegavqError
from megavq.io import model_tokenizer, save_model
from megavq.manifest import FORMATS, read_manifest
from test_train import losses, pretrain

FIXTURES = ROOT / "tests" / "fixtures" / "ec4c2b2"


def fixture_logits(run_dir):
    ref = load_file(FIXTURES / "logits.safetensors")
    with torch.no_grad():
        return (megavq.load_model(run_dir)(ref["tokens"]) - ref["logits"]).abs().max().item()


def test_run_of_format_0_loads_with_its_logits():
    assert not (FIXTURES / "run" / "manifest.json").exists()
    assert fixture_logits(FIXTURES / "run") == 0.0


def test_upgrade_writes_manifests_and_keeps_the_model(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    proc = subprocess.run([sys.executable, "scripts/upgrade.py", str(run)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(run, ("run",))["format_version"] == FORMATS["run"]
    ckpt = read_manifest(run / "checkpoints" / "step_0000004", ("checkpoint",))
    assert ckpt["upgraded_from"] == 0 and ckpt["config"]["moe"]["router"] == "vq" and ckpt["tokenizer"] is None
    assert fixture_logits(run) == 0.0


@pytest.mark.parametrize("version, message", [(FORMATS["model"] + 1, r"newer than this megavq reads \(0-1\): update megavq"),
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
    """Today's trainer continues a run written by ec4c2b2 (its data directory is format 1) and writes the
    current formats into it."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"] = str(tmp_path / "data")
    (run / "config.json").write_text(json.dumps(config))
    pretrain(["--config", str(run / "config.json"), "--out_dir", str(run), "--resume", "train.max_steps=6",
              "train.save_every=2"], launcher=("deepspeed",))
    assert len(losses(run)) == 6 and all(v == v for v in losses(run))
    assert read_manifest(run, ("run",))["format_version"] == FORMATS["run"]
    ckpt = run / "checkpoints" / "step_0000006"
    assert read_manifest(ckpt, ("checkpoint",))["step"] == 6
    assert model_tokenizer(ckpt).read_bytes() == (FIXTURES / "data" / "tokenizer.model").read_bytes()


@pytest.mark.slow
def test_data_of_today_carries_its_manifest(builtin_data):
    meta = json.loads((builtin_data / "meta.json").read_text())
    assert meta["format"] == "megavq-data" and meta["versions"]["megavq"] == megavq.__version__
