"""A fine-tuning task's data: rows of text (and labels) read with `datasets.load_dataset`, tokenized, split, batched.

Legend: B rows, S the longest row of a micro-batch (at most model.seq_len).
Rows are right-padded to the longest row of their micro-batch; a pad holds the id -1 (`real_BS = idx_BS >= 0`).
Classification: x (B, S) token ids, y (B,) labels. Causal LM: each text's ids and an end-of-document id, x and y
the row shifted by one, y -1 at pads (no loss). The rows of step s are a pure function of (seed, s): epochs are
seeded permutations of the training rows, so any number of ranks and a resumed run see the same rows.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megavq.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
VAL_SPLITS = ("validation", "val", "dev")


def split_files(path: Path) -> dict:
    """{split: file} of a folder holding train.EXT and perhaps validation.EXT (EXT: jsonl, json, csv, parquet)."""
    files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in BUILDERS and p.stem in ("train", *VAL_SPLITS)}
    if "train" not in files or len({p.suffix for p in files.values()}) > 1:
        raise DataError(f"fine-tuning data folder {path} needs a train file (and perhaps a validation one) of one "
                        f"format: {', '.join(f'train{s}' for s in BUILDERS)}")
    return files


def read_splits(source: str) -> dict:
    """{split name: datasets.Dataset} of a local file, a folder of split files (split_files) or a dataset name."""
    import datasets
    path = Path(source)
    try:
        if path.suffix in BUILDERS:
            if not path.is_file():
                raise DataError(f"fine-tuning data {source} does not exist")
            return dict(datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path)))
        if path.is_dir():
            files = split_files(path)
            builder = BUILDERS[next(iter(files.values())).suffix]
            return dict(datasets.load_dataset(builder, data_files={k: str(p) for k, p in files.items()}))
        return dict(datasets.load_dataset(source))
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"cannot read fine-tuning data {source}: {str(e).splitlines()[0]}") from None


def train_val(splits: dict, source: str, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train rows, validation rows); without a validation split, a seeded val_fraction of the training rows."""
    if "train" not in splits:
        raise DataError(f"fine-tuning data {source} has no train split (it has {', '.join(splits)})")
    train = splits["train"].to_list()
    val = next((splits[name].to_list() for name in VAL_SPLITS if name in splits), None)
    if val is not None:
        return train, val
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(train) * val_fraction))
    return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]


def column(rows: list, name: str, source: str) -> list:
    if rows and name not in rows[0]:
        raise DataError(f"fine-tuning data {source} has no column {name!r} (its columns: {', '.join(rows[0])})")
    return [row[name] for row in rows]


def label_names(labels: list) -> list:
    """The classes, in label order: 0..max for integer labels, sorted names for strings."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted({str(v) for v in labels})


class TaskData:
    """The tokenized rows of a task's train and validation splits."""

    def __init__(self, task: str, rows: dict, classes: list):
        self.task, self.rows, self.classes = task, rows, classes
        self.perms = {}  # the current epoch's permutation of the training rows

    @classmethod
    def open(cls, cfg, tokenizer, seed: int) -> "TaskData":
        """The task of cfg.finetune, tokenized with `tokenizer` (encode, eos_id), rows cut at cfg.model.seq_len."""
        f = cfg.finetune
        train, val = train_val(read_splits(f.data), f.data, f.val_fraction, seed)
        classes = label_names(column(train + val, f.label_column, f.data)) if f.task == "classify" else []
        rows = {}
        for split, part in (("train", train), ("val", val)):
            texts = [str(t) for t in column(part, f.text_column, f.data)]
            ids = [tokenizer.encode(t) for t in texts]
            if f.task == "classify":
                index = {c: i for i, c in enumerate(classes)}
                rows[split] = [(x[:cfg.model.seq_len], index[str(y)])
                               for x, y in zip(ids, column(part, f.label_column, f.data)) if x]
            else:
                rows[split] = [(x + [tokenizer.eos_id])[:cfg.model.seq_len + 1] for x in ids if x]
            if not rows[split]:
                raise DataError(f"fine-tuning data {f.data} has no {split} row with text in {f.text_column!r}")
        return cls(f.task, rows, classes)

    def __len__(self) -> int:
        return len(self.rows["train"])

    def batch_rows(self, step: int, global_batch: int, seed: int, rows: slice) -> list[int]:
        """Indices of this rank's rows of step `step`'s global batch: consecutive slices of seeded epoch permutations."""
        n, first = len(self), step * global_batch
        out = []
        for i in range(first + rows.start, first + rows.stop):
            epoch, at = divmod(i, n)
            out.append(self.permutation(epoch, seed)[at])
        return out

    def permutation(self, epoch: int, seed: int) -> list[int]:
        if epoch not in self.perms:
            generator = torch.Generator().manual_seed(seed * 1000 + epoch)
            self.perms = {epoch: torch.randperm(len(self), generator=generator).tolist()}
        return self.perms[epoch]

    def batch(self, step: int, global_batch: int, seed: int, rows: slice) -> tuple[torch.Tensor, ...]:
        return self.collate([self.rows["train"][i] for i in self.batch_rows(step, global_batch, seed, rows)])

    def eval_batches(self, micro: int):
        """The validation rows in order, micro rows at a time."""
        val = self.rows["val"]
        for i in range(0, len(val), micro):
            yield self.collate(val[i:i + micro])

    def collate(self, rows: list) -> tuple[torch.Tensor, ...]:
        """(x, y, real_BS) of classification rows, or of causal-LM rows."""
        if self.task == "classify":
            idx_BS = pad([x for x, _ in rows])
            return idx_BS.clamp(min=0), torch.tensor([y for _, y in rows]), idx_BS >= 0
        ids_BS = pad(rows)
        x_BS, y_BS = ids_BS[:, :-1], ids_BS[:, 1:]
        return x_BS.clamp(min=0), y_BS, x_BS >= 0


def pad(rows: list) -> torch.Tensor:
    """Rows of ids right-padded with -1 to the longest."""
    out = torch.full((len(rows), max(len(r) for r in rows)), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
