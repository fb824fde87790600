"""Near-duplicate texts: the Jaccard similarity of their sets of word n-grams (shingles), case and punctuation
ignored. A teacher asked many times about overlapping chunks, or for many examples of one label, repeats itself in
slightly different words; exact matching would keep those repeats.

Candidates are found through an index from shingle to the texts kept so far, so a text is compared only with those
sharing a shingle with it: the shared-shingle counts give each pair's intersection without building it. Exact Jaccard
needs no extra dependency and is fast enough for the tens of thousands of rows a synth run writes (MinHash would
trade exactness for speed at millions)."""

import re
from collections import Counter, defaultdict

WORD = re.compile(r"\w+")


def shingles(text: str, size: int) -> frozenset[tuple[str, ...]]:
    """The text's word n-grams of `size` words (a shorter text is one shingle of all its words)."""
    words = WORD.findall(text.lower())
    if len(words) <= size:
        return frozenset({tuple(words)})
    return frozenset(tuple(words[start:start + size]) for start in range(len(words) - size + 1))


def near_duplicates(texts: list[str], threshold: float, size: int = 2) -> list[int | None]:
    """For each text, the index of an earlier kept text it nearly repeats (Jaccard of shingles >= threshold), or None
    when it is kept. The first of a group is kept, so the outcome depends only on the order of the texts."""
    kept: dict[int, frozenset] = {}
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    repeats: list[int | None] = []
    for position, text in enumerate(texts):
        own = shingles(text, size)
        shared = Counter(other for shingle in own for other in index.get(shingle, ()))
        match = next((other for other, common in shared.items()
                      if common / (len(own) + len(kept[other]) - common) >= threshold), None)
        repeats.append(match)
        if match is None:
            kept[position] = own
            for shingle in own:
                index[shingle].append(position)
    return repeats
