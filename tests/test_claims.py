"""scripts/claims.py and megavq.tools.claims: paired differences, verdicts, equal-FLOPs steps, the claims' list, one
claim end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from megavq.config import load_config
from megavq.errors import ConfigError, DataError
from megavq.model.flops import flops_per_token
from megavq.model.transformer import Transformer
from megavq.tools.claims import (CLAIMS, CONSISTENT, INCONSISTENT, NOISE, Setup, comparison, equal_flops_steps,
                                 markdown, paired, second_corpus, verdict)


def test_paired_differences_take_the_same_seed_of_both():
    assert paired({2: 5.0, 1: 3.0, 3: 1.0}, {1: 1.0, 2: 2.0}) == [2.0, 3.0]  # seed 3 has no baseline
    assert paired({1: 1.0}, {2: 1.0}) == []


def test_a_verdict_needs_every_seed_in_one_direction_beyond_the_spread():
    assert verdict([-0.10, -0.12, -0.08], "lower") == CONSISTENT
    assert verdict([-0.10, -0.12, -0.08], "higher") == INCONSISTENT
    assert verdict([0.10, 0.12], "higher") == CONSISTENT
    assert verdict([0.10, 0.12], "lower") == INCONSISTENT
    assert verdict([-0.10, 0.02], "lower") == NOISE  # signs disagree
    assert verdict([-0.01, -0.30], "lower") == NOISE  # |mean| 0.155 <= std 0.205
    assert verdict([-0.5], "lower") == NOISE  # one seed: no spread to judge by
    assert verdict([], "lower") == NOISE
    with pytest.raises(ConfigError):
        verdict([1.0, 2.0], "better")


def test_a_comparison_row_is_printed_with_its_paired_differences_and_verdict():
    row = comparison("loss: a vs b", "10% better", {1: 3.0, 2: 3.5}, {1: 3.2, 2: 3.8}, "lower")
    assert row["diff"]["values"] == pytest.approx([-0.2, -0.3]) and row["verdict"] == CONSISTENT
    assert row["ours_stat"]["mean"] == pytest.approx(3.25)
    text = markdown({"claim": "x", "paper": "P", "size": "S", "rows": [row], "tables": {"T": [["a"], [1]]},
                     "notes": ["n"]})
    assert ("| loss: a vs b | 10% better | 3.2500 ± 0.3536 | 3.5000 ± 0.4243 | -0.2500 ± 0.0707 (-0.2000, -0.3000) "
            f"| {CONSISTENT} |") in text
    assert "## T" in text and "- n" in text


def test_equal_flops_steps_spend_the_dense_continuations_flops():
    dense = Transformer(load_config("tiny", ["moe.every=0", "model.vocab_size=4000"]))
    moe = Transformer(load_config("tiny", ["model.vocab_size=4000"]))
    f_dense, f_moe = flops_per_token(dense), flops_per_token(moe)
    assert f_moe > f_dense  # top-2 of 4 experts: twice the MLP products per token
    steps = equal_flops_steps(300, f_dense, f_moe)
    assert steps < 300 and abs(steps * f_moe - 300 * f_dense) <= f_moe / 2  # within half a step of equal
    assert equal_flops_steps(300, f_dense, f_dense) == 300 and equal_flops_steps(1, 1.0, 1e9) == 1
    with pytest.raises(ConfigError):
        equal_flops_steps(0, f_dense, f_moe)


def test_the_corpus_tasks_second_corpus_is_the_datas_source_or_the_docs(builtin_data, tmp_path):
    prepared = tmp_path / "prepared"  # a data directory prepared from another text source
    prepared.mkdir()
    meta = json.loads((builtin_data / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps({**meta, "source": "/texts/linux-docs"}))
    assert second_corpus(Setup([1], 4, str(prepared), tmp_path)) == "/texts/linux-docs"
    for data in ("builtin", str(builtin_data)):  # builtin has no second corpus offline: the project's docs
        docs = Path(second_corpus(Setup([1], 4, data, tmp_path)))
        assert {"README.txt", "claims.txt"} <= {p.name for p in docs.iterdir()}
    with pytest.raises(DataError, match="nowhere"):
        second_corpus(Setup([1], 4, str(tmp_path / "nowhere"), tmp_path))


def test_list_names_every_claim_and_an_unknown_one_is_refused():
    listed = subprocess.run([sys.executable, "scripts/claims.py", "--list"], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == list(CLAIMS)
    bad = subprocess.run([sys.executable, "scripts/claims.py", "nope", "--out_dir", "/nonexistent/x"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown claim 'nope'" in bad.stderr and "usmoe-budget" in bad.stderr


def test_usmoe_budget_claim_runs_end_to_end(builtin_data, tmp_path):
    out = tmp_path / "claims"
    cmd = [sys.executable, "scripts/claims.py", "usmoe-budget", "--steps", "2", "--seeds", "1", "--jobs", "1",
           "--eval_batches", "1", "--data", str(builtin_data), "--out_dir", str(out), "model.n_layers=1",
           "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32", "data.micro_batch_size=4",
           "data.eval_batches=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "usmoe-budget.json").read_text())
    assert [r["measure"].split(":")[1].split("(")[0].strip() for r in result["rows"]] == ["usmoe"] * 3
    assert all(r["verdict"] == NOISE and len(r["diff"]["values"]) == 1 for r in result["rows"])  # one seed
    sweep = json.loads((out / "runs" / "topk" / "seed1" / "claims" / "budget.json").read_text())["result"]
    assert result["rows"][0]["ours"]["1"] == sweep["budget_sweep"]["points"][-1]["loss"]
    assert result["rows"][0]["baseline"]["1"] == sweep["loss"]  # the trained topk model's own test loss
    assert "2 pre-training steps, seeds 1" in result["size"]
    assert (out / "usmoe-budget.md").read_text() in done.stdout
