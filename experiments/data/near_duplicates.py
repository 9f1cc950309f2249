"""Near-duplicate groups of documents, so that a held-out split never holds a near-copy of a training text.

Public API:
    shingles(text) -> uint64 [n]       the distinct word 5-grams of a text, hashed stably (no PYTHONHASHSEED)
    jaccard(a, b) -> float             exact Jaccard similarity of two shingle arrays
    signature(text) -> uint32 [K]      its MinHash signature (K = NUM_HASHES)
    groups(signatures) -> int64 [n]    for each document, the index of the first document of its group

Definition: two documents are near-duplicates when the Jaccard similarity of their sets of word 5-grams
(words: runs of `\\w` characters) is at least DUPLICATE_JACCARD (0.5). The encodings/cp*.py tables of
the standard library are the motivating case: cp437 and cp865 share 94% of their 5-grams, cp862 and
cp865 70%. A group is a connected component of the near-duplicate relation, so a chain of pairwise
near-copies stays together.

Method (Broder's MinHash with LSH banding): each document gets NUM_HASHES min-hashes; the fraction of
equal entries of two signatures estimates their Jaccard similarity with standard deviation
sqrt(J (1 - J) / K) (0.031 at J = 0.5). Candidate pairs are those equal on some band of BAND_ROWS
consecutive entries (a pair at J = 0.5 is missed by all 128 bands with probability 0.75^128, about
1e-16); a candidate is linked when its estimate reaches LINK_JACCARD = 0.4, three standard deviations
below the definition, so pairs at J >= 0.5 are linked and a few pairs just under 0.5 are grouped too,
which only costs split granularity. Cost: one pass over the text (hashing, O(words * K)), K 32-bit
integers of memory per document, and candidate checks (K comparisons each).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

DUPLICATE_JACCARD = 0.5
LINK_JACCARD = 0.4
NUM_HASHES = 256
BAND_ROWS = 2
SHINGLE_WORDS = 5
_WORD = re.compile(r"\w+")
_MASK64 = (1 << 64) - 1
# fixed odd multipliers and offsets of the hash family (multiply-add mod 2^64, keep the high 32 bits)
_RNG = np.random.default_rng(20261204)
_MUL = _RNG.integers(1, 1 << 63, NUM_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_ADD = _RNG.integers(0, 1 << 63, NUM_HASHES, dtype=np.uint64)
_BLOCK = 4096  # shingles hashed at once: bounds memory at _BLOCK * NUM_HASHES * 8 bytes


def shingles(text: str) -> np.ndarray:
    """The distinct hashed word 5-grams of `text` (a shorter text is one shingle of all its words)."""
    words = np.fromiter((zlib.crc32(w.encode()) for w in _WORD.findall(text)), dtype=np.uint64)
    if len(words) < SHINGLE_WORDS:
        words = np.concatenate([words, np.zeros(SHINGLE_WORDS - len(words), np.uint64)])
    n = len(words) - SHINGLE_WORDS + 1
    mixed = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(SHINGLE_WORDS):  # a polynomial hash of the 5 word hashes, wrapping mod 2^64
            mixed = mixed * np.uint64(0x100000001B3) + words[j : j + n] + np.uint64(j + 1)
    return np.unique(mixed)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two arrays of distinct shingles."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def signature(text: str) -> np.ndarray:
    """The NUM_HASHES min-hashes of the text's shingles."""
    values = shingles(text)
    out = np.full(NUM_HASHES, np.iinfo(np.uint32).max, np.uint32)
    with np.errstate(over="ignore"):
        for start in range(0, len(values), _BLOCK):
            block = values[start : start + _BLOCK, None] * _MUL[None, :] + _ADD[None, :]
            np.minimum(out, (block >> np.uint64(32)).min(axis=0).astype(np.uint32), out=out)
    return out


def groups(sig: np.ndarray) -> np.ndarray:
    """For each document (`sig`: uint32 [n, K], signatures in document order), the index of the first
    document of its group."""
    n = len(sig)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    need = int(np.ceil(LINK_JACCARD * NUM_HASHES))
    for band in range(NUM_HASHES // BAND_ROWS):
        key = np.zeros(n, np.uint64)
        for col in sig[:, band * BAND_ROWS : (band + 1) * BAND_ROWS].T:  # BAND_ROWS * 32 <= 64 bits
            key = (key << np.uint64(32)) | col.astype(np.uint64)
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.diff(key[order]) != 0) + 1
        for members in np.split(order, starts):
            for pos in range(len(members) - 1):
                i = int(members[pos])
                for j in members[pos + 1 :].tolist():
                    ri, rj = root(i), root(j)
                    if ri != rj and int((sig[i] == sig[j]).sum()) >= need:
                        parent[max(ri, rj)] = min(ri, rj)
    return np.array([root(i) for i in range(n)], dtype=np.int64)
