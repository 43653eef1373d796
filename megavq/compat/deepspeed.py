"""Every use of DeepSpeed's internals, in one place: private attributes and functions, and the inner structure
of its MoE layer. Tested against the DeepSpeed versions in TESTED (pyproject pins that range); another version
gets one warning at start-up (`check_deepspeed_version`).

What is used and why:
- MoE layer (deepspeed.moe.layer.MoE): `deepspeed_moe.gate` is replaced by megavq's gate; its local experts
  are `deepspeed_moe.experts.deepspeed_experts`; its EP group is `deepspeed_moe.ep_group`. The gate contract of
  0.19.4+ is `gate(x, used_token, True, use_tutel)` -> (l_aux, C, E, indices[K,T], locations[K,T], gates[K,T],
  exp_counts[E]).
- Expert-parallel groups for native layers: `groups._create_expert_and_data_parallel`,
  `groups._get_expert_parallel_group_dict`, `groups._get_expert_parallel_group`.
- ZeRO-3 consolidated weights: `engine._zero3_consolidated_16bit_state_dict`.
- Benchmark timing of DeepSpeed-MoE's phases: `sharded_moe._sparse_encode`, `_sparse_decode`, `_AllToAll`.
- The estimator's measured check: the ZeRO optimizer's `flatten` (sampled during the step).
- ZeRO-1/2 and bf16 optimizers: the flat fp32 partitions (`single_partition_of_fp32_groups`,
  `fp32_groups_flat_partition`), each parameter's fragment mapping (`_hp_mapping`: `lp_fragment_address`,
  `hp_fragment`, `get_optim_state_fragment`), the lazy linking of the Adam moments
  (`_hp_optimizer_states_linked`, `_lazy_init_hp_params_optimizer_state`).
- ZeRO-3: parameters carry `ds_id`, `ds_shape`, `ds_numel`, `ds_tensor` (this rank's partition of the 16-bit
  weights, `ds_tensor.ds_numel` elements, the last rank's padded) and `ds_zero_partition_rank`; the fp32
  partitions are `optimizer.fp32_partitioned_groups_flat`, a parameter's views of them and of its Adam moments
  `param._z3_optimizer._get_fp32_opt_state_partition` (what the public `safe_get_local_*` return, before they
  copy them to the device under CPU offload; NVMe offload is not supported by checkpoints).
- DeepSpeed's CPU shared-memory all-reduce (`deepspeed_shm_comm`, made when LOCAL_SIZE equals the world size,
  i.e. under the deepspeed launcher) creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`
  (66 MB) and never unlinks it: every such process leaked 66 MB of RAM (17 GB on a shared test machine).
  `unlink_shm_buffer` removes the name once every rank has mapped its peers' buffers (the mappings stay valid).
- Checkpoints (megavq.train.fragments) use the above: `owned_fragments`, `weight_targets`, `plain_state`,
  `ensure_adam_states`; DeepSpeed's own save_checkpoint / load_checkpoint are not used (they pickle).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import warnings

import torch

from megavq.errors import ConfigError

# The lowest and highest DeepSpeed versions the test suite passes on. 0.19.4 (the first with the sparse gate
# contract) fails the expert-parallel equivalence tests: 2 ranks at ep_size 2 differ from 1 rank by 1e-3.
TESTED = ("0.19.8", "0.19.8")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())


def is_tested(version: str) -> bool:
    low, high = (_release(v) for v in TESTED)
    return low <= _release(version) <= high


def check_deepspeed_version() -> str | None:
    """Warn once when the installed DeepSpeed is outside the tested range; returns its version (None: absent)."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not is_tested(version):
        warnings.warn(f"DeepSpeed {version} is untested with megavq (tested: {TESTED[0]} to {TESTED[1]}); "
                      f"install one of those if something fails", stacklevel=2)
    return version


def unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer (call after a barrier that follows
    deepspeed.init_distributed: every rank has mapped every buffer then); a no-op where there is none."""
    import os
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(f"/dev/shm/{name}")
    except OSError:
        pass


# ---- DeepSpeed's MoE layer ----------------------------------------------------------------------------
def moe_class():
    """deepspeed.moe.layer.MoE (the engine finds MoE layers by isinstance, so megavq builds this class)."""
    try:
        from deepspeed.moe.layer import MoE
    except ImportError as e:
        raise ConfigError(f"moe.backend=deepspeed needs DeepSpeed (pip install deepspeed): {e}") from None
    return MoE


def set_moe_gate(moe, gate: torch.nn.Module) -> None:
    moe.deepspeed_moe.gate = gate


def moe_gate(moe) -> torch.nn.Module:
    return moe.deepspeed_moe.gate


def moe_local_experts(moe) -> torch.nn.ModuleList:
    return moe.deepspeed_moe.experts.deepspeed_experts


MOE_LOCAL_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"  # their state-dict prefix inside the MoE module


def moe_ep_group(moe):
    return moe.deepspeed_moe.ep_group


def set_moe_parallelism(model: torch.nn.Module) -> None:
    """Give DeepSpeed MoE layers their EP groups as deepspeed.initialize would (outside an engine)."""
    MoE = moe_class()
    for m in model.modules():
        if isinstance(m, MoE) and m.ep_size > 1:
            m.set_deepspeed_parallelism()


def moe_phase_functions() -> list[tuple[object, str, str]]:
    """(owner, attribute, phase) of the DeepSpeed-MoE functions the benchmark times (dispatch, experts, ...)."""
    import deepspeed.moe.experts as dse
    import deepspeed.moe.sharded_moe as sm
    return [(sm, "_sparse_encode", "dispatch"), (sm, "_sparse_decode", "combine"),
            (dse.Experts, "forward", "experts"), (sm._AllToAll, "apply", "comm")]


# ---- expert parallelism for native layers ---------------------------------------------------------------
def expert_parallel_group(ep_size: int) -> tuple[str, object]:
    """(group name, this rank's EP group) of DeepSpeed's E + D layout, made on first use."""
    from deepspeed.utils import groups
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name, groups._get_expert_parallel_group(name)


def clip_by_global_norm(engine, ep_group) -> None:
    """ZeRO-0 fp32 engines clip by the norm of every gradient with each expert counted once, the same
    coefficient on every rank. DeepSpeed's `clip_fp32_gradients` (runtime/utils.py clip_grad_norm_) averages
    the ranks' norms, each over its own experts only; ZeRO-1/2 (get_grad_norm_direct sums the squares over all
    ranks) and the bf16 optimizer (get_norm_with_moe_layers) already count every expert once."""
    import torch.distributed as dist

    def clip() -> None:
        grads = {True: [], False: []}  # allreduce: shared (equal on every rank) / this rank's experts
        for p in engine.module.parameters():
            if p.grad is not None:
                grads[getattr(p, "allreduce", True)].append(p.grad)
        sq = [torch.stack([g.float().pow(2).sum() for g in gs]).sum() if gs else torch.zeros(())
              for gs in (grads[True], grads[False])]
        dist.all_reduce(sq[1], group=ep_group)  # the experts of the whole EP group, each once
        coef = (engine.gradient_clipping() / ((sq[0] + sq[1]).sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads[True] + grads[False], coef)
    engine.clip_fp32_gradients = clip


def mark_expert_parameters(params: list, group_name: str) -> None:
    """Gradients of these parameters are reduced over their expert-data-parallel group, not all ranks."""
    for p in params:
        p.allreduce, p.group_name = False, group_name


def expert_parallel_tag(num_experts: int, ep_size: int, group_name: str) -> torch.nn.Module:
    """A parameter-free DeepSpeed `MoE` that makes the engine treat the model as an MoE model.

    The engine reduces `param.allreduce = False` parameters over their expert-data-parallel group only when
    it has found an `MoE` module (isinstance); native expert-parallel layers are not one, so the model gets
    this tag. It holds no weights and names no local experts, so DeepSpeed writes no expert files for it.
    """
    MoE = moe_class()

    class ExpertParallelTag(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts, self.use_residual, self.enable_expert_tensor_parallelism = 0, False, False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist (expert_parallel_group)

        def forward(self, *args):
            raise RuntimeError("the expert-parallel tag is not a layer")

    return ExpertParallelTag()


# ---- engine state -----------------------------------------------------------------------------------------
def zero3_full_state_dict(engine) -> dict:
    """The whole model's 16-bit state dict gathered under ZeRO-3 (on rank 0; others get an empty dict)."""
    return engine._zero3_consolidated_16bit_state_dict()


def flat_optimizer(engine):
    """(inner torch optimizer, fp32 flat partitions) of a ZeRO-1/2 or bf16 optimizer; None for a plain one."""
    opt = engine.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition", None)
    return (opt.optimizer, flats) if flats is not None else None


def has_fragment_mapping(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed maps p to fp32 fragments (ZeRO-1/2, bf16) or partitions it (ZeRO-3)."""
    return hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")


def maps_fragments(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "_hp_mapping")


def link_zero_moments(engine) -> None:
    """ZeRO-1/2 and bf16 optimizers give each parameter its view of the Adam moments lazily: do it now."""
    if flat_optimizer(engine) is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


# ---- optimizer state by fragment (megavq.train.fragments) --------------------------------------------------
MOMENTS = ("exp_avg", "exp_avg_sq")


def is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def param_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's full shape (ZeRO-3 parameters hold an empty placeholder between forwards)."""
    return tuple(p.ds_shape) if is_zero3_param(p) else tuple(p.shape)


def _zero3_range(p: torch.nn.Parameter) -> tuple[int, int]:
    """(start, numel) of this rank's partition of p's flattened elements (ZeRO-3; the padding cut off)."""
    size = p.ds_tensor.ds_numel
    start = size * p.ds_zero_partition_rank
    return start, max(0, min(size, p.ds_numel - start))


def owned_fragments(engine, p: torch.nn.Parameter) -> list[tuple[int, int, dict]] | None:
    """The parts of p's fp32 master weights and Adam moments this rank holds and no other rank of p's
    data-parallel group does: [(start, numel, {"fp32", "exp_avg", "exp_avg_sq": 1-D view})] over p's flattened
    elements (ZeRO-1/2 and bf16: its fragments of the flat partition, which cut across parameters; ZeRO-3: its
    partition). None under a plain optimizer: every replica holds p whole (`plain_state`).
    Call `ensure_adam_states` first."""
    if is_zero3_param(p):
        start, n = _zero3_range(p)
        if n == 0:
            return []
        # the optimizer's own partitions (safe_get_local_* would copy them to the device under CPU offload)
        part = p._z3_optimizer._get_fp32_opt_state_partition
        views = {key or "fp32": part(p, False, key)[0][:n] for key in (None, *MOMENTS)}
        return [(start, n, views)]
    if hasattr(p, "_hp_mapping"):
        m = p._hp_mapping
        if m is None:
            return []
        views = {"fp32": m.hp_fragment, **{k: m.get_optim_state_fragment(k) for k in MOMENTS}}
        return [(m.lp_fragment_address.start, m.lp_fragment_address.numel, views)]
    return None


def plain_state(engine, p: torch.nn.Parameter) -> dict:
    """{"fp32", "exp_avg", "exp_avg_sq": p's whole flattened tensors} under a plain (ZeRO-0 fp32) optimizer."""
    state = engine.optimizer.state[p]
    return {"fp32": p.data.view(-1), **{k: state[k].view(-1) for k in MOMENTS}}


def weight_targets(p: torch.nn.Parameter) -> list[tuple[int, torch.Tensor]]:
    """[(start, 1-D view)] of the module weights of p that this rank keeps: p whole, or under ZeRO-3 its
    partition of the 16-bit weights (and p whole too when DeepSpeed keeps it gathered: persistent parameters)."""
    if not is_zero3_param(p):
        return [(0, p.data.view(-1))]
    start, n = _zero3_range(p)
    out = [(start, p.ds_tensor.data[:n])] if n else []
    if p.data.numel() == p.ds_numel:
        out.append((0, p.data.view(-1)))
    return out


def full_state(engine, p: torch.nn.Parameter, key: str) -> torch.Tensor:
    """p's whole fp32 master weights or Adam moment `key` (an all-gather over p's data-parallel group under
    ZeRO-1/2 and bf16: call on every rank). For layers whose experts are not row ranges of the canonical layout."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if hasattr(p, "_hp_mapping"):
        return safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)
    return plain_state(engine, p)[key].view(p.shape)


def set_full_state(engine, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Set p's fp32 master weights or Adam moment `key` from its whole value (each rank keeps its fragment)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    value = value.to(p.device)
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is not None:
            (safe_set_full_fp32_param(p, value) if key == "fp32" else safe_set_full_optimizer_state(p, value, key))
        return
    plain_state(engine, p)[key].copy_(value.reshape(-1))


def _adam_states(engine) -> list[tuple[dict, torch.Tensor]]:
    """(Adam state dict, the tensor it belongs to) of every tensor the inner optimizer updates."""
    if engine.zero_optimization_partition_weights():
        inner = engine.optimizer.optimizer
        return [(inner.state[t], t) for t in engine.optimizer.fp32_partitioned_groups_flat]
    flat = flat_optimizer(engine)
    if flat is not None:
        return [(flat[0].state[t], t) for t in flat[1]]
    opt = engine.optimizer
    return [(opt.state[p], p) for g in opt.param_groups for p in g["params"]]


def ensure_adam_states(engine) -> None:
    """Create the Adam states that the optimizer makes lazily at its first step (zero moments, step 0) and
    link ZeRO's per-parameter views of them, so that a fresh engine can be loaded into and saved."""
    for state, t in _adam_states(engine):
        if "exp_avg" not in state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(t), exp_avg_sq=torch.zeros_like(t))
    link_zero_moments(engine)


def adam_step(engine) -> int:
    return max((int(s["step"]) for s, _ in _adam_states(engine) if "step" in s), default=0)


def set_adam_step(engine, step: int) -> None:
    for state, _ in _adam_states(engine):
        state["step"] = torch.tensor(float(step))


def replica_position(sharded: bool, rank: int, world: int, ep_size: int) -> tuple[int, int]:
    """(index, count) of this rank among the ranks holding the same copy of a tensor, in DeepSpeed's E + D
    layout: expert-parallel groups are runs of ep_size consecutive ranks, so the copies of an expert-sharded
    tensor are the ranks with the same rank % ep_size; other tensors are on every rank."""
    return (rank // ep_size, world // ep_size) if sharded else (rank, world)


@contextlib.contextmanager
def sampling_flatten(optimizer, sampler):
    """During the step, call sampler(extra_gradients=[flat]) right after a ZeRO optimizer flattens a group's
    gradient partition (`optimizer.flatten`): the moment the partition and its flat copy are both alive
    (megavq.tools.estimate_check measures the peak there)."""
    flatten = getattr(optimizer, "flatten", None)
    if flatten is None:
        yield
        return

    def sampled(tensors):
        flat = flatten(tensors)
        sampler(extra_gradients=[flat])
        return flat
    optimizer.flatten = sampled
    try:
        yield
    finally:
        optimizer.flatten = flatten
