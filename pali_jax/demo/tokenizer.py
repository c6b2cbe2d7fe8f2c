"""A small Gemma-style sentencepiece tokenizer for the demo task.

Layout as in Gemma's tokenizer where PaliGemma depends on it: `<pad>` 0, `<eos>` 1, `<bos>` 2,
`<unk>` 3, then `<mask>` (transformers' GemmaTokenizer would append one otherwise, moving
`<image>`), the 1024 `<locNNNN>` and 128 `<segNNN>` pieces, `"\\n"`, 256 byte pieces (any text
still encodes) and the task's words learned by BPE, each a single piece. `<image>` is the id
right after the vocabulary, as transformers' processor gives it.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import sentencepiece as spm

from pali_jax.demo import shapes
from pali_jax.processor import LOC_TOKENS, SEG_TOKENS

_USER_DEFINED = ["<mask>", *LOC_TOKENS, *SEG_TOKENS, "\n"]
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-"


def train_tokenizer(out_file: Path, seed: int = 0) -> Path:
    """Trains the demo tokenizer and writes it to `out_file` (a `tokenizer.model`)."""
    rng = random.Random(seed)
    corpus = shapes.tokenizer_corpus()
    sentences = [rng.choice(corpus) for _ in range(2000)] + [" ".join(_LETTERS)]
    # The corpus has few words: stop when they are all pieces rather than at the vocabulary size.
    return train_gemma_style(sentences, out_file, vocab_size=4096, hard_vocab_limit=False)


def train_gemma_style(sentences: list[str], out_file: Path, vocab_size: int, hard_vocab_limit: bool = True) -> Path:
    """A sentencepiece BPE model laid out like Gemma's `tokenizer.model`: pad 0, eos 1, bos 2, unk 3,
    `<mask>`, the loc/seg tokens and "\\n" as user-defined pieces, identity normalisation, no dummy
    prefix, whitespace kept, digits split, byte fallback. Writes it to `out_file`."""
    out_file = Path(out_file)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=hard_vocab_limit,
            character_coverage=1.0,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            user_defined_symbols=_USER_DEFINED,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            num_threads=1,
            minloglevel=2,
        )
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_bytes(prefix.with_suffix(".model").read_bytes())
    return out_file
