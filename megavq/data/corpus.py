"""Corpus readers: the documents (str) of the train, val and test splits of a text source.

Sources (`read_corpus(source, split)`):
  builtin            the English text of Python's `pydoc_data.topics` (about 466 KB, topics in name order;
                     the text changes a little between Python versions)
  PATH               a UTF-8 text file, or a folder of *.txt files (recursive, in path order)
  lm1b:PATH          the One Billion Word benchmark in its original layout under PATH:
                     train = training-monolingual.tokenized.shuffled/news.en-*-of-00100,
                     test = heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050 (the standard
                     test set), val = news.en.heldout-00001-of-00050 (the next held-out shard; not in train)
  hf:NAME[:CONFIG]   a Hugging Face dataset: a hub name (`datasets.load_dataset(NAME, CONFIG)`, e.g.
                     `hf:wikitext:wikitext-103-raw-v1`), or a local path to a dataset saved with `save_to_disk`,
                     to a data file (.json, .jsonl, .csv, .parquet, .txt) or to a folder of them.
                     Its train/validation/test splits are used when present; a missing val or test split is
                     carved out of train with the interleaved split below. Text comes from `text_column`.
                     lm1b by hub name (`hf:billion-word-benchmark/lm1b`, train and test only, so val is carved
                     from train) loads only from a hub copy in a data format such as Parquet, since `datasets`
                     4+ runs no loading scripts; `lm1b:PATH` works with the original files.

Every document ends with a newline (added where missing): it separates documents in the token stream
and counts in the bytes of a split.

Interleaved split (builtin, files, and HF datasets lacking val/test): the text is cut into blocks of about
BLOCK_CHARS characters at line (row) boundaries; block i goes to val if i % 20 == 18, to test if
i % 20 == 19, else to train. The blocks are the documents. Unlike holding out the tail, this spreads the
held-out text over an ordered corpus. It is deterministic.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

from megavq.errors import DataError

SPLITS = ("train", "val", "test")
BLOCK_CHARS = 2000
PERIOD = 20
HELDOUT_SLOT = {"val": 18, "test": 19}  # block index mod PERIOD
LM1B_TRAIN = "training-monolingual.tokenized.shuffled/news.en-*-of-00100"
LM1B_HELDOUT = "heldout-monolingual.tokenized.shuffled/news.en.heldout-{:05d}-of-00050"
LM1B_HELDOUT_SHARD = {"test": 0, "val": 1}
HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def read_corpus(source: str, split: str, text_column: str = "text") -> Iterator[str]:
    """Documents of one split of `source` (see the module docstring for the source strings)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if source == "builtin":
        return interleaved(lines_of(builtin_text()), split)
    if source.startswith("lm1b:"):
        return file_lines(lm1b_files(source[len("lm1b:"):], split))
    if source.startswith("hf:"):
        name, _, config = source[len("hf:"):].partition(":")
        return read_hf(name, config or None, split, text_column)
    if Path(source).exists():
        return interleaved(file_lines(text_files(Path(source))), split)
    raise DataError(f"text source {source!r} is not 'builtin', 'lm1b:PATH', 'hf:NAME[:CONFIG]' "
                    "nor an existing file or folder")


# ---- interleaved split ----------------------------------------------------------------------------------

def block_split(i: int, held_out: tuple = ("val", "test")) -> str:
    """The split of block i; slots of splits not in `held_out` stay in train."""
    return next((s for s in held_out if i % PERIOD == HELDOUT_SLOT[s]), "train")


def char_groups(texts: Iterable[str], min_chars: int) -> Iterator[list]:
    """Consecutive texts in groups of at least `min_chars` characters (the last group may be shorter)."""
    group, size = [], 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= min_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def blocks(units: Iterable[str], block_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """Join consecutive units (lines or rows) into blocks of at least `block_chars` characters."""
    return ("".join(group) for group in char_groups(units, block_chars))


def interleaved(units: Iterable[str], split: str, held_out: tuple = ("val", "test")) -> Iterator[str]:
    for i, block in enumerate(blocks(units)):
        if block_split(i, held_out) == split:
            yield block


# ---- builtin and text files -----------------------------------------------------------------------------

def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))


def builtin_sha256() -> str:
    """Digest of the builtin text, which depends on the Python version."""
    return hashlib.sha256(builtin_text().encode("utf-8")).hexdigest()


def lines_of(text: str) -> Iterator[str]:
    """Lines split at '\\n' only, each ending with '\\n'."""
    for line in io.StringIO(text, newline="\n"):
        yield line if line.endswith("\n") else line + "\n"


def text_files(path: Path) -> list:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"text folder '{path}' has no .txt files")
    return files


def file_lines(files: list) -> Iterator[str]:
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                yield from (line if line.endswith("\n") else line + "\n" for line in f)
        except UnicodeDecodeError as e:
            raise DataError(f"text file '{path}' is not UTF-8: {e}") from None


# ---- lm1b -----------------------------------------------------------------------------------------------

def lm1b_files(root: str, split: str) -> list:
    """Files of one split of the original lm1b layout; raises when there are none."""
    if split == "train":
        pattern = LM1B_TRAIN
        files = sorted(Path(root).glob(LM1B_TRAIN))
    else:
        pattern = LM1B_HELDOUT.format(LM1B_HELDOUT_SHARD[split])
        files = [p for p in [Path(root) / pattern] if p.is_file()]
    if not files:
        raise DataError(f"lm1b: no {split} file '{pattern}' under '{root}'")
    return files


# ---- Hugging Face datasets ------------------------------------------------------------------------------

def read_hf(name: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    own = hf_splits(load_hf(name, config), name)
    columns = own["train"].column_names
    if text_column not in columns:
        raise DataError(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(columns)})")
    missing = tuple(s for s in ("val", "test") if own[s] is None)
    if split in missing or (split == "train" and missing):
        return interleaved(hf_rows(own["train"], text_column), split, held_out=missing)
    return hf_rows(own[split], text_column)


def load_hf(name: str, config: str | None) -> dict:
    """{split name: datasets.Dataset} of a hub name, a saved dataset, a data file or a folder of them."""
    import datasets  # slow to import; only this source needs it

    path = Path(name).expanduser()
    if (path.is_absolute() or name.startswith((".", "~"))) and not path.exists():
        raise DataError(f"local dataset path '{name}' does not exist")
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix in HF_FILE_BUILDERS:
            data = datasets.load_dataset(HF_FILE_BUILDERS[path.suffix], data_files=str(path))
        elif path.is_dir():
            data = datasets.load_dataset(str(path), config)  # a folder of data files
        else:
            data = datasets.load_dataset(name, config)
    except Exception as e:  # hub, network and format errors of user input: one line for the user
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load Hugging Face dataset {name!r}: {type(e).__name__}: {first_line}") from e
    return dict(data) if isinstance(data, datasets.DatasetDict) else {"train": data}


def hf_splits(data: dict, name: str) -> dict:
    """Our split name -> the dataset's split (None where it has none)."""
    own = {s: next((data[n] for n in HF_SPLIT_NAMES[s] if n in data), None) for s in SPLITS}
    if own["train"] is None:
        raise DataError(f"dataset {name!r} has no train split (splits: {', '.join(sorted(data))})")
    return own


def hf_rows(dataset, text_column: str, batch_size: int = 1000) -> Iterator[str]:
    for batch in dataset.iter(batch_size=batch_size):
        for text in batch[text_column]:
            if text is not None:
                yield text if text.endswith("\n") else text + "\n"
