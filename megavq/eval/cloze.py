"""A small multiple-choice cloze task for lm-evaluation-harness, made from held-out text of a corpus.

Each item: up to `context_chars` characters of one piece of the split (starting at a word), and four choices
for the word that follows it, " word": the real one and three other words of the split of about the same
length. The items are spread evenly over the split's candidate words (alphabetic, at least 3 letters, after a
space, with at least min_context characters before them in the same piece); everything is drawn from
random.Random(seed), so the same text gives the same items. The task shipped in megavq/lm_eval_tasks is made
from the test split of the builtin corpus, which no model trained on builtin data sees
(`python scripts/make_cloze_task.py`).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from megavq.errors import MegavqError

WORD = re.compile(r"(?<= )[A-Za-z]{3,}\b")
CHOICES = 4


def candidates(texts: list[str], min_context: int) -> list[tuple[int, int, str]]:
    """(text index, start, word) of every word an item may ask for."""
    return [(t, m.start(), m.group()) for t, text in enumerate(texts) for m in WORD.finditer(text)
            if m.start() > min_context]


def context_before(text: str, start: int, context_chars: int) -> str:
    """The text before `start` (without the space before the word), at most context_chars, from a word start."""
    left = text[max(0, start - 1 - context_chars):start - 1]
    cut = re.search(r"\s", left) if start - 1 > context_chars else None
    return left[cut.end():] if cut else left


def distractors(word: str, pool: list[str], rng: random.Random) -> list[str]:
    """CHOICES - 1 distinct words of the pool, none equal to `word` (ignoring case), drawn among those whose length
    is within 2 of its length (or the closest ten or more, for rare lengths)."""
    others = [w for w in pool if w.lower() != word.lower()]
    near, d = [], 2
    while len(near) < 10 and d <= len(word) + max(map(len, others)):
        near, d = [w for w in others if abs(len(w) - len(word)) <= d], d + 1
    return rng.sample(near, CHOICES - 1)


def make_items(texts: list[str], n_items: int = 300, context_chars: int = 300, min_context: int = 80,
               seed: int = 0) -> list[dict]:
    """{"context", "choices" (each with its leading space), "label" (index of the real word)} items."""
    found = candidates(texts, min_context)
    if len(found) < n_items:
        raise MegavqError(f"the text has {len(found)} candidate words, fewer than {n_items} items")
    rng = random.Random(seed)
    pool = sorted({word for _, _, word in found})
    items = []
    for i in range(n_items):
        t, start, word = found[i * len(found) // n_items]
        choices = [word, *distractors(word, pool, rng)]
        rng.shuffle(choices)
        items.append({"context": context_before(texts[t], start, context_chars),
                      "choices": [" " + c for c in choices], "label": choices.index(word)})
    return items


def write_jsonl(items: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path
