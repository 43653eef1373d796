"""Pre-train a megavq MoE language model with DeepSpeed.

    deepspeed scripts/pretrain.py --ds_config ds_configs/zero2.json [--config tiny] [--data builtin]
        [--out_dir runs/tiny] [--resume | --resume auto | --overwrite] [--init_from DIR] [key=value ...]

Exit codes: 0 finished; 2 bad input (or a first non-finite loss); 3 fatal (a checkpoint that cannot be written
or read, a non-finite loss again after a resume); 75 retryable: stopped by SIGTERM/SIGUSR1 after saving, a lost
rank, a collective timeout (continue with --resume auto).
"""
import argparse
import json
from pathlib import Path

from megavq.config import load_config
from megavq.plugins import load_plugins
from megavq.store.model_dir import resolve_model_dir
from megavq.train.launch import add_run_arguments, parse_run_args, single_process_env, user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "moe.router=vq train.lr=1e-3")
    p.add_argument("--config", default=None,
                   help="preset name or YAML/JSON path (default: tiny, or the config.json of --init_from)")
    p.add_argument("--data", default=None, help="'builtin', a directory made by scripts/prepare_data.py or "
                                                  "megatron:PREFIX (with data.tokenizer=MODEL), or a weighted "
                                                  "mixture DIR@0.7,DIR@0.3 (docs/mixtures.md)")
    p.add_argument("--init_from", default=None, help="start from the weights of a model/checkpoint directory")
    return parse_run_args(p)


def main():
    args = parse_args()
    with user_errors():
        load_plugins(args.plugin)
        overrides = args.overrides + ([f"data.source={args.data}"] if args.data else [])
        config = args.config or (str(resolve_model_dir(args.init_from) / "config.json") if args.init_from else "tiny")
        cfg = load_config(config, overrides)
        out_dir = args.out_dir or f"runs/{Path(config).stem}"  # the preset's name
        single_process_env()
        from megavq.train.engine import init_distributed
        from megavq.train.trainer import run
        rank, _ = init_distributed(cfg.train.dist_timeout_s)
        summary = run(cfg, args.ds_config, out_dir, resume=args.resume, init_from=args.init_from,
                      overwrite=args.overwrite)
        if rank == 0:
            print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
