"""The token shard format, shared by `rdhpc prep` (writer) and the trainer (reader).

A shard folder holds:

    manifest.json         every shard with its split, rows, token counts, documents, sha256, bytes;
                          the tokenizer (path, sha256, special ids); the exact command and settings
    train-00000.arrow     Arrow IPC files, one column `input_ids`: FixedSizeList<uint16|uint32>[L+1]
    val-00000.arrow       (uint16 while the vocabulary fits in it), written in record batches of
                          `batch_rows` rows so a memory-mapped reader gets any row without copying

Each shard's schema metadata repeats format version, seq_len, dtype, tokenizer sha256 and split, so
a shard is checked on its own when opened: a mismatch, a truncated or a corrupted file is an error
naming the file, never silently wrong tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rdhpc.errors import UserError

FORMAT_VERSION = 1
COLUMN = "input_ids"
MANIFEST_FILE = "manifest.json"
DEFAULT_BATCH_ROWS = 1024
SPLITS = ("train", "val")
_META_PREFIX = "rdhpc."


class ShardError(UserError, ValueError):
    """A shard or shard folder that is missing, corrupted or does not match what the reader expects."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arrow"


# ---- writing ------------------------------------------------------------------------------------

def write_shard(path: str | Path, rows: np.ndarray, *, seq_len: int, dtype: str, tokenizer_sha256: str,
                split: str, batch_rows: int = DEFAULT_BATCH_ROWS, durable: bool = True) -> dict:
    """Write rows (N, seq_len + 1) to `path` atomically (temporary name, then rename).
    Returns the shard's manifest entry without document counts. The file is assembled in memory,
    so its sha256 needs no second read; `durable` fsyncs it before the rename (prep, which writes
    thousands of small shards, checks sizes on a resume instead: a fsync costs ~0.5 ms here)."""
    path = Path(path)
    if rows.ndim != 2 or rows.shape[1] != seq_len + 1:
        raise ValueError(f"rows must be (N, {seq_len + 1}), got {rows.shape}")
    rows = np.ascontiguousarray(rows, dtype=np.dtype(dtype))
    metadata = {f"{_META_PREFIX}format_version": str(FORMAT_VERSION), f"{_META_PREFIX}seq_len": str(seq_len),
                f"{_META_PREFIX}dtype": dtype, f"{_META_PREFIX}tokenizer_sha256": tokenizer_sha256,
                f"{_META_PREFIX}split": split, f"{_META_PREFIX}batch_rows": str(batch_rows)}
    value_type = pa.uint16() if dtype == "uint16" else pa.uint32()
    schema = pa.schema([pa.field(COLUMN, pa.list_(value_type, seq_len + 1), nullable=False)], metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start:start + batch_rows]
            # from_buffers, not pa.array: no copy, and pa.array on numpy imports pandas when it is
            # installed (a quarter of a second in every process that writes a shard)
            values = pa.Array.from_buffers(value_type, chunk.size, [None, pa.py_buffer(chunk)])
            writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(values, seq_len + 1)], schema=schema))
    buffer = sink.getvalue()
    sha = hashlib.sha256(memoryview(buffer)).hexdigest()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(buffer))
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "split": split, "rows": int(len(rows)), "sha256": sha, "bytes": buffer.size}


# ---- reading ------------------------------------------------------------------------------------

class ShardReader:
    """Memory-mapped, zero-copy row access to one shard, checked against what the caller expects."""

    def __init__(self, path: str | Path, *, seq_len: int | None = None, tokenizer_sha256: str | None = None,
                 dtype: str | None = None, sha256: str | None = None, num_rows: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ShardError(f"{self.path}: shard not found")
        if sha256 is not None and file_sha256(self.path) != sha256:
            raise ShardError(f"{self.path}: sha256 does not match the manifest (corrupted or replaced file)")
        try:
            self._source = pa.memory_map(str(self.path), "r")
            self._file = pa.ipc.open_file(self._source)
            schema = self._file.schema
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise ShardError(f"{self.path}: not a readable Arrow shard (truncated or corrupted?): {exc}") from None
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}

        def field_of(name):
            if _META_PREFIX + name not in meta:
                raise ShardError(f"{self.path}: not an rdhpc shard (schema metadata lacks {_META_PREFIX + name})")
            return meta[_META_PREFIX + name]

        version = int(field_of("format_version"))
        if version != FORMAT_VERSION:
            raise ShardError(f"{self.path}: shard format version {version}, this rdhpc reads {FORMAT_VERSION}")
        self.seq_len = int(field_of("seq_len"))
        self.dtype = field_of("dtype")
        self.tokenizer_sha256 = field_of("tokenizer_sha256")
        self.split = field_of("split")
        self.batch_rows = int(field_of("batch_rows"))
        for name, expected, actual in (("seq_len", seq_len, self.seq_len), ("dtype", dtype, self.dtype),
                                       ("tokenizer sha256", tokenizer_sha256, self.tokenizer_sha256)):
            if expected is not None and expected != actual:
                raise ShardError(f"{self.path}: {name} is {actual}, expected {expected}")
        expected_type = pa.list_(pa.uint16() if self.dtype == "uint16" else pa.uint32(), self.seq_len + 1)
        if schema.names != [COLUMN] or schema.field(COLUMN).type != expected_type:
            raise ShardError(f"{self.path}: schema {schema} is not one column {COLUMN}: {expected_type}")
        try:
            self._batches = [self._batch_array(i) for i in range(self._file.num_record_batches)]
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise ShardError(f"{self.path}: cannot read record batches (truncated or corrupted?): {exc}") from None
        self.num_rows = sum(len(b) for b in self._batches)
        if any(len(b) != self.batch_rows for b in self._batches[:-1]):
            raise ShardError(f"{self.path}: record batches are not of {self.batch_rows} rows")
        if num_rows is not None and num_rows != self.num_rows:
            raise ShardError(f"{self.path}: {self.num_rows} rows, the manifest says {num_rows}")

    def _batch_array(self, index: int) -> np.ndarray:
        column = self._file.get_batch(index).column(0)
        values = column.values.to_numpy(zero_copy_only=True)
        start = column.offset * (self.seq_len + 1)
        return values[start:start + len(column) * (self.seq_len + 1)].reshape(len(column), self.seq_len + 1)

    def __len__(self) -> int:
        return self.num_rows

    def row(self, index: int) -> np.ndarray:
        return self._batches[index // self.batch_rows][index % self.batch_rows]

    def rows(self, indices) -> np.ndarray:
        return np.stack([self.row(int(i)) for i in indices]) if len(indices) else \
            np.empty((0, self.seq_len + 1), dtype=self.dtype)

    def all_rows(self) -> np.ndarray:
        return np.concatenate(self._batches) if self._batches else np.empty((0, self.seq_len + 1), dtype=self.dtype)


# ---- the manifest -------------------------------------------------------------------------------

@dataclass
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int


@dataclass
class ShardEntry:
    file: str
    split: str
    rows: int
    real_tokens: int
    pad_tokens: int
    documents: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    seq_len: int
    dtype: str
    pack: str
    tokenizer: TokenizerInfo
    shards: list[ShardEntry]
    settings: dict = field(default_factory=dict)
    """The exact settings that made the folder (inputs, weights, seed, val fraction, ...)."""
    command: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    """Documents read, skipped (with file and line), tokens per source."""
    format_version: int = FORMAT_VERSION
    inputs: dict = field(default_factory=dict)
    """Each input file's size, modification time and a hash of its ends when the shards were made:
    a later `prep shards` into the same folder refuses stale shards of changed inputs."""

    def split_shards(self, split: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == split]

    def totals(self, split: str) -> dict:
        shards = self.split_shards(split)
        return {k: sum(getattr(s, k) for s in shards) for k in ("rows", "real_tokens", "pad_tokens", "documents")}

    def to_json(self) -> str:
        data = asdict(self)
        data["totals"] = {split: self.totals(split) for split in SPLITS}
        return json.dumps(data, indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        tmp = path.with_name(MANIFEST_FILE + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (not a finished `rdhpc prep shards` output folder)")
    try:
        data = json.loads(path.read_text())
        data.pop("totals", None)
        if data.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{path}: format version {data.get('format_version')}, this rdhpc reads {FORMAT_VERSION}")
        data["tokenizer"] = TokenizerInfo(**data["tokenizer"])
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        return Manifest(**data)
    except ShardError:
        raise
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ShardError(f"{path}: malformed manifest ({exc})") from None


def open_shard(folder: str | Path, entry: ShardEntry, manifest: Manifest, verify_checksum: bool = False) -> ShardReader:
    return ShardReader(Path(folder) / entry.file, seq_len=manifest.seq_len, dtype=manifest.dtype,
                       tokenizer_sha256=manifest.tokenizer.sha256, num_rows=entry.rows,
                       sha256=entry.sha256 if verify_checksum else None)


def verify_folder(folder: str | Path, checksums: bool = True) -> tuple[Manifest, list[str]]:
    """Check every shard of a folder against its manifest: schema, rows, sizes, checksums, token
    range, and the counts. Returns the manifest and the list of problems (empty when all is well)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    listed = {s.file for s in manifest.shards}
    for stray in sorted(p.name for p in folder.glob("*.arrow") if p.name not in listed):
        problems.append(f"{folder / stray}: shard not listed in the manifest")
    for entry in manifest.shards:
        path = folder / entry.file
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != entry.bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {entry.bytes} (truncated?)")
            continue
        try:
            reader = open_shard(folder, entry, manifest, verify_checksum=checksums)
        except ShardError as exc:
            problems.append(str(exc))
            continue
        rows = reader.all_rows()
        if reader.split != entry.split:
            problems.append(f"{path}: split {reader.split!r}, the manifest says {entry.split!r}")
        if rows.size and int(rows.max()) >= manifest.tokenizer.vocab_size:
            problems.append(f"{path}: token id {int(rows.max())} >= vocab size {manifest.tokenizer.vocab_size}")
        pad = int((rows == manifest.tokenizer.pad_id).sum())
        if pad != entry.pad_tokens or rows.size - pad != entry.real_tokens:
            problems.append(f"{path}: {rows.size - pad} real / {pad} pad tokens, the manifest says "
                            f"{entry.real_tokens} / {entry.pad_tokens}")
        starts = int((rows == manifest.tokenizer.bos_id).sum())
        if manifest.pack == "carry" and starts != entry.documents:
            problems.append(f"{path}: {starts} documents start here, the manifest says {entry.documents}")
        # keep-all sources are chunked whole: their rows may start inside a document
        if manifest.pack == "drop" and not manifest.settings.get("keep_all") and len(rows) \
                and not np.all(rows[:, 0] == manifest.tokenizer.bos_id):
            problems.append(f"{path}: a row does not start with BOS (drop packing)")
    return manifest, problems
