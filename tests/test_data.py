"""Data layer: corpus splits, tokenizer round trip, data directories, batches, validation, scripts."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from megavq.data import DataError, TokenData, Tokenizer, encode_corpus, prepare_data, read_corpus
from megavq.data.corpus import (
    SPLITS,
    Piece,
    block_split,
    blocks,
    builtin_documents,
    builtin_text,
    builtin_topics,
    hf_rows,
    interleaved,
    joined,
    load_hf_dataset,
)
from megavq.data.dataset import BUILTIN_TOKENIZER, FORMAT_VERSION
from megavq.data.tokenizer import train_tokenizer
from megavq.errors import MegavqError
from megavq.files import file_sha256

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "ec4c2b2" / "data"  # format 1, written before EOS ids
SEQ = 16
EOS = 2


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(builtin_text()[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_dir(text_file, tmp_path_factory):
    """A small data directory with its own 400-piece tokenizer."""
    return encode_corpus(str(text_file), tmp_path_factory.mktemp("data") / "small", vocab_size=400)


# ---- corpus ---------------------------------------------------------------------------------------------

def texts(pieces) -> str:
    return "".join(piece.text for piece in pieces)


def test_builtin_split_is_interleaved_deterministic_disjoint_and_covering():
    text = builtin_text()
    all_blocks = list(blocks(builtin_documents()))
    assert texts(line for block in all_blocks for line in block) == text == "".join(builtin_topics())
    docs = {s: list(read_corpus("builtin", s)) for s in SPLITS}
    for s in SPLITS:
        assert docs[s] == [p for i, b in enumerate(all_blocks) if block_split(i) == s for p in joined(b)]
        assert docs[s] == list(read_corpus("builtin", s))
    assert sum(len(texts(docs[s])) for s in SPLITS) == len(text)
    assert [block_split(i) for i in range(18, 21)] == ["val", "test", "train"]
    assert all(len(texts(b)) >= 2000 for i, b in enumerate(all_blocks[:-1]) if block_split(i) != "train")
    assert 0.03 < len(texts(docs["val"])) / len(text) < 0.07


def test_builtin_documents_are_topics_with_one_eos_at_their_real_end():
    pieces = [p for block in blocks(builtin_documents()) for p in joined(block)]  # all splits, in order
    documents, current = [], ""
    for piece in pieces:
        current += piece.text
        if piece.eos:
            documents.append(current)
            current = ""
    assert documents == builtin_topics() and current == ""
    assert any(not p.eos for p in pieces)  # topics longer than a block: no EOS where a block cuts them
    assert sum(p.eos for s in SPLITS for p in read_corpus("builtin", s)) == len(builtin_topics())


def test_document_spanning_blocks_has_its_eos_in_the_split_of_its_end(tmp_path):
    line = "x" * 99 + "\n"  # 20 lines fill a block of 2000 characters
    (tmp_path / "a.txt").write_text(line * 20 * 19)  # blocks 0-18: train (0-17), then val (18)
    (tmp_path / "b.txt").write_text("short one\n")  # block 19: test
    (tmp_path / "c.txt").write_text("no newline")  # block 19 too
    docs = {s: list(read_corpus(str(tmp_path), s)) for s in SPLITS}
    assert docs["train"] == [Piece(line * 20, False)] * 18
    assert docs["val"] == [Piece(line * 20, True)]
    assert docs["test"] == [Piece("short one\n", True), Piece("no newline\n", True)]
    data = TokenData(encode_corpus(str(tmp_path), tmp_path / "data", tokenizer_path=BUILTIN_TOKENIZER))
    assert EOS not in data.split("train")
    assert np.flatnonzero(np.asarray(data.split("val")) == EOS).tolist() == [data.tokens("val") - 1]
    assert (np.asarray(data.split("test")) == EOS).sum() == 2 and data.split("test")[-1] == EOS


def test_text_folder_reads_txt_files_in_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("second\nfile")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "c.txt").write_text("")  # an empty file is no document
    assert list(read_corpus(str(tmp_path), "train")) == [Piece("first\n", True), Piece("second\nfile\n", True)]
    assert list(read_corpus(str(tmp_path), "val")) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        read_corpus(str(tmp_path / "empty"), "train")


def test_unknown_source_and_split():
    with pytest.raises(DataError, match="/nonexistent"):
        read_corpus("/nonexistent", "train")
    with pytest.raises(DataError, match="'dev'"):
        read_corpus("builtin", "dev")


def write_lm1b(root: Path) -> dict:
    """A tiny fake lm1b tree; returns the expected lines per split."""
    train, heldout = root / "training-monolingual.tokenized.shuffled", root / "heldout-monolingual.tokenized.shuffled"
    train.mkdir(parents=True)
    heldout.mkdir()
    lines = {name: [Piece(f"{name} sentence {i} .\n", True) for i in range(3)]
             for name in ("t1", "t2", "h0", "h1", "h2")}
    for name, path in [("t2", train / "news.en-00002-of-00100"), ("t1", train / "news.en-00001-of-00100"),
                       ("h0", heldout / "news.en.heldout-00000-of-00050"),
                       ("h1", heldout / "news.en.heldout-00001-of-00050"),
                       ("h2", heldout / "news.en.heldout-00002-of-00050")]:
        path.write_text(texts(lines[name]))
    return {"train": lines["t1"] + lines["t2"], "val": lines["h1"], "test": lines["h0"]}


def test_lm1b_layout(tmp_path):
    expected = write_lm1b(tmp_path)
    for s in SPLITS:
        assert list(read_corpus(f"lm1b:{tmp_path}", s)) == expected[s]
    out = encode_corpus(f"lm1b:{tmp_path}", tmp_path / "data", tokenizer_path=BUILTIN_TOKENIZER)
    test_file = tmp_path / "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050"
    assert TokenData(out).meta["splits"]["test"]["bytes"] == test_file.stat().st_size
    assert (np.asarray(TokenData(out).split("test")) == EOS).sum() == 3  # one per sentence
    test_file.unlink()
    with pytest.raises(DataError, match="heldout-00000"):
        read_corpus(f"lm1b:{tmp_path}", "test")


def rows(n: int, tag: str) -> list:
    return [f"{tag} row {i}: " + "lorem ipsum " * 8 for i in range(n)]


def documents(rows: list) -> list:
    return [Piece(r + "\n", True) for r in rows]


def held_out_pieces(all_blocks: list, slot: int) -> list:
    return [p for b in all_blocks[slot::20] for p in joined(b)]


def test_hf_saved_dataset_uses_own_splits_and_carves_missing_ones(tmp_path):
    datasets = pytest.importorskip("datasets")
    train, test = rows(600, "train"), rows(5, "test")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "test": datasets.Dataset.from_dict({"text": test})}).save_to_disk(str(tmp_path / "dd"))
    source = f"hf:{tmp_path / 'dd'}"
    docs = {s: list(read_corpus(source, s)) for s in SPLITS}
    assert docs["test"] == documents(test)
    all_blocks = list(blocks(documents(train)))
    assert docs["val"] == held_out_pieces(all_blocks, 18) and docs["val"]
    assert docs["train"] == [p for i, b in enumerate(all_blocks) if i % 20 != 18 for p in joined(b)]
    assert sorted(docs["val"] + docs["train"]) == sorted(documents(train))  # every row once, as a document
    with pytest.raises(DataError, match="no column 'body'"):
        read_corpus(source, "train", text_column="body")


def test_hf_data_file_with_other_column(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    train = rows(600, "doc")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"content": r}) + "\n" for r in train))
    docs = {s: list(read_corpus(f"hf:{path}", s, text_column="content")) for s in SPLITS}
    all_blocks = list(blocks(documents(train)))
    assert docs["test"] == held_out_pieces(all_blocks, 19) and docs["val"] == held_out_pieces(all_blocks, 18)
    assert sum(len(d) for d in docs.values()) == len(train)


def arrow_files(folder: Path) -> list:
    return sorted(folder.rglob("*.arrow"))


def test_hf_sources_stream_and_equal_the_loaded_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    train, test = rows(600, "train"), rows(5, "test")
    files = tmp_path / "files"
    files.mkdir()
    for name, split_rows in [("train", train), ("test", test)]:
        (files / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in split_rows))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train})}).save_to_disk(str(tmp_path / "saved"))
    for path in (files / "train.jsonl", files, tmp_path / "saved"):
        assert all(isinstance(d, datasets.IterableDataset) for d in load_hf_dataset(str(path), None).values())
    source = f"hf:{files}"
    assert next(read_corpus(source, "train")) == Piece(train[0] + "\n", True)
    assert arrow_files(tmp_path / "cache") == []  # streamed: nothing converted or cached
    loaded = datasets.load_dataset(str(files))  # the non-streaming way, for comparison
    assert arrow_files(tmp_path / "cache")  # ... which converts the whole dataset first
    for s in ("train", "val"):
        assert list(read_corpus(source, s)) == list(interleaved(hf_rows(loaded["train"], "text"), s, ("val",)))
    assert list(read_corpus(source, "test")) == list(hf_rows(loaded["test"], "text")) == documents(test)
    assert list(read_corpus(f"hf:{tmp_path / 'saved'}", "val")) == list(read_corpus(source, "val"))
    with pytest.raises(DataError, match="no column 'body' .columns: text"):
        read_corpus(source, "train", text_column="body")


def test_hf_empty_rows_are_skipped_and_non_text_is_an_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": ["a", "", None, "b\n"], "n": [1, 2, 3, 4]})
    assert list(hf_rows(data, "text")) == [Piece("a\n", True), Piece("b\n", True)]
    with pytest.raises(DataError, match="column 'n' holds int values, not text"):
        list(hf_rows(data, "n"))


def test_hf_unloadable_name_is_one_line_error(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="local dataset path .* does not exist") as e:
        read_corpus(f"hf:{tmp_path / 'missing'}", "train")
    assert "\n" not in str(e.value)


# ---- tokenizer ------------------------------------------------------------------------------------------

def test_shipped_tokenizer_round_trips_any_text():
    tok = Tokenizer(BUILTIN_TOKENIZER)
    assert tok.vocab_size == 4096 and tok.sha256 == file_sha256(BUILTIN_TOKENIZER)
    sample = builtin_text()[5000:7000] + "  two  spaces\ttab\r\n\n€ 日本語 😀 naïve Ω\n"
    ids = tok.encode(sample)
    assert all(0 <= i < 4096 for i in ids)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode("utf-8")) / 2
    assert tok.eos_id == EOS and tok.sp.id_to_piece(EOS) == "</s>" and tok.decode([EOS]) == ""
    assert not {0, 1, EOS} & set(tok.encode("<unk> <s> </s>" + sample))  # text never encodes to a special id


def test_encoding_and_training_give_the_same_result_on_any_thread_count(text_file, tmp_path):
    tok = Tokenizer(BUILTIN_TOKENIZER)
    lines = builtin_text()[:200_000].splitlines(keepends=True)
    one = tok.encode_batch(lines, threads=1)
    assert one == tok.encode_batch(lines, threads=3) == tok.encode_batch(lines) == [tok.encode(x) for x in lines]
    models = [train_tokenizer([text_file.read_text()], 400, tmp_path / f"t{n}", threads=n) for n in (1, 2)]
    pieces = [[Tokenizer(m).sp.id_to_piece(i) for i in range(400)] for m in models]
    assert pieces[0] == pieces[1]
    with pytest.raises(DataError, match="threads must be .* got 0"):
        tok.encode_batch(lines, threads=0)


def test_tokenizer_without_eos_is_refused_for_encoding(text_file, tmp_path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text_file.read_text().splitlines()), vocab_size=400,
                                   model_prefix=str(tmp_path / "noeos"), eos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match="noeos.model' has no end-of-document piece"):
        encode_corpus(str(text_file), tmp_path / "data", tokenizer_path=tmp_path / "noeos.model")


def test_tokenizer_rejects_missing_or_invalid_model(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_text("junk")
    with pytest.raises(DataError, match="junk.model' is not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")


# ---- data directories -----------------------------------------------------------------------------------

def test_meta_matches_files_and_tokens_decode_to_the_text(data_dir, text_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current format loads without a warning
        data = TokenData(data_dir)
    assert data.vocab_size == 400 and data.meta["dtype"] == "uint16"
    assert data.meta["format_version"] == FORMAT_VERSION == 2 and data.meta["eos_id"] == data.eos_id == EOS
    tok = data.tokenizer()
    assert tok.sha256 == data.meta["tokenizer_sha256"]
    for s in SPLITS:
        info = data.meta["splits"][s]
        assert (data_dir / info["file"]).stat().st_size == info["tokens"] * 2 == data.tokens(s) * 2
        pieces = list(read_corpus(str(text_file), s))
        text = texts(pieces)
        assert info["bytes"] == len(text.encode("utf-8"))
        assert tok.decode(data.split(s)) == text  # EOS decodes to ""
        assert data.bytes_per_token(s) == info["bytes"] / info["tokens"]
        expected = [i for p in pieces for i in tok.encode(p.text) + [EOS] * p.eos]
        assert np.asarray(data.split(s)).tolist() == expected
    assert [(np.asarray(data.split(s)) == EOS).sum() for s in SPLITS] == [1, 0, 0]  # one file: one document
    assert data.split("train")[-1] == EOS  # its end falls in the last block, a train block


def test_encoding_gives_the_same_tokens_on_any_thread_count(data_dir, text_file, tmp_path):
    one = encode_corpus(str(text_file), tmp_path / "one", tokenizer_path=data_dir / "tokenizer.model", threads=1)
    for s in SPLITS:
        assert (one / f"{s}.bin").read_bytes() == (data_dir / f"{s}.bin").read_bytes()


def test_format_1_fixture_loads_with_a_one_line_warning():
    with pytest.warns(UserWarning, match=r"format 1, with no end-of-document ids .* max_new_tokens; rebuild it "
                                         r"with: python scripts/prepare_data.py --source /tmp/fx/text.txt") as record:
        data = TokenData(FIXTURE_DATA)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert data.eos_id is None and data.vocab_size == 384 and data.tokens("val") == 1454
    assert EOS not in data.split("train")
    assert data.doc_ends("val").tolist() == [1454]  # no EOS ids: the split is one document
    assert data.tokenizer().decode(data.split("val")).endswith("\n")
    x, y = data.batch("train", step=0, batch_size=2, seq_len=SEQ)
    assert x.shape == (2, SEQ) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.warns(UserWarning, match="format 1"):
        assert prepare_data(str(FIXTURE_DATA)) == FIXTURE_DATA


def test_the_warning_command_rebuilds_a_format_1_directory_with_its_tokenizer(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(FIXTURE_DATA, old)
    (tmp_path / "text.txt").write_text(builtin_text()[:60_000])
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps(dict(meta, source=str(tmp_path / "text.txt"))))
    with pytest.warns(UserWarning, match="rebuild it with: ") as record:
        TokenData(old)
    command = shlex.split(str(record[0].message).split("rebuild it with: ")[1])
    assert command[:2] == ["python", "scripts/prepare_data.py"]
    result = run_script(*command[2:])
    assert result.returncode == 0, result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = TokenData(old)
    assert data.eos_id == EOS and data.meta["tokenizer_sha256"] == meta["tokenizer_sha256"]


def test_unknown_format_version_is_refused(data_dir, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(data_dir, newer)
    meta = json.loads((newer / "meta.json").read_text())
    for version in (4, "2"):
        (newer / "meta.json").write_text(json.dumps(dict(meta, format_version=version)))
        with pytest.raises(DataError, match=f"has format_version {version!r}, which this megavq cannot read") as e:
            TokenData(newer)
        assert "\n" not in str(e.value)
    del meta["eos_id"]
    (newer / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="lacks eos_id"):
        TokenData(newer)


def test_batch_is_a_pure_function_of_seed_and_step(data_dir):
    data = TokenData(data_dir)
    x, y = data.batch("train", step=3, batch_size=4, seq_len=SEQ, seed=7)
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    x2, y2 = TokenData(data_dir).batch("train", step=3, batch_size=4, seq_len=SEQ, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, data.batch("train", step=4, batch_size=4, seq_len=SEQ, seed=7)[0])
    assert not torch.equal(x, data.batch("train", step=3, batch_size=4, seq_len=SEQ, seed=8)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows_NS = np.lib.stride_tricks.sliding_window_view(np.asarray(data.split("train")), SEQ + 1)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        row = np.concatenate([row_x, row_y[-1:]])
        assert (windows_NS == row).all(axis=1).any()


def test_eval_batches_cover_the_split_without_overlap(data_dir):
    data = TokenData(data_dir)
    tokens = np.asarray(data.split("val"), dtype=np.int64)
    batches = list(data.eval_batches("val", batch_size=8, seq_len=SEQ))
    x = torch.cat([b[0] for b in batches]).flatten().numpy()
    y = torch.cat([b[1] for b in batches]).flatten().numpy()
    n_windows = (len(tokens) - 1) // SEQ
    assert len(x) == n_windows * SEQ and len(tokens) - len(x) <= SEQ
    assert (x == tokens[:len(x)]).all() and (y == tokens[1:len(x) + 1]).all()
    few = list(data.eval_batches("val", batch_size=2, seq_len=SEQ, max_batches=3))
    assert len(few) == 3 and all(xb.shape == (2, SEQ) for xb, _ in few)
    aligned_NS = tokens[:n_windows * SEQ].reshape(n_windows, SEQ)
    starts = [int(np.flatnonzero((aligned_NS == row).all(axis=1))[0]) for xb, _ in few for row in xb.numpy()]
    assert starts == sorted(set(starts)) and starts[0] == 0 and starts[-1] > n_windows // 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(few, data.eval_batches("val", 2, SEQ, max_batches=3)))


def test_truncated_or_missing_data_raises(data_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    size = (broken / "val.bin").stat().st_size
    with open(broken / "val.bin", "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(DataError, match=rf"val\.bin' has {size - 3} bytes but meta.json says {size}"):
        TokenData(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json"):
        TokenData(broken)
    with pytest.raises(DataError, match="does not exist"):
        TokenData(tmp_path / "missing")
    assert issubclass(DataError, MegavqError)


def test_seq_len_longer_than_split_raises(data_dir):
    data = TokenData(data_dir)
    with pytest.raises(DataError, match="seq_len"):
        data.batch("val", 0, 1, data.tokens("val"), seed=0)


# ---- prepare_data and the script ------------------------------------------------------------------------

def test_prepare_builtin_encodes_once_then_reuses(tmp_path, monkeypatch):
    path = prepare_data("builtin", cache_dir=tmp_path)
    data = TokenData(path)
    assert data.vocab_size == 4096 and data.meta["source"] == "builtin"
    assert data.tokens("val") > 1000 and 3.0 < data.bytes_per_token("train") < 5.0

    def fail(*args, **kwargs):
        raise AssertionError("the cached directory should be reused")

    monkeypatch.setattr("megavq.data.dataset.encode_corpus", fail)
    assert prepare_data("builtin", cache_dir=tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    (path / "meta.json").unlink()  # an incomplete directory is rebuilt
    assert prepare_data("builtin", cache_dir=tmp_path) == path and TokenData(path).tokens("val") == data.tokens("val")
    assert prepare_data(str(path)) == path


def test_prepare_unknown_source_is_one_line_error():
    with pytest.raises(DataError, match="data source '/nonexistent' is not 'builtin'") as e:
        prepare_data("/nonexistent")
    assert "\n" not in str(e.value)


def run_script(*args):
    env = dict(os.environ, PYTHONPATH="")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_tokenize_script_end_to_end(text_file, tmp_path):
    result = run_script("--source", str(text_file), "--out", str(tmp_path / "out"), "--vocab_size", "400",
                        "--threads", "1")
    assert result.returncode == 0, result.stderr
    data = TokenData(tmp_path / "out")
    assert data.vocab_size == 400
    assert f"train {data.tokens('train'):,}" in result.stdout and "bytes/token" in result.stdout
    small = run_script("--source", str(text_file), "--out", str(tmp_path / "small"), "--vocab_size", "300")
    assert small.returncode == 2 and "vocab_size 300" in small.stderr and "\n" not in small.stderr.strip()
    bad = run_script("--source", "/nonexistent", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
