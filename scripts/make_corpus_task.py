"""Write the classification task "which corpus does this passage come from": passages of each corpus (builtin, a
folder of .txt files, any source scripts/prepare_data.py reads), labelled with the corpus's name, as
train.jsonl and validation.jsonl (text, label) for scripts/finetune.py; --baselines also prints the majority class
and a bag-of-words logistic regression (scikit-learn) on the same split.

    python scripts/make_corpus_task.py --corpus builtin --corpus data/linux-docs --out_dir data/corpus-task
        [--passage_chars 400] [--per_corpus 500] [--val_fraction 0.2] [--seed 0] [--baselines]

Passages are consecutive runs of words of the corpus's training split (whitespace collapsed, so that layout is no
clue), cut at about passage_chars characters; per_corpus of them are drawn from each corpus (seeded).
"""
import argparse
import json
import random
from pathlib import Path

from megavq.train.launch import user_errors


def passages(source: str, chars: int) -> list[str]:
    """The corpus's training text cut into runs of words of about `chars` characters."""
    from megavq.data import read_corpus
    out, words, size = [], [], 0
    for piece in read_corpus(source, "train"):
        for word in piece.text.split():
            words.append(word)
            size += len(word) + 1
            if size >= chars:
                out.append(" ".join(words))
                words, size = [], 0
    return out


def make_rows(corpora: list[str], chars: int, per_corpus: int, seed: int) -> list[dict]:
    from megavq.errors import DataError
    rng, rows = random.Random(seed), []
    for source in corpora:
        found = passages(source, chars)
        if len(found) < per_corpus:
            raise DataError(f"corpus {source} has {len(found)} passages of {chars} characters, fewer than "
                            f"--per_corpus {per_corpus}")
        rows += [{"text": text, "label": Path(source).name} for text in rng.sample(found, per_corpus)]
    rng.shuffle(rows)
    return rows


def baselines(train: list[dict], val: list[dict]) -> dict:
    """Accuracy and macro-F1 on the validation rows of the majority class and of a bag-of-words logistic regression."""
    from collections import Counter

    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    gold = [r["label"] for r in val]
    majority = [Counter(r["label"] for r in train).most_common(1)[0][0]] * len(val)
    words = CountVectorizer()
    fit = LogisticRegression(max_iter=1000).fit(words.fit_transform([r["text"] for r in train]),
                                                [r["label"] for r in train])
    bow = fit.predict(words.transform([r["text"] for r in val])).tolist()
    return {name: {"accuracy": accuracy_score(gold, pred), "macro_f1": f1_score(gold, pred, average="macro")}
            for name, pred in (("majority", majority), ("bag_of_words_logreg", bow))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", action="append", required=True, help="a corpus (repeat: one class each)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--passage_chars", type=int, default=400)
    p.add_argument("--per_corpus", type=int, default=500)
    p.add_argument("--val_fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baselines", action="store_true", help="print the majority and bag-of-words baselines")
    args = p.parse_args()
    with user_errors():
        rows = make_rows(args.corpus, args.passage_chars, args.per_corpus, args.seed)
        n_val = round(len(rows) * args.val_fraction)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, part in (("validation", rows[:n_val]), ("train", rows[n_val:])):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {len(rows) - n_val} training and {n_val} validation passages to {out}")
        if args.baselines:
            print(json.dumps(baselines(rows[n_val:], rows[:n_val]), indent=2))


if __name__ == "__main__":
    main()
