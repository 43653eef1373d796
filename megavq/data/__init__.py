"""Data layer: corpus readers, SentencePiece tokenizers, tokenized data directories.

text source -> `read_corpus(source, split)` (documents) -> `encode_corpus` -> data dir
(`train.bin`, `val.bin`, `test.bin`, `meta.json`) -> `TokenData` (memory-mapped batches).
"""
from megavq.data.corpus import SPLITS, read_corpus
from megavq.data.dataset import TokenData, encode_corpus, prepare_data
from megavq.data.tokenizer import Tokenizer, train_tokenizer
from megavq.errors import DataError

__all__ = ["DataError", "SPLITS", "read_corpus", "Tokenizer", "train_tokenizer", "TokenData", "encode_corpus",
           "prepare_data"]
