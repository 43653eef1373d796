"""Train each router with the same preset, data, seed and step budget; print a comparison table.

    python scripts/compare_routers.py [--routers topk,xmoe,compete,vq] [--config tiny] [--data builtin]
        [--ds_config ds_configs/zero2.json] [--out_dir runs/compare] [key=value ...]

Writes OUT_DIR/compare.md and OUT_DIR/compare.json; each router's run directory is OUT_DIR/<router>.
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not scripts/ (tokenize.py is there)

import argparse  # noqa: E402

from megavq.errors import ConfigError  # noqa: E402
from megavq.config import load_config  # noqa: E402
from megavq.moe.routers import router_class  # noqa: E402
from megavq.train.compare import compare, markdown_table  # noqa: E402
from megavq.train.launch import free_port, user_errors  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", default="topk,xmoe,compete,vq", help="comma-separated router names")
    p.add_argument("--config", default="tiny")
    p.add_argument("--data", default="builtin")
    p.add_argument("--ds_config", default="ds_configs/zero2.json")
    p.add_argument("--out_dir", default="runs/compare")
    p.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "python"])
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = p.parse_intermixed_args()
    with user_errors():
        routers = args.routers.split(",")
        for name in routers:
            if not router_class(name).causal:
                raise ConfigError(f"router '{name}' is not causal; the comparison trains causal language models")
            load_config(args.config, args.overrides + [f"moe.router={name}"])  # fail fast on bad overrides
        launcher = ["deepspeed", "--master_port", str(free_port())] if args.launcher == "deepspeed" else [sys.executable]
        run_args = ["--ds_config", args.ds_config, "--config", args.config, "--data", args.data, *args.overrides]
        rows = compare(routers, Path(args.out_dir), launcher, run_args)
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
