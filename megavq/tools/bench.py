"""MoE backend benchmark: one model, one batch, every backend variant in the same process so that ratios
compare. Used by scripts/benchmark.py (which documents the variants and columns).

Legend: B batch, S sequence, T tokens.
"""
from __future__ import annotations

import contextlib
import time

import torch

from megavq.compat import deepspeed as ds_compat
from megavq.config import load_config
from megavq.model import Transformer
from megavq.model.flops import device_peak_tflops, flops_per_token, utilisation
from megavq.moe.dispatch.megablocks import MegaBlocksDispatcher
from megavq.moe.phases import PHASES, PREFIX, phase
from megavq.train.engine import prepare_model, setup_expert_parallel


@contextlib.contextmanager
def patched(obj, name, value):
    """Set obj.name for the duration; an inherited attribute is restored by deleting the override."""
    own, old = name in vars(obj), getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old) if own else delattr(obj, name)


def ranged(name: str, fn):
    """fn inside the profiler range of phase `name` (for code that marks no range itself: DeepSpeed's)."""
    def call(*args, **kwargs):
        with phase(name):
            return fn(*args, **kwargs)
    return call


@contextlib.contextmanager
def foreign_ranges(model, own_gate: bool):
    """Ranges around the phases of DeepSpeed-MoE's own functions, and around a foreign gate (DeepSpeed's
    TopKGate, MegaBlocks' LearnedRouter) when it replaces the megavq router; megavq's code marks its own."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError):
            for owner, name, ph in ds_compat.moe_phase_functions():
                stack.enter_context(patched(owner, name, ranged(ph, getattr(owner, name))))
        for _, layer in model.moe_layers() if own_gate else []:
            gate = gate_of(layer)
            stack.enter_context(patched(gate, "forward", ranged("router", gate.forward)))
        yield


def phase_times(model, x, y, steps: int, device: str, own_gate: bool) -> dict[str, float]:
    """Milliseconds per forward in each phase's profiler ranges (megavq.moe.phases): host time on the CPU, the
    device time of the ranges on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with foreign_ranges(model, own_gate), torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            model(x, y)
    totals = dict.fromkeys((*PHASES, "moe"), 0.0)
    for event in prof.key_averages():
        name = event.key.removeprefix(PREFIX)
        if event.key.startswith(PREFIX) and name in totals:
            us = event.device_time_total if device == "cuda" else event.cpu_time_total
            totals[name] += us / 1e3 / steps
    return totals


def own_deepspeed_gate(layer, cfg) -> None:
    """Run a DeepSpeed MoE layer with DeepSpeed's TopKGate (sharing the megavq topk router's weight)."""
    from deepspeed.moe.sharded_moe import TopKGate
    m = cfg.moe
    gate = TopKGate(layer.router.hidden_size, m.num_experts, m.top_k, m.capacity_factor, m.eval_capacity_factor,
                    m.min_capacity, None, m.drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
    gate.wg.weight = layer.router.gate.weight
    ds_compat.set_moe_gate(layer.experts, gate)

    def forward(x_BSD, real_BS=None):
        with phase("moe"):
            y, l_aux, _ = layer.experts(x_BSD)
        return y, m.aux_loss_coef * l_aux, {}
    layer.forward = forward


def own_megablocks_router(layer) -> None:
    """Run a MegaBlocks layer with MegaBlocks' LearnedRouter (sharing the megavq topk router's weight)."""
    from megablocks.layers.router import LearnedRouter
    args = layer.experts.router.args
    router = LearnedRouter(args)
    router.layer.weight = layer.router.gate.weight
    args.moe_normalize_expert_weights = 1
    layer.experts.router = router
    layer.forward = lambda x, real_BS=None: (ranged("moe", layer.experts)(x), layer.router.gate.weight.new_zeros(()), {})


VARIANTS = {  # name: (backend, capacity_factor, own gate)
    "native": ("native", None, False), "ds-1.25": ("deepspeed", 1.25, False), "ds-2.0": ("deepspeed", 2.0, False),
    "dsgate-1.25": ("deepspeed", 1.25, True), "dsgate-2.0": ("deepspeed", 2.0, True),
    "megablocks": ("megablocks", None, False), "mb-learned": ("megablocks", None, True),
    "native-ac": ("native", None, False),  # activation checkpointing of every block
    "dense": ("native", None, False)}  # no MoE layer: MLPs of hidden top_k x d_expert (the same active FLOPs)


def variant_overrides(args, name: str) -> list[str]:
    backend, factor, _ = VARIANTS[name]
    extra = [f"moe.backend={backend}"] + ([f"moe.capacity_factor={factor}"] if factor else [])
    if name == "native-ac":
        extra.append("train.activation_checkpointing=1")
    if name == "dense":
        cfg = load_config(args.config, list(args.overrides))
        extra += ["moe.every=0", f"model.d_ff={cfg.moe.top_k * (cfg.moe.d_expert or cfg.model.d_ff)}"]
    return extra


def build(args, name):
    backend, _, own = VARIANTS[name]
    cfg = load_config(args.config, [*args.overrides, *variant_overrides(args, name)])
    cfg.model.vocab_size = cfg.model.vocab_size or 4096
    torch.manual_seed(cfg.train.seed)
    model = prepare_model(Transformer(cfg), cfg)
    setup_expert_parallel(model, cfg.moe.ep_size)
    if backend == "deepspeed" and cfg.moe.ep_size > 1:
        ds_compat.set_moe_parallelism(model)  # the EP groups deepspeed.initialize would give
    for _, layer in model.moe_layers() if own else []:
        own_deepspeed_gate(layer, cfg) if backend == "deepspeed" else own_megablocks_router(layer)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return cfg, model.to(args.device, dtype)


def gate_of(layer):
    """The module that routes: the megavq router, or DeepSpeed's / MegaBlocks' gate that runs it (or their own)."""
    if layer.dispatcher.deepspeed_moe:
        return ds_compat.moe_gate(layer.experts)
    return layer.experts.router if isinstance(layer.dispatcher, MegaBlocksDispatcher) else layer.router


def saved_mb(model, x, y) -> float:
    """Activations saved for the backward (parameters excluded), MB: the memory the backend adds per step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(params), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y).loss
    loss.backward()
    return total[0] / 2**20


def one_step(model, x, y, sync) -> tuple[float, float]:
    """(forward seconds, whole step seconds) of forward + backward."""
    model.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    loss = model(x, y).loss
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    return t1 - t0, time.perf_counter() - t0


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(args, names: list[str], world: int) -> list[dict]:
    """Every variant built once, then timed in turns (round robin) so that drifts of a shared machine hit all."""
    built = {n: build(args, n) for n in names}
    cfg = built[names[0]][0]
    B, S = args.batch, cfg.model.seq_len
    idx = torch.randint(cfg.model.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0)).to(args.device)
    x, y = idx[:, :-1], idx[:, 1:]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = {n: [] for n in names}
    mem = {}
    for n, (_, model) in built.items():
        for _ in range(args.warmup):
            one_step(model, x, y, sync)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            one_step(model, x, y, sync)
            mem[n] = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem[n] = saved_mb(model, x, y)
    for _ in range(args.steps):
        for n, (_, model) in built.items():
            times[n].append(one_step(model, x, y, sync))
    phases = {n: phase_times(model, x, y, args.steps, args.device, VARIANTS[n][2])  # apart: profiling costs
              for n, (_, model) in built.items()}
    results = []
    for n, (_, model) in built.items():
        fwd, step = median([t[0] for t in times[n]]), median([t[1] for t in times[n]])
        results.append({"name": n, "tok_s": B * S * world / step, "mem_mb": mem[n], "step_ms": step * 1e3,
                        "forward_ms": fwd * 1e3, "phases_ms": phases[n], "flops_token": flops_per_token(model),
                        "world": world})
    return results


def mfu(result, args) -> float | None:
    peak = device_peak_tflops(args.peak_tflops or 0.0)
    return utilisation(result["flops_token"], result["tok_s"], result["world"], peak).get("mfu")


def row(r: dict, base: float, args) -> list[str]:
    ph = r["phases_ms"]
    m = mfu(r, args)
    return [r["name"], f"{r['tok_s']:.0f}", f"{r['tok_s'] / base:.2f}", f"{r['mem_mb']:.1f}", f"{r['step_ms']:.1f}",
            f"{r['forward_ms']:.1f}", f"{ph['moe']:.1f}", *[f"{ph[p]:.2f}" for p in PHASES],
            f"{r['step_ms'] - r['forward_ms']:.1f}", "-" if m is None else f"{m:.1%}"]


def table(results: list[dict], args) -> str:
    mem = "peak MB" if args.device == "cuda" else "saved MB"
    head = ["variant", "tok/s", "x first", mem, "step ms", "fwd ms", "moe fwd", *[f"{p} ms" for p in PHASES],
            "bwd ms", "MFU"]
    rows = [row(r, results[0]["tok_s"], args) for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = [" | ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    by = {r["name"]: r for r in results}
    pairs = [("native", "ds-1.25"), ("native", "ds-2.0"), ("dsgate-1.25", "ds-1.25"), ("dsgate-2.0", "ds-2.0"),
             ("megablocks", "native"), ("mb-learned", "megablocks")]
    lines = [f"{a} / {b}: {by[a]['tok_s'] / by[b]['tok_s']:.2f}x tokens/s" for a, b in pairs if a in by and b in by]
    for a, b, what in [("native", "dense", "MoE step / dense step"), ("native-ac", "native", "checkpointed / not")]:
        if a in by and b in by:
            lines.append(f"{what}: {by[a]['step_ms'] / by[b]['step_ms']:.2f}x step time, "
                         f"{by[a]['mem_mb'] / by[b]['mem_mb']:.2f}x memory")
    return lines
