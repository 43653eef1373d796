"""scripts/benchmark.py runs every CPU variant in one process and prints same-run ratios."""
import subprocess
import sys

import pytest
from conftest import ROOT

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32",
        "model.vocab_size=256"]


@pytest.mark.slow
def test_benchmark_prints_table_with_ratios():
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--batch", "2", "--steps", "2", "--warmup", "1",
                           *TINY], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for variant in ["native", "ds-1.25", "ds-2.0", "dsgate-1.25", "dsgate-2.0", "native-ac", "dense"]:
        assert variant in out, variant
    assert "megablocks" not in out  # GPU only
    assert "native / ds-1.25:" in out and "dsgate-1.25 / ds-1.25:" in out, out
    assert "MoE step / dense step:" in out and "checkpointed / not:" in out, out


def test_benchmark_rejects_unknown_variant():
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--variants", "nosuch", *TINY], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown variant 'nosuch'")


@pytest.mark.parametrize("grouped", [False, True])
def test_phase_times_come_from_the_layers_profiler_ranges(monkeypatch, grouped):
    """Every phase of a native layer is read from the ranges it marks, the grouped products' experts too (the path
    CUDA takes, forced here on the CPU, where only its forward runs)."""
    import torch

    import megavq.moe.dispatch.native as native
    from megavq.config import load_config
    from megavq.model import Transformer
    from megavq.tools.bench import phase_times
    if grouped:
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("torch has no _grouped_mm")
        monkeypatch.setattr(native, "grouped_products", lambda x, experts: True)
    model = Transformer(load_config("tiny", TINY))
    x = torch.randint(256, (2, 32), generator=torch.Generator().manual_seed(0))
    ms = phase_times(model, x, x, steps=2, device="cpu", own_gate=False)
    inner = ("router", "dispatch", "experts", "combine")
    assert all(ms[p] > 0 for p in ("moe", *inner)) and ms["comm"] == 0, ms
    assert ms["moe"] >= sum(ms[p] for p in inner), ms
