"""SentencePiece BPE tokenizers.

The text is kept exactly (identity normalisation, no whitespace folding, no dummy prefix) and unknown
characters fall back to their UTF-8 bytes, so decode(encode(text)) == text for any text and documents
encoded one by one concatenate into the tokens of their concatenation (up to merges across documents).
SentencePiece trains on lines, so no piece contains a newline; '\\n' is the byte piece <0x0A>.
Ids 0, 1, 2 are <unk>, <s>, </s>: text never encodes to them (the literal text "</s>" is bytes and pieces);
</s> (`eos_id`) is the end-of-document id that the encoder writes after each document, and decodes to "".

Encoding and training use `threads` threads, by default `os.cpu_count()`; the ids do not depend on it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from megavq.errors import DataError
from megavq.files import file_sha256

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
    minloglevel=2,
)


def resolve_threads(threads: int | None) -> int:
    """None -> os.cpu_count(); otherwise a count of at least 1."""
    if threads is None:
        return os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DataError(f"threads must be a whole number of at least 1, got {threads!r}")
    return threads


def training_lines(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        yield from doc.split("\n")


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_prefix: str | Path,
                    threads: int | None = None) -> Path:
    """Train a BPE model on `documents` (texts); writes MODEL_PREFIX.model and .vocab, returns the .model path.
    The model file records `threads` (so its bytes, not its pieces, depend on it)."""
    if vocab_size < 260:
        raise DataError(f"vocab_size {vocab_size} is too small: the 256 byte pieces and 3 specials need 259")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    lines = (line for line in training_lines(documents) if line)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=str(model_prefix),
                                       vocab_size=vocab_size, num_threads=resolve_threads(threads),
                                       **TRAINER_OPTIONS)
    except RuntimeError as e:  # sentencepiece reports bad input (no text, vocab too small) this way
        reason = str(e).split("] ")[-1].strip()  # drop its source location and failed check
        raise DataError(f"tokenizer training with vocab_size {vocab_size} failed: {reason}") from e
    return Path(f"{model_prefix}.model")


class Tokenizer:
    """A SentencePiece model file: encode/decode, vocab_size, eos_id and the sha256 of the file."""

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
    def eos_id(self) -> int:
        """The end-of-document id; raises for a model without one."""
        eos_id = self.sp.eos_id()
        if eos_id < 0:
            raise DataError(f"tokenizer model '{self.path}' has no end-of-document piece (eos_id -1)")
        return eos_id

    def encode(self, text: str) -> list:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list, threads: int | None = None) -> list:
        """The ids of each text, encoded on `threads` threads (default os.cpu_count())."""
        return self.sp.encode(texts, out_type=int, num_threads=resolve_threads(threads))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer('{self.path}', vocab_size={self.vocab_size})"
