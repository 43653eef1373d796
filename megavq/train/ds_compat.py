"""Every use of DeepSpeed's internals, in one place: private attributes and functions, and the inner structure
of its MoE layer. Tested against the DeepSpeed versions in TESTED (pyproject pins that range); another version
gets one warning at start-up (`check_version`).

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
  `fp32_groups_flat_partition`), each parameter's fragment mapping (`_hp_mapping`), the lazy linking of the
  Adam moments (`_hp_optimizer_states_linked`, `_lazy_init_hp_params_optimizer_state`); ZeRO-3 parameters
  carry `ds_id`.
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


def check_version() -> str | None:
    """Warn once when the installed DeepSpeed is outside the tested range; returns its version (None: absent)."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not is_tested(version):
        warnings.warn(f"DeepSpeed {version} is untested with megavq (tested: {TESTED[0]} to {TESTED[1]}); "
                      f"install one of those if something fails", stacklevel=2)
    return version


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


@contextlib.contextmanager
def sampling_flatten(optimizer, sampler):
    """During the step, call sampler(extra_gradients=[flat]) right after a ZeRO optimizer flattens a group's
    gradient partition (`optimizer.flatten`): the moment the partition and its flat copy are both alive
    (megavq.estimate_check measures the peak there)."""
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
