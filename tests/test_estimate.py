"""Sizing: the anchor presets' parameter counts, the estimator's arithmetic, and the estimate against
measurement (activations in one process here; the engine's state on 2 gloo ranks in the slow test)."""
import itertools
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from megavq.config import load_config
from megavq.errors import ConfigError
from megavq.model import Transformer
from megavq.moe.dispatch.expert_parallel import expected_ranks
from megavq.moe.experts import Experts
from megavq.tools.estimate import (
    Cluster,
    DeepSpeedSettings,
    activation_memory,
    all_to_all,
    estimate,
    model_params,
    summary_line,
)
from megavq.tools.estimate_check import saved_bytes
from megavq.train.launch import free_port

# published total and active parameters (OLMoE: Muennighoff et al. 2024; Mixtral: Jiang et al. 2024)
ANCHORS = {"olmoe_1b_7b": (6.92e9, 1.28e9), "mixtral_8x7b": (46.7e9, 12.9e9)}


@pytest.mark.parametrize("preset", sorted(ANCHORS))
def test_anchor_presets_build_on_meta_with_the_published_counts(preset):
    t0 = time.perf_counter()
    cfg = load_config(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert time.perf_counter() - t0 < 30
    assert all(p.is_meta for p in model.parameters())
    total, active = ANCHORS[preset]
    assert model.num_params() == pytest.approx(total, rel=0.01)
    assert model.num_params(active=True) == pytest.approx(active, rel=0.01)


def test_experts_draw_nothing_on_meta_and_the_seeded_weights_elsewhere():
    with torch.device("meta"):
        assert Experts(64, 2048, 1024, seed=3).w_in.is_meta
    bank = Experts(3, 8, 16, seed=3, first_expert=1)
    g = torch.Generator().manual_seed(3 * 100_003 + 1 + 2)  # global expert 3 = local expert 2
    assert torch.equal(bank.w_in[2], torch.randn(bank.w_in[2].shape, generator=g) * 0.02)


# ---- the estimator's arithmetic ------------------------------------------------------------------------
def olmoe(*overrides):
    return load_config("olmoe_1b_7b", list(overrides))


def test_expert_states_partition_over_the_expert_data_parallel_group():
    """32 GPUs, ep 8, ZeRO-2: each rank keeps 8 of 64 experts and 1/4 (32 / 8 ranks) of their fp32 state;
    the other parameters' state is split 32 ways."""
    params = model_params(olmoe("moe.ep_size=8"))
    expert = sum(p.numel for p in params if p.expert) * 8  # all 64 experts
    other = sum(p.numel for p in params if not p.expert)
    est = estimate(olmoe("moe.ep_size=8"), DeepSpeedSettings(stage=2, dtype="bf16"), Cluster(32))
    assert est.memory.total("params") == pytest.approx((other + expert / 8) * 2, rel=1e-4)
    assert est.memory.total("master") == pytest.approx((other / 32 + expert / 8 / 4) * 4, rel=1e-4)
    assert est.memory.total("optimizer") == 2 * est.memory.total("master")


def test_zero3_partitions_everything_and_keeps_small_parameters_whole():
    cfg = olmoe()
    params = model_params(cfg)
    est = estimate(cfg, DeepSpeedSettings(stage=3, dtype="bf16"), Cluster(16))
    small = sum(p.numel for p in params if p.numel <= 100_000)
    assert est.memory.total("params") == pytest.approx((sum(p.numel for p in params) / 16 + small) * 2, rel=1e-4)


def test_deepspeed_settings_use_deepspeeds_defaults():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    for stage in (0, 1, 2, 3):
        ours, theirs = DeepSpeedSettings.from_json({"zero_optimization": {"stage": stage}}), DeepSpeedZeroConfig(stage=stage)
        for key in ("reduce_bucket_size", "contiguous_gradients", "prefetch_bucket_size", "param_persistence_threshold",
                    "max_live_parameters", "sub_group_size"):
            assert getattr(ours, key) == getattr(theirs, key), key
        assert ours.overlap == theirs.overlap_comm


def test_all_to_all_splits_nvlink_and_infiniband():
    cfg = olmoe("moe.ep_size=16")
    a = all_to_all(cfg, Cluster(32, gpus_per_node=8), micro_batch=1, b=2)
    rows = round(4096 * expected_ranks(64, 8, 16))  # a token once per rank holding one of its 8 experts
    assert rows == round(4096 * 16 * (1 - math.comb(60, 8) / math.comb(64, 8)))
    assert a.bytes_per_exchange == rows * 2048 * 2  # rows of D bf16 values
    assert a.route_bytes_per_step == 16 * rows * 8 * (2 + 2 + 4)  # 8 weights there and back, 8 int32 ids
    assert (a.intra_fraction, a.inter_fraction) == (7 / 16, 8 / 16)
    assert a.exchanges_per_step == 16 * 4
    assert a.ib_s == pytest.approx((a.bytes_per_exchange * 64 + a.route_bytes_per_step) * 0.5 / 50e9)
    one_node = all_to_all(olmoe("moe.ep_size=8"), Cluster(8), 1, 2)
    assert one_node.inter_fraction == 0 and one_node.ib_s == 0
    assert all_to_all(olmoe(), Cluster(8), 1, 2).exchanges_per_step == 0


def enumerated_ranks(E: int, K: int, R: int, G: int, M: int) -> float:
    """The mean number of ranks over every choice of M of G groups and of K experts among theirs."""
    size, counts = E // G, []
    for chosen in itertools.combinations(range(G), M):
        experts = [e for g in chosen for e in range(g * size, (g + 1) * size)]
        counts += [len({e // (E // R) for e in picked}) for picked in itertools.combinations(experts, K)]
    return sum(counts) / len(counts)


@pytest.mark.parametrize("E, K, R, G, M", [(4, 2, 2, 1, 1), (4, 2, 2, 2, 1), (8, 2, 2, 4, 2), (8, 3, 4, 2, 1),
                                           (8, 4, 4, 4, 2), (6, 2, 2, 3, 1), (12, 3, 3, 4, 2), (16, 4, 8, 8, 3)])
def test_expected_ranks_equal_the_enumeration(E, K, R, G, M):
    """Groups aligned with the ranks (G a multiple of R or R of G) and not (6 experts, 3 groups, 2 ranks)."""
    assert expected_ranks(E, K, R, G, M) == pytest.approx(enumerated_ranks(E, K, R, G, M), rel=1e-12)
    if G == 1:
        assert expected_ranks(E, K, R) == pytest.approx(enumerated_ranks(E, K, R, G, M), rel=1e-12)


@pytest.mark.parametrize("override, stage, message", [
    ("moe.ep_size=8", 3, "ZeRO-3 runs MoE"), ("moe.ep_size=16", 2, "must divide"),
    ("model.vocab_size=0", 2, "model.vocab_size")])
def test_impossible_layouts_are_config_errors(override, stage, message):
    with pytest.raises(ConfigError, match=message):
        estimate(olmoe(override), DeepSpeedSettings(stage=stage), Cluster(24))


def test_summary_line_says_whether_it_fits():
    est = estimate(load_config("mixtral_8x7b"), DeepSpeedSettings(stage=3, dtype="bf16"), Cluster(8))
    assert not est.fits and "does not fit" in summary_line("mixtral_8x7b", est)
    est = estimate(olmoe("moe.ep_size=8"), DeepSpeedSettings(stage=2, dtype="bf16"), Cluster(8))
    assert est.fits and summary_line("olmoe_1b_7b", est).startswith("olmoe_1b_7b on 8 x 80 GiB (1 node of 8)")


def test_estimate_script_prints_the_table_and_one_summary_line():
    proc = subprocess.run([sys.executable, "scripts/estimate.py", "--config", "olmoe_1b_7b", "--ds_config",
                           "ds_configs/zero2_bf16.json", "--gpus", "32", "moe.ep_size=8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("olmoe_1b_7b on 32 x 80 GiB (4 nodes of 8), ZeRO-2 bf16, ep 8")
    assert any(line.split()[:2] == ["3", "1"] for line in lines)  # a ZeRO-3 candidate row
    bad = subprocess.run([sys.executable, "scripts/estimate.py", "--config", "olmoe_1b_7b", "--ds_config",
                          "ds_configs/zero3.json", "--gpus", "8", "moe.ep_size=8"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ZeRO-3")


PLUGIN = """
from megavq.moe.dispatch import dispatcher_class, register_dispatcher

NativeDispatcher = dispatcher_class("native")


@register_dispatcher("est_undeclared")
class Undeclared(NativeDispatcher):
    row_counts = classmethod(lambda cls, moe, tokens: None)


@register_dispatcher("est_declared")
class Declared(NativeDispatcher):
    pass
"""


def test_the_estimator_asks_the_dispatcher_or_refuses_it(tmp_path, monkeypatch):
    """A plugin dispatcher that declares its rows is estimated like native; one that does not is refused in one
    line, by the script too."""
    plugin = tmp_path / "est_plugin.py"
    plugin.write_text(PLUGIN)
    from megavq.moe.dispatch.base import DISPATCHERS
    from megavq.plugins import load_plugins
    monkeypatch.setattr(DISPATCHERS, "classes", dict(DISPATCHERS.classes))  # the plugin's, for this test only
    load_plugins([str(plugin)])
    ds, cluster = DeepSpeedSettings.from_json({"zero_optimization": {"stage": 2}}), Cluster(8)
    totals = {b: estimate(load_config("olmoe_1b_7b", [f"moe.backend={b}", "moe.ep_size=8"]), ds, cluster)
              .memory.total() for b in ("native", "est_declared")}
    assert totals["native"] == totals["est_declared"]
    with pytest.raises(ConfigError, match="moe.backend=est_undeclared does not declare its expert rows"):
        estimate(load_config("olmoe_1b_7b", ["moe.backend=est_undeclared"]), ds, cluster)
    bad = subprocess.run([sys.executable, "scripts/estimate.py", "--config", "olmoe_1b_7b", "--ds_config",
                          "ds_configs/zero2_bf16.json", "--gpus", "8", "--plugin", str(plugin),
                          "moe.backend=est_undeclared"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: moe.backend=est_undeclared does not declare")


def test_readme_quotes_the_estimators_summary_lines():
    from megavq.train.engine import read_ds_config
    readme = (ROOT / "README.md").read_text()
    for preset, ds_config, gpus, ep in [("olmoe_1b_7b", "zero2_bf16", 8, 8), ("olmoe_1b_7b", "zero2_bf16", 32, 8),
                                        ("olmoe_1b_7b", "zero2_bf16", 32, 32), ("mixtral_8x7b", "zero2_bf16", 8, 8),
                                        ("mixtral_8x7b", "zero2_bf16", 32, 8)]:
        ds = DeepSpeedSettings.from_json(read_ds_config(ROOT / "ds_configs" / f"{ds_config}.json"))
        line = summary_line(preset, estimate(load_config(preset, [f"moe.ep_size={ep}"]), ds, Cluster(gpus)))
        assert line in readme, line


# ---- against measurement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [[], ["moe.every=2"], ["model.mlp=gelu"], ["model.n_kv_heads=2"],
                                       ["moe.top_k=1", "moe.num_experts=8"],
                                       ["model.qk_norm=proj", "model.clip_qkv=2.0"],
                                       ["model.qk_norm=head", "model.head_dim=48", "model.n_kv_heads=2"],
                                       ["moe.shared_experts=2", "moe.d_shared=64", "moe.shared_gate=true",
                                        "moe.dense_layers=[0]"]])
def test_activation_count_equals_the_tensors_saved_for_the_backward(overrides, dtype):
    """One process, the model alone: every tensor the forward saves, deduplicated by storage, plus the logits."""
    cfg = load_config("tiny", ["model.vocab_size=512", "model.n_layers=2", *overrides])
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    x = torch.randint(512, (3, cfg.model.seq_len))
    out, measured = saved_bytes(model, lambda: model(x, x.roll(1)))
    out.loss.backward()
    b = torch.finfo(dtype).bits // 8
    assert sum(i.bytes for i in activation_memory(cfg, 3, b)) == pytest.approx(measured, rel=0.01)


# ZeRO 1, 2 and 3, fp32 and bf16, both backends, expert parallelism, both presets; every case of
# megavq/tools/estimate_check.py runs with `deepspeed --num_gpus 2 scripts/estimate_check.py`.
CHECKED_CASES = ["tiny zero1", "tiny zero3 bf16", "tiny zero2 deepspeed ep2", "lm1b_base zero2 bf16 ep2"]


@pytest.mark.slow
def test_estimate_within_15_percent_of_deepspeed_engines_on_two_ranks(tmp_path):
    """scripts/estimate_check.py under the deepspeed launcher: the cases above, every checked figure."""
    out = tmp_path / "rows.json"
    cmd = ["deepspeed", "--master_port", str(free_port()), "--num_gpus", "2", "scripts/estimate_check.py",
           "--cases", ",".join(CHECKED_CASES), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    checked = [r for r in rows if r["section"] in ("params", "master", "optimizer", "gradients", "activations")]
    assert {r["case"] for r in checked} == set(CHECKED_CASES)
    assert all(r["measured"] > 0 for r in checked if r["section"] != "master" or "zero0" not in r["case"])
    assert all(abs(r["ratio"] - 1) <= 0.15 for r in checked), [r for r in checked if abs(r["ratio"] - 1) > 0.15]
