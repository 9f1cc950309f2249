"""Training corpora: a `data.source` becomes one flat token array with a fixed train/val split.

Public API:
    load_corpus(source, tokenizer, split, cache_dir, *, val_fraction=0.05, bos=False) -> Corpus
    Corpus.tokens        1-D uint16/uint32 array (a read-only memmap): documents back to back,
                         each ending in the tokenizer's eos id (and starting with bos if bos=True)
    Corpus.doc_offsets   int64 [n_docs + 1]: document i is tokens[doc_offsets[i]:doc_offsets[i+1]]
    Corpus.info          CorpusInfo (source, kind, split, corpus_hash, n_docs, n_tokens, ...);
                         `info.to_dict()` is what a run records
    Corpus.documents()   iterate the documents as token arrays
    Corpus.long_sequences(length, n) -> int64 [N <= n, length]: the first `length` tokens of the
                         first n documents that are at least that long (perplexity vs length)

Sources (the value of `data.source`):
    "stdlib"             the embedded default: the running Python's standard-library `.py` files
                         (test/tests/idle_test, site-packages and machine-specific build files
                         excluded), sorted by relative path; one document per file
    a directory          every non-hidden file below it (recursively, sorted); one document per file
    a `.jsonl` file      one document per non-blank line, from its "text" field
    a prepared directory the output of `llamoe data prepare` (a manifest.json; experiments/data/prepared.py):
                         memory-mapped in place, not cached, nothing re-read or re-hashed
    a `.u16.bin` or      pre-tokenised ids, raw little-endian uint16 / uint32 (the suffix is the
    `.u32.bin` file      dtype); used in place, not cached; documents are delimited by the eos ids
                         already in it
    any other file       UTF-8 text, one document

Train/validation split, by near-duplicate groups: documents whose word-5-gram Jaccard similarity is
at least 0.5 are one group (experiments/data/near_duplicates.py; the stdlib's 40 encodings/cp*.py
code-page tables are 8 groups), and a whole group belongs to "val" when sha1(key of its first
document) maps below `val_fraction` (key = relative path for files, record index for JSONL), so no
held-out document has a near-copy in training, and the split is stable and needs no shuffle state.
If that selects no document, the group with the smallest hash is "val". A source with
a single document (one text file) is split by position: the last `val_fraction` of it, cut at a
line break, is "val". A `.bin` source is split by token position the same way.

Cache: tokenised splits live in `cache_dir/<kind>-<split>-<key>/` (tokens file, doc offsets,
info.json), where the key hashes the corpus content, the tokenizer fingerprint, the split settings
and this module's format version. Entries are built in a temporary directory and renamed into
place, so a crash never leaves a half-written entry and concurrent builders (data-parallel ranks)
are safe: the first rename wins. A write that fails (disk full) removes its temporary directory
and raises WriteError naming the entry; temporaries of builders that died on this host (their
names carry host and pid) are removed by the next build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sysconfig
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from llamoe.config_error import ConfigError
from llamoe.experiments.data import near_duplicates, prepared
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.errors import write_failed

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: near-duplicate groups split train from val
SPLITS = ("train", "val")
_SOURCE_HELP = (
    "Use 'stdlib' (the built-in corpus), a text file, a directory of text files, "
    "a .jsonl file with a 'text' field, or a .u16.bin/.u32.bin token file."
)
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class CorpusInfo:
    """What a run records about its data: enough to tell whether two runs saw the same tokens."""

    source: str
    kind: str  # stdlib | directory | jsonl | text | tokens | prepared
    split: str
    corpus_hash: str  # content of the whole source (both splits)
    tokenizer: str  # tokenizer fingerprint
    val_fraction: float
    bos: bool
    n_docs: int
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Corpus:
    """One split of a source as a flat token array; see the module docstring."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    info: CorpusInfo
    cache_path: Path | None  # None for .bin sources, which are used in place
    from_cache: bool

    def __len__(self) -> int:
        return len(self.tokens)

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's tokens (a view), including its trailing eos."""
        for start, end in zip(self.doc_offsets[:-1], self.doc_offsets[1:]):
            yield self.tokens[start:end]

    def long_sequences(self, length: int, n: int) -> np.ndarray:
        """The first `length` tokens of each of the first `n` documents with at least `length` tokens."""
        lengths = np.diff(self.doc_offsets)
        picks = np.flatnonzero(lengths >= length)[:n]
        if len(picks) == 0:
            raise ValueError(
                f"no {self.info.split} document of data.source={self.info.source!r} has {length} tokens "
                f"(the longest has {int(lengths.max())}); evaluate shorter lengths or use a source "
                "with longer documents"
            )
        rows = [self.tokens[self.doc_offsets[i] : self.doc_offsets[i] + length] for i in picks]
        return np.stack(rows).astype(np.int64)


def load_corpus(
    source: str,
    tokenizer: Tokenizer,
    split: str,
    cache_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    bos: bool = False,
) -> Corpus:
    """Tokenise (or reuse the cached tokens of) one split of `source`; see the module docstring."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    val_fraction, bos = float(val_fraction), bool(bos)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in [0, 1), got {val_fraction}")
    kind, path = _resolve(source)
    if kind == "tokens":
        return _load_token_file(source, path, tokenizer, split, val_fraction)
    if kind == "prepared":
        tokens, offsets, manifest = prepared.open_prepared(path, tokenizer, split, val_fraction, bos)
        info = CorpusInfo(source, kind, split, manifest["source"]["sha256"], tokenizer.fingerprint, val_fraction,
                          bos, len(offsets) - 1, len(tokens))  # fmt: skip
        return Corpus(tokens, offsets, info, None, from_cache=False)  # type: ignore[arg-type]

    files = _list_files(kind, path)
    corpus_hash = _hash_files(files, path if path.is_dir() else path.parent)
    keys = _document_keys(kind, files, path)
    meta = dict(
        source=source,
        kind=kind,
        split=split,
        corpus_hash=corpus_hash,
        tokenizer=tokenizer.fingerprint,
        val_fraction=val_fraction,
        bos=bos,
    )
    settings = {k: v for k, v in meta.items() if k != "source"}
    key = hashlib.sha1(json.dumps(dict(settings, version=CACHE_FORMAT_VERSION), sort_keys=True).encode()).hexdigest()
    entry = Path(cache_dir).expanduser() / f"{kind}-{split}-{key[:20]}"

    from_cache = entry.is_dir()
    if not from_cache:
        log.info("tokenising data.source=%r (%s split) into %s", source, split, entry)
        if len(keys) == 1:
            texts = _position_split(next(_texts(kind, files, [0])), split, val_fraction)
        else:
            groups = split_groups(_texts(kind, files, range(len(keys))), val_fraction)
            texts = _texts(kind, files, _select(keys, split, val_fraction, groups))
        _build_entry(entry, texts, tokenizer, bos, meta, n_source_docs=len(keys))
    return _open_entry(entry, source, from_cache)


def _resolve(source: str) -> tuple[str, Path]:
    """Classify `data.source` as one of the source kinds, or fail naming what does exist."""
    if source == "stdlib":
        return "stdlib", Path(sysconfig.get_paths()["stdlib"])
    path = Path(source).expanduser()
    if not path.exists():
        parent = path.absolute().parent
        if parent.is_dir():
            names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
            listing = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
            where = f"{parent} contains: {listing or '(nothing)'}"
        else:
            where = f"{parent} does not exist either"
        raise ConfigError("data.source", f"{source!r} does not exist ({where}). {_SOURCE_HELP}")
    if path.is_dir():
        if prepared.is_interrupted(path):
            raise ConfigError(
                "data.source", f"{source!r} holds an interrupted `llamoe data prepare` (no manifest.json); rerun it"
            )
        return ("prepared" if prepared.is_prepared(path) else "directory"), path
    if path.name.endswith((".u16.bin", ".u32.bin")):
        return "tokens", path
    if path.suffix == ".bin":
        raise ConfigError(
            "data.source",
            f"{source!r}: the token dtype of a .bin file is read from its suffix; "
            "rename it to *.u16.bin (uint16 ids) or *.u32.bin (uint32 ids)",
        )
    return ("jsonl" if path.suffix == ".jsonl" else "text"), path


def _list_files(kind: str, root: Path) -> list[Path]:
    """The files that make up a source, in their deterministic document order."""
    if kind in ("text", "jsonl"):
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        if kind == "stdlib":
            # config-3.x-*/ and _sysconfigdata*.py hold this machine's build paths: not portable.
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
            names = [f for f in filenames if f.endswith(".py") and not f.startswith("_sysconfigdata")]
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names = [f for f in filenames if not f.startswith(".")]
        files.extend(Path(dirpath) / f for f in names if (Path(dirpath) / f).is_file())
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        what = "standard-library .py files" if kind == "stdlib" else "non-hidden files"
        raise ConfigError("data.source", f"{root} holds no {what}; the corpus would be empty. {_SOURCE_HELP}")
    return files


def _hash_files(files: list[Path], root: Path, algorithm: str = "sha1") -> str:
    """A digest (sha1 for the cache keys; `llamoe data prepare` records sha256) over (relative path, size,
    content) of every file, in order."""
    digest = hashlib.new(algorithm)
    for f in files:
        data = f.read_bytes()
        digest.update(f"{f.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _document_keys(kind: str, files: list[Path], root: Path) -> list[str]:
    """The split key of every document, in document order."""
    if kind == "jsonl":
        return [str(i) for i, _ in enumerate(_jsonl_lines(files[0]))]
    if kind == "text":
        return ["0"]
    return [f.relative_to(root).as_posix() for f in files]


def split_groups(texts: Iterable[str], val_fraction: float, signature: Callable = map) -> np.ndarray | None:
    """The near-duplicate group of every document (None when nothing is held out, so nothing to keep apart);
    `signature` maps near_duplicates.signature over the texts (a process pool's imap in `llamoe data prepare`)."""
    if val_fraction == 0:
        return None
    signatures = list(signature(near_duplicates.signature, texts))
    return near_duplicates.groups(np.stack(signatures)) if signatures else np.zeros(0, np.int64)


def _select(keys: list[str], split: str, val_fraction: float, groups: np.ndarray | None = None) -> list[int]:
    """Indices of the documents in `split` under the group hash rule (see the module docstring);
    `groups[i]` is the first document of document i's group (None: every document its own group)."""
    first = np.arange(len(keys)) if groups is None else groups
    unit = {int(g): int(hashlib.sha1(keys[g].encode()).hexdigest()[:15], 16) / 16**15 for g in np.unique(first)}
    val = {g for g, u in unit.items() if u < val_fraction}
    if not val and val_fraction > 0 and unit:
        val = {min(unit, key=unit.__getitem__)}
    return [i for i in range(len(keys)) if (int(first[i]) in val) == (split == "val")]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            "data.source", f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); remove it from the source"
        ) from None


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every non-blank line: one record each."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def _texts(kind: str, files: list[Path], indices: Iterable[int]) -> Iterator[str]:
    """The texts of the selected documents, in document order, read lazily."""
    if kind != "jsonl":
        for i in indices:
            yield _read_text(files[i])
        return
    wanted = set(indices)
    for index, (lineno, line) in enumerate(_jsonl_lines(files[0])):
        if index not in wanted:
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError("data.source", f"{files[0]}:{lineno}: not a UTF-8 JSON object ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError("data.source", f"{files[0]}:{lineno}: each line needs a string 'text' field")
        yield record["text"]


def _position_split(text: str, split: str, val_fraction: float) -> Iterator[str]:
    """One document split in two at the last line break before the (1 - val_fraction) point."""
    target = int(len(text) * (1.0 - val_fraction))
    # val_fraction 0 (a text evaluated whole) keeps every character, a last line without "\n" too
    cut = len(text) if target >= len(text) else (text.rfind("\n", 0, target) + 1) or target
    yield text[:cut] if split == "train" else text[cut:]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _build_entry(
    entry: Path, texts: Iterator[str], tokenizer: Tokenizer, bos: bool, meta: dict, n_source_docs: int
) -> None:
    """Tokenise `texts` into a temporary directory, then rename it to `entry` (atomic)."""
    dtype = _token_dtype(tokenizer.vocab_size)
    _remove_dead_builders(entry)
    tmp = entry.parent / f".{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        offsets = [0]
        with open(tmp / f"tokens.{dtype.name}", "wb") as f:
            for text in texts:
                if not text:
                    continue
                ids = tokenizer.encode_array(text)
                doc = np.empty(len(ids) + 1 + bos, dtype=dtype)
                doc[bos:-1] = ids
                doc[-1] = tokenizer.eos_id
                if bos:
                    doc[0] = tokenizer.bos_id
                f.write(doc.tobytes())
                offsets.append(offsets[-1] + len(doc))
            f.flush()
            os.fsync(f.fileno())
        if len(offsets) == 1:
            raise ConfigError(
                "data.source",
                f"{meta['source']!r} has no non-empty documents in the {meta['split']} split "
                f"({n_source_docs} documents in the source, data.val_fraction={meta['val_fraction']}); "
                "add data or change data.val_fraction",
            )
        np.save(tmp / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
        info = dict(meta, n_docs=len(offsets) - 1, n_tokens=offsets[-1], dtype=dtype.name)
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # anything but "another builder got there first" is an error
                raise
    except OSError as e:
        raise write_failed("the token cache", entry, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_builders(entry: Path) -> None:
    """Remove temporaries of `entry` left by builders on this host whose process no longer exists."""
    prefix = f".{entry.name}.tmp-{socket.gethostname()}-"
    if not entry.parent.is_dir():
        return
    for path in entry.parent.iterdir():
        pid = path.name[len(prefix) :].split("-")[0] if path.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_entry(entry: Path, source: str, from_cache: bool) -> Corpus:
    info = dict(json.loads((entry / "info.json").read_text()), source=source)
    dtype = np.dtype(info.pop("dtype"))
    token_file = entry / f"tokens.{dtype.name}"
    if not token_file.is_file() or token_file.stat().st_size != info["n_tokens"] * dtype.itemsize:
        raise RuntimeError(f"corpus cache entry {entry} is damaged; delete that directory and run again")
    tokens = np.memmap(token_file, dtype=dtype, mode="r")
    offsets = np.load(entry / "doc_offsets.npy")
    return Corpus(tokens, offsets, CorpusInfo(**info), entry, from_cache)


def _load_token_file(source: str, path: Path, tokenizer: Tokenizer, split: str, val_fraction: float) -> Corpus:
    """A pre-tokenised .u16.bin/.u32.bin file, memory-mapped in place and split by position."""
    dtype = np.dtype("<u2" if path.name.endswith(".u16.bin") else "<u4")
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise ConfigError(
            "data.source", f"{path} holds {size} bytes, not a whole, non-zero number of {dtype.name} token ids"
        )
    every = np.memmap(path, dtype=dtype, mode="r")
    top = int(every.max())
    if top >= tokenizer.vocab_size:
        raise ConfigError(
            "data.source",
            f"{path} holds token id {top}, but the tokenizer has vocab_size {tokenizer.vocab_size}; "
            "use the tokenizer the file was made with",
        )
    cut = int(len(every) * (1.0 - val_fraction))
    tokens = every[:cut] if split == "train" else every[cut:]
    if len(tokens) == 0:
        raise ConfigError(
            "data.source", f"{path}: the {split} split is empty (data.val_fraction={val_fraction}); change it"
        )
    ends = np.flatnonzero(tokens == tokenizer.eos_id) + 1
    if len(ends) == 0 or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    info = CorpusInfo(
        source=source,
        kind="tokens",
        split=split,
        corpus_hash=digest.hexdigest(),
        tokenizer=tokenizer.fingerprint,
        val_fraction=val_fraction,
        bos=False,
        n_docs=len(offsets) - 1,
        n_tokens=len(tokens),
    )
    return Corpus(tokens, offsets, info, None, from_cache=False)
