"""Plot training runs: train and validation loss of every run on one figure, and per-layer expert-load heatmaps
over training (from each run's metrics.jsonl).

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] [--out runs.png]
"""


import argparse

from megavq.train.launch import user_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default="runs.png", help="output PNG file")
    args = p.parse_args()
    with user_errors():
        from megavq.eval.plots import plot_runs
        print(f"wrote {plot_runs(args.runs, args.out)}")


if __name__ == "__main__":
    main()
