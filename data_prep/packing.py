"""Packing documents into fixed rows of seq_len + 1 tokens, and the seeded keys that order them.

Every document becomes BOS + tokens + EOS.
- drop (the paper's method): documents in their shuffled order are appended to a buffer; whenever the
  buffer holds at least a row, the row is cut and the rest of the buffer is DROPPED, so every row
  starts at a document start. The incomplete buffer at the end of a group is dropped too. Documents
  of "keep all" sources (the released code's precious sources) are chunked whole instead: when one
  of them fills the buffer, every full row is cut and the remainder carries on.
- carry: documents are concatenated across row boundaries and only the last row of a group is
  padded; the rows, concatenated and split at BOS, give back every document exactly once.

The order is a pure function of (seed, source, file, record): each document copy gets a 64-bit key;
key % num_groups picks its output shard, and sorting by key orders a shard. No worker count, rank
count or piece size enters, so the output is byte-identical however the work is split.
"""

from __future__ import annotations

import hashlib

import numpy as np

PACK_MODES = ("drop", "carry")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_VAL_SALT = np.uint64(0x5EED0FA1DA7A5E75)
_COPY_SALT = np.uint64(0xC0B1E5C0B1E5C0B1)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (Steele et al.), vectorised; integer overflow wraps by design."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def unit_interval(keys: np.ndarray) -> np.ndarray:
    """Map 64-bit keys to floats uniform in [0, 1) (53 bits)."""
    return (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def file_key(seed: int, source: str, file: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}\0{source}\0{file}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def document_keys(seed: int, source: str, file: str, records: np.ndarray) -> np.ndarray:
    return splitmix64(np.uint64(file_key(seed, source, file)) ^ splitmix64(np.asarray(records, dtype=np.uint64)))


def is_validation(keys: np.ndarray, val_fraction: float) -> np.ndarray:
    return unit_interval(splitmix64(keys ^ _VAL_SALT)) < val_fraction


def num_copies(keys: np.ndarray, weight: float) -> np.ndarray:
    """floor(weight) whole copies plus one more with probability frac(weight), seeded by the key."""
    whole = int(np.floor(weight))
    extra = unit_interval(splitmix64(keys ^ _COPY_SALT)) < (weight - whole)
    return (whole + extra).astype(np.int64)


def copy_keys(keys: np.ndarray, copies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the original document, key of the copy) for every copy."""
    index = np.repeat(np.arange(len(keys)), copies)
    starts = np.cumsum(copies) - copies
    copy_number = np.arange(len(index)) - np.repeat(starts, copies)
    return index, splitmix64(keys[index] + copy_number.astype(np.uint64) * _GOLDEN)


def pack(docs: list[np.ndarray], row_len: int, mode: str, bos: int, eos: int, pad: int,
         dtype=np.uint32, keep_all: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Rows (N, row_len) from documents (token ids without BOS/EOS), and counts for the manifest.
    `keep_all` (drop packing): per document, whether it comes from a source whose every token is
    kept (the released code's "keep all" sources)."""
    if mode not in PACK_MODES:
        raise ValueError(f"unknown pack mode {mode!r}; choose one of {PACK_MODES}")
    if not docs:
        return np.empty((0, row_len), dtype=dtype), {"rows": 0, "real_tokens": 0, "pad_tokens": 0,
                                                     "documents": 0, "dropped_tokens": 0}
    lengths = np.fromiter((len(d) + 2 for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    bos_arr, eos_arr = np.array([bos], dtype=dtype), np.array([eos], dtype=dtype)

    if mode == "carry":
        num_rows = -(-total // row_len)
        parts = [bos_arr, None, eos_arr] * len(docs)
        parts[1::3] = docs
        pad_tokens = num_rows * row_len - total
        parts.append(np.full(pad_tokens, pad, dtype=dtype))
        rows = np.concatenate(parts).astype(dtype, copy=False).reshape(num_rows, row_len)
        dropped, documents = 0, len(docs)
    else:
        rows, documents = _drop_rows(docs, lengths, row_len, keep_all, bos, eos, dtype)
        dropped, pad_tokens = total - rows.size, 0
    counts = {"rows": int(len(rows)), "real_tokens": int(rows.size - pad_tokens), "pad_tokens": int(pad_tokens),
              "documents": int(documents), "dropped_tokens": int(dropped)}
    return rows, counts


def _drop_rows(docs, lengths, row_len: int, keep_all, bos: int, eos: int, dtype) -> tuple[np.ndarray, int]:
    """Drop packing: the rows decided from the lengths alone, then only kept tokens copied. In the
    stream of BOS + document + EOS, a buffer starts at a document start; when document i fills it
    to a row or more, one row is cut and the rest dropped, unless document i is keep-all: then
    every full row is cut and the remainder carries on in the buffer (so the next row may start
    inside a document). Returns the rows and how many document starts (BOS) they hold."""
    ends = np.cumsum(lengths)
    row_starts = []  # stream offset of every row
    buffer_start = 0
    for i, end in enumerate(ends.tolist()):
        if end - buffer_start < row_len:
            continue
        if keep_all is not None and keep_all[i]:
            whole = (end - buffer_start) // row_len
            row_starts += range(buffer_start, buffer_start + whole * row_len, row_len)
            buffer_start += whole * row_len
        else:
            row_starts.append(buffer_start)
            buffer_start = end  # the rest of the buffer is dropped
    rows = np.empty((len(row_starts), row_len), dtype=dtype)
    if not row_starts:
        return rows, 0
    doc_starts = ends - lengths
    starts = np.asarray(row_starts, dtype=np.int64)
    first_docs = np.searchsorted(ends, starts, side="right")  # the document each row starts in
    for row, start, j in zip(rows, row_starts, first_docs.tolist()):
        _fill_row(row, docs, j, start - int(doc_starts[j]), bos, eos)
    row_of_start = np.searchsorted(starts, doc_starts, side="right") - 1
    inside = (row_of_start >= 0) & (doc_starts < starts[np.maximum(row_of_start, 0)] + row_len)
    return rows, int(inside.sum())


def _fill_row(row: np.ndarray, docs, j: int, skip: int, bos: int, eos: int) -> None:
    """Copy the stream (BOS + document + EOS, ...) into `row` from token `skip` of document j's part."""
    position, row_len = 0, len(row)
    while position < row_len:
        doc = docs[j]
        stream_len = len(doc) + 2
        take = min(row_len - position, stream_len - skip)
        first, last = skip, skip + take  # [first, last) of this document's stream
        if first == 0:
            row[position] = bos
        low, high = max(first, 1), min(last, stream_len - 1)
        if high > low:
            row[position + low - first:position + high - first] = doc[low - 1:high - 1]
        if last == stream_len:
            row[position + take - 1] = eos
        position, j, skip = position + take, j + 1, 0


def unpack_carry(rows: np.ndarray, bos: int, eos: int, pad: int) -> list[np.ndarray]:
    """The inverse of carry packing: the documents (without BOS/EOS) in packing order."""
    stream = rows.reshape(-1)
    stream = stream[stream != pad] if pad not in (bos, eos) else stream
    starts = np.flatnonzero(stream == bos)
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(stream)
        doc = stream[start + 1:end]
        if len(doc) == 0 or doc[-1] != eos:
            raise ValueError(f"document at stream offset {start} does not end with EOS")
        out.append(doc[:-1])
    return out
