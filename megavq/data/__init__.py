"""Data layer: corpus readers, SentencePiece tokenizers, tokenized data directories.

text source -> `read_corpus(source, split)` (pieces of documents) -> `encode_store` (megavq.data.encode: shards
in worker processes, format 3; megavq.data.store reads them) or `encode_corpus` (`train.bin`, `val.bin`,
`test.bin`, format 2) -> `TokenData` (memory-mapped batches), which also opens Megatron indexed datasets
("megatron:PREFIX", megavq.data.megatron).

Documents are real ones (a text file, a builtin topic, an lm1b sentence, a dataset row) and each is followed
in the token stream by the end-of-document id (EOS, `meta.json` "eos_id", `TokenData.eos_id`; 2 = `</s>`).
Bits per byte (loss x tokens / (bytes x ln 2)) count the loss on EOS tokens over the bytes of the text:
EOS tokens add loss but no bytes. Format-1 directories (no EOS) still load, with a warning.

Tokenizer training and encoding use `threads` threads, by default `os.cpu_count()`.
"""
from megavq.data.corpus import SPLITS, Piece, read_corpus
from megavq.data.dataset import TokenData, data_options, encode_corpus, prepare_data
from megavq.data.tokenizer import Tokenizer, train_tokenizer
from megavq.errors import DataError

__all__ = ["DataError", "SPLITS", "Piece", "read_corpus", "Tokenizer", "train_tokenizer", "TokenData", "data_options",
           "encode_corpus", "prepare_data"]
