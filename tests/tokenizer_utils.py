"""Train a tiny Gemma-style sentencepiece tokenizer for tests (no downloads).

The model mirrors the layout of Gemma's real ``tokenizer.model`` where it matters to PaliGemma:

=========================  ==================  ==========================
piece                      tiny id             real Gemma id
=========================  ==================  ==========================
``<pad>``                  0                   0
``<eos>``                  1                   1
``<bos>``                  2                   2
``<unk>``                  3                   3
``<mask>``                 4                   4
``<loc0000>..<loc1023>``   5 .. 1028           256000 .. 257023
``<seg000>..<seg127>``     1029 .. 1156        257024 .. 257151
``"\\n"``                  1157                108
byte pieces ``<0x00>..``   1158 .. 1413        217 .. 472
learned BPE pieces         1414 .. vocab-1     the rest
``<image>`` (added by HF)  vocab_size          257152
=========================  ==================  ==========================

Code under test must never hard-code these ids: it reads them with ``piece_to_id``.
``<mask>`` is kept because transformers' ``GemmaTokenizer`` declares a ``<mask>`` special token and
would otherwise append one, pushing ``<image>`` one id past the sentencepiece vocabulary.
"""

import random
from pathlib import Path

from pali_jax.demo.tokenizer import train_gemma_style
from pali_jax.processor import LOC_TOKENS, SEG_TOKENS  # noqa: F401  (the processor tests import them here)

_SUBJECTS = [
    "the cat", "a dog", "two birds", "my neighbour", "the old man", "a young woman", "the robot",
    "three children", "the teacher", "a red car", "the big truck", "an astronaut", "the coffee cup",
    "a small boat", "the café owner", "the naïve student", "el niño", "die Straße", "the zebra",
]
_VERBS = [
    "is sitting on", "jumps over", "looks at", "is standing next to", "drives past", "holds",
    "is painting", "walks towards", "eats", "is hiding behind", "carries", "points at", "answers",
]
_OBJECTS = [
    "the wooden bench", "a green apple", "the window", "a large building", "the river", "a pizza",
    "the mountain", "a blue umbrella", "the laptop", "some flowers", "the kitchen table", "a bicycle",
    "the crème brûlée", "a smörgåsbord", "the résumé", "a piñata", "the 東京 tower", "Καλημέρα",
]
_TAILS = [
    ".", "!", "?", " in 2024.", " at 10:30 am.", ", isn't it?", " (again).", " for $3.50.",
    " - twice.", " with 42 friends.", "; then it rains.", ": yes/no?", " 100% of the time.",
]
_QUESTIONS = [
    "caption en", "caption es", "answer en what is in the image?", "detect cat ; dog",
    "segment person", "ocr", "question: how many apples are there?", "describe the scene",
    "answer en what colour is the car?", "detect car", "what time is it?",
]


def _corpus(seed: int, n_sentences: int) -> list[str]:
    """Deterministic, varied English-like sentences with digits, punctuation and some unicode."""
    rng = random.Random(seed)
    sentences = list(_QUESTIONS)
    for _ in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
        if rng.random() < 0.3:
            s = s.capitalize()
        if rng.random() < 0.2:
            s += f" {rng.randint(0, 99999)}"
        sentences.append(s)
    return sentences


def train_tokenizer(out_dir: Path, vocab_size: int = 2000, seed: int = 0) -> Path:
    """Train a tiny Gemma-style BPE sentencepiece model and write ``out_dir/tokenizer.model``.

    Settings follow Gemma's ``tokenizer.model`` (identity normalisation, no dummy prefix, extra
    whitespace kept, digits split, byte fallback, whitespace-only pieces allowed). Training takes well
    under a second. Returns the path of the written model.
    """
    return train_gemma_style(_corpus(seed, n_sentences=600), Path(out_dir) / "tokenizer.model", vocab_size)
