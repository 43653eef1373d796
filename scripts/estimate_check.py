"""Check scripts/estimate.py against measurement: real DeepSpeed engines on CPU gloo ranks.

    deepspeed --num_gpus 2 scripts/estimate_check.py [--cases "tiny zero2,lm1b_base zero3"] [--out rows.json]

For every case (megavq/tools/estimate_check.py: presets tiny and lm1b_base at vocabulary 8000 and micro-batch 4;
ZeRO 0/1/2/3; ep_size 1 and 2; fp32 and bf16; the native and deepspeed backends) each rank builds the
engine as the trainer does, trains two steps and measures
what it holds: parameters, fp32 master weights, AdamW states, gradients, DeepSpeed's reduce bucket, ZeRO-3's
gathered weights and the activations saved for the backward. Rank 0 prints a table (estimate, measured,
ratio) and exits with status 1 when a checked figure is more than 15% off.
"""
import argparse
import json
import sys
from pathlib import Path

from megavq.tools.estimate_check import CASES, compare, failures, table
from megavq.train.launch import single_process_env, user_errors

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args()
    with user_errors():
        names = args.cases.split(",") if args.cases else [c.name for c in CASES]
        cases = [c for c in CASES if c.name in names]
        if len(cases) != len(names):
            raise SystemExit(f"unknown case in {names} (cases: {[c.name for c in CASES]})")
        single_process_env()
        from megavq.train.engine import init_distributed
        rank, _ = init_distributed()
        rows = [row for case in cases for row in compare(case, ROOT / "ds_configs")]
        if rank == 0:
            print(table(rows))
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1))
            bad = failures(rows)
            print("\n".join(["", *bad]) if bad else "\nevery checked figure within 15%")
        if failures(rows):
            sys.exit(1)


if __name__ == "__main__":
    main()
