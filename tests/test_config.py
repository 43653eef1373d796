import pytest

from megavq.errors import ConfigError
from megavq.config import available_presets, load_config, parse_override


def test_presets_load():
    assert {"tiny", "lm1b_base"} <= set(available_presets())
    base = load_config("lm1b_base")
    assert (base.model.n_layers, base.model.d_model, base.model.n_heads, base.model.seq_len) == (4, 256, 8, 512)
    assert (base.moe.num_experts, base.moe.d_expert, base.moe.every) == (16, 512, 1)


def test_required_keys_exist():
    cfg = load_config("tiny").to_dict()
    for key in ["moe.router", "moe.backend", "moe.num_experts", "moe.top_k", "moe.every", "moe.ep_size",
                "moe.capacity_factor", "moe.aux_loss_coef", "model.n_layers", "model.d_model", "model.n_heads",
                "model.vocab_size", "model.seq_len", "train.max_steps", "train.lr", "train.seed",
                "train.eval_every", "train.save_every", "train.wandb"]:
        section, name = key.split(".")
        assert name in cfg[section], key


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.lr=1e-3", "moe.top_k=1", "train.wandb=true", "moe.router_options.jitter=0.01"])
    assert cfg.train.lr == 1e-3 and cfg.moe.top_k == 1 and cfg.train.wandb is True
    assert cfg.moe.router_options == {"jitter": 0.01}
    assert load_config("tiny", ["train.lr=1"]).train.lr == 1.0  # an int is a valid float


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr: expected float, got 'abc'"),
    ("moe.top_k=2.5", "moe.top_k: expected int"),
    ("train.nosuch=1", "unknown config key 'train.nosuch'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("moe.router=nosuch", "unknown moe.router 'nosuch'"),
    ("moe.top_k=9", "moe.top_k (9) exceeds moe.num_experts (4)"),
    ("train.wandb=maybe", "train.wandb: expected bool"),
    ("lr", "not of the form key=value"),
    ("model.qk_norm=layer", "model.qk_norm must be none, proj or head, got 'layer'"),
    ("model.head_dim=15", "RoPE needs an even head size, got 15"),
    ("moe.dense_layers=[4]", "are not blocks of a 4-layer model"),
    ("moe.dense_layers=1", "moe.dense_layers: expected list, got 1"),
    ("moe.shared_gate=true", "moe.shared_gate needs moe.shared_experts > 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_unknown_preset_and_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nosuch'"):
        load_config("nosuch")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "x.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: wide\n")
    with pytest.raises(ConfigError, match="model.d_model: expected int"):
        load_config(str(bad))


def test_router_options_merge():
    cfg = load_config("tiny", ["moe.router=compete", "moe.router_options.rate=0.5",  # options are validated
                               "moe.router_options.warmup_steps=10"])
    assert cfg.moe.router_options == {"rate": 0.5, "warmup_steps": 10}


def test_parse_override_nests():
    assert parse_override("model.d_model=64") == {"model": {"d_model": 64}}
