"""`rdhpc prep shards`: tokenize and pack corpora into verified Arrow shards, in parallel, restartable.

    rdhpc prep shards --input web=data/web/ --input code=data/code/*.jsonl.zst --weight code=2.0 \
        --tokenizer tok.json --seq-len 4096 --out shards/ --workers 8
    srun -n 16 rdhpc prep shards ...        # or: mpirun -n 16 rdhpc prep shards ...

Two stages, each a list of independent tasks split over ranks (task i goes to rank i % world) and,
inside a rank, over `--workers` processes:
1. tokenize: each piece of the input (rdhpc.data_prep.sources.Piece) -> `.work/tok/piece-N.tokens`
   (the ids of its documents) and `piece-N.npz` (their seeded keys, split, copy count and offsets);
2. pack: each output shard gathers its documents from every piece (key % num_shards), orders them
   by key and packs them -> `train-N.arrow` / `val-N.arrow`.
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
    wait_timeout: float = 24 * 3600.0

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
        for name in ("workers", "rows_per_shard", "piece_bytes"):
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
    """The piece's index (keys, split, copies, document offsets): written last, so its presence
    means the piece is complete. Beside it: `.tokens` (the raw ids of all its documents, in the
    shards' dtype) and `.json` (its counts)."""
    return work / "tok" / f"piece-{index:06d}.npz"


def tokenize_piece(task: tuple[int, Piece]) -> dict:
    index, piece = task
    settings: ShardSettings = _worker_state["settings"]
    tokenizer: TextTokenizer = _worker_state["tokenizer"]
    source = _worker_state["sources"][piece.source]
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    path = _piece_path(Path(settings.out) / WORK_DIR, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens_path = path.with_suffix(".tokens")
    tokens_tmp = tokens_path.with_name(tokens_path.name + ".tmp")
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
    result, length_parts = ReadResult(), []
    # Tokens go to disk batch by batch, already in the shards' dtype: no concatenation of the whole
    # piece in memory, and half the bytes where the vocabulary fits 16 bits.
    with open(tokens_tmp, "wb") as tokens_file:
        while (part := batches.get()) is not None:
            if isinstance(part, BaseException):
                raise part
            if settings.strict and part.problems:
                resolve_lines(part.problems[:1])
                raise PrepError(f"{part.problems[0]} (--strict: stopping; without it such records are skipped and reported)")
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
    copies = np.where(val, 1, num_copies(keys, source.weight)).astype(np.uint16)
    lengths = np.concatenate(length_parts) if length_parts else np.empty(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stats = {
        "piece": index, "source": source.name, "documents": len(keys), "bytes": result.bytes_read,
        "tokens": int(lengths.sum()),
        "train_documents": int((~val).sum()), "val_documents": int(val.sum()),
        # +2 per document: BOS and EOS
        "train_tokens_with_copies": int(((lengths + 2) * copies)[~val].sum()),
        "val_tokens": int((lengths + 2)[val].sum()),
        # drop packing keeps at most one row per document start: what sizes its shards
        "train_capped_tokens_with_copies": int((np.minimum(lengths + 2, settings.seq_len + 1) * copies)[~val].sum()),
        "val_capped_tokens": int(np.minimum(lengths + 2, settings.seq_len + 1)[val].sum()),
        "train_copies": int(copies[~val].sum()),
        "problems": [asdict(p) for p in result.problems],
    }
    os.replace(tokens_tmp, tokens_path)
    _write_json_atomic(path.with_suffix(".json"), stats)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as index_file:
        np.savez(index_file, keys=keys, val=val, copies=copies, offsets=offsets)
    os.replace(tmp, path)  # the index appears last: its presence means the piece is complete
    return stats


# ---- stage 2: pack one shard ---------------------------------------------------------------------

def _open_piece(path: Path, dtype: str):
    with np.load(path) as index:
        keys, val, copies, offsets = (index[name] for name in ("keys", "val", "copies", "offsets"))
    tokens_path = path.with_suffix(".tokens")
    expected = int(offsets[-1]) * np.dtype(dtype).itemsize
    if tokens_path.stat().st_size != expected:
        raise PrepError(f"{tokens_path}: {tokens_path.stat().st_size} bytes, its index says {expected} "
                        "(delete the .work folder and run again)")
    # memory-mapped: a shard reads only its own documents' pages. A plain ndarray over the map:
    # slicing a np.memmap runs Python code per slice (twice the whole pack stage's packing time).
    values = np.asarray(np.memmap(tokens_path, dtype=dtype, mode="r")) if expected else np.empty(0, dtype=dtype)
    return keys, val, copies.astype(np.int64), offsets, values


def pack_shard(task: tuple[str, int, int, int, frozenset]) -> dict:
    split, group, num_groups, num_pieces, keep_all_pieces = task
    settings: ShardSettings = _worker_state["settings"]
    tokenizer: TextTokenizer = _worker_state["tokenizer"]
    work = Path(settings.out) / WORK_DIR
    dtype = token_dtype(tokenizer.vocab_size)
    order_keys, docs, keep_all = [], [], []
    for index in range(num_pieces):
        keys, val, copies, offsets, values = _open_piece(_piece_path(work, index), dtype)
        selected = np.flatnonzero(val == (split == "val"))
        doc_index, keys_of_copies = copy_keys(keys[selected], copies[selected])
        mine = np.flatnonzero(keys_of_copies % np.uint64(num_groups) == np.uint64(group))
        for row, key in zip(selected[doc_index[mine]], keys_of_copies[mine]):
            order_keys.append(key)
            docs.append(values[offsets[row]:offsets[row + 1]])
        keep_all += [index in keep_all_pieces] * len(mine)
    order = np.argsort(np.asarray(order_keys, dtype=np.uint64), kind="stable")
    docs = [docs[i] for i in order]
    flags = np.asarray(keep_all, dtype=bool)[order] if keep_all_pieces else None
    rows, counts = pack(docs, settings.seq_len + 1, settings.pack, tokenizer.bos_id, tokenizer.eos_id,
                        tokenizer.pad_id, dtype=np.dtype(dtype), keep_all=flags)
    path = Path(settings.out) / shard_name(split, group)
    entry = write_shard(path, rows, seq_len=settings.seq_len, dtype=dtype, tokenizer_sha256=tokenizer.sha256,
                        split=split)
    entry.update(real_tokens=counts["real_tokens"], pad_tokens=counts["pad_tokens"], documents=counts["documents"],
                 dropped_tokens=counts["dropped_tokens"])
    _write_json_atomic(work / "shards" / (path.name + ".json"), entry)
    return entry


# ---- orchestration -------------------------------------------------------------------------------

def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _wait_for(paths: list[Path], work: Path, what: str, timeout: float) -> None:
    """A file barrier: wait until every path exists, failing at once if any rank left a FAILED note."""
    deadline = time.monotonic() + timeout
    while True:
        failed = sorted(work.glob("FAILED-rank*"))
        if failed:
            raise PrepError(f"{failed[0].name.removeprefix('FAILED-')} failed: {failed[0].read_text().strip()}")
        missing = [p for p in paths if not p.exists()]
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
            _wait_for([settings_file], work, "start", settings.wait_timeout)
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
        todo = [(i, p) for i, p in enumerate(pieces) if i % ranks.world_size == ranks.rank and not piece_paths[i].exists()]
        # Largest first: a big piece started last would leave the other workers idle at the end.
        # That matters for compressed and .txt inputs, which are not cut (a multi-GB .jsonl.zst is
        # one piece); .jsonl pieces are at most --piece-bytes, and on the benchmark's corpus the
        # order made no measurable difference. The order does not change the output: each piece is
        # named by its index.
        todo.sort(key=lambda task: -piece_size(task[1]))
        if ranks.is_main:
            log(f"[prep] {sum(len(s.files) for s in sources)} files in {len(sources)} source(s) -> {len(pieces)} pieces, "
                f"{ranks.world_size} rank(s) ({ranks.launcher}) x {settings.workers} worker(s)"
                + (f"; resuming: {sum(p.exists() for p in piece_paths)} pieces already tokenized"
                   if any(p.exists() for p in piece_paths) else ""))
        setup_done = time.monotonic()
        _run_tasks(tokenize_piece, todo, workers, "tokenize", show, "piece")
        _wait_for(piece_paths, work, "tokenize", wait_timeout)
        tokenize_done = time.monotonic()

        stats = [json.loads(p.with_suffix(".json").read_text()) for p in piece_paths]
        keep_all_pieces = frozenset(i for i, s in enumerate(stats) if s["source"] in settings.keep_all)

        def kept(s, split):  # tokens that size the shards: drop packing keeps at most a row per start
            capped = "capped_" if settings.pack == "drop" and s["piece"] not in keep_all_pieces else ""
            return s[f"train_{capped}tokens_with_copies"] if split == "train" else s[f"val_{capped}tokens"]

        groups = {"train": _num_groups(sum(kept(s, "train") for s in stats), settings),
                  "val": _num_groups(sum(kept(s, "val") for s in stats), settings)
                  if any(s["val_documents"] for s in stats) else 0}
        tasks = [(split, g, groups[split], len(pieces), keep_all_pieces) for split in ("train", "val")
                 for g in range(groups[split])]
        shard_stats = [work / "shards" / (shard_name(split, g) + ".json") for split, g, _, _, _ in tasks]
        todo = [t for i, t in enumerate(tasks) if i % ranks.world_size == ranks.rank and not shard_stats[i].exists()]
        _run_tasks(pack_shard, todo, workers, "pack", show, "shard")
        if not ranks.is_main:
            return out  # rank 0 gathers the shards' counts and may delete .work as soon as all exist
        _wait_for(shard_stats, work, "pack", wait_timeout)
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

    entries = [json.loads(p.read_text()) for p in shard_stats]
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
    }
