"""Sizing: the anchor presets' parameter counts."""
import time

import pytest
import torch

from megavq.config import load_config
from megavq.model import Transformer
from megavq.moe.experts import Experts

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
