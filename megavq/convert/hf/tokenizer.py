"""The tokenizer files of a Hugging Face export: a tokenizer.json built from megavq's SentencePiece model that
`AutoTokenizer.from_pretrained(dir)` loads and that gives exactly SentencePiece's ids, and the generation config.

Why not `LlamaTokenizer`: at its defaults it adds a dummy prefix (a leading "▁") that megavq's models (trained
with add_dummy_prefix=false) never saw; with legacy=False and add_prefix_space=False the ids agree, but the text
"<s>", "</s>" or "<unk>" inside a document becomes the special id, where SentencePiece encodes it as pieces
(text never encodes to a control id). The tokenizer written here is SentencePiece's own BPE spelled in
`tokenizers`' terms:
  normalizer      " " -> "▁" only (identity normalisation, no dummy prefix, no whitespace folding)
  pre-tokenizer   none: merges run over the whole text, as SentencePiece's BPE encoder does
  model           BPE over the model's pieces and ids; a merge (l, r) for every split of a normal piece into
                  two normal pieces, ranked by the piece's score (SentencePiece merges the pair whose piece
                  scores highest); unknown characters fall back to their UTF-8 byte pieces <0xXX>
  special tokens  <unk>, <s>, </s> at SentencePiece's ids, with split_special_tokens=true: their text in a
                  document is encoded as text; no BOS or EOS is added. Batches are padded on the left (for
                  generate) with </s>, which the attention mask hides
  decoder         "▁" -> " ", bytes fused back into characters
The generation config stops at the tokenizer's end-of-document id (</s>).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megavq.data.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def piece_kinds(tok: Tokenizer) -> tuple[dict, set]:
    """({piece: id} of the whole vocabulary, the normal pieces: those BPE merges may produce)."""
    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    special = (sp.is_control, sp.is_unknown, sp.is_byte, sp.is_unused)
    normal = {p for p, i in vocab.items() if not any(is_kind(i) for is_kind in special)}
    return vocab, normal


def bpe_merges(tok: Tokenizer, normal: set) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, highest-scoring piece first."""
    sp = tok.sp
    merges = []
    for i in sorted(range(sp.vocab_size()), key=lambda i: (-sp.get_score(i), i)):
        piece = sp.id_to_piece(i)
        if piece in normal:
            merges += [(piece[:k], piece[k:]) for k in range(1, len(piece))
                       if piece[:k] in normal and piece[k:] in normal]
    return merges


def special_tokens(tok: Tokenizer) -> dict:
    """{"unk_token", "bos_token", "eos_token"}: the pieces at SentencePiece's ids (those it has)."""
    sp = tok.sp
    ids = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id()}
    return {name: sp.id_to_piece(i) for name, i in ids.items() if i >= 0}


def fast_tokenizer(tok: Tokenizer, model_max_length: int):
    """A transformers fast tokenizer with SentencePiece's ids (see the module docstring)."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    vocab, normal = piece_kinds(tok)
    specials = special_tokens(tok)
    bpe = BPE(vocab, bpe_merges(tok, normal), unk_token=specials.get("unk_token"), fuse_unk=True, byte_fallback=True)
    rust = RustTokenizer(bpe)
    rust.normalizer = normalizers.Replace(" ", "▁")
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    return PreTrainedTokenizerFast(tokenizer_object=rust, split_special_tokens=True, clean_up_tokenization_spaces=False,
                                   model_max_length=model_max_length, padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"],  # no token_type_ids
                                   pad_token=tok.sp.id_to_piece(tok.eos_id), **specials)


def save_hf_tokenizer(tokenizer: str | Path, out_dir: str | Path, model_max_length: int) -> list[Path]:
    """tokenizer.json, tokenizer_config.json and a copy of the SentencePiece model in out_dir; the paths written.
    The class is named PreTrainedTokenizerFast, which transformers 4 and 5 both know (5 writes TokenizersBackend)."""
    tok = Tokenizer(tokenizer)
    out_dir = Path(out_dir)
    fast_tokenizer(tok, model_max_length).save_pretrained(out_dir)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    shutil.copyfile(tok.path, out_dir / "tokenizer.model")
    return [out_dir / name for name in (*TOKENIZER_FILES, "tokenizer.model")]


def save_generation_config(tokenizer: str | Path, out_dir: str | Path) -> Path:
    """generation_config.json: stop at the end-of-document id; padding (batched prompts) with it too."""
    from transformers import GenerationConfig
    tok = Tokenizer(tokenizer)
    eos, bos = tok.eos_id, tok.sp.bos_id()  # eos_id raises for a model without one
    bos = bos if bos >= 0 else None
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out_dir)
    return Path(out_dir) / "generation_config.json"
