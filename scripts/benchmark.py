"""Benchmark the MoE backends on one model and one batch; prints a table.

    python scripts/benchmark.py [--config tiny] [--batch 8] [--steps 10] [--device cpu|cuda] [--dtype fp32|bf16]
        [--variants native,ds-1.25,...] [--peak_tflops F] [key=value ...]
    torchrun --nproc_per_node 2 scripts/benchmark.py moe.ep_size=2      # expert parallel: all-to-all timed

Variants (all in one invocation, so their ratios compare): `native` (dropless), `ds-1.25` / `ds-2.0`
(DeepSpeed MoE at capacity factor 1.25 / 2.0 driven by the megavq router), `dsgate-1.25` / `dsgate-2.0` (the
same with DeepSpeed's own TopKGate holding the same weights), on a GPU `megablocks` (megavq router) and
`mb-learned` (MegaBlocks' own LearnedRouter), `native-ac` (native with activation checkpointing of every block)
and `dense` (no MoE layer: MLPs of hidden top_k x d_expert, the MoE model's active FLOPs).
Columns: tokens/s of a forward+backward step (all ranks), memory
(GPU: peak allocated; CPU: activations saved for the backward), the forward time of the MoE layers split
into router (gate: routing plus capacity bookkeeping), dispatch, experts, combine and communication
(all-to-all, including the wait for the other ranks), the backward, and MFU = model FLOPs per token (6 x active
matrix parameters + attention, megavq/model/flops.py) x tokens/s per device / peak FLOP/s (with --peak_tflops, or on
a known GPU). The phases are the profiler ranges the MoE layers mark (megavq/moe/phases.py): native's dispatch is
the sort by expert and the gather of the rows, its combine the weighting and scatter-add.
"""


import argparse

import torch

from megavq.errors import ConfigError
from megavq.tools.bench import VARIANTS, measure, ratios, table
from megavq.train.launch import single_process_env, user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (per rank)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak FLOP/s of the device, for MFU")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args()


def main():
    args = parse_args()
    with user_errors():
        names = args.variants.split(",") if args.variants else \
            [n for n in VARIANTS if VARIANTS[n][0] != "megablocks" or args.device == "cuda"]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant {unknown[0]!r} (valid: {list(VARIANTS)})")
        single_process_env()
        from megavq.train.engine import init_distributed
        rank, world = init_distributed()
        results = measure(args, names, world)
        if rank == 0:
            device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
            print(f"{device}, {world} rank(s), {args.batch} sequences per rank, {args.dtype}, median of {args.steps} "
                  f"steps; phases: forward only, summed over MoE layers")
            print(table(results, args))
            print("\n".join(ratios(results)))


if __name__ == "__main__":
    main()
