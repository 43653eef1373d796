"""Corpus readers: the text of the train, val and test splits of a text source, as documents.

Sources (`read_corpus(source, split)`):
  builtin            the English text of Python's `pydoc_data.topics` (about 466 KB; each topic is one document,
                     topics in name order; the text changes a little between Python versions)
  PATH               a UTF-8 text file, or a folder of *.txt files (recursive, in path order); each file is one
                     document
  lm1b:PATH          the One Billion Word benchmark in its original layout under PATH, one document per line:
                     train = training-monolingual.tokenized.shuffled/news.en-*-of-00100,
                     test = heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050 (the standard
                     test set), val = news.en.heldout-00001-of-00050 (the next held-out shard; not in train)
  hf:NAME[:CONFIG]   a Hugging Face dataset, one document per row, streamed (`datasets.load_dataset(...,
                     streaming=True)`, nothing is downloaded or converted up front): a hub name (e.g.
                     `hf:wikitext:wikitext-103-raw-v1`), a local data file (.json, .jsonl, .csv, .parquet, .txt)
                     or a folder of them, or a dataset saved with `save_to_disk` (its Arrow files are
                     memory-mapped and read row by row through `to_iterable_dataset`).
                     Its train/validation/test splits are used when present; a missing val or test split is
                     carved out of train with the interleaved split below. Text comes from `text_column`.
                     lm1b by hub name (`hf:billion-word-benchmark/lm1b`, train and test only, so val is carved
                     from train) loads only from a hub copy in a data format such as Parquet, since `datasets`
                     4+ runs no loading scripts; `lm1b:PATH` works with the original files.

A split is a stream of `Piece(text, eos)`: consecutive text of one document, with eos=True where the document
ends (the encoder writes the end-of-document id there). Every document ends with a newline (added where
missing), which counts in the bytes of a split; empty documents (an empty file, row or lm1b line) are skipped.

Interleaved split (builtin, files, and HF datasets lacking val/test): the text, documents one after another,
is cut into blocks of about BLOCK_CHARS characters at line boundaries; block i goes to val if i % 20 == 18, to
test if i % 20 == 19, else to train. Unlike holding out the tail, this spreads the held-out text over an
ordered corpus, and it is deterministic. Blocks ignore document boundaries: a block that ends inside a
document yields a piece with eos=False, and a document spanning blocks gets its eos where it really ends,
in whichever split that block falls.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

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


class Piece(NamedTuple):
    """Consecutive text of one document; eos: the document ends with this piece."""
    text: str
    eos: bool


def read_corpus(source: str, split: str, text_column: str = "text") -> Iterator[Piece]:
    """The pieces of one split of `source` (see the module docstring for the source strings)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if source == "builtin":
        return interleaved(builtin_documents(), split)
    if source.startswith("lm1b:"):
        return lm1b_documents(lm1b_files(source[len("lm1b:"):], split))
    if source.startswith("hf:"):
        name, _, config = source[len("hf:"):].partition(":")
        return read_hf(name, config or None, split, text_column)
    if Path(source).exists():
        return interleaved(file_documents(text_files(Path(source))), split)
    raise DataError(f"text source {source!r} is not 'builtin', 'lm1b:PATH', 'hf:NAME[:CONFIG]' "
                    "nor an existing file or folder")


def with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


# ---- interleaved split ----------------------------------------------------------------------------------

def block_split(i: int, held_out: tuple = ("val", "test")) -> str:
    """The split of block i; slots of splits not in `held_out` stay in train."""
    return next((s for s in held_out if i % PERIOD == HELDOUT_SLOT[s]), "train")


def char_groups(pieces: Iterable[Piece], min_chars: int) -> Iterator[list]:
    """Consecutive pieces in groups of at least `min_chars` characters (the last group may be shorter)."""
    group, size = [], 0
    for piece in pieces:
        group.append(piece)
        size += len(piece.text)
        if size >= min_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def lines_of(text: str) -> Iterator[str]:
    """Lines split at '\\n' only, each ending with '\\n'."""
    for line in io.StringIO(text, newline="\n"):
        yield with_newline(line)


def piece_lines(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """The pieces cut into lines; the last line of a piece keeps its eos."""
    for piece in pieces:
        lines = list(lines_of(piece.text))
        yield from (Piece(line, False) for line in lines[:-1])
        yield Piece(lines[-1], piece.eos)


def blocks(pieces: Iterable[Piece], block_chars: int = BLOCK_CHARS) -> Iterator[list]:
    """The lines of the pieces in blocks (lists of line pieces) of at least `block_chars` characters."""
    return char_groups(piece_lines(pieces), block_chars)


def joined(block: list) -> Iterator[Piece]:
    """A block's lines joined into one piece per document (part) in it."""
    texts = []
    for line in block:
        texts.append(line.text)
        if line.eos:
            yield Piece("".join(texts), True)
            texts = []
    if texts:
        yield Piece("".join(texts), False)  # the document goes on in the next block


def interleaved(pieces: Iterable[Piece], split: str, held_out: tuple = ("val", "test")) -> Iterator[Piece]:
    for i, block in enumerate(blocks(pieces)):
        if block_split(i, held_out) == split:
            yield from joined(block)


# ---- builtin and text files -----------------------------------------------------------------------------

def builtin_topics() -> list:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def builtin_documents() -> Iterator[Piece]:
    return (Piece(with_newline(topic), True) for topic in builtin_topics() if topic)


def builtin_text() -> str:
    """The builtin documents one after another."""
    return "".join(piece.text for piece in builtin_documents())


def builtin_sha256() -> str:
    """Digest of the builtin text, which depends on the Python version."""
    return hashlib.sha256(builtin_text().encode("utf-8")).hexdigest()


def text_files(path: Path) -> list:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"text folder '{path}' has no .txt files")
    return files


def file_lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from (with_newline(line) for line in f)
    except UnicodeDecodeError as e:
        raise DataError(f"text file '{path}' is not UTF-8: {e}") from None


def last_marked(lines: Iterable[str]) -> Iterator[Piece]:
    """The lines of one document as pieces, eos on the last one (none for no lines)."""
    previous = None
    for line in lines:
        if previous is not None:
            yield Piece(previous, False)
        previous = line
    if previous is not None:
        yield Piece(previous, True)


def file_documents(files: list) -> Iterator[Piece]:
    """Each file is one document, read line by line."""
    for path in files:
        yield from last_marked(file_lines(path))


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


def lm1b_documents(files: list) -> Iterator[Piece]:
    """Each line (a sentence) is one document."""
    for path in files:
        yield from (Piece(line, True) for line in file_lines(path) if line != "\n")


# ---- Hugging Face datasets ------------------------------------------------------------------------------

def read_hf(name: str, config: str | None, split: str, text_column: str) -> Iterator[Piece]:
    own = hf_splits(load_hf_dataset(name, config), name)
    columns = hf_columns(own["train"])
    if text_column not in columns:
        raise DataError(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(columns)})")
    missing = tuple(s for s in ("val", "test") if own[s] is None)
    if split in missing or (split == "train" and missing):
        return interleaved(hf_rows(own["train"], text_column), split, held_out=missing)
    return hf_rows(own[split], text_column)


def load_hf_dataset(name: str, config: str | None) -> dict:
    """{split name: datasets.IterableDataset} of a hub name, a saved dataset, a data file or a folder of them."""
    import datasets  # slow to import; only this source needs it

    path = Path(name).expanduser()
    if (path.is_absolute() or name.startswith((".", "~"))) and not path.exists():
        raise DataError(f"local dataset path '{name}' does not exist")
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = streamed(datasets.load_from_disk(str(path)))  # memory-mapped Arrow files, read row by row
        elif path.is_file() and path.suffix in HF_FILE_BUILDERS:
            data = datasets.load_dataset(HF_FILE_BUILDERS[path.suffix], data_files=str(path), streaming=True)
        elif path.is_dir():
            data = datasets.load_dataset(str(path), config, streaming=True)  # a folder of data files
        else:
            data = datasets.load_dataset(name, config, streaming=True)
    except Exception as e:  # hub, network and format errors of user input: one line for the user
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load Hugging Face dataset {name!r}: {type(e).__name__}: {first_line}") from e
    return dict(data) if isinstance(data, dict) else {"train": data}


def streamed(data):
    """A saved Dataset or DatasetDict as IterableDataset(s) over the same memory-mapped files."""
    if isinstance(data, dict):
        return {split: dataset.to_iterable_dataset() for split, dataset in data.items()}
    return data.to_iterable_dataset()


def hf_splits(data: dict, name: str) -> dict:
    """Our split name -> the dataset's split (None where it has none)."""
    own = {s: next((data[n] for n in HF_SPLIT_NAMES[s] if n in data), None) for s in SPLITS}
    if own["train"] is None:
        raise DataError(f"dataset {name!r} has no train split (splits: {', '.join(sorted(data))})")
    return own


def hf_columns(dataset) -> list:
    """Column names of a dataset; a streamed one of unknown features shows them in its first row."""
    if dataset.column_names is not None:
        return dataset.column_names
    return list(next(iter(dataset), {}))


def hf_rows(dataset, text_column: str, batch_size: int = 1000) -> Iterator[Piece]:
    """Each non-empty row is one document."""
    for batch in dataset.select_columns([text_column]).iter(batch_size=batch_size):
        for text in batch[text_column]:
            if text is not None and not isinstance(text, str):
                raise DataError(f"column {text_column!r} holds {type(text).__name__} values, not text")
            if text:
                yield Piece(with_newline(text), True)
