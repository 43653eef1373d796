"""SentencePiece BPE tokenizers.

The text is kept exactly (identity normalisation, no whitespace folding, no dummy prefix) and unknown
characters fall back to their UTF-8 bytes, so decode(encode(text)) == text for any text and documents
encoded one by one concatenate into the tokens of their concatenation (up to merges across documents).
SentencePiece trains on lines, so no piece contains a newline; '\\n' is the byte piece <0x0A>.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from megavq.errors import DataError

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=0.9995,  # rarer characters become bytes
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) as one piece
    hard_vocab_limit=False,  # a small corpus may yield fewer pieces than asked for
    input_sentence_size=2_000_000,  # sample of lines used by the trainer on large corpora
    shuffle_input_sentence=True,
    num_threads=2,
    minloglevel=2,
)


def training_lines(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        yield from doc.split("\n")


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_prefix: str | Path) -> Path:
    """Train a BPE model on `documents`; writes MODEL_PREFIX.model and .vocab, returns the .model path."""
    if vocab_size < 260:
        raise DataError(f"vocab_size {vocab_size} is too small: the 256 byte pieces and 3 specials need 259")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    lines = (line for line in training_lines(documents) if line)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=str(model_prefix),
                                       vocab_size=vocab_size, **TRAINER_OPTIONS)
    except RuntimeError as e:  # sentencepiece reports bad input (no text, vocab too small) this way
        reason = str(e).split("] ")[-1].strip()  # drop its source location and failed check
        raise DataError(f"tokenizer training with vocab_size {vocab_size} failed: {reason}") from e
    return Path(f"{model_prefix}.model")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Tokenizer:
    """A SentencePiece model file: encode/decode, vocab_size and the sha256 of the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model '{self.path}' does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError:
            raise DataError(f"'{self.path}' is not a SentencePiece model") from None
        self.sha256 = file_sha256(self.path)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eos_id(self) -> int | None:
        """The end-of-document id (2 in the models megavq trains), or None when the model has none."""
        i = self.sp.eos_id()
        return None if i < 0 else i

    def encode(self, text: str) -> list:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list, num_threads: int = 2) -> list:
        return self.sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer('{self.path}', vocab_size={self.vocab_size})"
