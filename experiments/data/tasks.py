"""Synthetic long-context tasks: passkey retrieval, needle-in-a-haystack, multi-query associative recall.

Public API:
    TaskExample                      tokens + answer spans; answer_mask(), prompt(), answers(), training_pair()
    Passkey(tokenizer).example(length, depth, seed)
    Needle(tokenizer, haystack, n_needles=4).example(length, seed, depth=None)
    MQAR(tokenizer).example(length, n_pairs, seed)
    Domains(tokenizer, n_domains).example(length, domain, seed)   a mixture of synthetic letter languages
    every task: .sample(length, seed) draws one example from its training distribution
Training batches of these tasks (TaskBatches, the `data.tasks` mix): experiments/data/task_mix.py.

Formats (protocols in shared/REFERENCE.md, "Long-context evaluation protocols"):
- passkey (Mohtashami & Jaggi 2023, "Landmark Attention"; LongLoRA; YaRN): an instruction, the
  filler sentences, a key sentence (one of four wordings) at the sentence start nearest to `depth`
  (fraction of the filler before it), more filler, then "What is the pass key? The pass key is "
  and the 5-digit answer.
- needle (Kamradt's needle-in-a-haystack, with several needles as in RULER): corpus text as the
  haystack, `n_needles` sentences "The special magic number for <key> is <value>." at random
  depths (the asked one at `depth` when given), then a question about one of them.
- mqar (Arora et al. 2023, "Zoology"): key=value pairs (two letters = two digits), filler as the
  gap, then every key queried again in a random order; the answers are the values.
- domains (a capacity-bound task for MoE positive controls, after the "mixture of domains with
  distinct statistics" of MoE studies): `n_domains` sparse bigram languages over the letters, one per
  row; the model must recognise the domain from the row and know its table.

Every example is assembled from text pieces that are encoded one by one and concatenated, so the
token spans of the answers are exact under any tokenizer, and the same token layout serves training
(loss on answer tokens only) and evaluation (greedy decoding, or teacher-forced argmax at the answer
positions). Lengths are exact: an example of nominal length N holds N tokens. The same seed always
gives the same example.

Layouts vary so that no position is predictable from the length alone (a model must retrieve):
- the filler is a random sequence of the filler sentences, entered at a random token offset;
- after the answer comes a tail of t extra filler/haystack tokens, t uniform in [0, min(slack, N // 4)]
  (slack: the tokens the example does not need), so the answer ends anywhere in the last quarter;
- key depth (passkey, needle) is a continuous fraction; MQAR puts a random filler prefix before the pairs.
Training rows (task_mix.TaskBatches) and evaluation examples of nominal length N come from the same builders
with the same N, so they share one layout distribution. The tail carries no loss and is never scored.
"""

from __future__ import annotations

import string
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np

from llamoe.experiments.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # targets with this id carry no loss (torch cross_entropy's default ignore_index)

Seed = Union[int, Sequence[int]]

PASSKEY_INTRO = "A pass key is hidden in the text below. Find it and remember it.\n"
FILLER_SENTENCES = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
PASSKEY_SENTENCES = (  # of different lengths, so the key's distance from the question varies at any depth
    "The pass key is {key}. Remember it. {key} is the pass key. ",
    "The pass key is {key}. Remember it. ",
    "Listen carefully. The pass key is {key}. ",
    "The pass key is {key}. ",
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is "
NEEDLE_SENTENCE = "\nThe special magic number for {key} is {value}.\n"
NEEDLE_QUESTION = "\nWhat is the special magic number for {key}? The special magic number for {key} is "
MQAR_PAIR = " {key}={value}"
MQAR_QUERY = " {key}="
MQAR_GAP_OPEN, MQAR_GAP_CLOSE = "\n", "\n"


@dataclass(frozen=True)
class TaskExample:
    """One example: tokens [N] and the [start, end) spans of its answer tokens (in order)."""

    tokens: np.ndarray
    answer_spans: tuple[tuple[int, int], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def answer_mask(self) -> np.ndarray:
        """bool [N]: True at answer tokens."""
        mask = np.zeros(len(self.tokens), dtype=bool)
        for start, end in self.answer_spans:
            mask[start:end] = True
        return mask

    def answers(self) -> list[np.ndarray]:
        """The answer token ids, one array per span."""
        return [self.tokens[start:end] for start, end in self.answer_spans]

    def prompt(self) -> np.ndarray:
        """Everything before the first answer: what greedy decoding is given."""
        return self.tokens[: self.answer_spans[0][0]]

    def training_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [N], targets [N]): the whole example as input; target i is token i+1 where that is an
        answer token, IGNORE_INDEX elsewhere (the last position has no next token)."""
        scored = np.append(self.answer_mask()[1:], False)
        targets = np.where(scored, np.append(self.tokens[1:], 0), IGNORE_INDEX)
        return self.tokens, targets


class Task(Protocol):
    """What TaskBatches needs from a task: a name and its training distribution."""

    name: str

    def sample(self, length: int, seed: Seed) -> TaskExample: ...


class _Pieces:
    """Concatenates separately encoded pieces and records which of them are answers."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def add(self, ids: Sequence[int] | np.ndarray, answer: bool = False) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if answer:
            self.spans.append((self.length, self.length + len(ids)))
        self.parts.append(ids)
        self.length += len(ids)

    def build(self, meta: dict[str, Any]) -> TaskExample:
        return TaskExample(np.concatenate(self.parts), tuple(self.spans), meta)


def _ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _tile(unit: np.ndarray, start: int, n: int) -> np.ndarray:
    """n tokens of `unit` repeated forever, starting at offset `start` of the repetition."""
    reps = (start + n) // len(unit) + 1
    return np.tile(unit, reps)[start : start + n]


class _Filler:
    """Filler text: the filler sentences in a random order, entered at a random token offset."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.sentences = [_ids(tokenizer, s) for s in FILLER_SENTENCES]
        self.longest = max(len(s) for s in self.sentences)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [n], the positions in [0, n) where a sentence starts): random sentences, entered at a
        random offset into the first one (so position 0 is a start only when the offset is 0)."""
        offset = int(rng.integers(self.longest))
        parts, total = [], 0
        while total < n + offset:
            parts.append(self.sentences[int(rng.integers(len(self.sentences)))])
            total += len(parts[-1])
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        starts = np.cumsum([0] + [len(p) for p in parts]) - offset
        return stream[offset : offset + n], starts[(starts >= 0) & (starts < n)].astype(np.int64)


def _tail_length(rng: np.random.Generator, length: int, slack: int) -> int:
    """Tokens after the answer: uniform in [0, min(slack, length // 4)], so the answer's end moves."""
    return int(rng.integers(min(slack, length // 4) + 1))


def _too_short(task: str, length: int, minimum: int, hint: str) -> ValueError:
    return ValueError(f"a {task} example of {length} tokens is impossible: {hint} need {minimum} tokens")


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


class Passkey:
    """A 5-digit pass key hidden at a chosen depth in repeated filler; chance of a guess: 1e-5."""

    name = "passkey"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._intro, self._filler = _ids(tokenizer, PASSKEY_INTRO), _Filler(tokenizer)
        self._question = _ids(tokenizer, PASSKEY_QUESTION)

    def min_length(self) -> int:
        """Tokens an example surely fits in (ASCII text never takes more tokens than characters)."""
        key = "12345"
        longest = max(len(s.format(key=key)) for s in PASSKEY_SENTENCES)
        return len(self._intro) + longest + len(self._question) + len(key)

    def example(self, length: int, depth: float, seed: Seed) -> TaskExample:
        """An example of nominal `length` tokens with the key sentence after about `depth` of the filler.

        The key sentence goes at the filler sentence start nearest to depth * (filler length); the
        filler's sentences, its entry offset and the tail after the answer are drawn from `seed`.
        """
        _check_depth(depth)
        rng = np.random.default_rng(seed)
        key = str(rng.integers(10_000, 100_000))
        template = PASSKEY_SENTENCES[int(rng.integers(len(PASSKEY_SENTENCES)))]
        sentence, answer = _ids(self.tokenizer, template.format(key=key)), _ids(self.tokenizer, key)
        fixed = len(self._intro) + len(sentence) + len(self._question) + len(answer)
        if length < self.min_length():  # the longest wording must fit, so whether N fits never depends on the seed
            raise _too_short("passkey", length, self.min_length(), "the instruction, key sentence, question and answer")
        tail = _tail_length(rng, length, length - fixed)
        filler, starts = self._filler.draw(rng, length - fixed)
        n_filler = length - fixed - tail
        body, rest = filler[:n_filler], filler[n_filler:]
        starts = starts[starts < n_filler]  # where the key sentence may go: a sentence start, else the beginning
        if not len(starts):
            starts = np.zeros(1, dtype=np.int64)
        before = int(starts[np.argmin(np.abs(starts - depth * n_filler))])
        out = _Pieces()
        out.add(self._intro)
        out.add(body[:before])
        out.add(sentence)
        out.add(body[before:])
        out.add(self._question)
        out.add(answer, answer=True)
        out.add(rest)
        meta = {
            "task": self.name,
            "key": key,
            "depth": depth,
            "key_position": len(self._intro) + before,
            "filler": n_filler,
            "tail": tail,
        }
        return out.build(meta)

    def sample(self, length: int, seed: Seed) -> TaskExample:
        """Training distribution: depth uniform in [0, 1]."""
        rng = np.random.default_rng(seed)
        return self.example(length, float(rng.random()), rng.integers(2**63))


class Needle:
    """Several key -> number sentences inside corpus text; one of them is asked for (6-digit answer)."""

    name = "needle"

    def __init__(self, tokenizer: Tokenizer, haystack: np.ndarray, n_needles: int = 4) -> None:
        if n_needles < 1:
            raise ValueError(f"n_needles must be >= 1, got {n_needles}")
        if len(haystack) == 0:
            raise ValueError("the needle haystack is empty; pass the token array of a corpus split")
        self.tokenizer = tokenizer
        self.haystack = haystack
        self.n_needles = n_needles

    def min_length(self) -> int:
        """Tokens an example surely fits in (ASCII text never takes more tokens than characters)."""
        key, value = "abcdef", "123456"
        needle = len(NEEDLE_SENTENCE.format(key=key, value=value))
        return self.n_needles * needle + len(NEEDLE_QUESTION.format(key=key)) + len(value)

    def example(self, length: int, seed: Seed, depth: Optional[float] = None) -> TaskExample:
        """An example of exactly `length` tokens; the asked needle sits at `depth` (random when None)."""
        rng = np.random.default_rng(seed)
        keys: list[str] = []
        while len(keys) < self.n_needles:  # distinct six-letter keys
            key = "".join(rng.choice(list(string.ascii_lowercase), 6))
            if key not in keys:
                keys.append(key)
        values = [str(v) for v in rng.integers(100_000, 1_000_000, self.n_needles)]
        asked = int(rng.integers(self.n_needles))
        depths = rng.random(self.n_needles)
        if depth is not None:
            _check_depth(depth)
            depths[asked] = depth
        needles = [_ids(self.tokenizer, NEEDLE_SENTENCE.format(key=k, value=v)) for k, v in zip(keys, values)]
        question = _ids(self.tokenizer, NEEDLE_QUESTION.format(key=keys[asked]))
        answer = _ids(self.tokenizer, values[asked])
        fixed = sum(len(n) for n in needles) + len(question) + len(answer)
        if length < fixed:
            raise _too_short("needle", length, fixed, f"{self.n_needles} needles, the question and the answer")
        tail = _tail_length(rng, length, length - fixed)
        n_hay = length - fixed - tail
        start = int(rng.integers(len(self.haystack)))
        hay = _tile(np.asarray(self.haystack, dtype=np.int64), start, n_hay + tail)
        cuts = np.round(depths * n_hay).astype(np.int64)
        out, done = _Pieces(), 0
        for i in np.argsort(cuts, kind="stable"):
            out.add(hay[done : cuts[i]])
            out.add(needles[i])
            done = int(cuts[i])
        out.add(hay[done:n_hay])
        out.add(question)
        out.add(answer, answer=True)
        out.add(hay[n_hay:])
        meta = {
            "task": self.name,
            "key": keys[asked],
            "value": values[asked],
            "depth": float(depths[asked]),
            "tail": tail,
        }
        return out.build(meta)

    def sample(self, length: int, seed: Seed) -> TaskExample:
        """Training distribution: every needle at a uniform random depth."""
        return self.example(length, seed)


class MQAR:
    """Multi-query associative recall: `n_pairs` " ab=12" pairs, a filler gap, then " ab=" queries.

    Each key is two lowercase letters (distinct within an example), each value two digits, so a
    guess is right with probability 1/100. Training draws n_pairs uniformly from `train_pairs`.
    """

    name = "mqar"
    n_values = 100

    def __init__(self, tokenizer: Tokenizer, train_pairs: tuple[int, int] = (2, 8)) -> None:
        if not 1 <= train_pairs[0] <= train_pairs[1]:
            raise ValueError(f"train_pairs must be (min, max) with 1 <= min <= max, got {train_pairs}")
        self.tokenizer = tokenizer
        self.train_pairs = train_pairs
        self._filler = _Filler(tokenizer)
        self._open, self._close = _ids(tokenizer, MQAR_GAP_OPEN), _ids(tokenizer, MQAR_GAP_CLOSE)

    def example(self, length: int, n_pairs: int, seed: Seed) -> TaskExample:
        """An example of exactly `length` tokens: the pairs, a gap of filler, then every key once more."""
        if not 1 <= n_pairs <= 26 * 26:
            raise ValueError(f"n_pairs must be in [1, 676] (two-letter keys), got {n_pairs}")
        rng = np.random.default_rng(seed)
        letters = np.array(list(string.ascii_lowercase))
        codes = rng.choice(26 * 26, n_pairs, replace=False)
        keys = [letters[c // 26] + letters[c % 26] for c in codes]
        values = [f"{v:02d}" for v in rng.integers(0, self.n_values, n_pairs)]
        order = rng.permutation(n_pairs)
        pairs = [_ids(self.tokenizer, MQAR_PAIR.format(key=k, value=v)) for k, v in zip(keys, values)]
        queries = [
            (_ids(self.tokenizer, MQAR_QUERY.format(key=keys[i])), _ids(self.tokenizer, values[i])) for i in order
        ]
        fixed = sum(len(p) for p in pairs) + sum(len(q) + len(a) for q, a in queries)
        fixed += len(self._open) + len(self._close)
        if length < fixed:
            raise _too_short("mqar", length, fixed, f"{n_pairs} pairs and their queries")
        tail = _tail_length(rng, length, length - fixed)
        free = length - fixed - tail
        prefix = int(rng.integers(free // 4 + 1))  # filler before the pairs moves every pair's position
        filler, _ = self._filler.draw(rng, free + tail)
        out = _Pieces()
        out.add(filler[:prefix])
        for p in pairs:
            out.add(p)
        out.add(self._open)
        out.add(filler[prefix:free])
        out.add(self._close)
        for query, answer in queries:
            out.add(query)
            out.add(answer, answer=True)
        out.add(filler[free:])
        return out.build({"task": self.name, "n_pairs": n_pairs, "gap": free - prefix, "prefix": prefix, "tail": tail})

    def sample(self, length: int, seed: Seed) -> TaskExample:
        """Training distribution: n_pairs uniform in train_pairs (capped by what fits in `length`)."""
        rng = np.random.default_rng(seed)
        low, high = self.train_pairs
        n_pairs = min(int(rng.integers(low, high + 1)), max(1, self.max_pairs(length)))
        return self.example(length, n_pairs, rng.integers(2**63))

    def max_pairs(self, length: int) -> int:
        """How many pairs surely fit in `length` tokens (ASCII text never takes more tokens than characters)."""
        per_pair = len(MQAR_PAIR.format(key="ab", value="12")) + len(MQAR_QUERY.format(key="ab")) + 2
        return min(26 * 26, max(0, (length - len(self._open) - len(self._close)) // per_pair))

    def min_length(self) -> int:
        """Tokens an example with one pair surely fits in."""
        return next(n for n in range(1, 10**4) if self.max_pairs(n) >= 1)


class Domains:
    """A mixture of `n_domains` synthetic languages over the 26 lowercase letters, one per row.

    In domain d each letter has `successors` allowed next letters (drawn once from `table_seed`, so every
    run of a study learns the same languages), and a row is a chain of letters of one domain, each next
    letter uniform among the allowed ones. The first WARMUP letters carry no loss: they are what
    identifies the domain. A model that knows every domain's table and recognises the domain scores
    ln(successors) nats per letter; one that ignores the domain, about ln 26. The tables are what must
    be stored, so total parameters help; the domain is visible in every position's context, so a router
    can specialise experts by domain.
    """

    name = "domains"
    letters, successors, warmup = 26, 2, 8

    def __init__(self, tokenizer: Tokenizer, n_domains: int, table_seed: int = 0) -> None:
        if not 1 <= n_domains <= 10**4:
            raise ValueError(f"n_domains must be in [1, 10000], got {n_domains}")
        self.tokenizer, self.n_domains = tokenizer, n_domains
        rng = np.random.default_rng([table_seed, zlib.crc32(b"domains")])
        # table[d, a]: the letters allowed after letter a in domain d
        self.table = np.argsort(rng.random((n_domains, self.letters, self.letters)), axis=2)[..., : self.successors]
        ids = [_ids(tokenizer, letter) for letter in string.ascii_lowercase]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the domains task needs every lowercase letter to be one token of {tokenizer!r}")
        self.letter_ids = np.concatenate(ids)

    def min_length(self) -> int:
        """The warmup letters and one scored letter."""
        return self.warmup + 1

    def example(self, length: int, domain: int, seed: Seed) -> TaskExample:
        """A chain of `length` letters of `domain`; the answers are the letters after the warmup."""
        if length < self.min_length():
            raise _too_short("domains", length, self.min_length(), "the warmup letters and one scored letter")
        rng = np.random.default_rng(seed)
        chain = np.empty(length, dtype=np.int64)
        chain[0] = rng.integers(self.letters)
        picks = rng.integers(self.successors, size=length)
        for t in range(1, length):
            chain[t] = self.table[domain, chain[t - 1], picks[t]]
        return TaskExample(self.letter_ids[chain], ((self.warmup, length),), {"task": self.name, "domain": domain})

    def sample(self, length: int, seed: Seed) -> TaskExample:
        """Training distribution: the domain uniform."""
        rng = np.random.default_rng(seed)
        return self.example(length, int(rng.integers(self.n_domains)), rng.integers(2**63))

    def allowed_next(self, example: TaskExample) -> np.ndarray:
        """[N, successors]: the token ids the example's domain allows after each of its letters."""
        order = np.argsort(self.letter_ids)
        letters = order[np.searchsorted(self.letter_ids, example.tokens, sorter=order)]
        return self.letter_ids[self.table[example.meta["domain"], letters]]
