"""Typed run configuration: dataclasses, YAML/JSON presets and dotted key=value overrides.

Every key is a dataclass field. Unknown keys and values of the wrong type raise ConfigError with a
one-line message that names the key, e.g. `train.lr: expected float, got 'abc'`.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megavq.errors import ConfigError, check, check_positive
from megavq.files import write_json
from megavq.moe.config import MoEConfig
from megavq.moe.routers import available_routers, recorded_options
from megavq.plugins import load_plugins

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (no grouped-query attention)
    head_dim: int = 0  # size of one attention head; 0 = d_model // n_heads
    qk_norm: str = "none"  # none | proj (RMSNorm over the whole q and k projections, OLMoE) | head (per head, Qwen3)
    clip_qkv: float = 0.0  # clamp q, k and v to [-clip_qkv, clip_qkv] after their projections and norms (OLMoE); 0 = off
    vocab_size: int = 0  # 0 = taken from the tokenized data
    seq_len: int = 256
    d_ff: int = 512  # hidden size of the dense MLP
    mlp: str = "swiglu"  # swiglu | gelu (tanh approximation, as GPT-2)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    pos: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    init_seed: int = -1  # seeds the experts' initialisation; -1: train.seed (what configs saved without it used)
    document_eos_id: int = -1  # attention does not cross this id, positions restart after it (-1: off);
    # data.document_mask=true sets it to the data's end-of-document id
    num_classes: int = 0  # > 0: a sequence-classification head of this many classes (scripts/finetune.py)
    pool: str = "last"  # what the classification head reads: the last real token | mean over the real tokens

    def head_size(self) -> int:
        """The size of one attention head (hs): model.head_dim, or d_model // n_heads when it is 0."""
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | a tokenized data directory | megatron:PREFIX | PATH@WEIGHT,... (a mixture)
    tokenizer: str = ""  # the SentencePiece model of a megatron: source's ids (a data directory's own must match)
    split: str = "969,30,1"  # train,val,test weights of a megatron: source's documents, as Megatron's --split
    append_eos: bool = True  # megatron: documents without an end-of-document id get one (false: refused)
    micro_batch_size: int = 16
    eval_batches: int = 20  # per source
    sampler: str = "auto"  # permutation | random | auto: random for a new run, the checkpoint's when resuming
    document_mask: bool = False  # attention within documents only (sets model.document_eos_id)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    activation_checkpointing: int = 0  # recompute every n-th block in the backward (1: every block; 0: off)
    peak_tflops: float = 0.0  # the device's dense peak for the mfu metric; 0: the known table (megavq.model.flops)
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 500
    keep_checkpoints: int = 2
    max_time_s: float = 0.0  # stop early (and evaluate) after this many seconds; 0 = no limit
    final_eval_tokens: int = 4_194_304  # end-of-run val and test evaluation: at most this many tokens per split
    stop_at_step: int = 0  # stop (checkpoint, evaluate) after this step; the schedule still spans max_steps
    collapse_share: float = 0.9  # warn when one expert gets more than this share of a layer's tokens ...
    collapse_patience: int = 3  # ... for this many consecutive evaluations (see megavq/train/health.py)
    dead_code_frac: float = 0.5  # vq: warn when more than this fraction of the codes are dead (same patience)
    code_usage_min: float = 0.5  # vq: ... or when the code perplexity is below this fraction of the codes
    wandb: bool = False
    wandb_project: str = "megavq"
    dist_timeout_s: float = 1800.0  # a collective waiting longer for a lost or stuck rank fails (retryable exit)


TRAINABLE = ("all", "no_router", "discrete_only", "no_experts", "head")


@dataclass
class FinetuneConfig:
    """scripts/finetune.py: the task, its data and what trains (docs/finetuning.md)."""
    task: str = ""  # classify | lm; "" for a pre-training run
    checkpoint: str = ""  # the model fine-tuned: a megavq model, checkpoint or run directory, or a Hugging Face one
    data: str = ""  # a .jsonl/.json, .csv or .parquet file, or a dataset name (datasets.load_dataset)
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.1  # of the rows held out for validation when the data has no validation split
    trainable: str = "all"  # all | no_router | discrete_only (vq: the discrete path alone) | no_experts | head


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        """The configuration as saved (config.json, manifests): every router option recorded with its value,
        so that a default changed later does not change what a saved run means."""
        out = dataclasses.asdict(self)
        if self.moe.every and self.moe.router in available_routers():
            out["moe"]["router_options"] = recorded_options(self.moe.router, self.moe.router_options)
        return out


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the annotated type `typ`; ints are accepted where floats are expected, and
    numbers YAML reads as strings (`1e-3`) are parsed."""
    if typ in (int, float) and isinstance(value, str):
        try:
            value = typ(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key == "data.source" and isinstance(value, list):  # a mixture written as a YAML list
            value = source_text(value)
        if name not in hints:
            valid = ", ".join(f"{prefix}{n}" for n in hints)
            raise ConfigError(f"unknown config key '{key}' (valid: {valid})")
        if hints[name] is dict and isinstance(value, dict):  # free-form mappings merge key by key
            setattr(obj, name, {**getattr(obj, name), **value})
        elif dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            _apply(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# ---- data.source: one source or a weighted mixture ---------------------------------------------------------

SAMPLERS = ("permutation", "random")


def source_text(entries: list) -> str:
    """[{path, weight}, ...] (YAML) -> 'PATH@WEIGHT,...' (the form data.source holds)."""
    parts = []
    for entry in entries:
        check(isinstance(entry, dict) and set(entry) <= {"path", "weight"} and "path" in entry,
              f"data.source: expected a list of {{path, weight}}, got {entry!r}")
        parts.append(f"{entry['path']}@{entry.get('weight', 1.0)}")
    return ",".join(parts)


def parse_sources(text: str) -> list[tuple[str, float]]:
    """'PATH[@WEIGHT],...' -> [(path, weight), ...]; a path without a weight weighs 1."""
    out = []
    for part in text.split(","):
        path, at, weight = part.strip().rpartition("@")
        if not at:  # no weight (a path holding '@' needs one)
            path, weight = part.strip(), "1"
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        check(bool(path), f"data.source: empty path in {text!r}")
        check(0 < value < float("inf"), f"data.source: weight {weight!r} of {path} must be a number > 0")
        out.append((path, value))
    return out


def parse_override(text: str) -> dict:
    """'moe.top_k=2' -> {'moe': {'top_k': 2}}; the value is parsed as YAML (numbers, booleans, ...)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if key.startswith("moe.router_options."):  # free-form: checked by the router itself
        return {"moe": {"router_options": {key.split(".", 2)[2]: value}}}
    return _nest(key, value)


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping")
    return data


def resolve_source(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown config '{name_or_path}': not a file, and presets are {available_presets()}")
    return preset


def load_config(name_or_path: str = "tiny", overrides: list[str] = ()) -> Config:
    load_plugins()  # routers and dispatchers registered by MEGAVQ_PLUGINS
    cfg = Config()
    _apply(cfg, _read_file(resolve_source(name_or_path)))
    for text in overrides:
        _apply(cfg, parse_override(text))
    return resolved(cfg)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of cfg with the dotted key=value overrides applied, resolved and validated."""
    out = Config()
    _apply(out, cfg.to_dict())
    for text in overrides:
        _apply(out, parse_override(text))
    return resolved(out)


def config_from_dict(data: dict) -> Config:
    load_plugins()
    cfg = Config()
    _apply(cfg, data)
    return resolved(cfg)


def resolved(cfg: Config) -> Config:
    """cfg with the defaults that depend on other keys filled in (model.init_seed), validated."""
    if cfg.model.init_seed < 0:
        cfg.model.init_seed = cfg.train.seed
    validate(cfg)
    return cfg


def saved_config(data: dict) -> Config:
    """The Config of a saved run, checkpoint or model (its config.json). Router options it does not record (it
    was saved before options were recorded in full) take the value they had then (Router.legacy_options)."""
    if "sampler" not in data.get("data", {}):  # saved before data.sampler existed: random windows
        data = {**data, "data": {**data.get("data", {}), "sampler": "random"}}
    moe = data.get("moe", {})
    if moe.get("every", MoEConfig.every) and moe.get("router", MoEConfig.router) in available_routers():
        name = moe.get("router", MoEConfig.router)
        data = {**data, "moe": {**moe, "router_options": recorded_options(name, moe.get("router_options", {}),
                                                                          saved=True)}}
    return config_from_dict(data)


def validate(cfg: Config, zero_stage: int | None = None) -> None:
    """Every start-up check that does not need the world size: types and ranges, the router and backend, the
    router's options, router x backend x ep_size (x ZeRO stage when given), causality. `load_config` calls it;
    the launch adds the checks that need the world size (megavq.train.engine.check_world)."""
    _check_model(cfg.model)
    _check_train(cfg.train, cfg.data)
    _check_data(cfg.data)
    _check_finetune(cfg.finetune)
    cfg.moe.check(cfg.model.d_model, cfg.model.mlp_bias, zero_stage)
    bad = [i for i in cfg.moe.dense_layers if not 0 <= i < cfg.model.n_layers]
    check(not bad, f"moe.dense_layers: {bad} are not blocks of a {cfg.model.n_layers}-layer model")


def _check_model(m: ModelConfig) -> None:
    check_positive([("model.n_layers", m.n_layers), ("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
                    ("model.seq_len", m.seq_len), ("model.d_ff", m.d_ff)])
    check(m.head_dim > 0 or m.d_model % m.n_heads == 0,
          f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}), or model.head_dim set")
    check(m.head_dim >= 0, f"model.head_dim must be >= 0, got {m.head_dim}")
    check(m.pos != "rope" or m.head_size() % 2 == 0, f"RoPE needs an even head size, got {m.head_size()}")
    check(m.qk_norm in ("none", "proj", "head"), f"model.qk_norm must be none, proj or head, got {m.qk_norm!r}")
    check(m.clip_qkv >= 0, f"model.clip_qkv must be >= 0, got {m.clip_qkv}")
    kv = m.n_kv_heads or m.n_heads
    check(m.n_heads % kv == 0, f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({kv})")
    check(m.mlp in ("swiglu", "gelu"), f"model.mlp must be swiglu or gelu, got {m.mlp!r}")
    check(m.norm in ("rmsnorm", "layernorm"), f"model.norm must be rmsnorm or layernorm, got {m.norm!r}")
    check(m.pos in ("rope", "learned"), f"model.pos must be rope or learned, got {m.pos!r}")
    check(m.vocab_size >= 0, f"model.vocab_size must be >= 0, got {m.vocab_size}")
    check(m.document_eos_id >= -1, f"model.document_eos_id must be >= -1 (-1: off), got {m.document_eos_id}")
    check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    check(m.num_classes >= 0, f"model.num_classes must be >= 0 (0: no classification head), got {m.num_classes}")
    check(m.pool in ("last", "mean"), f"model.pool must be last or mean, got {m.pool!r}")


def _check_train(t: TrainConfig, data: DataConfig) -> None:
    check_positive([("train.max_steps", t.max_steps), ("data.micro_batch_size", data.micro_batch_size),
                    ("data.eval_batches", data.eval_batches), ("train.grad_accum_steps", t.grad_accum_steps),
                    ("train.eval_every", t.eval_every), ("train.save_every", t.save_every),
                    ("train.log_every", t.log_every), ("train.keep_checkpoints", t.keep_checkpoints),
                    ("train.collapse_patience", t.collapse_patience)])
    check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    check(t.dist_timeout_s > 0, f"train.dist_timeout_s must be > 0, got {t.dist_timeout_s}")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "max_time_s", "stop_at_step", "final_eval_tokens",
                "activation_checkpointing", "peak_tflops"):
        check(getattr(t, key) >= 0, f"train.{key} must be >= 0, got {getattr(t, key)}")
    check(0 < t.collapse_share <= 1, f"train.collapse_share must be in (0, 1], got {t.collapse_share}")
    check(0 < t.dead_code_frac <= 1, f"train.dead_code_frac must be in (0, 1], got {t.dead_code_frac}")
    check(0 <= t.code_usage_min <= 1, f"train.code_usage_min must be in [0, 1], got {t.code_usage_min}")


def _check_data(d: DataConfig) -> None:
    parse_sources(d.source)
    check(d.sampler in SAMPLERS + ("auto",), f"data.sampler must be one of {', '.join(SAMPLERS)} or auto, "
                                             f"got {d.sampler!r}")


def _check_finetune(f: FinetuneConfig) -> None:
    check(f.task in ("", "classify", "lm"), f"finetune.task must be classify or lm, got {f.task!r}")
    check(f.trainable in TRAINABLE, f"finetune.trainable must be one of {', '.join(TRAINABLE)}, got {f.trainable!r}")
    check(0 < f.val_fraction < 1, f"finetune.val_fraction must be in (0, 1), got {f.val_fraction}")


def save_config(cfg: Config, path: Path) -> None:
    write_json(Path(path), cfg.to_dict())
