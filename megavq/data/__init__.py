"""Data layer: corpus readers, SentencePiece tokenizers, tokenized data directories.

text source -> `read_corpus(source, split)` (documents) -> `encode_corpus` -> data dir
(`train.bin`, `val.bin`, `test.bin`, `meta.json`) -> `TokenData` (memory-mapped batches).
"""
from megavq.config import MegavqError


class DataError(MegavqError):
    """A missing, incomplete or corrupt data source or tokenized data directory."""


# The submodules import DataError from here, so it is defined before them.
from megavq.data.corpus import SPLITS, read_corpus  # noqa: E402
from megavq.data.dataset import TokenData, encode_corpus, prepare_data  # noqa: E402
from megavq.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

__all__ = ["DataError", "SPLITS", "read_corpus", "Tokenizer", "train_tokenizer", "TokenData", "encode_corpus",
           "prepare_data"]
