"""Input corpora: expanding paths into files, cutting files into pieces, and reading documents.

Formats: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, text in `text` or
`--text-field`), `.parquet` (a string column), `.txt` (one document per file). Directories and
globs expand to the supported files inside them, sorted, so every rank sees the same list.

Nothing is silently lost: an undecodable line, malformed JSON, a missing or non-string field is
recorded as a Problem with its file and line (row for parquet) and skipped, or raised with --strict.
A field repeated in one record takes its last value, as Python's json and orjson both do.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rdhpc.errors import UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")

try:  # 3-5x faster JSON parsing; the standard library stays the reference for every error message
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a dependency
    _fast_loads = None


class InputError(UserError, ValueError):
    pass


class _CorruptFile(Exception):
    """A compressed or parquet file that cannot be read on from `offset` (decompressed bytes)."""

    def __init__(self, offset: int | None, reason: str, line: int | None = None):
        super().__init__(reason)
        self.offset, self.reason, self.line = offset, reason, line


def _stream_errors():
    """What decompressing or reading a broken file raises: a truncated or foreign gzip stream, a
    .zst that is not zstd, a parquet file that is empty or damaged."""
    import zlib

    import pyarrow
    import zstandard

    return (EOFError, OSError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, pyarrow.ArrowException)


@dataclass
class Problem:
    file: str
    line: int | None  # 1-based line (jsonl: None until resolve_lines), row (parquet), line of the first bad byte (txt)
    reason: str
    offset: int | None = None  # jsonl: byte offset of the record's line in the (decompressed) file

    def __str__(self):
        return f"{self.file}:{self.line if self.line is not None else f'byte {self.offset}'}: {self.reason}"


@dataclass
class Source:
    """A named part of the mixture. Weight w: floor(w) whole copies plus a seeded fraction."""

    name: str
    files: list[str]
    weight: float = 1.0
    key_names: dict[str, str] = field(default_factory=dict)
    """file -> the name its documents' seeded keys use: "<input index>/<path relative to that input>",
    so the output does not depend on where the corpus lies, only on what the inputs name."""


@dataclass(frozen=True)
class Piece:
    """A part of one file that one worker reads: a byte range of a plain .jsonl file, one row
    group of a parquet file, or a whole file. Records are named within their file: by the byte
    offset of their line (jsonl), their row (parquet), 0 (txt); never by a count that depends on
    where the file was cut."""

    source: int  # index into the source list
    file: str
    start: int = 0  # byte offset (jsonl) or row group (parquet)
    end: int = -1  # exclusive; -1 = to the end


def file_format(path: str) -> str:
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix):
            return suffix
    raise InputError(f"{path}: unsupported input format (supported: {', '.join(SUFFIXES)})")


def spec_root(spec: str) -> Path:
    """The folder that names inside `spec` are relative to: the directory itself, the fixed part of
    a glob, or the parent of a file."""
    if any(ch in spec for ch in "*?["):
        fixed = spec[:min(spec.index(ch) for ch in "*?[" if ch in spec)]
        return Path(fixed if fixed.endswith("/") else os.path.dirname(fixed) or ".")
    return Path(spec) if Path(spec).is_dir() else Path(spec).parent


def expand(spec: str) -> list[str]:
    """A file, a directory (its supported files, recursively) or a glob; sorted; never empty."""
    if any(ch in spec for ch in "*?["):
        matches = sorted(glob.glob(spec, recursive=True))
    else:
        matches = [spec]
    files = []
    for match in matches:
        path = Path(match)
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.is_file() and str(p).endswith(SUFFIXES))
        elif path.is_file():
            file_format(str(path))
            files.append(str(path))
        else:
            raise InputError(f"{spec}: no such file or directory")
    if not files:
        raise InputError(f"{spec}: matches no input file (supported: {', '.join(SUFFIXES)})")
    return files


def _source_of(spec: str) -> str:
    name, sep, _ = spec.partition("=")
    return "main" if not sep or os.path.exists(spec) else name


def parse_sources(inputs: list[str], weights: list[str] = ()) -> list[Source]:
    """`name=path` inputs form named sources (several paths may share a name); plain paths belong
    to the source "main". `--weight name=2.0` up-samples a source."""
    by_name: dict[str, list[str]] = {}
    key_names: dict[str, dict[str, str]] = {}
    for spec in inputs:
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, path = "main", spec
        if not name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"{spec}: source name {name!r} must be letters, digits, - or _")
        files = expand(path)
        by_name.setdefault(name, []).extend(files)
        names = key_names.setdefault(name, {})
        index, root = sum(1 for s in inputs[:inputs.index(spec)] if _source_of(s) == name), spec_root(path)
        for f in files:
            names.setdefault(f, f"{index}/{Path(os.path.relpath(f, root)).as_posix()}")
    parsed_weights = {}
    for spec in weights:
        name, sep, value = spec.partition("=")
        if not sep:
            raise InputError(f"--weight {spec}: expected name=number")
        if name not in by_name:
            raise InputError(f"--weight {spec}: no input source named {name!r} (sources: {sorted(by_name)})")
        try:
            parsed_weights[name] = float(value)
        except ValueError:
            raise InputError(f"--weight {spec}: {value!r} is not a number") from None
        if not 0 < parsed_weights[name] < float("inf"):
            raise InputError(f"--weight {spec}: the weight must be a finite number > 0")
    sources = [Source(name, sorted(set(files)), parsed_weights.get(name, 1.0), key_names[name])
               for name, files in sorted(by_name.items())]
    seen = {}
    for source in sources:
        for f in source.files:
            if f in seen:
                raise InputError(f"{f}: listed in two sources ({seen[f]!r} and {source.name!r})")
            seen[f] = source.name
    return sources


def piece_size(piece: Piece) -> int:
    """About how many input bytes a piece holds (compressed bytes for .gz/.zst, the whole file for
    a parquet row group): enough to start the largest pieces first."""
    if piece.end >= 0 and file_format(piece.file) == ".jsonl":
        return piece.end - piece.start
    return os.path.getsize(piece.file)


def plan_pieces(sources: list[Source], piece_bytes: int) -> list[Piece]:
    """Cut every file into pieces of about piece_bytes. Only the cut changes with piece_bytes; the
    documents and their numbering do not, so the output does not depend on it."""
    pieces = []
    for index, source in enumerate(sources):
        for path in source.files:
            fmt = file_format(path)
            if fmt == ".jsonl":
                size = os.path.getsize(path)
                for start in range(0, max(size, 1), piece_bytes):
                    pieces.append(Piece(index, path, start, min(start + piece_bytes, size)))
            elif fmt == ".parquet":
                import pyarrow.parquet as pq

                try:
                    groups = pq.ParquetFile(path).num_row_groups
                except _stream_errors():  # reported by the piece that reads it (iter_piece)
                    groups = 1
                for group in range(max(groups, 1)):
                    pieces.append(Piece(index, path, group, group + 1))
            else:
                pieces.append(Piece(index, path))
    return pieces


@dataclass
class ReadResult:
    """Documents of one piece: record numbers (unique within the file) and texts."""

    records: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0


def _check_text(text, path, line, text_field, result: ReadResult, offset: int | None = None) -> bool:
    if not isinstance(text, str):
        reason = (f"field {text_field!r} missing" if text is None
                  else f"field {text_field!r} is {type(text).__name__}, not text")
        result.problems.append(Problem(path, line, reason, offset))
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes such as "\ud800"
        result.problems.append(Problem(path, line, f"invalid unicode in text ({exc.reason})", offset))
        return False
    return True


def _open_jsonl(path: str):
    fmt = file_format(path)
    if fmt == ".jsonl.gz":
        return gzip.open(path, "rb")
    if fmt == ".jsonl.zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_lines(piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) of the lines that START inside [start, end). Offsets, unlike line
    numbers, need nothing read before the piece: a piece deep in a 100 GB file starts at once."""
    position = lines = 0
    try:
        with _open_jsonl(piece.file) as stream:
            if piece.start > 0:  # only plain .jsonl files are cut, so only they seek
                stream.seek(piece.start - 1)
                if stream.read(1) != b"\n":
                    stream.readline()  # finish the line that started before our range
                position = stream.tell()
            for raw in stream:
                if piece.end >= 0 and position >= piece.end:
                    break
                yield position, raw
                position += len(raw)
                lines += 1
    except _stream_errors() as exc:
        # compressed files are read whole (never cut), so the lines counted are the file's
        raise _CorruptFile(position, f"{type(exc).__name__}: {exc}", lines + 1 if piece.start == 0 else None) from None


def resolve_lines(problems: list[Problem]) -> None:
    """Fill in the line numbers of jsonl problems from their byte offsets: one pass per file,
    reading only up to its last problem. Called for the problems that are reported."""
    by_file: dict[str, list[Problem]] = {}
    for problem in problems:
        if problem.line is None and problem.offset is not None:
            by_file.setdefault(problem.file, []).append(problem)
    for path, pending in by_file.items():
        pending.sort(key=lambda p: p.offset)
        newlines, consumed, index = 0, 0, 0
        try:
            with _open_jsonl(path) as stream:
                while index < len(pending):
                    chunk = stream.read(1 << 24)
                    while index < len(pending) and (not chunk or pending[index].offset < consumed + len(chunk)):
                        pending[index].line = newlines + chunk[:pending[index].offset - consumed].count(b"\n") + 1
                        index += 1
                    if not chunk:
                        break
                    newlines += chunk.count(b"\n")
                    consumed += len(chunk)
        except _stream_errors():  # a corrupt file: lines from its readable part; the rest keep their byte offset
            pass


def read_piece(piece: Piece, text_field: str = "text") -> ReadResult:
    """All documents of a piece at once."""
    whole = ReadResult()
    for part in iter_piece(piece, text_field):
        whole.records += part.records
        whole.texts += part.texts
        whole.problems += part.problems
        whole.bytes_read += part.bytes_read
    return whole


def iter_piece(piece: Piece, text_field: str = "text", batch_bytes: int = 4 << 20) -> Iterator[ReadResult]:
    """The documents of a piece in batches of about batch_bytes, so reading can overlap encoding.
    A file that cannot be read on (a truncated or foreign compressed stream, a broken parquet file)
    ends with a Problem naming it; the documents read before the damage stay, one bad file never
    stops the corpus (--strict makes any problem fatal)."""
    state = {"result": ReadResult()}
    try:
        yield from _iter_piece(piece, text_field, batch_bytes, state)
    except _CorruptFile as exc:  # the documents of the batch under way stay, then the problem
        result = state["result"]
        line = exc.line if exc.line is not None else (None if exc.offset is not None else 0)
        result.problems.append(Problem(piece.file, line, f"unreadable from here on, the rest of the file is skipped "
                                                         f"({exc.reason})", exc.offset))
        yield result


def _iter_piece(piece: Piece, text_field: str, batch_bytes: int, state: dict) -> Iterator[ReadResult]:
    result = state["result"]
    fmt = file_format(piece.file)
    if fmt == ".txt":
        data = Path(piece.file).read_bytes()
        result.bytes_read = len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            result.problems.append(Problem(piece.file, line, f"undecodable bytes at offset {exc.start} ({exc.reason})"))
            yield result
            return
        result.records.append(0)
        result.texts.append(text)
    elif fmt == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(piece.file)
        except _stream_errors() as exc:
            raise _CorruptFile(None, f"not a readable parquet file: {type(exc).__name__}: {exc}") from None
        if text_field not in parquet.schema_arrow.names:
            columns = parquet.schema_arrow.names
            result.problems.append(Problem(piece.file, 0, f"no column {text_field!r} (columns: {columns})"))
            yield result
            return
        first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(piece.start))
        if parquet.num_row_groups:
            try:
                column = parquet.read_row_group(piece.start, columns=[text_field]).column(0).to_pylist()
            except _stream_errors() as exc:
                raise _CorruptFile(None, f"row group {piece.start}: {type(exc).__name__}: {exc}") from None
            for offset, text in enumerate(column):
                row = first_row + offset
                if _check_text(text, piece.file, row + 1, text_field, result):
                    result.records.append(row)
                    result.texts.append(text)
                    result.bytes_read += len(text)
    else:
        for offset, raw in _jsonl_lines(piece):
            result.bytes_read += len(raw)
            if _fast_loads is not None:
                # orjson validates UTF-8 and rejects lone surrogates, so a string it returns needs no
                # further check; anything it refuses takes the exact path below for the message.
                try:
                    record = _fast_loads(raw)
                    if isinstance(record, dict) and isinstance(record.get(text_field), str):
                        result.records.append(offset)
                        result.texts.append(record[text_field])
                        if result.bytes_read >= batch_bytes:
                            yield result
                            result = state["result"] = ReadResult()
                        continue
                except ValueError:
                    pass
            if not raw.strip():
                result.problems.append(Problem(piece.file, None, "empty line", offset))
                continue
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                result.problems.append(Problem(piece.file, None, f"undecodable bytes at column {exc.start + 1}", offset))
                continue
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as exc:
                result.problems.append(Problem(piece.file, None, f"malformed JSON ({exc.msg})", offset))
                continue
            except RecursionError:  # valid JSON, but nested deeper than either parser goes
                result.problems.append(Problem(piece.file, None, "JSON nested too deeply to parse", offset))
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(record, dict):
                result.problems.append(Problem(piece.file, None, f"a JSON {type(record).__name__}, not an object", offset))
            elif _check_text(text, piece.file, None, text_field, result, offset):
                result.records.append(offset)
                result.texts.append(text)
    yield result
