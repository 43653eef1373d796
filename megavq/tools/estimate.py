"""Sizing before launch: memory per GPU and expert all-to-all traffic of a megavq run under DeepSpeed.

Legend: W ranks (GPUs), R = moe.ep_size, L = E / R local experts, B micro-batch, S sequence, T = B*S tokens
per rank, D hidden, F dense MLP hidden, H expert hidden, E experts, K = top_k, N = T*K routed rows,
V vocabulary, nh heads, kv = key/value width, b bytes of the model dtype (2 for bf16/fp16, 4 for fp32).

The parameters are enumerated from the model itself, built on the meta device (no memory), and laid out
as DeepSpeed lays them out: the optimizer groups of megavq.train.engine.param_groups (decay / no-decay,
expert-parallel parameters in groups of their own), flattened, padded and partitioned. Every figure is
per rank, for the most loaded rank. What each figure counts (DeepSpeed 0.19.8; file:line in deepspeed/):

parameters   the model's weights in the model dtype (bf16/fp16 when the JSON enables them, else fp32).
             Expert parameters: L = E/R experts per rank. ZeRO-0/1/2 hold them whole (the flat buffer,
             padded to 2 x group size: runtime/zero/stage_1_and_2.py:387,441); ZeRO-3 holds each
             parameter's 1/W partition (runtime/zero/partition_parameters.py:1690-1696,1817) plus a full
             copy of the parameters of at most stage3_param_persistence_threshold elements (default 1e5,
             runtime/zero/config.py:228; runtime/zero/parameter_offload.py:317-330).
master       fp32 copy the optimizer updates. ZeRO-1/2: this rank's partition of each group, also for an
             fp32 model (a clone: stage_1_and_2.py:560-584); ZeRO-3: the partition (stage3.py:1081-1176);
             ZeRO-0: none for fp32 (torch AdamW updates the weights), a full copy under bf16/fp16
             (runtime/fp16/fused_optimizer.py:94-100).
optimizer    AdamW's exp_avg and exp_avg_sq, fp32, over the master weights (8 bytes per element); ZeRO-0
             fp32: over the weights.
gradients    the most gradient memory held between the backward and the step. ZeRO-0: every gradient
             (model dtype); under bf16 also the fp32 casts of one group and their flat copy, made together
             by the step (fused_optimizer.py:286-291). ZeRO-1: the larger of every gradient at the end of
             the backward (reduced only afterwards, runtime/engine.py:3088-3092) and what ZeRO-2 holds at
             the step. ZeRO-2: the gradient partition in the model dtype (`grads_in_partition`: it holds
             every parameter that touches the partition in full, stage_1_and_2.py:2182-2199) plus one
             group's flat copy and (bf16/fp16) its fp32 cast, the gradient the optimizer steps on
             (stage_1_and_2.py:3110-3131). ZeRO-3: the gradient partition buffer (stage3.py:791) plus one
             optimizer sub-group's flat copy and fp32 cast (sub_group_size, default 1e9,
             stage3.py:2686-2693). Expert gradients are partitioned over the expert-data-parallel group
             (W/R ranks, stage_1_and_2.py:862-884), the others over all W ranks.
buffers      DeepSpeed's reduce bucket: reduce_bucket_size elements (default 5e8, config.py:113) in the
             model dtype, two with overlap_comm (default on for ZeRO-3 only, config.py:384-387);
             ZeRO-1/2 allocate it for the backward (stage_1_and_2.py:3256-3279), ZeRO-3 for good
             (stage3.py:779-784); none with contiguous_gradients off (the gradient figures assume it on,
             DeepSpeed's default, which ZeRO-2 with MoE requires). allgather_bucket_size (default 5e8) only chunks the all-gather into
             the parameter buffer and holds no memory of its own (runtime/utils.py:1008-1054).
             ZeRO-3: parameters gathered for compute, the largest module's plus stage3_prefetch_bucket_size
             (5e7) elements, at most stage3_max_live_parameters (1e9) and the non-persistent parameters.
             ZeRO-0 on several ranks: the flattened all-reduce bucket, up to 5e8 elements (engine.py:151,
             3094). Expert parallelism: the rows of one all-to-all in flight, sent and received (2*N*D*b;
             E*C rows with the deepspeed backend). The rows are what the dispatcher declares
             (Dispatcher.row_counts); a dispatcher that declares none is refused.
activations  the tensors the forward saves for the backward, per micro-batch, counted op by op from the
             model's forward (megavq/model, megavq/moe): per norm its fp32 input, x*rsqrt, rsqrt and
             output (before an MoE layer the router's fp32 copy of it instead); attention's q and k after RoPE, v, output, the (B,S,D) copy for o_proj and the
             log-sum-exp (a flash kernel; no S x S matrix); the router's logits and probabilities (T,E)
             fp32 and its top-k indices and weights; the routed rows, the experts' hidden states
             (SwiGLU: both projections, silu and product; GELU: input and output), with SwiGLU a copy of
             each local expert's input weight (Experts.forward flattens w_in[e].transpose(0,1), which
             copies), the expert outputs twice (before
             and after the route weights) and the routing indices; the output head's loss is chunked
             (megavq/model/loss.py): its gradients (T, D) and (V, D) are kept, no (T, V) logits.
             With activation checkpointing of every block: the block inputs plus one block's saved
             tensors during its recompute, plus everything outside the blocks.
             The deepspeed backend counts E*C capacity rows (C = ceil(capacity_factor * T*K / E)) instead
             of N; other routers than topk save about as much (a few (T,E) fp32 tensors).

All-to-all (expert parallelism, dropless, balanced load): per MoE layer and micro-batch each rank sends
the rows its dispatcher declares (Dispatcher.row_counts) of D*b bytes and receives as many in each of 4
exchanges (dispatch and combine in the forward, their reverses in the backward; 6 with activation
checkpointing, whose recompute dispatches and combines again), (R-1)/R of them to other ranks. The native
dispatcher sends a token once to each rank that holds one of its K experts: T times the expected number of
such ranks when the experts are spread uniformly (over the experts of the token's group_top groups under
group-limited routing; megavq.moe.dispatch.expert_parallel.expected_ranks), not N = T*K rows, plus K route
weights (b bytes, forward and backward) and K int32 expert ids per row. EP groups are runs of R consecutive
ranks, so with G GPUs per node
(min(R,G)-1)/R of the rows stay on the node (NVLink) and (R-min(R,G))/R cross it (InfiniBand). Time =
bytes / bandwidth per GPU and direction, NVLink and InfiniBand in parallel, no latency, no overlap with
compute: a lower bound. The deepspeed backend sends E*C rows (its capacity buffer, padding included).

Not counted: the CUDA context, NCCL's buffers, allocator fragmentation, kernel workspaces, and routing
imbalance (a rank whose experts get more than their share computes more rows).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from megavq.config import Config
from megavq.errors import ConfigError
from megavq.model import Transformer
from megavq.moe.config import check_zero3
from megavq.moe.dispatch import RowCounts, dispatcher_class, dropless_rows
from megavq.moe.spec import is_moe_layer, moe_blocks

GiB = 2**30
MOE_GROUP_MAX = 178956971  # split_params_into_different_moe_groups_for_optimizer's max_group_size (moe/utils.py:74)
ALLREDUCE_BUCKET = 500_000_000  # MEMORY_OPT_ALLREDUCE_SIZE (engine.py:151), the ZeRO-0 all-reduce bucket


# ---- the DeepSpeed settings that size memory ------------------------------------------------------------
@dataclass
class DeepSpeedSettings:
    """What the estimate reads from the DeepSpeed JSON, with DeepSpeed's defaults (runtime/zero/config.py)."""
    stage: int = 0
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool | None = None  # None: DeepSpeed's default, on for ZeRO-3 only
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000

    @classmethod
    def from_json(cls, ds: dict) -> "DeepSpeedSettings":
        z = ds.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param", "cpu_offload"):
            if z.get(key):
                raise ConfigError(f"zero_optimization.{key}: the estimate does not model offloading (GPU memory only)")
        if ds.get("data_types", {}).get("grad_accum_dtype"):
            raise ConfigError("data_types.grad_accum_dtype: the estimate models gradients accumulated in the model "
                              "dtype (DeepSpeed's default), not DeepSpeed's separate-accumulation optimizers")
        stage = int(z.get("stage", 0))
        dtype = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
        return cls(stage=stage, dtype=dtype,
                   reduce_bucket_size=int(z.get("reduce_bucket_size", 5e8)),
                   overlap_comm=z.get("overlap_comm"),
                   contiguous_gradients=bool(z.get("contiguous_gradients", True)),
                   prefetch_bucket_size=int(z.get("stage3_prefetch_bucket_size", z.get("prefetch_bucket_size", 5e7))),
                   param_persistence_threshold=int(z.get("stage3_param_persistence_threshold",
                                                         z.get("param_persistence_threshold", 1e5))),
                   max_live_parameters=int(z.get("stage3_max_live_parameters", z.get("max_live_parameters", 1e9))),
                   sub_group_size=int(z.get("sub_group_size", 1e9)))

    @property
    def bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def overlap(self) -> bool:
        return self.stage == 3 if self.overlap_comm is None else bool(self.overlap_comm)


@dataclass
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    nvlink_gbps: float = 450.0  # GB/s per GPU and direction (H100 NVLink 4: 900 GB/s both ways)
    ib_gbps: float = 50.0  # GB/s per GPU and direction (one 400 Gb/s NDR port per GPU)


# ---- parameters, as DeepSpeed groups and partitions them ----------------------------------------------
@dataclass
class Param:
    name: str
    numel: int  # on this rank (expert parameters: L of E experts)
    expert: bool
    decay: bool


def meta_model(cfg: Config):
    """The model on the meta device, all experts in one bank (ep_size 1, native layout: same shapes)."""
    cfg = copy.deepcopy(cfg)
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size=0 means 'taken from the data': give it for the estimate "
                          "(e.g. model.vocab_size=32000)")
    cfg.moe.ep_size, cfg.moe.backend = 1, "native"
    with torch.device("meta"):
        return Transformer(cfg)


def model_params(cfg: Config) -> list[Param]:
    """The parameters one rank holds, in the model's order. Expert banks (E, ...) hold L = E/R experts; the
    deepspeed backend keeps one module per expert, so its expert parameters come one expert at a time."""
    R, E = cfg.moe.ep_size, cfg.moe.num_experts
    out = []
    for n, p in meta_model(cfg).named_parameters():
        if ".experts." not in n:
            out.append(Param(n, p.numel(), False, p.dim() >= 2))
        elif dispatcher_class(cfg.moe.backend).deepspeed_moe:
            out += [Param(f"{n}.{e}", p.numel() // E, True, p.dim() >= 3) for e in range(E // R)]
        else:
            out.append(Param(n, p.numel() // R, True, p.dim() >= 2))
    return out


def expert_params_are_moe(cfg: Config) -> bool:
    """Whether DeepSpeed treats expert parameters as MoE parameters (own groups, expert-data-parallel)."""
    return dispatcher_class(cfg.moe.backend).deepspeed_moe or cfg.moe.ep_size > 1


@dataclass
class Group:
    """One optimizer parameter group as DeepSpeed sees it: its parameters' sizes on this rank and the size of
    the data-parallel group that partitions it."""
    numels: list[int]
    dp: int


def optimizer_groups(params: list[Param], cfg: Config, world: int) -> list[Group]:
    """megavq.train.engine.param_groups after DeepSpeed's split: decay, no_decay, then the MoE groups
    (chunked at MOE_GROUP_MAX elements), empty groups dropped."""
    moe = expert_params_are_moe(cfg)
    groups = [Group([p.numel for p in params if p.decay == d and not (moe and p.expert)], world)
              for d in (True, False)]
    for d in (True, False):
        chunk, size = [], 0
        for p in (p for p in params if moe and p.expert and p.decay == d):
            if chunk and size + p.numel > MOE_GROUP_MAX:
                groups.append(Group(chunk, world // cfg.moe.ep_size))
                chunk, size = [], 0
            chunk.append(p.numel)
            size += p.numel
        groups.append(Group(chunk, world // cfg.moe.ep_size))
    return [g for g in groups if g.numels]


def flat_partition(g: Group) -> int:
    """ZeRO-1/2 partition size: the group flattened, padded to a multiple of 2*dp, split in dp parts."""
    align = 2 * g.dp
    return math.ceil(sum(g.numels) / align) * align // g.dp


def touching_partition(g: Group) -> list[int]:
    """Per partition index: elements of the parameters that overlap the partition, each counted whole
    (what `grads_in_partition` holds)."""
    ps, out, off = flat_partition(g), [0] * g.dp, 0
    for n in g.numels:
        for r in range(off // ps, min(g.dp - 1, (off + n - 1) // ps) + 1):
            out[r] += n
        off += n
    return out


def partition_index(rank: int, g: Group, world: int) -> int:
    """A rank's index in a group's data-parallel group: the rank, or rank // R in the expert-data-parallel
    group (DeepSpeed's E + D layout: EP groups of R consecutive ranks)."""
    return rank if g.dp == world else rank // (world // g.dp)


def zero3_partition(numel: int, dp: int) -> int:
    return math.ceil(numel / dp)


# ---- the figures --------------------------------------------------------------------------------------
@dataclass
class Item:
    name: str
    bytes: float
    counts: str = ""


@dataclass
class MemoryEstimate:
    params: list[Item] = field(default_factory=list)
    master: list[Item] = field(default_factory=list)
    optimizer: list[Item] = field(default_factory=list)
    gradients: list[Item] = field(default_factory=list)
    buffers: list[Item] = field(default_factory=list)
    activations: list[Item] = field(default_factory=list)

    SECTIONS = ("params", "master", "optimizer", "gradients", "buffers", "activations")

    def total(self, section: str | None = None) -> float:
        sections = [section] if section else self.SECTIONS
        return sum(i.bytes for s in sections for i in getattr(self, s))


def state_memory(params: list[Param], cfg: Config, ds: DeepSpeedSettings, world: int) -> MemoryEstimate:
    """Parameters, master weights, optimizer states and gradients of the most loaded rank."""
    fn = {0: _zero0, 1: _zero12, 2: _zero12, 3: _zero3}.get(ds.stage)
    if fn is None:
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {ds.stage}")
    return fn(params, cfg, ds, world)


def _zero0(params, cfg, ds, world) -> MemoryEstimate:
    n, b = sum(p.numel for p in params), ds.bytes
    est = MemoryEstimate(params=[Item("weights", n * b, f"{n:,} elements x {b} B")])
    if b != 4:
        est.master.append(Item("fp32 master weights", n * 4, "every parameter"))
    est.optimizer.append(Item("AdamW moments", n * 8, "exp_avg + exp_avg_sq, fp32"))
    est.gradients.append(Item("gradients", n * b, "every parameter, model dtype"))
    if b != 4:
        largest = max(sum(g.numels) for g in optimizer_groups(params, cfg, world))
        est.gradients.append(Item("fp32 copies and flat fp32 gradients at the step", 2 * largest * 4,
                                  f"one group of {largest:,}, twice (per-parameter casts, then flattened)"))
    if world > 1:
        est.buffers.append(Item("all-reduce bucket", min(n, ALLREDUCE_BUCKET) * b, "flattened gradients"))
    return est


def _zero12(params, cfg, ds, world) -> MemoryEstimate:
    groups, b = optimizer_groups(params, cfg, world), ds.bytes
    n = sum(p.numel for p in params)
    touched = [touching_partition(g) for g in groups]
    rank = max(range(world), key=lambda r: sum(t[partition_index(r, g, world)] for g, t in zip(groups, touched)))
    grads_part = sum(t[partition_index(rank, g, world)] for g, t in zip(groups, touched))
    part = sum(flat_partition(g) for g in groups)
    largest = max(flat_partition(g) for g in groups)
    est = MemoryEstimate(params=[Item("weights", _padded(groups) * b, f"{n:,} elements (+ padding) x {b} B")])
    est.master.append(Item("fp32 master partition", part * 4, _dp_text(groups)))
    est.optimizer.append(Item("AdamW moments", part * 8, "exp_avg + exp_avg_sq over the master partition"))
    flat = largest * (b + 4) if b != 4 else largest * 4  # the group's flat copy, cast to fp32
    at_step = grads_part * b + flat
    grads = Item("partition + one group's flat fp32 copy (step)", at_step,
                 f"{grads_part:,} x {b} B + {largest:,} x {b + 4 if b != 4 else 4} B")
    if ds.stage == 1 and n * b > at_step:
        grads = Item("every gradient (end of the backward)", n * b, "ZeRO-1 reduces after the backward")
    est.gradients.append(grads)
    est.buffers.append(_reduce_bucket(ds, "for the backward"))
    return est


def _zero3(params, cfg, ds, world) -> MemoryEstimate:
    b = ds.bytes
    part = sum(zero3_partition(p.numel, world) for p in params)
    persist = sum(p.numel for p in params if p.numel <= ds.param_persistence_threshold)
    est = MemoryEstimate(params=[Item("weight partitions", part * b, f"each parameter / {world}"),
                                 Item("persistent weights", persist * b,
                                      f"parameters of <= {ds.param_persistence_threshold:,} elements, whole")])
    est.master.append(Item("fp32 master partition", part * 4, f"/ {world}"))
    est.optimizer.append(Item("AdamW moments", part * 8, "exp_avg + exp_avg_sq over the master partition"))
    sub = min(part, ds.sub_group_size + max(zero3_partition(p.numel, world) for p in params))
    est.gradients.append(Item("gradient partition", part * b, "the flat buffer, model dtype"))
    est.gradients.append(Item("one sub-group's flat fp32 copy (step)", sub * (b + 4 if b != 4 else 4),
                              f"sub_group_size {ds.sub_group_size:,}"))
    est.buffers.append(_reduce_bucket(ds, "allocated at start-up"))
    units = _fetch_units(params, ds)
    unit = max(units.values(), default=0)
    gathered = min(unit + ds.prefetch_bucket_size, ds.max_live_parameters, sum(units.values()))
    est.buffers.append(Item("gathered weights", gathered * b, f"largest module ({unit:,}) + prefetch bucket"))
    return est


def _reduce_bucket(ds: DeepSpeedSettings, when: str) -> Item:
    copies = (2 if ds.overlap else 1) if ds.contiguous_gradients else 0
    return Item("reduce bucket", ds.reduce_bucket_size * ds.bytes * copies,
                f"{copies} x reduce_bucket_size {ds.reduce_bucket_size:,} x {ds.bytes} B, {when}")


def _padded(groups: list[Group]) -> int:
    return sum(flat_partition(g) * g.dp for g in groups)


def _dp_text(groups: list[Group]) -> str:
    dps = sorted({g.dp for g in groups}, reverse=True)
    return "partitioned over " + " / ".join(f"{d}" for d in dps) + " ranks" + (
        " (non-expert / expert)" if len(dps) > 1 else "")


def _fetch_units(params: list[Param], ds: DeepSpeedSettings) -> dict[str, int]:
    """ZeRO-3 gathers a module's own parameters together; persistent ones are never released."""
    units: dict[str, int] = {}
    for p in params:
        if p.numel > ds.param_persistence_threshold:
            module = p.name.rsplit(".", 1)[0]
            units[module] = units.get(module, 0) + p.numel
    return units


# ---- activations --------------------------------------------------------------------------------------
@dataclass
class Shape:
    """The sizes the activation count needs, per rank and micro-batch."""
    T: int
    S: int
    D: int
    nh: int
    kv: int
    V: int
    F: int
    H: int
    E: int
    L: int
    K: int
    rows: int  # expert rows this rank computes (N, or E*C for a capacity backend): the dispatcher's row_counts
    sent: int  # rows of one all-to-all (to every rank of the EP group, this one included)
    routed: int  # N = T*K
    b: int
    n_in: int  # 2 for SwiGLU, 1 for GELU
    ep: int
    capacity_buffer: bool  # rows pass through an (E, C, D) buffer (DeepSpeed-MoE), else routed rows (dropless)
    hs: int = 0  # head size (model.head_dim or D / nh)
    qk_norms: int = 0  # RMSNorm rows per token on the queries and keys: 2 (over the projections), nh + nkv (per head)
    clip: bool = False  # model.clip_qkv
    Fs: int = 0  # the shared experts' summed hidden size (0: none)
    shared_gate: bool = False
    route_slots: int = 0  # route weights and expert ids beside each dispatched row (the dispatcher's row_counts)

    @property
    def q(self) -> int:
        """The queries' (and the attention output's) width, nh x hs."""
        return self.nh * self.hs


def shape_of(cfg: Config, micro_batch: int, b: int) -> Shape:
    m, moe = cfg.model, cfg.moe
    T, E, K = micro_batch * m.seq_len, moe.num_experts, moe.top_k
    rows = row_counts(moe, T) if moe.every else dropless_rows(moe, T)
    hs, nkv = m.head_size(), m.n_kv_heads or m.n_heads
    qk_norms = {"none": 0, "proj": 2, "head": m.n_heads + nkv}[m.qk_norm]
    H = moe.d_expert or m.d_ff
    return Shape(T, m.seq_len, m.d_model, m.n_heads, nkv * hs, m.vocab_size, m.d_ff, H, E, E // moe.ep_size, K,
                 rows.computed, rows.sent, T * K, b, 2 if m.mlp == "swiglu" else 1, moe.ep_size, rows.capacity_buffer,
                 hs, qk_norms, m.clip_qkv > 0, moe.shared_experts * (moe.d_shared or H), moe.shared_gate,
                 rows.route_slots)


def row_counts(moe, tokens: int) -> RowCounts:
    """The rows the dispatcher declares (Dispatcher.row_counts); a dispatcher that declares none is refused."""
    rows = dispatcher_class(moe.backend).row_counts(moe, tokens)
    if rows is None:
        raise ConfigError(f"moe.backend={moe.backend} does not declare its expert rows (Dispatcher.row_counts): "
                          f"the estimator cannot size it")
    return rows


def norm_bytes(s: Shape, output: bool = True) -> float:
    """fp32 input, x*rsqrt, rsqrt, and the output when the next op saves it (not the router: its fp32 copy)."""
    return s.T * s.D * (4 + s.b + (s.b if output else 0)) + s.T * 4


def attention_bytes(s: Shape) -> float:
    """q, k, v, out, o_proj input; lse; QK-norm's fp32 input, x*rsqrt and rsqrt; clip_qkv's inputs."""
    qk_norm = s.T * (s.q + s.kv) * (4 + s.b) + s.T * s.qk_norms * 4 if s.qk_norms else 0
    clip = s.T * (s.q + 2 * s.kv) * s.b if s.clip else 0
    return s.T * (3 * s.q + 2 * s.kv) * s.b + s.T * s.nh * 4 + qk_norm + clip


def router_bytes(s: Shape) -> float:
    """fp32 input (the norm output itself in fp32, x.float() under bf16; also a weight.float() copy),
    logits and probabilities, log-sum-exp, top-k indices and weights, their sum."""
    fp32_input = s.T * s.D * 4 + (s.E * s.D * 4 if s.b != 4 else 0)
    return fp32_input + 2 * s.T * s.E * 4 + s.T * 4 + s.T * s.K * 12 + s.T * 4


def experts_bytes(s: Shape) -> float:
    hidden = s.rows * s.H * s.b * (s.n_in + (2 if s.n_in == 2 else 1))  # h (1|2 H), silu and product | gelu
    # SwiGLU: w_in[e].transpose(0, 1).flatten(1) copies each local expert's (2, D, H) input weight; GELU's
    # (1, D, H) transposes to a view
    weights = s.L * s.D * 2 * s.H * s.b if s.n_in == 2 else 0
    if s.capacity_buffer:  # capacity buffer in, routed outputs weighted in the combine
        return s.rows * s.D * s.b + hidden + weights + s.routed * s.D * s.b + s.rows * 8 + s.routed * 12
    perm = s.rows * 8 if s.ep > 1 else 0
    return s.rows * s.D * s.b + hidden + weights + 2 * s.routed * s.D * s.b + s.routed * (16 + s.b) + perm


def dense_mlp_bytes(s: Shape, F: int | None = None) -> float:
    return s.T * (F or s.F) * s.b * (4 if s.n_in == 2 else 2)


def shared_bytes(s: Shape) -> float:
    """The shared experts: a dense MLP of their summed width, its input in the model dtype (under fp32 the
    router's copy), the gate's output and the gated product's inputs."""
    if not s.Fs:
        return 0
    own_input = s.T * s.D * s.b if s.b != 4 else 0
    return dense_mlp_bytes(s, s.Fs) + own_input + (s.T * (s.D + 1) * s.b if s.shared_gate else 0)


def block_bytes(s: Shape, is_moe: bool) -> float:
    if is_moe:
        moe = router_bytes(s) + experts_bytes(s) + shared_bytes(s)
        return norm_bytes(s) + attention_bytes(s) + norm_bytes(s, output=False) + moe
    return 2 * norm_bytes(s) + attention_bytes(s) + dense_mlp_bytes(s)


def outside_blocks(s: Shape) -> list[Item]:
    return [Item("token ids and targets", s.T * 16, "int64"),
            Item("final norm", norm_bytes(s, output=False), "fp32 input, x*rsqrt, rsqrt"),
            Item("loss gradients of the head", (s.T + s.V) * s.D * s.b, "(T, D) and (V, D): chunked loss, "
                 "no logits kept"),
            Item("RoPE tables", s.S * s.hs * 4, "cos, sin")]


def activation_memory(cfg: Config, micro_batch: int, b: int, checkpointing: bool = False) -> list[Item]:
    s = shape_of(cfg, micro_batch, b)
    kinds = [is_moe_layer(i, cfg.moe.every, cfg.moe.dense_layers) for i in range(cfg.model.n_layers)]
    items = outside_blocks(s)
    if checkpointing:
        items.append(Item("block inputs", len(kinds) * s.T * s.D * s.b, f"{len(kinds)} x (T, D)"))
        items.append(Item("one block recomputed", max(block_bytes(s, k) for k in kinds), "its saved tensors"))
        return items
    n_moe = sum(kinds)
    norms = len(kinds) * 2 * norm_bytes(s) - n_moe * (norm_bytes(s) - norm_bytes(s, output=False))
    items.append(Item("norms and attention", norms + len(kinds) * attention_bytes(s), f"{len(kinds)} blocks"))
    if n_moe:
        items.append(Item("router", n_moe * router_bytes(s), f"{n_moe} MoE layers: logits, probs, top-k"))
        items.append(Item("experts", n_moe * experts_bytes(s),
                          f"{s.rows:,} rows: inputs, hidden, outputs; w_in copies of {s.L} experts"))
    if n_moe and s.Fs:
        items.append(Item("shared experts", n_moe * shared_bytes(s), f"hidden {s.Fs}" + (", gated" * s.shared_gate)))
    if len(kinds) > n_moe:
        items.append(Item("dense MLPs", (len(kinds) - n_moe) * dense_mlp_bytes(s), f"{len(kinds) - n_moe} layers"))
    return items


# ---- all-to-all -----------------------------------------------------------------------------------------
@dataclass
class AllToAll:
    bytes_per_exchange: float  # hidden rows sent by one rank (as many received), one MoE layer, one micro-batch
    exchanges_per_step: int
    intra_fraction: float
    inter_fraction: float
    cluster: Cluster
    route_bytes_per_step: float = 0.0  # the route weights and expert ids beside the dispatched rows

    @property
    def bytes_per_step(self) -> float:
        """Bytes one rank passes to the all-to-all per optimizer step, its own rows included."""
        return self.bytes_per_exchange * self.exchanges_per_step + self.route_bytes_per_step

    @property
    def sent_per_step(self) -> float:
        """Bytes one rank sends to other ranks per optimizer step (it receives as many)."""
        return self.bytes_per_step * (self.intra_fraction + self.inter_fraction)

    @property
    def nvlink_s(self) -> float:
        return self.bytes_per_step * self.intra_fraction / (self.cluster.nvlink_gbps * 1e9)

    @property
    def ib_s(self) -> float:
        return self.bytes_per_step * self.inter_fraction / (self.cluster.ib_gbps * 1e9)

    @property
    def seconds(self) -> float:
        return max(self.nvlink_s, self.ib_s)


def all_to_all(cfg: Config, cluster: Cluster, micro_batch: int, b: int, checkpointing: bool = False) -> AllToAll:
    s, R, G = shape_of(cfg, micro_batch, b), cfg.moe.ep_size, cluster.gpus_per_node
    n_moe = len(moe_blocks(cfg.model.n_layers, cfg.moe.every, cfg.moe.dense_layers))
    dispatches = n_moe * cfg.train.grad_accum_steps if R > 1 else 0
    # per dispatch: the weights and int32 ids forward, the weights' gradient back, and again in the recompute
    route = s.sent * s.route_slots * (2 * b + 4 + (b + 4 if checkpointing else 0))
    local = min(R, G)
    return AllToAll(s.sent * s.D * b, dispatches * (6 if checkpointing else 4), (local - 1) / R, (R - local) / R,
                    cluster, dispatches * route)


# ---- one configuration, and the candidates ------------------------------------------------------------
@dataclass
class Estimate:
    cfg: Config
    ds: DeepSpeedSettings
    cluster: Cluster
    memory: MemoryEstimate
    checkpointed: list[Item]  # activations with checkpointing of every block
    a2a: AllToAll

    @property
    def fits(self) -> bool:
        return self.memory.total() <= self.cluster.gpu_memory_gib * GiB


def check_layout(cfg: Config, ds: DeepSpeedSettings, gpus: int) -> None:
    R = cfg.moe.ep_size
    if gpus < 1 or gpus % R:
        raise ConfigError(f"moe.ep_size={R} must divide the number of GPUs, got {gpus}")
    if ds.stage == 3 and cfg.moe.every > 0:
        check_zero3(cfg.moe)


def estimate(cfg: Config, ds: DeepSpeedSettings, cluster: Cluster, params: list[Param] | None = None) -> Estimate:
    """Memory per GPU and all-to-all of cfg (its moe.ep_size and data.micro_batch_size) on cluster.gpus GPUs."""
    check_layout(cfg, ds, cluster.gpus)
    params = model_params(cfg) if params is None else params
    mem = state_memory(params, cfg, ds, cluster.gpus)
    mb, b = cfg.data.micro_batch_size, ds.bytes
    mem.activations = activation_memory(cfg, mb, b)
    if cfg.moe.ep_size > 1 and cfg.moe.every > 0:
        s = shape_of(cfg, mb, b)
        mem.buffers.append(Item("all-to-all rows in flight", 2 * s.sent * s.D * b, "one exchange, sent + received"))
    return Estimate(cfg, ds, cluster, mem, activation_memory(cfg, mb, b, checkpointing=True),
                    all_to_all(cfg, cluster, mb, b))


def with_layout(cfg: Config, ep_size: int, micro_batch: int) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.moe.ep_size, cfg.data.micro_batch_size = ep_size, micro_batch
    return cfg


def candidates(cfg: Config, ds: DeepSpeedSettings, cluster: Cluster, max_micro_batch: int = 64) -> list[dict]:
    """For each ZeRO stage 1-3 and ep_size (powers of two dividing E and the GPUs), the largest power-of-two
    micro-batch that fits, without and with activation checkpointing (micro-batch 1 when none fits)."""
    rows = []
    eps = [r for r in (2**i for i in range(12)) if r <= cluster.gpus and cluster.gpus % r == 0
           and cfg.moe.num_experts % r == 0] if cfg.moe.every else [1]
    for stage in (1, 2, 3):
        for ep in eps:
            if stage == 3 and (ep > 1 or not dispatcher_class(cfg.moe.backend).zero3):
                continue
            stage_ds = copy.copy(ds)
            stage_ds.stage = stage
            params = model_params(with_layout(cfg, ep, 1))
            for ckpt in (False, True):
                rows.append(_largest_fit(cfg, stage_ds, cluster, ep, ckpt, params, max_micro_batch))
    return rows


def _largest_fit(cfg, ds, cluster, ep, ckpt, params, max_mb) -> dict:
    best, mb = None, 1
    while mb <= max_mb:
        est = estimate(with_layout(cfg, ep, mb), ds, cluster, params)
        row = dict(stage=ds.stage, ep=ep, micro_batch=mb, checkpointing=ckpt, gib=total_bytes(est, ckpt) / GiB,
                   a2a_ms=all_to_all(est.cfg, cluster, mb, ds.bytes, ckpt).seconds * 1e3)
        row["fits"] = row["gib"] <= cluster.gpu_memory_gib
        if not row["fits"]:
            return best or row
        best, mb = row, mb * 2
    return best


def total_bytes(est: Estimate, checkpointing: bool = False) -> float:
    mem = est.memory
    acts = sum(i.bytes for i in est.checkpointed) if checkpointing else mem.total("activations")
    return mem.total() - mem.total("activations") + acts


# ---- text -----------------------------------------------------------------------------------------------
def gib(x: float) -> str:
    return f"{x / GiB:.2f}" if x < 10 * GiB else f"{x / GiB:.1f}"


def summary_line(name: str, est: Estimate) -> str:
    """One line per configuration, for README."""
    c, m, a = est.cluster, est.memory, est.a2a
    nodes = math.ceil(c.gpus / c.gpus_per_node)
    parts = ", ".join(f"{s} {gib(m.total(s))}" for s in MemoryEstimate.SECTIONS)
    comm = (f"all-to-all {a.sent_per_step / 1e9:.2f} GB/step/GPU, >= {a.seconds * 1e3:.0f} ms "
            f"(NVLink {a.nvlink_s * 1e3:.0f} ms, IB {a.ib_s * 1e3:.0f} ms)") if a.exchanges_per_step else "no all-to-all"
    return (f"{name} on {c.gpus} x {c.gpu_memory_gib:g} GiB ({nodes} node{'s' if nodes > 1 else ''} of "
            f"{c.gpus_per_node}), ZeRO-{est.ds.stage} {est.ds.dtype}, ep {est.cfg.moe.ep_size}, micro-batch "
            f"{est.cfg.data.micro_batch_size} x {est.cfg.model.seq_len}: {gib(m.total())} GiB/GPU "
            f"({'fits' if est.fits else 'does not fit'}; {parts}; with activation checkpointing "
            f"{gib(total_bytes(est, True))}); {comm}")


def report(name: str, est: Estimate, rows: list[dict]) -> str:
    lines = [f"{name}: {est.cfg.model.n_layers} layers, d {est.cfg.model.d_model}, {est.cfg.moe.num_experts} "
             f"experts, top-{est.cfg.moe.top_k}; memory per GPU in GiB (the most loaded rank)", ""]
    for section in MemoryEstimate.SECTIONS:
        lines.append(f"{section:<12} {gib(est.memory.total(section)):>8}")
        lines += [f"  {i.name:<52} {gib(i.bytes):>8}  {i.counts}" for i in getattr(est.memory, section)]
    ck = sum(i.bytes for i in est.checkpointed)
    lines.append(f"{'total':<12} {gib(est.memory.total()):>8}  of {est.cluster.gpu_memory_gib:g} GiB")
    lines.append(f"activations with checkpointing of every block: {gib(ck)} GiB (analytic; "
                 f"train.activation_checkpointing=1); total {gib(total_bytes(est, True))} GiB")
    lines += ["", *a2a_lines(est), "", "candidates (largest power-of-two micro-batch that fits):",
              f"{'ZeRO':>4} {'ep':>4} {'ckpt':>5} {'micro-batch':>11} {'GiB/GPU':>8} {'fits':>5} {'a2a ms/step':>12}"]
    lines += [f"{r['stage']:>4} {r['ep']:>4} {'yes' if r['checkpointing'] else 'no':>5} {r['micro_batch']:>11} "
              f"{r['gib']:>8.1f} {'yes' if r['fits'] else 'no':>5} {r['a2a_ms']:>12.1f}" for r in rows]
    return "\n".join(lines)


def a2a_lines(est: Estimate) -> list[str]:
    a = est.a2a
    if not a.exchanges_per_step:
        return ["all-to-all: none (moe.ep_size=1)"]
    s = shape_of(est.cfg, est.cfg.data.micro_batch_size, est.ds.bytes)
    return [f"all-to-all per MoE layer and micro-batch: {a.bytes_per_exchange / 1e6:.1f} MB per exchange and rank "
            f"(x4: dispatch, combine, and their backward; {s.sent / s.T:.2f} rows a token for its top-{s.K} "
            f"experts), {a.intra_fraction:.0%} to ranks on the node, {a.inter_fraction:.0%} off it",
            f"per step: {a.sent_per_step / 1e9:.2f} GB sent (and received) per GPU; >= {a.seconds * 1e3:.1f} ms "
            f"at {est.cluster.nvlink_gbps:g} GB/s NVLink ({a.nvlink_s * 1e3:.1f} ms) and {est.cluster.ib_gbps:g} "
            f"GB/s InfiniBand ({a.ib_s * 1e3:.1f} ms) per GPU"]
