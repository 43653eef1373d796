"""Does a balancing setting undo a skewed gate? Every top-k gate starts with expert 0's logit `--skew` above the
others (a learnable gate bias); the model trains on the builtin corpus (or --data) for --steps steps, and the largest
per-layer load_cv is printed every --every steps, with the first step from which its 10-step mean is below --limit.

    python scripts/balance_check.py moe.router_options.bias_rate=0.01 moe.aux_loss_coef=0
    python scripts/balance_check.py moe.aux_loss_coef=0                  # no balancing
"""
import argparse

from megavq.config import load_config
from megavq.data import TokenData, prepare_data
from megavq.tools.balance import first_below, load_cv_curve
from megavq.train.launch import user_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (preset tiny, data.micro_batch_size=8)")
    p.add_argument("--data", default="builtin")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skew", type=float, default=1.0)
    p.add_argument("--limit", type=float, default=0.2)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args()
    with user_errors():
        data = TokenData(prepare_data(args.data))
        cfg = load_config("tiny", ["data.micro_batch_size=8", f"model.vocab_size={data.vocab_size}", *args.overrides])
        curve = load_cv_curve(cfg, data, args.steps, args.skew)
    for step in range(args.every, args.steps + 1, args.every):
        print(f"step {step:4d}  load_cv {curve[step - 1]:.3f}")
    reached = first_below(curve, args.limit)
    print(f"10-step mean load_cv below {args.limit}: {'from step ' + str(reached) if reached else 'never'} "
          f"(last 10 steps: {sum(curve[-10:]) / 10:.3f})")


if __name__ == "__main__":
    main()
