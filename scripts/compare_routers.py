"""Train each router with the same preset, data, step budget and seeds; print a comparison table.

    python scripts/compare_routers.py [--routers topk,xmoe,compete,vq] [--seeds 1,2,3] [--config tiny]
        [--data builtin] [--ds_config ds_configs/zero2.json] [--out_dir runs/compare] [--jobs 1] [key=value ...]

--routers: NAME[:OPTION=VALUE...][@SEED[+SEED...]], comma-separated, e.g. `topk,usmoe:selection=token,
vq:continuous=xmoe,xmoe@1`: options for that router only, @ for a subset of --seeds. The baseline is the default
router (moe.router's default); it runs at every seed. key=value overrides apply to every run.
--jobs N: N runs at once, each with its share of the cores (OMP_NUM_THREADS = cores // N) and its own master port,
its output in OUT_DIR/logs/ (tokens/s then compare the runs of one invocation only).
Writes OUT_DIR/compare.md and OUT_DIR/compare.json; each run's directory is OUT_DIR/<router>/seed<S>.
"""
import argparse
from pathlib import Path

from megavq.tools.compare import check_entries, compare, markdown_table, parse_entries, parse_seeds
from megavq.train.launch import user_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", default="topk,xmoe,compete,vq", help="comma-separated NAME[:OPTION=VALUE...][@SEEDS]")
    p.add_argument("--seeds", default="", help="comma-separated train.seed values (default: the config's seed)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--data", default="builtin")
    p.add_argument("--ds_config", default="ds_configs/zero2.json")
    p.add_argument("--out_dir", default="runs/compare")
    p.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "python"])
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores // jobs threads")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = p.parse_intermixed_args()
    with user_errors():
        seeds = parse_seeds(args.seeds)
        entries = parse_entries(args.routers, seeds)
        check_entries(entries, seeds, args.config, args.data, args.overrides)  # fail fast on bad options
        common = {"config": args.config, "data": args.data, "ds_config": args.ds_config, "overrides": args.overrides,
                  "launcher": args.launcher}
        rows = compare(entries, seeds, Path(args.out_dir), common, args.jobs)
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
