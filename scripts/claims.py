"""Measure one of the seed papers' headline claims at CPU scale: train, evaluate, print the paper's figure beside
ours with paired differences over seeds and a verdict.

    python scripts/claims.py NAME [--seeds 1,2] [--steps 300] [--data builtin|DIR] [--out_dir runs/claims]
        [--jobs 2] [--eval_batches 20] [--launcher python|deepspeed] [key=value ...]
    python scripts/claims.py --list

NAME: vqmoe-robustness, vqmoe-finetune, xmoe-consistency, compete, usmoe-budget, upcycling (--list says what each
measures). --data: builtin (offline) or a prepared data directory (scripts/prepare_data.py). key=value overrides
apply to every pre-training run. Finished runs of the same configuration are reused, across claims too. Writes
OUT_DIR/NAME.json and OUT_DIR/NAME.md; see docs/claims.md.
"""
import argparse
from pathlib import Path

from megavq.train.launch import user_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="the claim (--list names them)")
    p.add_argument("--list", action="store_true", help="name the claims, one line each")
    p.add_argument("--seeds", default=None, help="comma-separated train.seed values (default: the claim's)")
    p.add_argument("--steps", type=int, default=300, help="pre-training steps of each run")
    p.add_argument("--data", default="builtin", help="'builtin' or a prepared data directory")
    p.add_argument("--out_dir", default="runs/claims")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with cores // jobs threads")
    p.add_argument("--eval_batches", type=int, default=20, help="test batches of each evaluation")
    p.add_argument("--launcher", default="python", choices=["python", "deepspeed"])
    p.add_argument("overrides", nargs="*", help="key=value overrides of every pre-training run")
    args = p.parse_intermixed_args()
    from megavq.tools.claims import CLAIMS, Setup, markdown, run_claim
    from megavq.tools.compare import parse_seeds
    if args.list:
        for claim in CLAIMS.values():
            print(f"{claim.name:<18} {claim.line}")
        return
    if not args.name:
        p.error("give a claim's name, or --list")
    with user_errors():
        seeds = parse_seeds(args.seeds or (CLAIMS[args.name].seeds if args.name in CLAIMS else "1"))
        setup = Setup(seeds, args.steps, args.data, Path(args.out_dir), args.jobs, args.overrides,
                      args.eval_batches, args.launcher)
        print(markdown(run_claim(args.name, setup)))


if __name__ == "__main__":
    main()
