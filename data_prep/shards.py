"""`rdhpc prep shards`: tokenize and pack corpora into verified Arrow shards, in parallel, restartable.

    rdhpc prep shards --input web=data/web/ --input code=data/code/*.jsonl.zst --weight code=2.0 \
        --tokenizer tok.json --seq-len 4096 --out shards/ --workers 8
    srun -n 16 rdhpc prep shards ...        # or: mpirun -n 16 rdhpc prep shards ...

Two stages, each a list of independent tasks split over ranks (task i goes to rank i % world) and,
inside a rank, over `--workers` processes:
1. tokenize: each piece of the input (rdhpc.data_prep.sources.Piece) -> `.work/tok/piece-N.bin`:
   per split, its document copies sorted by their seeded 64-bit key, with the keys, the offsets and
   the tokens in that order (PieceFile);
2. pack: shard g of G holds the keys in [g * 2^64 / G, (g + 1) * 2^64 / G), ordered by key. Since
   every piece is sorted by key, a contiguous range of shards is one contiguous range of bytes in
   each piece: a pack task takes a range of shards, reads its range from every piece once, and
   packs each shard -> `train-N.arrow` / `val-N.arrow`. File opens and reads therefore grow with
   pieces x tasks + shards, where tasks are as few as the workers and --pack-task-bytes allow,
   not with pieces x shards.
Intermediate files that no other node reads (a piece's tokens before sorting, a shard before it is
published) are written under --local-tmp (or $RDHPC_LOCAL_TMP), a node-local folder, when given.
Every file is written under a temporary name and renamed when complete; a stage waits for the other
ranks through the files themselves, so an interrupted run started again redoes only what is missing
and produces the same bytes. Rank 0 writes manifest.json last; its presence means "finished".
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import queue
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.packing import PACK_MODES, copy_keys, document_keys, is_validation, num_copies, pack
from data_prep.sources import (InputError, Piece, Problem, ReadResult, iter_piece, parse_sources, piece_size,
                               plan_pieces, resolve_lines)
from rdhpc.data.format import (Manifest, ShardEntry, TokenizerInfo, read_manifest, shard_name, token_dtype,
                               write_shard)
from rdhpc.data.tokenizer import TextTokenizer
from rdhpc.distributed import discover_ranks
from rdhpc.errors import UserError

WORK_DIR = ".work"
LOCAL_TMP_VARIABLE = "RDHPC_LOCAL_TMP"
# Text per encode call: large enough for the encoder's threads to pay off, small enough to bound
# its memory (HF's Encoding objects take ~50 bytes per token).
ENCODE_BATCH_BYTES = 4 << 20
MAX_REPORTED_PROBLEMS = 200


class PrepError(UserError, RuntimeError):
    pass


@dataclass
class ShardSettings:
    inputs: list[str]
    tokenizer: str
    seq_len: int
    out: str
    weights: list[str] = field(default_factory=list)
    pack: str = "drop"
    val_fraction: float = 0.05
    seed: int = 0
    workers: int = 1
    text_field: str = "text"
    rows_per_shard: int = 8192
    piece_bytes: int = 64 << 20
    strict: bool = False
    keep_all: list[str] = field(default_factory=list)
    """Sources whose every token drop packing keeps (chunked whole, as the released code's
    precious sources); the others keep one row per buffer and drop the rest."""
    local_tmp: str | None = None
    """Node-local folder for intermediate files no other node reads (default $RDHPC_LOCAL_TMP; none:
    everything under OUT/.work). Does not change the output."""
    pack_task_bytes: int = 512 << 20
    """Token bytes one pack task holds in memory at once: bounds the pack stage's memory however
    large the corpus; larger tasks open each piece fewer times. Does not change the output."""
    wait_timeout: float = 24 * 3600.0

    @property
    def local_folder(self) -> Path | None:
        folder = self.local_tmp or os.environ.get(LOCAL_TMP_VARIABLE)
        return Path(folder) / "rdhpc-prep" if folder else None

    def problems(self) -> list[str]:
        out = []
        if self.pack not in PACK_MODES:
            out.append(f"--pack: unknown mode {self.pack!r}; choose one of {list(PACK_MODES)}")
        if self.seq_len < 1:
            out.append(f"--seq-len: must be >= 1, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            out.append(f"--val-fraction: must be in [0, 1), got {self.val_fraction}")
        if self.keep_all and self.pack != "drop":
            out.append(f"--keep-all: applies to --pack drop (carry keeps every token of every source), got --pack "
                       f"{self.pack}")
        for name in ("workers", "rows_per_shard", "piece_bytes", "pack_task_bytes"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        return out


# ---- the settings that determine the output ------------------------------------------------------

def output_fingerprint(settings: ShardSettings, sources, tokenizer: TextTokenizer) -> dict:
    """Everything the bytes of the output depend on, and nothing else (not workers, ranks, pieces)."""
    # keep_all only when used: folders made before it existed keep their fingerprint
    extra = {"keep_all": sorted(set(settings.keep_all))} if settings.keep_all else {}
    return extra | {
        "sources": [{"name": s.name, "weight": s.weight,
                     "files": sorted([s.key_names[f], os.path.getsize(f)] for f in s.files)} for s in sources],
        "tokenizer_sha256": tokenizer.sha256,
        "seq_len": settings.seq_len,
        "pack": settings.pack,
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
        "text_field": settings.text_field,
        "rows_per_shard": settings.rows_per_shard,
        # how documents are named inside a file, which seeds their keys (line byte offsets; an
        # earlier scheme used line numbers): shards of one scheme never mix with the other's
        "record_ids": "jsonl-byte-offset",
        # which shard a key goes to: its range of the key space (contiguous in every key-sorted
        # piece); the earlier key % num_shards scattered every shard over every piece
        "shard_assignment": "key-range",
    }


def input_signature(sources) -> dict:
    """What identifies each input file's content cheaply: size, modification time (ns) and a hash
    of its first and last 64 KiB. A file edited in place to the same size changes the time (and,
    where the edit is near either end, the hash): its finished pieces and shards are stale."""
    import hashlib

    signature = {}
    for source in sources:
        for path in source.files:
            stat = os.stat(path)
            digest = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                digest.update(f.read(1 << 16))
                if stat.st_size > 1 << 17:
                    f.seek(-(1 << 16), os.SEEK_END)
                    digest.update(f.read(1 << 16))
            signature[f"{source.name}/{source.key_names[path]}"] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return signature


def changed_inputs(before: dict, now: dict) -> list[str]:
    """What differs between two input signatures (empty when `before` is empty: folders made
    before inputs were recorded cannot be checked)."""
    if not before:
        return []
    out = []
    for name in sorted(set(before) | set(now)):
        if name not in now:
            out.append(f"{name} is no longer an input")
        elif name not in before:
            out.append(f"{name} is a new input")
        elif before[name] != now[name]:
            what = ["size", "modification time", "content"]
            out.append(f"{name}: {', '.join(w for w, a, b in zip(what, before[name], now[name]) if a != b)} changed")
    return out


def _read_work_settings(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_our_work(work: Path) -> bool:
    """The .work folder is this command's own: it holds our settings file (or nothing yet)."""
    if not work.exists():
        return True
    names = {p.name for p in work.iterdir()}
    return "settings" in _read_work_settings(work / "settings.json") or names <= {"settings.json.tmp"}


# ---- stage 1: tokenize one piece -----------------------------------------------------------------

_worker_state: dict = {}


def load_tokenizer(path: str) -> TextTokenizer:
    """One TextTokenizer per process and file content (loading checks the fast encoder: ~0.4 s)."""
    if not Path(path).is_file():
        raise InputError(f"--tokenizer {path}: no such file (make one with `rdhpc prep tokenizer`)")
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _tokenizers:
        _tokenizers[key] = TextTokenizer(path)
    return _tokenizers[key]


_tokenizers: dict[tuple, TextTokenizer] = {}


def _init_worker(settings_dict: dict, threads_per_worker: int | None):
    if threads_per_worker:
        os.environ["RAYON_NUM_THREADS"] = str(threads_per_worker)  # before tokenizers starts its pool
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    settings = ShardSettings(**settings_dict)
    _worker_state["settings"] = settings
    _worker_state["tokenizer"] = load_tokenizer(settings.tokenizer)
    _worker_state["sources"] = parse_sources(settings.inputs, settings.weights)


def _piece_path(work: Path, index: int) -> Path:
    """The piece's sorted documents (PieceFile), written last, so its presence means the piece is
    complete. Beside it: `.json` (its counts)."""
    return work / "tok" / f"piece-{index:06d}.bin"


def _scratch(settings: ShardSettings, name: str) -> Path:
    """A file only this process reads back: node-local when a local folder is given. A leftover of
    a killed run for the same file is replaced (the name carries the output folder's hash)."""
    folder = settings.local_folder
    if folder is None:
        return Path(settings.out) / WORK_DIR / "tmp" / name
    import hashlib

    tag = hashlib.blake2b(str(Path(settings.out).resolve()).encode(), digest_size=6).hexdigest()
    return folder / f"{tag}-{name}"


# A piece file: a 64-byte header (magic, then int64 counts: train copies, val documents, train
# tokens, val tokens, token itemsize), then uint64 keys and int64 offsets of the train copies, the
# same of the val documents, the train tokens, the val tokens; all sorted by key within a split.
_PIECE_MAGIC = b"RDHPCPC2"
_PIECE_HEADER = 64
_GATHER_TOKENS = 1 << 23  # tokens per gather when writing a piece: bounds the index array's memory


class PieceFile:
    """A tokenized piece, memory-mapped: `split(name)` gives (keys, offsets, tokens) views, so a
    pack task finds its key range with a binary search and reads only that range's bytes."""

    def __init__(self, path: Path, dtype: str):
        import mmap

        self.path = path
        with open(path, "rb") as f:  # the map keeps the pages; the file is closed at once
            size = os.fstat(f.fileno()).st_size
            data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8) if size else \
                np.empty(0, dtype=np.uint8)
        sizes = _piece_sizes(data[:_PIECE_HEADER].tobytes(), dtype)
        if sizes is None or _PIECE_HEADER + sum(sizes) != len(data):
            raise PrepError(f"{path}: not a complete tokenized piece of this run (truncated? delete the .work folder "
                            "and run again)")
        bounds = np.cumsum([_PIECE_HEADER] + sizes).tolist()
        self.token_start = {"train": bounds[4], "val": bounds[5]}  # byte offset of each split's tokens
        view = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self._splits = {"train": (view[0].view(np.uint64), view[1].view(np.int64), view[4].view(dtype)),
                        "val": (view[2].view(np.uint64), view[3].view(np.int64), view[5].view(dtype))}

    def split(self, name: str):
        return self._splits[name]


def _piece_sizes(header: bytes, dtype: str) -> list[int] | None:
    """The byte sizes of a piece file's six arrays, from its header; None if it is not one."""
    if len(header) < _PIECE_HEADER or header[:8] != _PIECE_MAGIC:
        return None
    n_train, n_val, t_train, t_val, itemsize = (int(v) for v in np.frombuffer(header[8:48], dtype=np.int64))
    if itemsize != np.dtype(dtype).itemsize:
        return None
    return [8 * n_train, 8 * (n_train + 1), 8 * n_val, 8 * (n_val + 1), itemsize * t_train, itemsize * t_val]


def _piece_complete(path: Path, dtype: str) -> bool:
    """A piece file left by an earlier run is kept only if whole: pieces are not fsynced (a
    thousand fsyncs cost as much as tokenizing here), so a node that crashed may have left one
    short; it is tokenized again."""
    try:
        with open(path, "rb") as f:
            sizes = _piece_sizes(f.read(_PIECE_HEADER), dtype)
            return sizes is not None and _PIECE_HEADER + sum(sizes) == os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return False


def _write_piece(path: Path, values: np.ndarray, lengths: np.ndarray, starts: np.ndarray, splits: dict) -> None:
    """splits: {"train"|"val": (sorted keys, the document of each)}; tokens gathered in key order,
    a copy of a weighted document as many times as it has copies (so every shard range is
    contiguous)."""
    tmp = path.with_name(path.name + ".tmp")
    order = [splits["train"], splits["val"]]
    doc_lengths = [lengths[docs] for _, docs in order]
    header = np.zeros(_PIECE_HEADER // 8, dtype=np.int64)
    header[1:6] = [len(order[0][0]), len(order[1][0]), doc_lengths[0].sum(), doc_lengths[1].sum(), values.itemsize]
    with open(tmp, "wb") as f:
        f.write(_PIECE_MAGIC + header[1:].tobytes())
        for (keys, _), lens in zip(order, doc_lengths):
            offsets = np.zeros(len(lens) + 1, dtype=np.int64)
            np.cumsum(lens, out=offsets[1:])
            f.write(keys.astype(np.uint64, copy=False).tobytes())
            f.write(offsets.tobytes())
        for (_, docs), lens in zip(order, doc_lengths):
            ends = np.cumsum(lens)
            first = 0
            while first < len(docs):  # a run of documents of about _GATHER_TOKENS tokens (at least one)
                last = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + _GATHER_TOKENS)))
                chunk_lens = lens[first:last]
                shift = np.repeat(starts[docs[first:last]] - (np.cumsum(chunk_lens) - chunk_lens), chunk_lens)
                f.write(values[shift + np.arange(int(chunk_lens.sum()))].tobytes())
                first = last
    os.replace(tmp, path)


def tokenize_piece(task: tuple[int, Piece]) -> dict:
    index, piece = task
    settings: ShardSettings = _worker_state["settings"]
    tokenizer: TextTokenizer = _worker_state["tokenizer"]
    source = _worker_state["sources"][piece.source]
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    path = _piece_path(Path(settings.out) / WORK_DIR, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The tokens in reading order, read back only by this process to be sorted: node-local scratch
    unsorted = _scratch(settings, f"piece-{index:06d}.unsorted")
    unsorted.parent.mkdir(parents=True, exist_ok=True)
    # A reader thread parses the next batch while this thread encodes (the encoders release the GIL).
    batches: queue.Queue = queue.Queue(maxsize=2)

    def read():
        try:
            for part in iter_piece(piece, settings.text_field, ENCODE_BATCH_BYTES):
                batches.put(part)
        except BaseException as exc:  # handed to the encoding thread, which raises it
            batches.put(exc)
        batches.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result, length_parts = ReadResult(), []
        # Tokens go to disk batch by batch, already in the shards' dtype: no concatenation of the whole
        # piece in memory, and half the bytes where the vocabulary fits 16 bits.
        with open(unsorted, "wb") as tokens_file:
            while (part := batches.get()) is not None:
                if isinstance(part, BaseException):
                    raise part
                if settings.strict and part.problems:
                    resolve_lines(part.problems[:1])
                    raise PrepError(f"{part.problems[0]} (--strict: stopping; without it such records are skipped "
                                    "and reported)")
                result.records += part.records
                result.problems += part.problems
                result.bytes_read += part.bytes_read
                if part.texts:
                    values, offsets = tokenizer.encode_batch_flat(part.texts)
                    tokens_file.write(values.astype(dtype, copy=False).data)
                    length_parts.append(np.diff(offsets))
        reader.join()
        keys = document_keys(settings.seed, source.name, source.key_names[piece.file],
                             np.asarray(result.records, dtype=np.uint64))
        val = is_validation(keys, settings.val_fraction)
        copies = np.where(val, 1, num_copies(keys, source.weight)).astype(np.int64)
        lengths = np.concatenate(length_parts) if length_parts else np.empty(0, dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        stats = {
            "piece": index, "source": source.name, "documents": len(keys), "bytes": result.bytes_read,
            "tokens": int(lengths.sum()),
            "train_documents": int((~val).sum()), "val_documents": int(val.sum()),
            # +2 per document: BOS and EOS
            "train_tokens_with_copies": int(((lengths + 2) * copies)[~val].sum()),
            "val_tokens": int((lengths + 2)[val].sum()),
            # drop packing keeps at most one row per document start: what sizes its shards
            "train_capped_tokens_with_copies":
                int((np.minimum(lengths + 2, settings.seq_len + 1) * copies)[~val].sum()),
            "val_capped_tokens": int(np.minimum(lengths + 2, settings.seq_len + 1)[val].sum()),
            "train_copies": int(copies[~val].sum()),
            "host": socket.gethostname(), "local_tmp": str(settings.local_folder) if settings.local_folder else None,
            "problems": [asdict(p) for p in result.problems],
        }
        train = np.flatnonzero(~val)
        doc_of_copy, train_keys = copy_keys(keys[train], copies[train])
        train_order = np.argsort(train_keys, kind="stable")
        val_docs = np.flatnonzero(val)
        val_order = np.argsort(keys[val_docs], kind="stable")
        splits = {"train": (train_keys[train_order], train[doc_of_copy[train_order]]),
                  "val": (keys[val_docs][val_order], val_docs[val_order])}
        values = (np.asarray(np.memmap(unsorted, dtype=dtype, mode="r")) if lengths.sum()
                  else np.empty(0, dtype=dtype))
        _write_json_atomic(path.with_suffix(".json"), stats)
        _write_piece(path, values, lengths, starts, splits)  # appears last: its presence means the piece is complete
        del values
        return stats
    finally:
        unsorted.unlink(missing_ok=True)  # node-local scratch: nothing is left behind, also on failure


# ---- stage 2: pack a range of shards -------------------------------------------------------------

def shard_bounds(num_shards: int) -> list[int]:
    """Shard g holds the keys in [bounds[g], bounds[g + 1]): equal ranges of the 64-bit key space."""
    step = -(-(1 << 64) // num_shards)
    return [min(g * step, 1 << 64) for g in range(num_shards + 1)]


def _key_index(keys: np.ndarray, bound: int) -> int:
    return len(keys) if bound >= 1 << 64 else int(np.searchsorted(keys, np.uint64(bound), side="left"))


def pack_shards(task: tuple[str, int, int, int, int, frozenset, frozenset]) -> dict:
    """Shards [first, last) of a split: one contiguous read per piece, then each shard packed
    (except those in `finished`, made by an earlier, interrupted run)."""
    split, first, last, num_shards, num_pieces, keep_all_pieces, finished = task
    settings: ShardSettings = _worker_state["settings"]
    tokenizer: TextTokenizer = _worker_state["tokenizer"]
    work = Path(settings.out) / WORK_DIR
    dtype = token_dtype(tokenizer.vocab_size)
    bounds = shard_bounds(num_shards)
    todo = [g for g in range(first, last) if shard_name(split, g) not in finished]
    # First where each piece's range lies (its keys and offsets: a binary search and a few pages of
    # a mapping closed at once), then every range read once into one array of the task's size: the
    # task's memory is that array, never twice it, and no more than one piece is open at a time.
    ranges, keys, lengths, pieces = [], [], [], []
    for index in range(num_pieces):
        piece = PieceFile(_piece_path(work, index), dtype)
        piece_keys, offsets, _ = piece.split(split)
        a, b = _key_index(piece_keys, bounds[first]), _key_index(piece_keys, bounds[last])
        if a == b:
            continue
        keys.append(np.array(piece_keys[a:b]))
        range_offsets = np.array(offsets[a:b + 1])
        lengths.append(np.diff(range_offsets))
        pieces.append(np.full(b - a, index, dtype=np.int64))
        itemsize = np.dtype(dtype).itemsize
        ranges.append((piece.path, piece.token_start[split] + int(range_offsets[0]) * itemsize,
                       int(range_offsets[-1] - range_offsets[0])))
        del piece, piece_keys, offsets
    keys = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
    lengths = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)
    pieces = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    filled = 0
    for path, byte_offset, count in ranges:
        _read_exactly(path, byte_offset, tokens[filled:filled + count])  # one contiguous read per piece
        filled += count
    starts = np.cumsum(lengths) - lengths
    # pieces in index order, each sorted: a stable sort breaks ties of equal keys by piece, then by
    # the copy's place in its piece, as a per-shard gather in piece order would
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    totals, entries = {"documents": 0, "real_tokens": 0}, []
    keep = np.asarray(sorted(keep_all_pieces), dtype=np.int64)
    for g in todo:
        mine = order[_key_index(sorted_keys, bounds[g]):_key_index(sorted_keys, bounds[g + 1])]
        docs = [tokens[s:s + n] for s, n in zip(starts[mine].tolist(), lengths[mine].tolist())]
        flags = np.isin(pieces[mine], keep) if keep_all_pieces else None
        rows, counts = pack(docs, settings.seq_len + 1, settings.pack, tokenizer.bos_id, tokenizer.eos_id,
                            tokenizer.pad_id, dtype=np.dtype(dtype), keep_all=flags)
        entry = _write_shard_published(settings, shard_name(split, g), rows, dtype, tokenizer.sha256, split)
        entry.update(real_tokens=counts["real_tokens"], pad_tokens=counts["pad_tokens"],
                     documents=counts["documents"], dropped_tokens=counts["dropped_tokens"],
                     host=socket.gethostname())
        entries.append(entry)
        totals["documents"] += counts["documents"]
        totals["real_tokens"] += counts["real_tokens"]
    if entries:  # one record per task, not per shard: the pack stage writes O(tasks) small files
        _write_json_atomic(work / "shards" / f"{split}-{first:05d}-{last:05d}.json", entries)
    return totals


def _finished_shards(out: Path, records_read: set | None = None) -> dict[str, dict]:
    """The shards finished by any task of this or an earlier (interrupted) run: their records,
    kept where the shard file is there with the recorded size (shards are not fsynced one by one;
    a node that crashed may have left one short: it is packed again; the manifest's sha256, which
    `prep verify` and the trainer check, covers the rest). `records_read`: record files to skip,
    and where the ones read are added (a task writes its record once, when all its shards exist)."""
    finished = {}
    for record in sorted((out / WORK_DIR / "shards").glob("*.json")):
        if records_read is not None and record.name in records_read:
            continue
        try:
            entries = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: read again at the next look
        for entry in entries:
            try:
                if (out / entry["file"]).stat().st_size == entry["bytes"]:
                    finished[entry["file"]] = entry
            except FileNotFoundError:
                pass
        if records_read is not None:
            records_read.add(record.name)
    return finished


def _read_exactly(path: Path, offset: int, into: np.ndarray) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(into).cast("B"), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise PrepError(f"{path}: ends before its header says (truncated? delete the .work folder and run "
                                "again)")
            done += got
    finally:
        os.close(fd)


def _write_shard_published(settings: ShardSettings, name: str, rows, dtype: str, tokenizer_sha256: str,
                           split: str) -> dict:
    """Write a shard; with a node-local folder, there first, then copied to the output in one
    sequential write (a parallel file system takes large writes best) and renamed."""
    final = Path(settings.out) / name
    if settings.local_folder is None:
        return write_shard(final, rows, seq_len=settings.seq_len, dtype=dtype, tokenizer_sha256=tokenizer_sha256,
                           split=split, durable=False)
    local = _scratch(settings, name)
    local.parent.mkdir(parents=True, exist_ok=True)
    entry = write_shard(local, rows, seq_len=settings.seq_len, dtype=dtype, tokenizer_sha256=tokenizer_sha256,
                        split=split, durable=False)
    tmp = final.with_name(final.name + ".tmp")
    try:
        shutil.copyfile(local, tmp)
        os.replace(tmp, final)
    finally:
        local.unlink(missing_ok=True)
    return entry | {"file": final.name}


# ---- orchestration -------------------------------------------------------------------------------

def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _wait_for(missing_outputs, work: Path, what: str, timeout: float) -> None:
    """A file barrier: wait until `missing_outputs()` (a list of what is not there yet) is empty,
    failing at once if any rank left a FAILED note."""
    deadline = time.monotonic() + timeout
    while True:
        failed = sorted(work.glob("FAILED-rank*"))
        if failed:
            raise PrepError(f"{failed[0].name.removeprefix('FAILED-')} failed: {failed[0].read_text().strip()}")
        missing = missing_outputs()
        if not missing:
            return
        if time.monotonic() > deadline:
            raise PrepError(f"timed out after {timeout:.0f} s waiting for other ranks to {what}: "
                            f"{len(missing)} outputs missing, e.g. {missing[0]}")
        time.sleep(0.2)


class _Workers:
    """This rank's worker processes, started once for both stages (spawned: each loads the
    tokenizer once), or nothing when there is one worker and tasks run in this process."""

    # fork: workers inherit the loaded modules and tokenizer instead of paying ~1 s each to import
    # and load them again. Both encoders handle a fork: gigatoken encodes on the calling thread in
    # a forked child, HF tokenizers turns its own parallelism off there.
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"

    def __init__(self, settings: ShardSettings):
        self.settings, self.pool = settings, None

    def map(self, fn, tasks):
        if self.settings.workers == 1 or len(tasks) <= 1:
            _init_worker(asdict(self.settings), None)  # every run: the state of an earlier run must not leak
            return map(fn, tasks)
        if self.pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.settings.workers)
            self.pool = multiprocessing.get_context(self.start_method).Pool(
                self.settings.workers, initializer=_init_worker, initargs=(asdict(self.settings), threads))
        return self.pool.imap_unordered(fn, tasks)

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _run_tasks(fn, tasks, workers: _Workers, desc: str, show_progress: bool, unit: str):
    """Run tasks on this rank's workers, with a progress bar (documents/s, tokens/s)."""
    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(tasks), desc=desc, unit=unit, disable=not show_progress, file=sys.stderr,
               dynamic_ncols=True)
    start, documents, tokens = time.monotonic(), 0, 0

    def record(result):
        nonlocal documents, tokens
        results.append(result)
        documents += result.get("documents", 0)
        tokens += result.get("tokens", result.get("real_tokens", 0))
        elapsed = max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s")
        bar.update(1)

    try:
        for result in workers.map(fn, tasks):
            record(result)
    finally:
        bar.close()
    return results


def _num_groups(tokens: int, settings: ShardSettings) -> int:
    return max(1, -(-tokens // (settings.rows_per_shard * (settings.seq_len + 1))))


def _pack_tasks(groups: dict, stats: list[dict], settings: ShardSettings, world_size: int, num_pieces: int,
                keep_all_pieces: frozenset, itemsize: int) -> list[tuple]:
    """Contiguous ranges of shards, as few as keep every worker busy and each task's tokens within
    --pack-task-bytes (what a task reads: every token of its key range, dropped ones included)."""
    tasks = []
    for split in ("train", "val"):
        num_shards = groups[split]
        if not num_shards:
            continue
        read = sum(s["train_tokens_with_copies"] if split == "train" else s["val_tokens"] for s in stats)
        per_shard = max(1.0, read * itemsize / num_shards)
        by_memory = max(1, int(settings.pack_task_bytes // per_shard))
        by_workers = -(-num_shards // (settings.workers * world_size))
        size = min(by_memory, by_workers)
        tasks += [(split, g, min(g + size, num_shards), num_shards, num_pieces, keep_all_pieces)
                  for g in range(0, num_shards, size)]
    return tasks


def run_shards(settings: ShardSettings, command: list[str] | None = None, log=print) -> Path:
    problems = settings.problems()
    if problems:
        raise InputError("; ".join(problems))
    started = time.monotonic()
    ranks = discover_ranks()
    out, work = Path(settings.out), Path(settings.out) / WORK_DIR
    sources = parse_sources(settings.inputs, settings.weights)
    unknown = sorted(set(settings.keep_all) - {s.name for s in sources})
    if unknown:
        raise InputError(f"--keep-all {' '.join(unknown)}: no input source of that name (sources: "
                         f"{', '.join(s.name for s in sources)}; name them with --input NAME=PATH)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder for shards")
    tokenizer = load_tokenizer(settings.tokenizer)
    fingerprint = output_fingerprint(settings, sources, tokenizer)
    inputs = input_signature(sources)
    show = ranks.is_main and sys.stderr.isatty() or os.environ.get("RDHPC_PROGRESS") == "1"

    if (out / "manifest.json").exists():
        manifest = read_manifest(out)
        if manifest.settings != fingerprint:
            raise PrepError(f"{out}: holds shards made with other settings "
                            f"({', '.join(k for k in fingerprint if manifest.settings.get(k) != fingerprint[k])} "
                            "differ); use another --out or delete the folder")
        changed = changed_inputs(manifest.inputs, inputs)
        if changed:
            raise PrepError(f"{out}: its shards were made from inputs that have changed since: "
                            f"{'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. Delete the folder (or "
                            f"choose another --out) to make them again")
        if ranks.is_main:
            if _is_our_work(work):
                shutil.rmtree(work, ignore_errors=True)
            log(f"[prep] nothing to do: {out} already holds these shards "
                f"({manifest.totals('train')['rows']} train rows, {manifest.totals('val')['rows']} val rows)")
        return out

    settings_file = work / "settings.json"
    expected = {"settings": fingerprint, "inputs": inputs}
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if work.exists() and not _is_our_work(work):
            raise PrepError(f"{work}: exists and was not made by `rdhpc prep shards` (no {settings_file.name} of "
                            f"ours in it); move it away or choose another --out: nothing was deleted")
        if settings_file.exists():
            before = _read_work_settings(settings_file)
            if before.get("settings") != fingerprint:
                raise PrepError(f"{out}: an unfinished run with other settings is in it; use another --out or "
                                f"delete it")
            changed = changed_inputs(before.get("inputs", {}), inputs)
            if changed:
                log(f"[prep] the inputs changed since the interrupted run ({'; '.join(changed[:3])}): "
                    f"starting over (the unfinished {work} was this command's own)")
                shutil.rmtree(work)
        for stale in work.glob("FAILED-rank*"):
            stale.unlink()
        _write_json_atomic(settings_file, expected)
    else:
        deadline = time.monotonic() + settings.wait_timeout
        while True:  # rank 0 may be rewriting it (inputs changed since an interrupted run)
            _wait_for(lambda: [] if settings_file.exists() else [settings_file], work, "start", settings.wait_timeout)
            if _read_work_settings(settings_file) == expected:
                break
            if time.monotonic() > deadline:
                raise PrepError(f"rank {ranks.rank}: inputs or settings differ from rank 0's")
            time.sleep(0.2)
    # Alone, nothing can still be coming: a missing output is an error at once, not a wait.
    wait_timeout = settings.wait_timeout if ranks.world_size > 1 else 0.0
    workers = _Workers(settings)
    try:
        pieces = plan_pieces(sources, settings.piece_bytes)
        piece_paths = [_piece_path(work, i) for i in range(len(pieces))]
        dtype = token_dtype(tokenizer.vocab_size)
        todo = [(i, p) for i, p in enumerate(pieces)
                if i % ranks.world_size == ranks.rank and not _piece_complete(piece_paths[i], dtype)]
        # Largest first: a big piece started last would leave the other workers idle at the end.
        # That matters for compressed and .txt inputs, which are not cut (a multi-GB .jsonl.zst is
        # one piece); .jsonl pieces are at most --piece-bytes, and on the benchmark's corpus the
        # order made no measurable difference. The order does not change the output: each piece is
        # named by its index.
        todo.sort(key=lambda task: -piece_size(task[1]))
        if ranks.is_main:
            log(f"[prep] {sum(len(s.files) for s in sources)} files in {len(sources)} source(s) -> "
                f"{len(pieces)} pieces, "
                f"{ranks.world_size} rank(s) ({ranks.launcher}) x {settings.workers} worker(s)"
                + (f"; resuming: {sum(p.exists() for p in piece_paths)} pieces already tokenized"
                   if any(p.exists() for p in piece_paths) else ""))
        setup_done = time.monotonic()
        _run_tasks(tokenize_piece, todo, workers, "tokenize", show, "piece")
        unchecked = list(piece_paths)

        def pieces_missing():  # each piece is checked whole once it exists (an earlier run's may be short)
            unchecked[:] = [p for p in unchecked if not _piece_complete(p, dtype)]
            return unchecked

        _wait_for(pieces_missing, work, "tokenize", wait_timeout)
        tokenize_done = time.monotonic()

        stats = [json.loads(p.with_suffix(".json").read_text()) for p in piece_paths]
        keep_all_pieces = frozenset(i for i, s in enumerate(stats) if s["source"] in settings.keep_all)

        def kept(s, split):  # tokens that size the shards: drop packing keeps at most a row per start
            capped = "capped_" if settings.pack == "drop" and s["piece"] not in keep_all_pieces else ""
            return s[f"train_{capped}tokens_with_copies"] if split == "train" else s[f"val_{capped}tokens"]

        groups = {"train": _num_groups(sum(kept(s, "train") for s in stats), settings),
                  "val": _num_groups(sum(kept(s, "val") for s in stats), settings)
                  if any(s["val_documents"] for s in stats) else 0}
        tasks = _pack_tasks(groups, stats, settings, ranks.world_size, len(pieces), keep_all_pieces,
                            np.dtype(dtype).itemsize)
        names = [shard_name(split, g) for split in ("train", "val") for g in range(groups[split])]
        records_read: set[str] = set()
        finished = _finished_shards(out, records_read)
        todo = []  # each task with the shards of its range an interrupted run finished, read once here
        for i, (split, first, last, *_) in enumerate(tasks):
            done = frozenset(n for n in (shard_name(split, g) for g in range(first, last)) if n in finished)
            if i % ranks.world_size == ranks.rank and len(done) < last - first:
                todo.append(tasks[i] + (done,))
        if ranks.is_main:
            log(f"[prep] packing {len(names)} shards in {len(tasks)} tasks: each reads its range of every "
                f"piece once ({len(tasks) * len(pieces):,} piece reads)")
        _run_tasks(pack_shards, todo, workers, "pack", show, "task")
        if not ranks.is_main:
            return out  # rank 0 gathers the shards' counts and may delete .work as soon as all exist

        def shards_missing():  # only the records written since the last look are read
            finished.update(_finished_shards(out, records_read))
            return [n for n in names if n not in finished]

        _wait_for(shards_missing, work, "pack", wait_timeout)
    except BaseException as exc:
        try:
            (work / f"FAILED-rank{ranks.rank}").write_text(f"{type(exc).__name__}: {exc}\n")
        except OSError:  # e.g. the full disk that made it fail
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PrepError(f"no space left on the device of {out} ({exc.filename or exc}): the pieces and shards "
                            f"already finished in {work} are kept; free space and run the same command again, it "
                            f"goes on from there") from exc
        raise
    finally:
        workers.close()

    entries = [finished[n] for n in names]
    report = _report(stats, entries, sources)
    changed = changed_inputs(inputs, input_signature(sources))  # edited while this command read them
    if changed:
        raise PrepError(f"the inputs changed while they were read ({'; '.join(changed[:3])}); run the command again")
    manifest = Manifest(
        seq_len=settings.seq_len, dtype=token_dtype(tokenizer.vocab_size), pack=settings.pack,
        tokenizer=TokenizerInfo(str(Path(settings.tokenizer).resolve()), tokenizer.sha256, tokenizer.vocab_size,
                                tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id),
        shards=[ShardEntry(**{k: e[k] for k in ShardEntry.__dataclass_fields__}) for e in entries],
        settings=fingerprint, command=list(command or sys.argv), report=report, inputs=inputs)
    manifest.write(out)
    shutil.rmtree(work, ignore_errors=True)
    train, val = manifest.totals("train"), manifest.totals("val")
    timing = (f"set-up {setup_done - started:.2f} s, tokenize {tokenize_done - setup_done:.2f} s, "
              f"pack {time.monotonic() - tokenize_done:.2f} s")
    log(f"[prep] wrote {out} ({timing}): train {train['rows']} rows / {train['real_tokens']:,} tokens in "
        f"{len(manifest.split_shards('train'))} shards, val {val['rows']} rows / {val['real_tokens']:,} tokens; "
        f"{report['documents_read']:,} documents read, {report['records_skipped']} records skipped, "
        f"{report['dropped_tokens']:,} tokens dropped by {settings.pack} packing")
    for problem in report["problems"][:5]:
        log(f"[prep]   skipped {problem}")
    return out


def _report(piece_stats: list[dict], shard_entries: list[dict], sources) -> dict:
    problems = [p for s in piece_stats for p in s["problems"]]
    reported = [Problem(**p) for p in problems[:MAX_REPORTED_PROBLEMS]]
    resolve_lines(reported)  # jsonl problems carry byte offsets: their line numbers, for these only
    by_source = {}
    for s in piece_stats:
        entry = by_source.setdefault(s["source"], {"documents": 0, "bytes": 0, "tokens": 0,
                                                    "train_tokens_with_copies": 0, "skipped": 0})
        entry["documents"] += s["documents"]
        entry["bytes"] += s["bytes"]
        entry["tokens"] += s["tokens"]
        entry["train_tokens_with_copies"] += s["train_tokens_with_copies"]
        entry["skipped"] += len(s["problems"])
    reasons = {}
    for p in problems:
        reason = p["reason"].split(" (")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "documents_read": sum(s["documents"] for s in piece_stats),
        "records_skipped": len(problems),
        "skipped_by_reason": reasons,
        "problems": [str(p) for p in reported],
        "dropped_tokens": sum(e["dropped_tokens"] for e in shard_entries),
        "sources": {s.name: {"weight": s.weight, **by_source.get(s.name, {})} for s in sources},
        "hosts": _hosts(piece_stats, shard_entries),
    }


def _hosts(piece_stats: list[dict], shard_entries: list[dict]) -> dict:
    """Which host tokenized how many pieces and packed how many shards, and its node-local folder."""
    hosts: dict[str, dict] = {}
    for s in piece_stats:
        entry = hosts.setdefault(s.get("host", "?"), {"pieces": 0, "shards": 0, "local_tmp": s.get("local_tmp")})
        entry["pieces"] += 1
    for e in shard_entries:
        hosts.setdefault(e.get("host", "?"), {"pieces": 0, "shards": 0, "local_tmp": None})["shards"] += 1
    return dict(sorted(hosts.items()))
