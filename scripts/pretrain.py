"""Pre-train a megavq MoE language model with DeepSpeed.

    deepspeed scripts/pretrain.py --ds_config ds_configs/zero2.json [--config tiny] [--data builtin]
        [--out_dir runs/tiny] [--resume | --resume auto | --overwrite] [--init_from DIR] [key=value ...]

Exit codes: 0 finished; 2 bad input (or a first non-finite loss); 3 fatal (a checkpoint that cannot be written
or read, a non-finite loss again after a resume); 75 retryable: stopped by SIGTERM/SIGUSR1 after saving, a lost
rank, a collective timeout (continue with --resume auto).
"""
import argparse
import json
import sys
from pathlib import Path

from megavq.config import load_config
from megavq.plugins import load_plugins
from megavq.store.model_dir import resolve_model_dir
from megavq.train.launch import resume_argv, single_process_env, user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed JSON config")
    p.add_argument("--config", default=None,
                   help="preset name or YAML/JSON path (default: tiny, or the config.json of --init_from)")
    p.add_argument("--data", default=None, help="'builtin', a directory made by scripts/prepare_data.py or "
                                                  "megatron:PREFIX (with data.tokenizer=MODEL), or a weighted "
                                                  "mixture DIR@0.7,DIR@0.3 (docs/mixtures.md)")
    p.add_argument("--out_dir", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", choices=("strict", "auto"), default=None,
                   help="`--resume`: continue from the newest checkpoint in out_dir (it must exist and be intact); "
                        "`--resume auto`: from the newest intact one, or start fresh when there is none")
    p.add_argument("--overwrite", action="store_true", help="delete the run in out_dir and start a fresh one")
    p.add_argument("--init_from", default=None, help="start from the weights of a model/checkpoint directory")
    p.add_argument("--plugin", action="append", default=[],
                   help="a .py file or module that registers routers or dispatchers (repeatable)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. moe.router=vq train.lr=1e-3")
    return p.parse_intermixed_args(resume_argv(sys.argv[1:]))


def main():
    args = parse_args()
    with user_errors():
        load_plugins(args.plugin)
        overrides = args.overrides + ([f"data.source={args.data}"] if args.data else [])
        config = args.config or (str(resolve_model_dir(args.init_from) / "config.json") if args.init_from else "tiny")
        cfg = load_config(config, overrides)
        out_dir = args.out_dir or f"runs/{Path(config).stem}"
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
