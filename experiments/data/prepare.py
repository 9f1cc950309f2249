"""`llamoe data prepare SOURCE OUT`: tokenise a corpus once, with several processes, into memory-mappable
shards plus a manifest; `data.source=OUT` then trains from it without reading the source again.

Sources: a text file (.txt/.text/.md/.rst, or no suffix), a directory (every non-hidden file below it
as UTF-8 text, one document each), a .jsonl file (one document per non-blank line, from the string field
--text-field, default "text") or a .parquet file (one document per row of the column --text-field;
needs pyarrow, in the dev extra).

Held-out split: the same rule as the token cache (experiments/data/corpus.py), applied at prepare
time: documents are grouped by near-duplicates (word-5-gram Jaccard >= 0.5, MinHash; a first pass over
the source, the signatures computed by the --workers processes), and a group is val when sha1(key of its
first document) maps below --val-fraction (key: the relative path in a directory, the record index in
JSONL and parquet; at least one val group when the fraction is > 0). A single text file is split by position: val is what follows the last line break before
(1 - val_fraction) of its *bytes* (corpus.py counts characters; the two agree on ASCII). prepare
writes separate train and val shards, and the manifest records the fraction: a run must use the same
data.val_fraction and data.bos (else exit status 2 naming the key).

Document boundaries: every document ends in the tokenizer's eos (and starts with bos under --bos),
as in the token cache, and `<split>-offsets.npy` holds the document offsets, so nothing has to scan
for eos. The layout is in experiments/data/prepared.py.

Parallelism and determinism: the parent reads the source in document order and cuts it into work
items of about 1 MiB of text (a text file larger than that is cut at line breaks followed by an ASCII
letter or digit, where neither Llama pre-tokenizer regex ever joins two pieces, so the ids equal those
of the whole file); `--workers N` spawned processes tokenise items, and the parent writes their ids in
item order, starting a new shard once one holds --shard-tokens. Shards therefore do not depend on the
number of workers: 1 and N workers give byte-identical shards and manifests.

Atomicity: a marker file is written first, shards and offsets go to a temporary directory inside OUT
and are renamed into place, the manifest is written (atomically) last and the marker removed; an
interrupted prepare leaves no manifest, and `data.source=OUT` says so (exit 2). Rerunning cleans up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from llamoe.config_error import ConfigError
from llamoe.experiments.data import corpus, prepared
from llamoe.experiments.data.prepare_worker import Item, Piece, init_worker, tokenise_item
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.errors import USAGE, UsageError, UserError, report, write_failed, write_text_atomic

try:
    import pyarrow.parquet as pq
except ImportError:  # parquet is optional: only a .parquet source needs it
    pq = None

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
ITEM_BYTES = 1 << 20  # text per work item
_TMP = ".prepare-tmp"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind(path: Path) -> str:
    """Which reader a source needs, or a UsageError naming the path and what is accepted."""
    accepted = "a directory, a text file (.txt, .md, .rst), a .jsonl or a .parquet file"
    if not path.exists():
        raise UsageError(f"source {path} does not exist; pass {accepted}")
    if path.is_dir():
        if prepared.is_prepared(path) or prepared.is_interrupted(path):
            raise UsageError(f"source {path} is itself a prepared directory; pass the original text")
        return "directory"
    if path.suffix in (".jsonl", ".parquet"):
        return path.suffix[1:]
    if path.suffix.lower() in TEXT_SUFFIXES:
        return "text"
    raise UsageError(f"source {path}: unknown extension {path.suffix!r}; pass {accepted} (rename text to .txt)")


class _Reader:
    """A source's documents in order, each with its split, and the source's sha256."""

    def __init__(self, path: Path, kind: str, val_fraction: float, text_field: str, workers: int = 1) -> None:
        self.path, self.kind, self.val_fraction, self.field = path, kind, val_fraction, text_field
        self.workers = workers
        self.n_docs = 0
        if kind == "parquet" and pq is None:
            raise UsageError(
                f"source {path}: reading parquet needs pyarrow; pip install pyarrow (the dev extra has it)"
            )
        if kind == "directory":
            self.files = corpus._list_files("directory", path)
            self.sha256 = corpus._hash_files(self.files, path, "sha256")
        else:
            self.sha256 = _file_sha256(path)

    def _val(self) -> set[int]:
        """The val documents: near-duplicate groups from a first pass over the texts, then the hash rule."""
        keys = [f.relative_to(self.path).as_posix() for f in self.files] if self.kind == "directory" else None
        if self.val_fraction == 0 or self.workers == 1:
            groups = corpus.split_groups(self._texts(), self.val_fraction)
        else:
            with multiprocessing.get_context("spawn").Pool(self.workers) as pool:
                groups = corpus.split_groups(
                    self._texts(), self.val_fraction, lambda f, texts: pool.imap(f, texts, chunksize=16)
                )
        n = len(keys) if keys is not None else (len(groups) if groups is not None else 0)
        keys = keys if keys is not None else [str(i) for i in range(n)]
        return set(corpus._select(keys, "val", self.val_fraction, groups))

    def _texts(self) -> Iterator[str]:
        """Every document's text, in order (a fresh pass each call)."""
        if self.kind == "directory":
            return (corpus._read_text(f) for f in self.files)
        return self._jsonl_texts() if self.kind == "jsonl" else self._parquet_texts()

    def documents(self) -> Iterator[tuple[str, Piece]]:
        """(split, piece) in document order."""
        if self.kind == "text":
            yield from self._text_pieces()
            return
        val = self._val()
        for index, text in enumerate(self._texts()):
            self.n_docs += 1
            if text:
                yield ("val" if index in val else "train"), Piece(text)

    def _jsonl_texts(self) -> Iterator[str]:
        for lineno, line in corpus._jsonl_lines(self.path):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UsageError(f"{self.path}:{lineno}: not a UTF-8 JSON object ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
                raise UsageError(
                    f"{self.path}:{lineno}: no string field {self.field!r}; name the text field with --text-field"
                )
            yield record[self.field]

    def _parquet_texts(self) -> Iterator[str]:
        table = pq.ParquetFile(self.path)
        if self.field not in table.schema_arrow.names:
            raise UsageError(
                f"{self.path}: no column {self.field!r} (columns: {', '.join(table.schema_arrow.names)}); "
                "name the text column with --text-field"
            )
        row = 0
        for batch in table.iter_batches(batch_size=4096, columns=[self.field]):
            for value in batch.column(0).to_pylist():
                if not isinstance(value, str):
                    raise UsageError(f"{self.path}: row {row} of column {self.field!r} is not a string")
                row += 1
                yield value

    def _text_pieces(self) -> Iterator[tuple[str, Piece]]:
        """A text file: train = bytes before the cut, val = after it, each one document in pieces."""
        self.n_docs = 1
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            target = int(size * (1.0 - self.val_fraction))
            cut = size if target >= size else (data.rfind(b"\n", 0, target) + 1) or target
            for split, start, end in (("train", 0, cut), ("val", cut, size)):
                pos = start
                while pos < end:
                    stop = self._piece_end(data, pos, end)
                    try:
                        text = data[pos:stop].decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise UsageError(
                            f"{self.path} is not UTF-8 text ({err.reason} at byte {pos + err.start})"
                        ) from None
                    yield split, Piece(text, starts=pos == start, ends=stop == end)
                    pos = stop

    @staticmethod
    def _piece_end(data: mmap.mmap, start: int, end: int) -> int:
        """The end of a piece: after the first line break past ITEM_BYTES that an ASCII letter or digit follows."""
        pos = start + ITEM_BYTES
        while pos < end:
            pos = data.find(b"\n", pos, end - 1)
            if pos < 0:
                break
            if data[pos + 1 : pos + 2].isalnum():
                return pos + 1
            pos += 1
        return end


def _items(docs: Iterator[tuple[str, Piece]]) -> Iterator[Item]:
    """Group each split's pieces, in order, into items of about ITEM_BYTES of text."""
    pending: dict[str, list[Piece]] = {split: [] for split in corpus.SPLITS}
    sizes = dict.fromkeys(corpus.SPLITS, 0)
    for split, piece in docs:
        pending[split].append(piece)
        sizes[split] += len(piece.text)
        if sizes[split] >= ITEM_BYTES:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    yield from ((split, pieces) for split, pieces in pending.items() if pieces)


class _SplitWriter:
    """Writes one split's ids into shards of about `shard_tokens` tokens in `tmp`, hashing as it goes."""

    def __init__(self, split: str, tmp: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.split, self.tmp, self.dtype, self.shard_tokens = split, tmp, dtype, shard_tokens
        self.suffix = ".u16.bin" if dtype.itemsize == 2 else ".u32.bin"
        self.shards: list[dict[str, Any]] = []
        self.offsets = [0]
        self.n_tokens = 0
        self._file: Any = None

    def write(self, ids: np.ndarray, ends: list[bool], lengths: list[int]) -> None:
        if self._file is None or self.shards[-1]["n_tokens"] >= self.shard_tokens:
            self._close()
            name = f"{self.split}-{len(self.shards):05d}{self.suffix}"
            self._file, self._digest = open(self.tmp / name, "wb"), hashlib.sha256()
            self.shards.append({"file": name, "n_tokens": 0, "n_docs": 0})
        data = ids.astype(self.dtype.newbyteorder("<")).tobytes()
        self._file.write(data)
        self._digest.update(data)
        shard = self.shards[-1]
        for end, length in zip(ends, lengths):
            shard["n_tokens"] += length
            self.n_tokens += length
            if end:
                shard["n_docs"] += 1
                self.offsets.append(self.n_tokens)

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.shards[-1].update(
                bytes=self.shards[-1]["n_tokens"] * self.dtype.itemsize, sha256=self._digest.hexdigest()
            )
            self._file = None

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()

    def finish(self) -> dict[str, Any]:
        """Close the last shard, save the offsets; the split's manifest entry."""
        self._close()
        name = f"{self.split}-offsets.npy"
        np.save(self.tmp / name, np.asarray(self.offsets, dtype=np.int64))
        offsets = {"file": name, "bytes": (self.tmp / name).stat().st_size, "sha256": _file_sha256(self.tmp / name)}
        return {"n_tokens": self.n_tokens, "n_docs": len(self.offsets) - 1, "offsets": offsets, "shards": self.shards}


def _results(items: Iterator[Item], tokenizer: Tokenizer, bos: bool, workers: int) -> Iterator[Any]:
    """tokenise_item over `items`, in order: in this process for one worker, else in a spawned pool."""
    if workers == 1:
        init_worker(tokenizer, bos)
        yield from map(tokenise_item, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, init_worker, (tokenizer, bos)) as pool:
        pending: deque[Any] = deque()  # at most 2 items a worker in flight, so the source is never all in memory
        for item in items:
            pending.append(pool.apply_async(tokenise_item, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _claim(out: Path) -> Path:
    """Make `out` ours: refuse a finished or foreign directory, clean up an interrupted prepare; the tmp dir."""
    if prepared.is_prepared(out):
        raise UsageError(
            f"{out} already holds a prepared corpus ({prepared.MANIFEST}); remove it or choose another OUT"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; OUT must be a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not prepared.is_interrupted(out):
        raise UsageError(f"{out} exists and is not empty; choose a new or empty OUT directory")
    try:
        if out.is_dir():
            for leftover in out.iterdir():  # an interrupted prepare's shards and temporary directory
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / prepared.MARKER).write_text(f"{os.getpid()}\n")
        (out / _TMP).mkdir()
    except OSError as e:
        raise write_failed("the prepared corpus", out, e) from e
    return out / _TMP


def prepare(
    source: str | Path,
    out: str | Path,
    tokenizer: Tokenizer,
    tokenizer_path: Optional[str] = None,
    *,
    workers: int = 1,
    val_fraction: float = 0.05,
    bos: bool = False,
    text_field: str = "text",
    shard_tokens: int = 1 << 27,
) -> dict[str, Any]:
    """Tokenise `source` into `out` with `tokenizer` (loaded from `tokenizer_path`, which the manifest records;
    see the module docstring); returns the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1 or shard_tokens < 1:
        raise UsageError(f"--workers and --shard-tokens must be >= 1, got {workers} and {shard_tokens}")
    src, out = Path(source).expanduser().absolute(), Path(out).expanduser().absolute()
    reader = _Reader(src, _kind(src), val_fraction, text_field, workers)
    if bos and tokenizer.bos_id is None:
        raise UsageError(f"the {tokenizer.kind} tokenizer defines no bos token; drop --bos")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    tmp = _claim(out)
    writers = {split: _SplitWriter(split, tmp, dtype, shard_tokens) for split in corpus.SPLITS}
    try:
        for split, ids, ends, lengths in _results(_items(reader.documents()), tokenizer, bos, workers):
            writers[split].write(ids, ends, lengths)
        splits = {split: w.finish() for split, w in writers.items()}
    except BaseException:  # the marker stays: OUT reads as an interrupted prepare until a rerun
        for w in writers.values():
            w.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if splits["train"]["n_docs"] == 0 or (val_fraction > 0 and splits["val"]["n_docs"] == 0):
        empty = "train" if splits["train"]["n_docs"] == 0 else "val"
        raise UsageError(
            f"source {src}: the {empty} split has no non-empty documents; add data or change --val-fraction"
        )
    manifest = {
        "format": prepared.FORMAT,
        "version": prepared.VERSION,
        "tokenizer": prepared.tokenizer_identity(tokenizer, tokenizer_path),
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "bos": bos,
        "source": {
            "path": str(src),
            "kind": reader.kind,
            "text_field": text_field,
            "sha256": reader.sha256,
            "n_docs": reader.n_docs,
        },
        "splits": splits,
        "totals": {
            "n_tokens": sum(s["n_tokens"] for s in splits.values()),
            "n_docs": sum(s["n_docs"] for s in splits.values()),
            "n_shards": sum(len(s["shards"]) for s in splits.values()),
        },
    }
    try:
        for name in os.listdir(tmp):
            os.replace(tmp / name, out / name)
        write_text_atomic(out / prepared.MANIFEST, json.dumps(manifest, indent=1) + "\n", "the manifest")
        (out / prepared.MARKER).unlink()
        tmp.rmdir()
    except OSError as e:
        raise write_failed("the prepared corpus", out, e) from e
    return manifest


def cli_main(argv: list[str]) -> int:
    """`llamoe data prepare SOURCE OUT [options]`; exit status as in experiments/errors.py."""
    parser = argparse.ArgumentParser(prog="llamoe data", description="Corpus tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        help="tokenise a corpus into memory-mapped shards + manifest.json for data.source=OUT",
        description="Tokenise SOURCE (text file, directory, .jsonl, .parquet) into OUT; train with data.source=OUT.",
    )
    p.add_argument("source", help="a text file, a directory of text files, a .jsonl or a .parquet file")
    p.add_argument("out", help="a new or empty directory for the shards and manifest.json")
    p.add_argument("--tokenizer", default="byte_level", help="tokenizer.kind: byte_level | llama3 | llama4 | hf")
    p.add_argument("--tokenizer-path", help="tokenizer.path: the tokenizer.model / tokenizer.json file")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenising processes (default: the CPU count; 1 tokenises in this process)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.05, help="data.val_fraction the runs will use")
    p.add_argument("--bos", action="store_true", help="start every document with bos (data.bos=true)")
    p.add_argument("--text-field", default="text", help="the JSONL field / parquet column holding the text")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard (default 2^27)")
    args = parser.parse_args(argv)
    prog = "llamoe data prepare"
    try:
        if args.tokenizer != "byte_level" and not args.tokenizer_path:
            raise UsageError(f"--tokenizer {args.tokenizer} needs --tokenizer-path")
        path = str(Path(args.tokenizer_path).expanduser().absolute()) if args.tokenizer_path else None
        tokenizer = Tokenizer.byte_level() if path is None else Tokenizer.from_file(path, kind=args.tokenizer)
        manifest = prepare(
            args.source, args.out, tokenizer, path, workers=args.workers,
            val_fraction=args.val_fraction, bos=args.bos, text_field=args.text_field, shard_tokens=args.shard_tokens,
        )  # fmt: skip
    except (UserError, ConfigError, FileNotFoundError, ValueError) as e:  # bad source, tokenizer file or option
        return report(prog, e, getattr(e, "exit_status", USAGE))
    totals = manifest["totals"]
    print(f"prepared {totals['n_tokens']:,} tokens in {totals['n_docs']:,} documents ({totals['n_shards']} shards, "
          f"{manifest['dtype']}) in {Path(args.out)}; train with data.source={Path(args.out)}")  # fmt: skip
    return 0
