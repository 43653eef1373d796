"""megavq.tools.estimate against a real DeepSpeed engine: what each rank holds, measured, next to the estimate.

Runs inside torch.distributed (gloo ranks on CPU: `deepspeed --num_gpus 2 scripts/estimate_check.py`). For
each case the model is built and handed to megavq.train.engine.build_engine as the trainer does; two
training steps run on random tokens and the second is measured. Every tensor the engine holds is found by
walking the parameters (their data, ZeRO-3 partitions and gradients), the torch optimizer (its parameter
groups: the master weights; its state: the AdamW moments) and the DeepSpeed optimizer's attributes, and
deduplicated by storage (a view counts its whole storage once). A storage is counted in the first of:
  params      the model's parameter storages after the step (ZeRO-3: partitions + persistent parameters);
  master      tensors in the torch optimizer's parameter groups that are not model parameters;
  optimizer   tensors in the torch optimizer's state;
  buffers     DeepSpeed's reduce bucket (attributes named ipg_*);
  gradients   .grad of parameters and master weights, and DeepSpeed attributes named *grad*;
sampled after each parameter's gradient is accumulated, after the backward, and during the step right after
DeepSpeed flattens a group's gradient partition (the flat copy included), after every dtype cast (its input
and output included: the bf16 flat copy and its fp32 copy) and before the torch optimizer's step, keeping
the largest; params, master and optimizer after the step. ZeRO-3's gathered weights are the parameter
storages during the backward beyond those after the step. Activations: the storages saved for the backward
during the forward (torch.autograd.graph.saved_tensors_hooks), parameter storages excluded, plus the
returned logits. Per section the largest rank is compared with the estimate for the most loaded rank.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megavq.compat import deepspeed as ds_compat
from megavq.config import load_config
from megavq.model import Transformer
from megavq.tools.estimate import Cluster, DeepSpeedSettings, estimate
from megavq.train.engine import build_engine, prepare_model, read_ds_config, reconcile_ds_config

SECTIONS = ("params", "master", "optimizer", "gradients", "reduce bucket", "gathered", "activations")
CHECKED = ("params", "master", "optimizer", "gradients", "reduce bucket", "activations")  # within TOLERANCE
TOLERANCE = 0.15
LM1B_SMALL = ["model.vocab_size=8000", "data.micro_batch_size=4"]


@dataclass
class Case:
    name: str
    preset: str
    ds_config: str  # a file in ds_configs/, without .json
    overrides: tuple = ()


CASES = [Case("tiny zero1", "tiny", "zero1", ("model.vocab_size=4096", "data.micro_batch_size=8")),
         Case("tiny zero2", "tiny", "zero2", ("model.vocab_size=4096", "data.micro_batch_size=8")),
         Case("tiny zero3", "tiny", "zero3", ("model.vocab_size=4096", "data.micro_batch_size=8")),
         Case("tiny zero2 ep2", "tiny", "zero2", ("model.vocab_size=4096", "data.micro_batch_size=8", "moe.ep_size=2")),
         Case("lm1b_base zero1", "lm1b_base", "zero1", tuple(LM1B_SMALL)),
         Case("lm1b_base zero2", "lm1b_base", "zero2", tuple(LM1B_SMALL)),
         Case("lm1b_base zero3", "lm1b_base", "zero3", tuple(LM1B_SMALL)),
         Case("lm1b_base zero2 ep2", "lm1b_base", "zero2", (*LM1B_SMALL, "moe.ep_size=2")),
         Case("tiny zero0", "tiny", "zero0", ("model.vocab_size=4096", "data.micro_batch_size=8")),
         Case("tiny zero2 bf16", "tiny", "zero2_bf16", ("model.vocab_size=4096", "data.micro_batch_size=8")),
         Case("tiny zero3 bf16", "tiny", "zero3_bf16", ("model.vocab_size=4096", "data.micro_batch_size=8")),
         Case("tiny zero2 deepspeed", "tiny", "zero2", ("model.vocab_size=4096", "data.micro_batch_size=8",
                                                        "moe.backend=deepspeed")),
         Case("tiny zero2 deepspeed ep2", "tiny", "zero2", ("model.vocab_size=4096", "data.micro_batch_size=8",
                                                            "moe.backend=deepspeed", "moe.ep_size=2")),
         Case("lm1b_base zero2 bf16 ep2", "lm1b_base", "zero2_bf16", (*LM1B_SMALL, "moe.ep_size=2"))]


# ---- what the engine holds -------------------------------------------------------------------------------
def _walk(obj, path: str, out: list, seen: set, depth: int = 0) -> None:
    """(path, tensor) for every tensor reachable from a DeepSpeed / torch.optim object through attributes,
    lists, tuples and dicts (modules, process groups and other objects are not entered)."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        out.append((path, obj))
        if obj.is_leaf and obj.grad is not None:
            out.append((path + ".grad", obj.grad))
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen, depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", out, seen, depth + 1)
    elif not isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", out, seen, depth + 1)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def held(engine, model, extra_gradients=()) -> dict[str, int]:
    """Bytes per section of every storage the engine holds now (see the module docstring)."""
    basic = engine.basic_optimizer  # ZeRO-3 empties its parameter groups between steps: the state keys remain
    masters = [p for g in basic.param_groups for p in g["params"]] + list(basic.state)
    roots = [("params", t) for p in model.parameters() for t in (p.data, getattr(p, "ds_tensor", None))
             if t is not None and t.numel()]
    roots += [("master", t) for t in masters] + [("optimizer", t) for s in basic.state.values()
                                                  for t in s.values() if torch.is_tensor(t)]
    walked: list = []
    _walk(engine.optimizer, "optimizer", walked, set())
    roots += [("reduce bucket", t) for path, t in walked if "ipg" in path]
    roots += [("gradients", p.grad) for p in [*model.parameters(), *masters] if p.grad is not None]
    roots += [("gradients", t) for t in extra_gradients]
    roots += [("gradients" if "grad" in path else "other", t) for path, t in walked]
    out, seen = dict.fromkeys((*SECTIONS, "other"), 0), set()
    for section, t in roots:
        ptr, nbytes = _storage(t)
        if ptr and ptr not in seen:
            seen.add(ptr)
            out[section] += nbytes
    return out


class Sampler:
    """Keeps, per section, the largest figure over the samples taken."""

    def __init__(self, engine, model):
        self.engine, self.model, self.peak, self.backward_params = engine, model, {}, 0

    def __call__(self, *_args, in_backward: bool = False, extra_gradients=()) -> None:
        now = held(self.engine, self.model, extra_gradients)
        for k, v in now.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        if in_backward:
            self.backward_params = max(self.backward_params, now["params"])


class SampledCasts(TorchDispatchMode):
    """During the step, sample right after every dtype cast (bf16 gradient partition -> fp32 copy), with the
    cast's input and output counted as gradients: the moment both copies are alive."""

    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(out) and out.dtype != args[0].dtype:
            self.sampler(extra_gradients=[args[0], out])
        return out


def saved_bytes(model, fn):
    """(fn(), bytes of the storages saved for the backward while fn runs, parameters excluded)."""
    seen, total = set(), [0]

    def pack(t):
        ptr, nbytes = _storage(t)
        params = {p.data.untyped_storage().data_ptr() for p in model.parameters()}
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total[0] += nbytes
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def measure_step(engine, model, x, y) -> dict[str, int]:
    sampler = Sampler(engine, model)
    hooks = [p.register_post_accumulate_grad_hook(lambda _p: sampler(in_backward=True)) for p in model.parameters()]
    hooks.append(engine.basic_optimizer.register_step_pre_hook(sampler))
    try:
        out, activations = saved_bytes(model, lambda: engine(x, y))
        engine.backward(out.loss)
        sampler()
        del out
        with ds_compat.sampling_flatten(engine.optimizer, sampler), SampledCasts(sampler):
            engine.step()
    finally:
        for h in hooks:
            h.remove()
    after = held(engine, model)
    measured = {k: after[k] for k in ("params", "master", "optimizer")}
    measured.update({k: sampler.peak[k] for k in ("gradients", "reduce bucket", "other")})
    measured["gathered"] = max(0, sampler.backward_params - after["params"]) if engine.zero_optimization_stage() == 3 else 0
    measured["activations"] = activations
    return measured


# ---- one case, every rank --------------------------------------------------------------------------------
def run_case(case: Case, ds_dir, steps: int = 2) -> dict[str, int]:
    """Build the engine for the case on this rank, train `steps` steps, measure the last; max over ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(case.preset, list(case.overrides))
    ds = reconcile_ds_config(read_ds_config(f"{ds_dir}/{case.ds_config}.json"), cfg, world)
    torch.manual_seed(cfg.train.seed)
    model = prepare_model(Transformer(cfg), cfg)
    engine = build_engine(model, cfg, ds)
    g = torch.Generator().manual_seed(rank)
    shape = (cfg.data.micro_batch_size, cfg.model.seq_len)
    for _ in range(steps):
        x, y = torch.randint(cfg.model.vocab_size, shape, generator=g), torch.randint(cfg.model.vocab_size, shape, generator=g)
        measured = measure_step(engine, model, x, y)
    everyone = [None] * world
    dist.all_gather_object(everyone, measured)
    del engine, model
    gc.collect()
    return {k: max(m[k] for m in everyone) for k in measured}


def estimated(case: Case, ds_dir, world: int) -> dict[str, float]:
    cfg = load_config(case.preset, list(case.overrides))
    est = estimate(cfg, DeepSpeedSettings.from_json(read_ds_config(f"{ds_dir}/{case.ds_config}.json")), Cluster(world))
    mem = est.memory
    out = {s: mem.total(s) for s in ("params", "master", "optimizer", "gradients", "activations")}
    out["reduce bucket"] = sum(i.bytes for i in mem.buffers if i.name == "reduce bucket")
    out["gathered"] = sum(i.bytes for i in mem.buffers if i.name == "gathered weights")
    out["activations (checkpointing)"] = sum(i.bytes for i in est.checkpointed)
    return out


def compare(case: Case, ds_dir) -> list[dict]:
    """Rows (case, section, estimate, measured, ratio estimate/measured) for one case."""
    measured = run_case(case, ds_dir)
    est = estimated(case, ds_dir, dist.get_world_size())
    rows = [dict(case=case.name, section=s, estimate=est[s], measured=measured[s],
                 ratio=est[s] / measured[s] if measured[s] else (1.0 if not est[s] else float("inf")))
            for s in SECTIONS]
    rows.append(dict(case=case.name, section="activations (checkpointing)", estimate=est["activations (checkpointing)"],
                     measured=None, ratio=None))
    rows.append(dict(case=case.name, section="other (not estimated)", estimate=None, measured=measured["other"],
                     ratio=None))
    return rows


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['case']} {r['section']}: estimate {r['estimate']:,.0f} B, measured {r['measured']:,.0f} B"
            for r in rows if r["section"] in CHECKED and r["ratio"] is not None
            and abs(r["ratio"] - 1) > TOLERANCE]


def table(rows: list[dict]) -> str:
    def mb(x):
        return "-" if x is None else f"{x / 2**20:,.2f}"
    lines = ["| case | section | estimate MiB | measured MiB | estimate / measured |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['section']} | {mb(r['estimate'])} | {mb(r['measured'])} | "
              f"{'-' if r['ratio'] is None else format(r['ratio'], '.3f')} |" for r in rows]
    return "\n".join(lines)
