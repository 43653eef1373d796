"""Write the items of the lm-evaluation-harness task megavq_builtin_cloze (megavq/lm_eval_tasks) from the test
split of the builtin corpus (held out from training).

    python scripts/make_cloze_task.py [--source builtin] [--split test] [--n_items 300] [--seed 0] [--out FILE]

The builtin text changes a little between Python versions: the shipped file was made with the version named in
megavq/lm_eval_tasks/megavq_builtin_cloze/README.md.
"""
import argparse

from megavq.train.launch import user_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="builtin")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n_items", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: the shipped task's jsonl")
    args = p.parse_args()
    with user_errors():
        from megavq.data import read_corpus
        from megavq.eval.cloze import make_items, write_jsonl
        from megavq.lm_eval_tasks import TASKS_DIR
        texts = [piece.text for piece in read_corpus(args.source, args.split)]
        out = args.out or TASKS_DIR / "megavq_builtin_cloze" / "megavq_builtin_cloze.jsonl"
        items = make_items(texts, args.n_items, seed=args.seed)
        print(f"wrote {len(items)} items to {write_jsonl(items, out)}")


if __name__ == "__main__":
    main()
