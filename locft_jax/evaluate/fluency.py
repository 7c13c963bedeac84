"""Fluency as ROME/EasyEdit measure it: weighted bi- and tri-gram entropy of generated text.

``compute_n_gram_entropy`` takes the entropy (bits) of the n-gram frequency distribution for
n = 2, 3, weights them 2/3 and 4/3 and averages; a text set's score is the mean over texts. Low
values flag repetitive output. ROME and EasyEdit split words with ``nltk.word_tokenize`` (Punkt
sentences, then Treebank rules); we use a regex (runs of word characters, and every other
non-space character alone) so no NLTK data download is needed. Both separate words from
punctuation, but the regex also splits what Treebank keeps whole — hyphenated words
("well-known"), decimals ("3.5"), abbreviations ("U.S."), ellipses ("...") — and splits
contractions and possessives as "don" "'" "t" / "John" "'" "s" where NLTK gives "do" "n't" /
"John" "'s". The extra tokens raise the entropy of ordinary prose a little (about 0.1-0.2 bits on
sentences of ~40 words); compare values within this tool, not with published ROME/EasyEdit
numbers to that precision.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORDS = re.compile(r"\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    return _WORDS.findall(text)


def n_gram_entropy_of(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """Weighted mean over ``ns`` of the n-gram entropy in bits (0 for a text too short for n)."""
    words = word_tokenize(text)
    entropies = []
    for n in ns:
        counts = np.array(list(Counter(zip(*(words[i:] for i in range(n)), strict=False)).values()), float)
        freqs = counts / counts.sum() if counts.size else counts
        entropies.append(float(np.sum(-freqs * np.log2(freqs))))
    return float(np.mean(np.array(entropies) * np.array(weights)))


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Mean weighted n-gram entropy over texts (EasyEdit's ``n_gram_entropy``, arithmetic)."""
    return float(np.mean([n_gram_entropy_of(t) for t in texts]))
