"""Packed training batches, validation windows and mixtures: layout, sharding, exact resume."""

import json
from itertools import islice

import numpy as np
import pytest
import torch

from llamoe.experiments.data.batches import MixedBatches, PackedBatches, ValidationBatches
from llamoe.experiments.data.corpus import Corpus, CorpusInfo
from llamoe.models.config import ConfigError


def position_corpus(n_tokens: int, split: str = "train", offset: int = 0) -> Corpus:
    """A corpus whose token at position p is offset + p, so every window names where it came from."""
    info = CorpusInfo("synthetic", "tokens", split, "0" * 40, "none", 0.0, False, 1, n_tokens)
    return Corpus(np.arange(n_tokens, dtype=np.uint32) + offset, np.array([0, n_tokens]), info, None, False)


def take(batches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(batches, n))


def test_windows_are_shifted_slices_of_the_stream() -> None:
    corpus = position_corpus(1001)
    inputs, targets = next(PackedBatches(corpus, seq_len=10, batch_size=4, seed=0))
    assert inputs.shape == targets.shape == (4, 10) and inputs.dtype == targets.dtype == torch.int64
    starts = inputs[:, 0]
    assert torch.all(starts % 10 == 0)
    assert torch.equal(inputs, starts[:, None] + torch.arange(10))
    assert torch.equal(targets, inputs + 1)


def test_one_epoch_visits_each_window_once_then_reshuffles() -> None:
    corpus = position_corpus(1001)  # 100 windows of 10 (+1) tokens
    batches = PackedBatches(corpus, seq_len=10, batch_size=8, seed=3)
    assert batches.batches_per_epoch == 12  # 96 windows used, 4 wait for a later epoch
    epoch0 = torch.cat([x[:, 0] for x, _ in take(batches, 12)]).tolist()
    assert len(set(epoch0)) == 96 and batches.epoch == 0
    epoch1 = torch.cat([x[:, 0] for x, _ in take(batches, 12)]).tolist()
    assert batches.epoch == 1 and len(set(epoch1)) == 96 and epoch1 != epoch0


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    corpus = position_corpus(5001)
    a = [x for x, _ in take(PackedBatches(corpus, 16, 4, seed=1), 5)]
    b = [x for x, _ in take(PackedBatches(corpus, 16, 4, seed=1), 5)]
    c = [x for x, _ in take(PackedBatches(corpus, 16, 4, seed=2), 5)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("k", [0, 3, 12, 13, 30])
def test_resume_gives_exactly_the_uninterrupted_batches(k: int) -> None:
    corpus = position_corpus(1001)  # 12 batches per epoch: k covers mid-epoch and epoch edges
    reference = take(PackedBatches(corpus, 10, 8, seed=5), k + 15)
    first = PackedBatches(corpus, 10, 8, seed=5)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PackedBatches(corpus, 10, 8, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(take(resumed, 15), reference[k:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_are_disjoint_and_together_equal_one_process() -> None:
    corpus = position_corpus(4001)
    single = PackedBatches(corpus, 10, 6, seed=7)
    ranks = [PackedBatches(corpus, 10, 3, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(single.batches_per_epoch + 3):  # into the second epoch
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not set(parts[0][0][:, 0].tolist()) & set(parts[1][0][:, 0].tolist())


def test_resume_under_a_different_rank_layout_with_the_same_global_batch() -> None:
    corpus = position_corpus(4001)
    single = PackedBatches(corpus, 10, 6, seed=7)
    take(single, 4)
    rank1 = PackedBatches(corpus, 10, 3, seed=7, rank=1, world_size=2)
    rank1.load_state_dict(single.state_dict())
    assert torch.equal(next(rank1)[0], next(single)[0][3:])


def test_load_state_dict_rejects_other_settings() -> None:
    corpus = position_corpus(1001)
    state = PackedBatches(corpus, 10, 8, seed=5).state_dict()
    with pytest.raises(ValueError, match="seq_len=10, but this run has seq_len=20"):
        PackedBatches(corpus, 20, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch=8, but this run has global_batch=4"):
        PackedBatches(corpus, 10, 4, seed=5).load_state_dict(state)


def test_corpus_smaller_than_one_batch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.batch_size: .* 9 windows of seq_len=10, fewer than one global batch"):
        PackedBatches(position_corpus(100), 10, 5, seed=0, world_size=2)


def test_validation_windows_are_fixed_ordered_and_sharded() -> None:
    corpus = position_corpus(1001, split="val")  # 100 windows
    val = ValidationBatches(corpus, seq_len=10, batch_size=8)
    first = [x for x, _ in val]
    assert len(val) == len(first) == 13 and first[-1].shape == (4, 10)
    assert torch.equal(torch.cat(first)[:, 0], torch.arange(100) * 10)
    assert all(torch.equal(a, b) for (a, _), b in zip(val, first))
    shards = [torch.cat([x for x, _ in ValidationBatches(corpus, 10, 8, rank=r, world_size=3)]) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    assert sorted(torch.cat(shards)[:, 0].tolist()) == list(range(0, 990, 10))
    capped = ValidationBatches(corpus, 10, 8, max_batches=2, rank=1, world_size=2)
    assert len(capped) == 2 and sum(len(x) for x, _ in capped) == 16


def test_validation_needs_one_window_per_rank() -> None:
    with pytest.raises(ConfigError, match="train.seq_len: .* holds 20 tokens"):
        ValidationBatches(position_corpus(20, split="val"), seq_len=10, batch_size=1, world_size=2)


def mixture(seed: int) -> MixedBatches:
    """Source 0 holds tokens < 10000, source 1 tokens >= 10000, weighted 3 : 1."""
    low = PackedBatches(position_corpus(1001), 10, 2, seed=1)
    high = PackedBatches(position_corpus(1001, offset=10_000), 10, 2, seed=2)
    return MixedBatches([(low, 3.0), (high, 1.0)], seed=seed)


def picks(batches) -> list[int]:
    return [int(x[0, 0] >= 10_000) for x, _ in batches]


def test_mixture_follows_weights_and_is_deterministic() -> None:
    drawn = picks(take(mixture(seed=0), 2000))
    assert abs(sum(drawn) / len(drawn) - 0.25) < 0.03
    assert picks(take(mixture(seed=0), 200)) == drawn[:200]  # every rank draws the same sources
    assert picks(take(mixture(seed=1), 200)) != drawn[:200]


@pytest.mark.parametrize("k", [0, 7, 40])
def test_mixture_resumes_exactly(k: int) -> None:
    reference = take(mixture(seed=4), k + 20)
    first = mixture(seed=4)
    take(first, k)
    resumed = mixture(seed=4)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for (x, y), (rx, ry) in zip(take(resumed, 20), reference[k:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_mixture_rejects_bad_weights_and_other_state() -> None:
    source = PackedBatches(position_corpus(1001), 10, 2, seed=1)
    for weights in ([0.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="positive and finite"):
            MixedBatches([(source, w) for w in weights], seed=0)
    with pytest.raises(ValueError, match="same data mixture"):
        mixture(seed=0).load_state_dict(MixedBatches([(source, 1.0)], seed=0).state_dict())
