"""The held-out split keeps near-duplicates together: MinHash estimates, groups, and the stdlib split checked
with exact Jaccard similarities (the old per-file rule as the positive control that the check can fail)."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamoe.experiments.config import TokenizerConfig
from llamoe.experiments.data import corpus, near_duplicates
from llamoe.experiments.data.corpus import _select, load_corpus, split_groups
from llamoe.experiments.data.near_duplicates import DUPLICATE_JACCARD, NUM_HASHES, jaccard, shingles, signature

BYTES = TokenizerConfig("byte_level").build()
WORDS = [f"w{i}" for i in range(5000)]


def text(rng: random.Random, n: int = 400) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def edited(doc: str, rng: random.Random, fraction: float) -> str:
    """`doc` with about `fraction` of its words replaced by fresh ones."""
    return " ".join(rng.choice(WORDS) if rng.random() < fraction else w for w in doc.split())


def worst_cross_similarity(texts: list[str], val: list[int], train: list[int]) -> tuple[float, int, int]:
    """The largest exact Jaccard similarity between a val document and a training document."""
    sets = {i: shingles(texts[i]) for i in val + train}
    return max((jaccard(sets[i], sets[j]), i, j) for i in val for j in train)


def test_signature_estimates_jaccard_within_its_standard_deviation() -> None:
    rng = random.Random(0)
    for fraction in (0.02, 0.05, 0.1, 0.2, 0.4):
        a = text(rng, 2000)
        b = edited(a, rng, fraction)
        exact = jaccard(shingles(a), shingles(b))
        estimate = float((signature(a) == signature(b)).mean())
        sd = np.sqrt(exact * (1 - exact) / NUM_HASHES)
        assert abs(estimate - exact) <= 4 * sd + 1e-9, (fraction, exact, estimate)
    assert jaccard(shingles(a), shingles(a)) == 1.0 and (signature(a) == signature(a)).all()


def test_signature_does_not_depend_on_the_interpreters_hash_seed() -> None:
    code = "from llamoe.experiments.data.near_duplicates import signature; print(signature('a b c d e f g h').tolist())"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout  # fmt: skip
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and outs.pop().strip() == str(signature("a b c d e f g h").tolist())


def test_groups_join_near_copies_and_chains_and_nothing_else() -> None:
    rng = random.Random(1)
    base = text(rng)
    near = edited(base, rng, 0.03)  # J about 0.86 with base
    chained = edited(near, rng, 0.03)
    far = edited(base, rng, 0.5)  # J about 0.03: a different document that reuses the vocabulary
    unrelated = [text(rng) for _ in range(20)]
    texts = [*unrelated[:10], base, far, near, *unrelated[10:], chained]
    g = near_duplicates.groups(np.stack([signature(t) for t in texts]))
    assert g[10] == g[12] == g[-1] == 10  # base, its near copy and the copy of the copy: one group
    assert all(g[i] == i for i in range(len(texts)) if i not in (12, len(texts) - 1))  # the rest stand alone


def test_a_family_of_near_copies_lands_on_one_side(tmp_path: Path) -> None:
    rng = random.Random(2)
    src = tmp_path / "src"
    src.mkdir()
    base = text(rng)
    for i in range(30):
        (src / f"family{i:02d}.txt").write_text(edited(base, rng, 0.02))
        (src / f"other{i:02d}.txt").write_text(text(rng))
    sides = {}
    for split in ("train", "val"):
        c = load_corpus(str(src), BYTES, split, tmp_path / "cache", val_fraction=0.3)
        sides[split] = [bytes(d[:-1].astype(np.uint8)).decode() for d in c.documents()]
    family = {split: sum(jaccard(shingles(t), shingles(base)) > 0.5 for t in texts)
              for split, texts in sides.items()}  # fmt: skip
    assert sorted(family.values()) == [0, 30]
    assert sides["val"] and sides["train"]
    # the per-file rule it replaced splits the family (the positive control)
    keys = [f"family{i:02d}.txt" for i in range(30)]
    assert 0 < len(_select(keys, "val", 0.3)) < 30


@pytest.fixture(scope="module")
def stdlib() -> tuple[list[str], list[str]]:
    kind, root = corpus._resolve("stdlib")
    files = corpus._list_files(kind, root)
    return corpus._document_keys(kind, files, root), [f.read_text("utf-8") for f in files]


def test_no_stdlib_val_document_has_a_training_near_duplicate(stdlib: tuple[list[str], list[str]]) -> None:
    keys, texts = stdlib
    groups = split_groups(texts, 0.05)
    val, train = _select(keys, "val", 0.05, groups), _select(keys, "train", 0.05, groups)
    assert sorted(val + train) == list(range(len(keys))) and 10 <= len(val) <= 0.1 * len(keys)
    worst, i, j = worst_cross_similarity(texts, val, train)
    assert worst < DUPLICATE_JACCARD, (keys[i], keys[j], worst)
    # positive control: the per-file hash rule it replaced held encodings/cp437.py out with cp865.py in training
    old_val, old_train = _select(keys, "val", 0.05), _select(keys, "train", 0.05)
    worst, i, j = worst_cross_similarity(texts, old_val, old_train)
    assert worst > DUPLICATE_JACCARD, (keys[i], keys[j], worst)
