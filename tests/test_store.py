"""Sharded token stores (data format 3): the same tokens, documents and bytes as format 2, shard boundaries
that do not depend on the worker count, resuming, and corrupt or missing shards."""
import importlib.util

import numpy as np
import pytest
from conftest import ROOT

from megavq.data import DataError, TokenData, encode_corpus
from megavq.data.corpus import SPLITS, builtin_topics
from megavq.data.dataset import BUILTIN_TOKENIZER, META
from megavq.data.encode import encode_store
from megavq.data.store import verify_store

SHARD_CHARS = 6000


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A folder of 40 text files (documents), about 80 KB."""
    root = tmp_path_factory.mktemp("texts")
    for i, topic in enumerate(builtin_topics()[:40]):
        (root / f"{i:03d}.txt").write_text(topic[:4000], encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def stores(text_dir, tmp_path_factory):
    """The same text as format 2, and as format 3 with 2 workers and with 1."""
    root = tmp_path_factory.mktemp("stores")
    two = encode_store(str(text_dir), root / "two", BUILTIN_TOKENIZER, workers=2, shard_chars=SHARD_CHARS)
    one = encode_store(str(text_dir), root / "one", BUILTIN_TOKENIZER, workers=1, shard_chars=SHARD_CHARS)
    flat = encode_corpus(str(text_dir), root / "flat", BUILTIN_TOKENIZER, threads=1)
    return {"two": two, "one": one, "flat": flat}


def shard_files(path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix in (".bin", ".ends")}


def test_store_holds_the_tokens_documents_and_bytes_of_format_2(stores):
    sharded, flat = TokenData(stores["two"]), TokenData(stores["flat"])
    assert sharded.meta["format_version"] == 3 and len(sharded.meta["splits"]["train"]["shards"]) > 3
    for split in SPLITS:
        view, reference = sharded.split(split), np.asarray(flat.split(split))
        assert len(view) == len(reference) and np.array_equal(view[0:len(view)], reference)
        assert np.array_equal(sharded.doc_ends(split), flat.doc_ends(split))  # .ends files vs the EOS ids
        assert sharded.bytes_per_token(split) == flat.bytes_per_token(split)
        idx = np.random.default_rng(1).integers(0, len(view), size=(4, 33))  # reads across shard boundaries
        assert np.array_equal(view[idx], reference[idx])
        assert np.array_equal(view[5000:5000 + 20000], reference[5000:25000])
    assert len(flat.doc_ends("train")) > 30 and flat.doc_ends("train")[-1] == flat.tokens("train")
    for a, b in zip(sharded.eval_batches("val", 4, 16, 3), flat.eval_batches("val", 4, 16, 3)):
        assert all(bool((x == y).all()) for x, y in zip(a, b))
    assert all(bool((x == y).all()) for x, y in zip(sharded.batch("train", 7, 8, 16), flat.batch("train", 7, 8, 16)))


def test_shards_do_not_depend_on_the_worker_count(stores):
    assert shard_files(stores["one"]) == shard_files(stores["two"])


def test_a_rerun_keeps_finished_shards_and_encodes_the_rest(stores, text_dir):
    out = stores["two"]
    expected, before = shard_files(out), {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    (out / META).unlink()  # as an interrupted encoding leaves it: a shard without its record, a temp file
    (out / "train-00001.json").unlink()
    (out / "train-00002.bin").write_bytes(b"junk")  # a corrupt shard is encoded again
    (out / "train-00003.bin.tmp").write_bytes(b"half")
    encode_store(str(text_dir), out, BUILTIN_TOKENIZER, workers=2, shard_chars=SHARD_CHARS)
    assert shard_files(out) == expected
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert [n for n in before if after[n] != before[n]] == ["train-00001.bin", "train-00002.bin"]
    assert verify_store(out, TokenData(out).meta) == 2 * len(expected) // 2


def test_a_trained_tokenizer_is_reused_on_resume(text_dir, tmp_path):
    out = encode_store(str(text_dir), tmp_path / "s", vocab_size=400, workers=1, shard_chars=SHARD_CHARS)
    sha = TokenData(out).meta["tokenizer_sha256"]
    (out / META).unlink()
    encode_store(str(text_dir), out, vocab_size=400, workers=1, shard_chars=SHARD_CHARS)
    assert TokenData(out).meta["tokenizer_sha256"] == sha


@pytest.fixture(scope="module")
def prepare_main():
    """scripts/prepare_data.py's main, run in this process (a subprocess would spend seconds importing)."""
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def prepare(prepare_main, capsys):
    def run(*args):
        code = prepare_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_a_missing_or_corrupt_shard_is_one_line(stores, tmp_path, prepare):
    out = tmp_path / "copy"
    out.mkdir()
    for p in stores["one"].iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    code, out_text, _ = prepare("--verify", out)
    assert code == 0 and "shard files match meta.json" in out_text
    data = bytearray((out / "val-00000.bin").read_bytes())
    data[10] ^= 1
    (out / "val-00000.bin").write_bytes(bytes(data))
    TokenData(out)  # the size is right: opening checks sizes only
    code, _, err = prepare("--verify", out)
    assert code == 2 and err.count("\n") == 1 and "val-00000.bin" in err
    (out / "train-00001.bin").write_bytes(b"x" * 6)
    with pytest.raises(DataError, match=r"train-00001\.bin' has 6 bytes"):
        TokenData(out)
    (out / "train-00001.bin").unlink()
    with pytest.raises(DataError, match=r"train-00001\.bin' is missing"):
        TokenData(out)


def test_prepare_data_writes_a_store(text_dir, tmp_path, prepare):
    code, out, err = prepare("--source", text_dir, "--out", tmp_path / "d", "--tokenizer", BUILTIN_TOKENIZER, "--workers", 2,
                   "--shard_chars", 20000)
    assert code == 0, err
    assert TokenData(tmp_path / "d").meta["format_version"] == 3 and "bytes/token" in out


def test_data_directory_and_tokenizer_must_agree(stores, tmp_path):
    other = tmp_path / "other.model"
    other.write_bytes(BUILTIN_TOKENIZER.read_bytes())
    TokenData(stores["one"], tokenizer=other)  # the same model elsewhere
    with pytest.raises(DataError, match="sha256 differ"):
        TokenData(stores["one"], tokenizer=ROOT / "tests" / "fixtures" / "ec4c2b2" / "data" / "tokenizer.model")
