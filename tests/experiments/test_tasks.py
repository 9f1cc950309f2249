"""Synthetic long-context tasks: pinned formats, exact lengths, answer spans, determinism, training batches."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llamoe.experiments.data.batches import MixedBatches, PackedBatches
from llamoe.experiments.data.corpus import load_corpus
from llamoe.experiments.data.task_mix import TaskBatches, TaskMix, task_sources
from llamoe.experiments.data.tasks import IGNORE_INDEX, MQAR, PASSKEY_SENTENCES, Domains, Needle, Passkey
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.models.config import ConfigError

BYTES = Tokenizer.byte_level()
HAYSTACK = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, dtype=np.uint8).astype(np.int64)


def text(ids) -> str:
    return BYTES.decode(ids)


def bpe_tokenizer(tmp_path: Path) -> Tokenizer:
    """A small BPE file whose merges cut digits, words and spaces differently from bytes."""
    merges = [
        b"12",
        b"123",
        b"45",
        b"Th",
        b"The",
        b" p",
        b" pa",
        b" pas",
        b" pass",
        b" k",
        b" ke",
        b" key",
        b"is",
        b" is",
        b"=1",
        b"ab",
    ]
    ranks = [bytes([b]) for b in range(256)] + merges
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return Tokenizer.from_file(path)


def test_passkey_format_is_pinned() -> None:
    ex = Passkey(BYTES).example(250, 0.5, seed=7)
    assert text(ex.tokens) == (
        "A pass key is hidden in the text below. Find it and remember it.\n"
        "Here we go. There and back again. Listen carefully. The pass key is 95041. The sky is blue. The gr"
        "\nWhat is the pass key? The pass key is 95041"
        "ass is green. The sky is blue. The sky is b"  # the tail: no loss, never scored
    )
    assert ex.answer_spans == ((202, 207),) and text(ex.answers()[0]) == "95041" == ex.meta["key"]
    assert ex.meta["tail"] == 43 and text(ex.prompt()).endswith("The pass key is ")


def test_mqar_format_is_pinned() -> None:
    ex = MQAR(BYTES).example(60, n_pairs=3, seed=7)
    assert text(ex.tokens) == "The  ym=77 qf=83 ru=22\nsun is yellow.\n ym=77 ru=22 qf=83 The"
    assert [text(a) for a in ex.answers()] == ["77", "22", "83"]
    assert (ex.meta["prefix"], ex.meta["gap"], ex.meta["tail"]) == (4, 14, 4)


@pytest.mark.parametrize("length", [168, 300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_lengths_are_exact_and_depth_moves_the_key(length: int, depth: float) -> None:
    task = Passkey(BYTES)
    ex = task.example(length, depth, seed=length)
    end = length - ex.meta["tail"]
    assert len(ex.tokens) == length and ex.answer_spans == ((end - 5, end),)
    assert 0 <= ex.meta["tail"] <= length // 4
    body = text(ex.tokens[:end])
    key = ex.meta["key"]
    assert re.fullmatch(r"[1-9]\d{4}", key)
    assert body.count(f"The pass key is {key}.") == 1 and body.endswith(f"The pass key is {key}")
    assert any(s.format(key=key) in body for s in PASSKEY_SENTENCES)
    # the key sentence starts at a filler sentence boundary, about `depth` of the way through the filler
    before = text(ex.tokens[: ex.meta["key_position"]])
    assert before.endswith(("\n", ". "))
    n_filler = ex.meta["filler"]
    assert abs(ex.meta["key_position"] - len(task._intro) - depth * n_filler) <= 22  # one filler sentence


def test_passkey_depth_order_and_determinism() -> None:
    task = Passkey(BYTES)
    positions = [task.example(2000, d, seed=1).meta["key_position"] for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert positions == sorted(positions) and positions[0] < positions[-1]
    a, b, c = task.example(500, 0.5, seed=3), task.example(500, 0.5, seed=3), task.example(500, 0.5, seed=4)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)


def test_too_short_examples_fail_with_the_needed_length() -> None:
    with pytest.raises(ValueError, match="passkey example of 100 tokens is impossible.*need 168"):
        Passkey(BYTES).example(100, 0.5, seed=0)
    with pytest.raises(ValueError, match="mqar example"):
        MQAR(BYTES).example(40, n_pairs=8, seed=0)
    with pytest.raises(ValueError, match="depth"):
        Passkey(BYTES).example(500, 1.5, seed=0)


def test_needle_inserts_every_needle_into_an_intact_haystack() -> None:
    task = Needle(BYTES, HAYSTACK, n_needles=3)
    ex = task.example(600, seed=5, depth=0.25)
    body = text(ex.tokens)
    needles = re.findall(r"\nThe special magic number for ([a-z]{6}) is (\d{6})\.\n", body)
    assert len(needles) == 3 and len(ex.tokens) == 600
    key, value = ex.meta["key"], ex.meta["value"]
    assert (key, value) in needles and text(ex.answers()[0]) == value
    body = text(ex.tokens[: ex.answer_spans[0][1]])  # without the tail
    assert body.endswith(f"\nWhat is the special magic number for {key}? The special magic number for {key} is {value}")
    # removing needles and question leaves one contiguous slice of the (repeated) haystack
    needle = r"\nThe special magic number for [a-z]{6} is \d{6}\.\n"
    hay = re.sub(needle, "", body[: body.index("\nWhat is")])
    assert hay in text(np.tile(HAYSTACK, 3))
    hay_before = re.sub(needle, "", body[: body.index(f"\nThe special magic number for {key} is {value}")])
    assert abs(len(hay_before) / len(hay) - 0.25) < 0.01
    assert len(ex.tokens) >= task.min_length()


def test_mqar_queries_every_key_once_with_its_value() -> None:
    ex = MQAR(BYTES).example(400, n_pairs=12, seed=2)
    body = text(ex.tokens)
    head, gap_and_queries = body.split("\n", 1)
    pairs = dict(re.findall(r" ([a-z]{2})=(\d\d)", head))
    queries = re.findall(r" ([a-z]{2})=(\d\d)", gap_and_queries.rsplit("\n", 1)[1])
    assert len(pairs) == 12 and sorted(k for k, _ in queries) == sorted(pairs)
    assert all(pairs[k] == v for k, v in queries)
    assert [text(a) for a in ex.answers()] == [v for _, v in queries]
    assert ex.meta["prefix"] + ex.meta["gap"] + ex.meta["tail"] == 400 - 12 * 12 - 2


def test_answer_spans_are_exact_under_a_bpe_tokenizer(tmp_path: Path) -> None:
    tok = bpe_tokenizer(tmp_path)
    ex = Passkey(tok).example(300, 0.5, seed=11)
    assert len(ex.tokens) == 300 and tok.decode(ex.answers()[0]) == ex.meta["key"]
    assert len(ex.tokens) < len(tok.decode(ex.tokens))  # merges happened
    mq = MQAR(tok).example(200, n_pairs=6, seed=1)
    pairs = dict(re.findall(r" ([a-z]{2})=(\d\d)", tok.decode(mq.tokens).split("\n", 1)[0]))
    assert len(mq.tokens) == 200 and all(tok.decode(a) in pairs.values() for a in mq.answers())


def test_training_pairs_carry_loss_only_on_answers() -> None:
    ex = MQAR(BYTES).example(120, n_pairs=4, seed=0)
    inputs, targets = ex.training_pair()
    assert np.array_equal(inputs, ex.tokens) and len(targets) == 120  # the example whole: nominal length = seq_len
    scored = targets != IGNORE_INDEX
    assert np.array_equal(scored[:-1], ex.answer_mask()[1:]) and scored.sum() == 4 * 2 and not scored[-1]
    assert np.array_equal(targets[:-1][scored[:-1]], ex.tokens[1:][scored[:-1]])


def test_task_batches_are_deterministic_resumable_and_split_over_ranks() -> None:
    def make(rank=0, world=1, batch=4):
        return TaskBatches(Passkey(BYTES), seq_len=200, batch_size=batch, seed=3, rank=rank, world_size=world)

    a = make()
    first = [next(a) for _ in range(3)]
    x, y = first[0]
    assert x.shape == y.shape == (4, 200) and x.dtype == y.dtype == torch.int64
    assert ((y != IGNORE_INDEX).sum(dim=1) == 5).all()
    assert not torch.equal(first[0][0], first[1][0])
    resumed = make()
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(next(resumed)[0], next(a)[0])
    # two ranks of 2 rows together make the single-process batch of 4
    r0, r1 = make(0, 2, 2), make(1, 2, 2)
    assert torch.equal(torch.cat([next(r0)[0], next(r1)[0]]), first[0][0])
    with pytest.raises(ValueError, match="seed"):
        TaskBatches(Passkey(BYTES), 200, 4, seed=4).load_state_dict(a.state_dict())


def test_task_mix_weights_validation_and_sources() -> None:
    mix = TaskMix(passkey=0.2, mqar=0.1)
    assert mix.weights() == {"passkey": 0.2, "mqar": 0.1} and mix.corpus_weight == pytest.approx(0.7)
    sources = task_sources(mix, BYTES, seq_len=256, batch_size=2, seed=0)
    assert [(s.task.name, w) for s, w in sources] == [("passkey", 0.2), ("mqar", 0.1)]
    x, y = next(sources[1][0])
    assert x.shape == (2, 256) and (y != IGNORE_INDEX).any()
    with pytest.raises(ConfigError, match="data.tasks"):
        TaskMix(passkey=0.7, mqar=0.5).validate()
    with pytest.raises(ConfigError, match="data.tasks.needle"):
        task_sources(TaskMix(needle=0.5), BYTES, 256, 2, 0)
    with pytest.raises(ConfigError, match="data.tasks.mqar_pairs"):
        TaskMix(mqar=0.1, mqar_pairs=[5, 2]).validate()
    needle = task_sources(TaskMix(needle=0.5, needles=2), BYTES, 256, 2, 0, haystack=HAYSTACK)
    assert next(needle[0][0])[0].shape == (2, 256)


def test_mqar_training_distribution_fits_the_sequence() -> None:
    task = MQAR(BYTES, train_pairs=(2, 8))
    counts = {task.sample(100, seed=s).meta["n_pairs"] for s in range(30)}
    assert counts <= set(range(2, 9)) and max(counts) <= task.max_pairs(100)
    assert all(len(task.sample(n, seed=0).tokens) == n for n in (task.min_length(), 64, 257))


def test_tasks_mix_with_corpus_batches_and_resume(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text("x = 1\nprint(x)\n" * 400)
    corpus = load_corpus(str(tmp_path / "doc.txt"), BYTES, "train", tmp_path / "cache")
    mix = TaskMix(passkey=0.3, mqar=0.3)

    def make() -> MixedBatches:
        tasks = task_sources(mix, BYTES, seq_len=200, batch_size=2, seed=1)
        return MixedBatches([(PackedBatches(corpus, 200, 2, seed=1), mix.corpus_weight), *tasks], seed=1)

    a = make()
    kinds = [bool((next(a)[1] == IGNORE_INDEX).any()) for _ in range(20)]
    assert 0 < sum(kinds) < 20  # both corpus batches (no ignored targets) and task batches appear
    saved = json.loads(json.dumps(a.state_dict()))
    b = make()
    b.load_state_dict(saved)
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----------------------------------------------------------------------------- layouts a shortcut cannot exploit


def _answer_starts(examples) -> np.ndarray:
    return np.array([ex.answer_spans[0][0] for ex in examples])


@pytest.mark.parametrize("length", [256, 512])
def test_layouts_vary_so_no_position_follows_from_the_length(length: int) -> None:
    passkeys = [Passkey(BYTES).sample(length, seed=s) for s in range(300)]
    mqars = [MQAR(BYTES, (2, 4)).sample(length, seed=s) for s in range(300)]
    needles = [Needle(BYTES, HAYSTACK, 2).sample(length, seed=s) for s in range(300)]
    for examples in (passkeys, mqars, needles):
        starts = _answer_starts(examples)
        assert len(set(starts.tolist())) >= length // 8  # the answer ends anywhere in the last quarter
        assert np.bincount(starts).max() <= 0.05 * len(examples)  # and no answer position dominates
    keys = np.array([ex.meta["key_position"] for ex in passkeys])
    assert len(set(keys.tolist())) >= 40 and np.bincount(keys).max() <= 0.05 * len(keys)
    # the key's distance from the question varies as much: a fixed look-back finds it rarely
    offsets = _answer_starts(passkeys) - keys
    assert np.bincount(offsets).max() <= 0.05 * len(offsets)
    # the filler is not one periodic text: the same slice differs between examples
    assert len({ex.tokens[100:140].tobytes() for ex in passkeys}) >= 250
    assert len({ex.meta["prefix"] for ex in mqars}) >= 10


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("task", ["passkey", "mqar"])
def test_training_rows_have_the_layout_of_evaluation_examples_of_the_same_length(task: str) -> None:
    from llamoe.experiments.evals.retrieval import STREAMS

    length = 256
    source = Passkey(BYTES) if task == "passkey" else MQAR(BYTES, (4, 4))
    batches = TaskBatches(source, seq_len=length, batch_size=50, seed=0)
    rows = [row for _ in range(8) for row in next(batches)[1]]  # targets [seq_len]
    assert all(len(r) == length for r in rows)
    train_starts = np.array([int(np.flatnonzero(r != IGNORE_INDEX)[0]) + 1 for r in rows])  # target i is token i+1
    # the evaluation examples, built as experiments/evals/retrieval.py builds them at this length
    if task == "passkey":
        evals = [
            source.example(length, d, [0, STREAMS["eval"], length, j, t])
            for j, d in enumerate([0.0, 0.25, 0.5, 0.75, 1.0])
            for t in range(80)
        ]
    else:
        evals = [source.example(length, 4, [0, STREAMS["eval"], length, t]) for t in range(400)]
    assert all(len(ex.tokens) == length for ex in evals)
    eval_starts = _answer_starts(evals)
    assert _ks(train_starts, eval_starts) < 0.15  # same distribution (KS critical value at p=0.001: 0.14)
    # the statistic does see a shift of the layout by a few tokens, as training at seq_len + 1 had
    assert _ks(train_starts, eval_starts + 12) > 0.15


def test_domains_rows_follow_their_domain_table_and_score_after_the_warmup(tmp_path: Path) -> None:
    task = Domains(BYTES, 64)
    again = Domains(BYTES, 64)
    assert np.array_equal(task.table, again.table)  # the languages are the data: no run seed in them
    assert not np.array_equal(Domains(BYTES, 64, table_seed=1).table, task.table)
    assert task.table.shape == (64, 26, 2) and (task.table[..., 0] != task.table[..., 1]).all()
    ex = task.example(64, domain=5, seed=3)
    letters = np.array([ord(c) - ord("a") for c in text(ex.tokens)])
    assert len(ex.tokens) == 64 and (0 <= letters).all() and (letters < 26).all()
    assert all(b in task.table[5, a] for a, b in zip(letters, letters[1:]))  # every step allowed in domain 5
    assert ex.answer_spans == ((Domains.warmup, 64),)
    allowed = task.allowed_next(ex)
    assert allowed.shape == (64, 2) and all(ex.tokens[i + 1] in allowed[i] for i in range(63))
    inputs, targets = ex.training_pair()
    scored = targets != IGNORE_INDEX
    assert scored.sum() == 64 - Domains.warmup and not scored[: Domains.warmup - 1].any()
    # rows of the training distribution cover the domains; another tokenizer gives the same chains
    assert len({task.sample(32, seed=s).meta["domain"] for s in range(400)}) == 64
    bpe = Domains(bpe_tokenizer(tmp_path), 64)
    assert bpe.tokenizer.decode(bpe.example(40, 5, seed=3).tokens) == text(task.example(40, 5, seed=3).tokens)
    with pytest.raises(ValueError, match="impossible"):
        task.example(Domains.warmup, 0, seed=0)
    with pytest.raises(ConfigError, match="data.tasks.n_domains"):
        TaskMix(domains=1.0, n_domains=0).validate()
    ((source, weight),) = task_sources(TaskMix(domains=1.0, n_domains=16), BYTES, 64, 2, 0)
    assert weight == 1.0 and source.task.name == "domains" and source.task.n_domains == 16
