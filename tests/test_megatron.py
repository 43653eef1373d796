"""Megatron indexed datasets as a data source: the committed fixtures (one written by megatron-core's own
IndexedDatasetBuilder, one by megavq's writer) read back equal to the documents written."""
import json
import shutil

import numpy as np
import pytest
from conftest import ROOT

from megavq.data import DataError, TokenData, Tokenizer
from megavq.data.dataset import BUILTIN_TOKENIZER
from megavq.data.megatron import read_index, split_ranges, token_starts, write_megatron

FIXTURES = ROOT / "tests" / "fixtures" / "megatron"
SPLIT = "8,1,1"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUILTIN_TOKENIZER)


@pytest.fixture(scope="module")
def documents():
    return json.loads((FIXTURES / "documents.json").read_text())


def expected(documents, tok, by_line: bool) -> list:
    """Each document's ids and its end-of-document id: mcore encoded one sequence per line, megavq one per document."""
    return [sum((tok.encode(line) for line in doc), []) if by_line else tok.encode("".join(doc)) for doc in documents]


def read_back(data) -> list:
    """The documents of all splits, cut at doc_ends."""
    docs = []
    for split in ("train", "val", "test"):
        view, ends = data.split(split), data.doc_ends(split)
        docs += [view[a:b].tolist() for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
    return docs


@pytest.mark.parametrize("name,by_line", [("mcore", True), ("megavq", False)])
def test_fixture_reads_back_the_documents_written(name, by_line, documents, tok):
    data = TokenData(f"megatron:{FIXTURES / name}", tokenizer=BUILTIN_TOKENIZER, split=SPLIT)
    assert read_back(data) == [ids + [tok.eos_id] for ids in expected(documents, tok, by_line)]
    assert (data.vocab_size, data.eos_id) == (tok.vocab_size, tok.eos_id)
    assert [data.meta["splits"][s]["documents"] for s in ("train", "val", "test")] == [19, 3, 2]
    assert data.bytes_per_token("test") is None  # Megatron's files know no bytes: no bits per byte
    x_BS, y_BS = data.batch("train", step=3, batch_size=4, seq_len=16, seed=1)
    assert x_BS.shape == (4, 16) and bool((x_BS[:, 1:] == y_BS[:, :-1]).all())


def test_random_reads_equal_the_concatenated_documents(documents, tok):
    """Reads of the view that appends EOS (mcore, no --append-eod) against the concatenation."""
    data = TokenData(f"megatron:{FIXTURES / 'mcore'}", tokenizer=BUILTIN_TOKENIZER, split=SPLIT)
    view = data.split("train")
    reference = np.concatenate([ids + [tok.eos_id] for ids in expected(documents, tok, True)[:19]])
    assert len(view) == len(reference)
    idx = np.random.default_rng(0).integers(0, len(view), size=(5, 9))
    assert np.array_equal(view[idx], reference[idx])
    assert np.array_equal(view[7:150], reference[7:150]) and view[3:3].size == 0


def test_writer_matches_megatron_core_byte_for_byte(documents, tok, tmp_path):
    """The same sequences written by megavq's writer give megatron-core's files."""
    write_megatron(tmp_path / "same", [[tok.encode(line) for line in doc] for doc in documents], tok.vocab_size)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"same{suffix}").read_bytes() == (FIXTURES / f"mcore{suffix}").read_bytes()


def test_large_vocabulary_writes_int32_and_reads_back(tmp_path):
    docs = [[[70000, 5, 65999]], [[1, 2], [3]], [[2]]]
    write_megatron(tmp_path / "big", docs, vocab_size=70001)
    assert (tmp_path / "big.idx").read_bytes()[17] == 4  # dtype code int32
    index = read_index(tmp_path / "big.idx")
    starts = token_starts(index, tmp_path / "big.idx")
    assert starts.tolist() == [0, 3, 6, 7] and index["dtype"] == np.int32


def test_split_ranges_follow_megatron():
    assert split_ranges("969,30,1", 1000) == {"train": (0, 969), "val": (969, 999), "test": (999, 1000)}
    assert split_ranges("8,1,1", 24) == {"train": (0, 19), "val": (19, 22), "test": (22, 24)}
    assert split_ranges("1", 5) == {"train": (0, 5), "val": (5, 5), "test": (5, 5)}


@pytest.mark.parametrize("kwargs,message", [
    ({}, "with no documents"),  # the default 969,30,1 leaves 24 documents no test split
    ({"split": SPLIT, "append_eos": False}, "without --append-eod"),
    ({"split": "8,x"}, "data.split '8,x'"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        TokenData(f"megatron:{FIXTURES / 'mcore'}", tokenizer=BUILTIN_TOKENIZER, **kwargs)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="needs the SentencePiece model"):
        TokenData(f"megatron:{FIXTURES / 'mcore'}")
    for suffix in (".bin", ".idx"):
        shutil.copyfile(FIXTURES / f"mcore{suffix}", tmp_path / f"m{suffix}")
    with open(tmp_path / "m.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"m\.bin' has 100 bytes"):
        TokenData(f"megatron:{tmp_path / 'm'}", tokenizer=BUILTIN_TOKENIZER, split=SPLIT)
    (tmp_path / "m.idx").write_bytes(b"NOTANIDX" + bytes(40))
    with pytest.raises(DataError, match="not a Megatron index"):
        TokenData(f"megatron:{tmp_path / 'm'}", tokenizer=BUILTIN_TOKENIZER, split=SPLIT)
    with pytest.raises(DataError, match="does not exist"):
        TokenData(f"megatron:{tmp_path / 'none'}", tokenizer=BUILTIN_TOKENIZER, split=SPLIT)
