"""Pre-train a megavq MoE language model with DeepSpeed.

    deepspeed scripts/pretrain.py --ds_config ds_configs/zero2.json [--config tiny] [--data builtin]
        [--out_dir runs/tiny] [--resume] [--init_from DIR] [key=value ...]
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not scripts/ (tokenize.py is there)

import argparse  # noqa: E402
import json  # noqa: E402

from megavq.config import load_config  # noqa: E402
from megavq.io import resolve_model_dir  # noqa: E402
from megavq.plugins import load_plugins  # noqa: E402
from megavq.train.launch import single_process_env, user_errors  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed JSON config")
    p.add_argument("--config", default=None,
                   help="preset name or YAML/JSON path (default: tiny, or the config.json of --init_from)")
    p.add_argument("--data", default=None, help="'builtin' or a directory made by scripts/tokenize.py")
    p.add_argument("--out_dir", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--init_from", default=None, help="start from the weights of a model/checkpoint directory")
    p.add_argument("--plugin", action="append", default=[],
                   help="a .py file or module that registers routers or dispatchers (repeatable)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. moe.router=vq train.lr=1e-3")
    return p.parse_intermixed_args()


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
        rank, _ = init_distributed()
        summary = run(cfg, args.ds_config, out_dir, resume=args.resume, init_from=args.init_from)
        if rank == 0:
            print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
