"""Memory per GPU and expert all-to-all traffic of a run, before launching it (no GPU, no DeepSpeed needed).

    python scripts/estimate.py --config olmoe_1b_7b --ds_config ds_configs/zero2_bf16.json --gpus 8 moe.ep_size=8
    python scripts/estimate.py --config mixtral_8x7b --ds_config ds_configs/zero3.json --gpus 32 \\
        --gpus_per_node 8 --gpu_memory 80 data.micro_batch_size=2

Prints, per GPU (the most loaded rank): parameters, fp32 master weights, AdamW states, gradients, DeepSpeed's
buffers and the activations of one micro-batch, each with the tensors it counts; the all-to-all volume and
its time at the stated bandwidths; a table of ZeRO stage / ep_size / micro-batch candidates marking which fit
in --gpu_memory; and one summary line. The formulas and their DeepSpeed sources: megavq/tools/estimate.py.
"""
import argparse
from pathlib import Path

from megavq.config import load_config
from megavq.plugins import load_plugins
from megavq.tools.estimate import Cluster, DeepSpeedSettings, candidates, estimate, report, summary_line
from megavq.train.engine import read_ds_config
from megavq.train.launch import user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name or YAML/JSON file")
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ZeRO stage, bf16, bucket sizes)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in all")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--gpu_memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--nvlink_gbps", type=float, default=450.0, help="GB/s per GPU and direction within a node "
                   "(default 450: H100 NVLink 4)")
    p.add_argument("--ib_gbps", type=float, default=50.0, help="GB/s per GPU and direction between nodes "
                   "(default 50: one 400 Gb/s InfiniBand NDR port per GPU)")
    p.add_argument("--max_micro_batch", type=int, default=64, help="largest micro-batch the candidate table tries")
    p.add_argument("--plugin", action="append", default=[],
                   help="a .py file or module registering routers or dispatchers (repeatable; see megavq/plugins.py)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_intermixed_args()


def main():
    args = parse_args()
    with user_errors():
        load_plugins(args.plugin)
        cfg = load_config(args.config, args.overrides)
        ds = DeepSpeedSettings.from_json(read_ds_config(args.ds_config))
        cluster = Cluster(args.gpus, args.gpus_per_node, args.gpu_memory, args.nvlink_gbps, args.ib_gbps)
        est = estimate(cfg, ds, cluster)
        name = Path(args.config).stem
        print(report(name, est, candidates(cfg, ds, cluster, args.max_micro_batch)))
        print("\n" + summary_line(name, est))


if __name__ == "__main__":
    main()
