"""Training batches from token shards: one global order shared by every rank, each rank a disjoint
slice of every global batch, prepared ahead of the step by a background thread.

    dataset = ShardDataset("shards/", "train", seq_len=4096)
    loader = BatchLoader(dataset, global_batch_size=4096, micro_batch_size=1, rank=r, world_size=W, seed=0)
    for step_batches in loader:             # one entry per optimizer step
        for inputs, labels in step_batches: # the micro-batches of this rank (gradient accumulation)
            ...

The loader reads rows through a RowSource (how many rows, these rows, a fingerprint); ShardDataset,
one split of a `rdhpc prep shards` folder, is the source the trainer uses.

The order is a seeded pseudo-random permutation of all rows, computed row by row (a Feistel network
with cycle walking), so it needs no memory however many rows there are and every rank computes the
same one without communicating. The position is counted in global batches: a run resumed on another
number of ranks (same global batch) continues with exactly the same data. The released code of the
paper shuffled files per rank, so some files were read twice and others never; this cannot happen
here.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rdhpc.data.format import ShardError, open_shard, read_manifest
from rdhpc.errors import ConfigError
from rdhpc.model.recurrent_depth import IGNORE_INDEX

_ROUNDS = 6


class FeistelPermutation:
    """A bijection of [0, n) drawn from (seed, epoch), evaluated for any index array in O(1) memory."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.low_bits = bits // 2
        self.high_bits = bits - self.low_bits
        self.low_mask = np.uint64((1 << self.low_bits) - 1)
        self.high_mask = np.uint64((1 << self.high_bits) - 1)
        rng = np.random.default_rng([seed, epoch, 0xFE15])
        self.keys = rng.integers(0, 2 ** 63, size=_ROUNDS, dtype=np.uint64)

    @staticmethod
    def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
        z = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(29)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        return z ^ (z >> np.uint64(32))

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        # An unbalanced Feistel network on (high, low): alternate which half absorbs the mix, each
        # half reduced to its own width, so every round is a bijection of [0, 2^bits).
        high, low = x >> np.uint64(self.low_bits), x & self.low_mask
        for i, key in enumerate(self.keys):
            if i % 2 == 0:
                high = (high + self._mix(low, key)) & self.high_mask
            else:
                low = (low + self._mix(high, key)) & self.low_mask
        return (high << np.uint64(self.low_bits)) | low

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} out of range for {self.n} rows")
        x = self._round_trip(x)
        outside = x >= self.n
        while outside.any():  # cycle walking: step again until back inside [0, n)
            x[outside] = self._round_trip(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


class RowSource(Protocol):
    """What the loader needs of its data: rows addressed by a global index, and a fingerprint that a
    checkpoint records so that a resume on other data is refused. A weighted mixture of several
    sources is one more RowSource."""

    seq_len: int
    pad_id: int

    def __len__(self) -> int: ...

    def rows(self, indices: np.ndarray) -> np.ndarray: ...

    def fingerprint(self) -> dict: ...


class ShardDataset:
    """Every row of one split of a `rdhpc prep shards` folder, addressed by a global row index.

    Start-up reads the manifest only: the row counts come from it, and no shard is opened until one
    of its rows is first read. A job of many ranks over many shards would otherwise open
    shards x ranks files on the metadata servers before step 1 (24k x 4096 = 100 million), at every
    start and every requeued segment. A shard's header (version, dtype, seq_len, tokenizer hash, row
    count against the manifest) is checked when it is opened, so with data.verify_checksums 'never'
    a bad shard still fails before its rows feed a step; with 'once' (the default) or 'always',
    `verify` checks every shard's header, sha256 and token range once before step 1, spread over
    the ranks (verify_shards), so a bad shard stops every rank, naming the file."""

    def __init__(self, folder: str | Path, split: str, seq_len: int | None = None,
                 tokenizer_sha256: str | None = None, verify_checksums: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if seq_len is not None and self.manifest.seq_len != seq_len:
            raise ShardError(f"{self.folder / 'manifest.json'}: shards of seq_len {self.manifest.seq_len}, "
                             f"the run expects {seq_len} (model.max_seq_len)")
        if tokenizer_sha256 is not None and self.manifest.tokenizer.sha256 != tokenizer_sha256:
            raise ShardError(f"{self.folder / 'manifest.json'}: made with tokenizer {self.manifest.tokenizer.sha256[:12]}, "
                             f"the run expects {tokenizer_sha256[:12]}")
        entries = [e for e in self.manifest.split_shards(split) if e.rows > 0]
        if not entries:
            raise ShardError(f"{self.folder}: no {split} rows")
        self.split = split
        self.entries = entries
        self.verify_checksums = verify_checksums  # sha256 at first open too (tests, `rdhpc eval`)
        self._readers: list = [None] * len(entries)  # opened on first read
        self._open_lock = threading.Lock()  # the prefetch thread and the evaluators may read at once
        self.num_opened = 0  # shards this process opened: what tools/bench_loader_start.py counts
        self.starts = np.cumsum([0] + [e.rows for e in entries])
        self.num_rows = int(self.starts[-1])
        self.seq_len = self.manifest.seq_len
        self.pad_id = self.manifest.tokenizer.pad_id

    def __len__(self) -> int:
        return self.num_rows

    def reader(self, shard: int):
        """The reader of the split's shard number `shard`, opened (and its header checked against
        the manifest) on first use."""
        reader = self._readers[shard]
        if reader is None:
            with self._open_lock:
                reader = self._readers[shard]
                if reader is None:
                    reader = open_shard(self.folder, self.entries[shard], self.manifest,
                                        verify_checksum=self.verify_checksums)
                    self._readers[shard] = reader
                    self.num_opened += 1
        return reader

    @property
    def readers(self) -> list:
        """Every shard's reader: opens them all (tests and tools; training opens them as it reads)."""
        return [self.reader(i) for i in range(len(self.entries))]

    def fingerprint(self) -> dict:
        """What identifies these rows wherever the folder lies: the tokenizer and a hash of the
        split's shard list (names, row counts, sha256 of every shard, as the manifest records them)."""
        listing = "\n".join(f"{e.file} {e.rows} {e.sha256}" for e in self.entries)
        return {"folder": str(self.folder), "split": self.split, "rows": self.num_rows,
                "tokenizer_sha256": self.manifest.tokenizer.sha256,
                "shards_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    def rows(self, indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for i, (s, index) in enumerate(zip(shard.tolist(), indices.tolist())):
            out[i] = self.reader(s).row(index - int(self.starts[s]))
        vocab = self.manifest.tokenizer.vocab_size
        if out.size and int(out.max()) >= vocab:  # a cheap check of every batch: never an embedding out of range
            i = int(np.flatnonzero(out.max(axis=1) >= vocab)[0])
            s = int(shard[i])
            raise ShardError(f"{self.folder / self.entries[s].file}: row {int(indices[i]) - int(self.starts[s])} "
                             f"holds token id {int(out[i].max())}, beyond the vocabulary of {vocab} (the shards' "
                             f"tokenizer): a corrupted or foreign shard")
        return out

    def verify(self, rank: int = 0, world_size: int = 1) -> list[str]:
        """This rank's share (every world_size-th shard) of a full check: the header against the
        manifest (what a first open checks), sha256 against the manifest, token ids within the
        vocabulary. The problems found, each naming its shard. The readers it opens are not kept:
        a rank reads other shards than the ones it verifies."""
        problems, vocab = [], self.manifest.tokenizer.vocab_size
        for entry in self.entries[rank::world_size]:
            try:
                reader = open_shard(self.folder, entry, self.manifest, verify_checksum=True)
            except ShardError as exc:
                problems.append(str(exc))
                continue
            rows = reader.all_rows()
            if rows.size and int(rows.max()) >= vocab:
                problems.append(f"{reader.path}: token id {int(rows.max())} >= vocabulary size {vocab}")
        return problems


def verify_shards(datasets: dict[str, ShardDataset], mode: str, record: Path, rank: int, world_size: int,
                  gather, log=print) -> None:
    """data.verify_checksums before step 1: every shard's header, sha256 and token range, each rank a
    share (ShardDataset.verify), every problem raised on every rank (`gather` joins the ranks'
    lists, so all ranks agree). With 'once', what `record` (in the run folder) says was verified is
    not read again, so a requeued segment starts at once; 'never' skips it (a shard's header is then
    checked when the shard is first read)."""
    import json
    import time

    if mode == "never":
        return
    done = {name: [d.fingerprint()["folder"], d.fingerprint()["shards_sha256"]] for name, d in datasets.items()}
    if mode == "once" and record.is_file() and json.loads(record.read_text()) == done:
        log("[train] shards verified before in this run folder (data.verify_checksums: once)")
        return
    started = time.perf_counter()
    problems = gather([p for d in datasets.values() for p in d.verify(rank, world_size)])
    if problems:
        raise ShardError(f"{len(problems)} shard(s) failed verification (data.verify_checksums: {mode}):\n  - "
                         + "\n  - ".join(problems[:20]))
    if rank == 0:
        record.write_text(json.dumps(done))
    entries = [e for d in datasets.values() for e in d.entries]
    log(f"[train] verified {len(entries)} shard(s), {sum(e.bytes for e in entries) / 1e6:,.1f} MB (sha256 and "
        f"token ids) and their headers on {world_size} rank(s) in {time.perf_counter() - started:.2f} s")


def inputs_and_labels(rows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of L+1 tokens -> inputs row[:-1] and labels row[1:], with pad labels ignored."""
    tokens = torch.from_numpy(rows)
    labels = tokens[:, 1:].clone()
    labels[labels == pad_id] = IGNORE_INDEX
    return tokens[:, :-1].contiguous(), labels


class BatchLoader:
    """Yields, per optimizer step, this rank's micro-batches [(inputs, labels), ...] from a RowSource:
    the order, the rank slicing, the tensors and the prefetch live here, the rows in the source."""

    def __init__(self, dataset: RowSource, global_batch_size: int, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, on_exhausted: str = "stop", prefetch_steps: int = 2, log=None):
        per_rank, remainder = divmod(global_batch_size, world_size)
        if remainder or per_rank % micro_batch_size:
            raise ConfigError([f"train.global_batch_size: {global_batch_size} does not split into {world_size} "
                               f"ranks x micro-batches of train.micro_batch_size = {micro_batch_size}"])
        if len(dataset) < global_batch_size:
            where = dataset.fingerprint().get("folder", "the data")
            raise ShardError(f"{where}: {len(dataset)} rows, fewer than one global batch of {global_batch_size}")
        if on_exhausted not in ("stop", "new_epoch"):
            raise ValueError(f"on_exhausted must be 'stop' or 'new_epoch', got {on_exhausted!r}")
        self.dataset, self.global_batch_size, self.micro_batch_size = dataset, global_batch_size, micro_batch_size
        self.rank, self.world_size, self.seed, self.on_exhausted = rank, world_size, seed, on_exhausted
        self.per_rank = per_rank
        self.steps_per_epoch = len(dataset) // global_batch_size  # the incomplete last batch is left out
        self.prefetch_steps = prefetch_steps
        self.consumed_steps = 0  # global batches handed out: the position a checkpoint stores
        self._permutations: dict[int, FeistelPermutation] = {}
        # A source that orders its own rows (a Mixture: the weights decide which source fills each
        # slot) hands the loader its order; a plain source is one permutation of all its rows.
        make_order = getattr(dataset, "batch_order", None)
        self.order = make_order(global_batch_size, seed, on_exhausted, log) if make_order else None

    # ---- the global order -------------------------------------------------------------------------
    def global_batch_indices(self, step: int) -> np.ndarray:
        """Row indices of the whole global batch of optimizer step `step` (0-based)."""
        if self.order is not None:
            return self.order.global_batch_indices(step)
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch not in self._permutations:
            self._permutations = {epoch: FeistelPermutation(len(self.dataset), self.seed, epoch)}
        positions = np.arange(within * self.global_batch_size, (within + 1) * self.global_batch_size)
        return self._permutations[epoch](positions)

    def rank_batch_indices(self, step: int) -> np.ndarray:
        indices = self.global_batch_indices(step)
        return indices[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def step_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.dataset.rows(self.rank_batch_indices(step))
        return [inputs_and_labels(rows[i:i + self.micro_batch_size], self.dataset.pad_id)
                for i in range(0, len(rows), self.micro_batch_size)]

    def exhausted(self, step: int) -> bool:
        if self.order is not None:
            return self.order.exhausted(step)
        return self.on_exhausted == "stop" and step >= self.steps_per_epoch

    def source_scalars(self, step: int) -> dict[str, float]:
        """Per-source figures for TensorBoard (a mixture's tokens per source); none for one source."""
        return self.order.scalars(step) if self.order is not None else {}

    def _fingerprints(self) -> list[dict]:
        fingerprints = getattr(self.dataset, "fingerprints", None)
        return fingerprints() if fingerprints else [self.dataset.fingerprint()]

    # ---- iteration with prefetch ------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"consumed_steps": self.consumed_steps, "seed": self.seed, "global_batch_size": self.global_batch_size,
                 "num_rows": len(self.dataset), "sources": self._fingerprints()}
        if self.order is not None:
            state["mixture"] = self.order.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's position; refuse when the data is not the data the run was
        trained on (another seed, batch, row count, tokenizer or shard content: the order would
        silently change). Checkpoints written before sources were recorded check what they have."""
        now = self.state_dict()
        problems = [f"{key} was {state[key]}, now {now[key]}" for key in ("seed", "global_batch_size", "num_rows")
                    if state[key] != now[key]]
        before_sources = state.get("sources", [])
        names = [[s.get("name") for s in sources] for sources in (before_sources, now["sources"])]
        if before_sources and names[0] != names[1]:
            problems.append(f"the sources were {names[0]}, now {names[1]}")
        for before, after in zip(before_sources, now["sources"]):
            problems += [f"{after['folder']}: {key} was {before[key][:16]}, now {after[key][:16]} (the checkpoint was "
                         f"trained on {before['folder']})"
                         for key in ("tokenizer_sha256", "shards_sha256") if before.get(key) not in (None, after[key])]
        if problems:
            raise ShardError("cannot resume the data order: " + "; ".join(problems))
        if self.order is not None:
            self.order.load_state_dict(state.get("mixture"), int(state["consumed_steps"]))
        self.consumed_steps = int(state["consumed_steps"])

    def __iter__(self):
        """Steps from the current position on; a background thread prepares the next ones."""
        ready: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch_steps))
        stop = threading.Event()
        first = self.consumed_steps

        def produce():
            step = first
            try:
                while not stop.is_set() and not self.exhausted(step):
                    item = (step, self.step_batches(step))
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    step += 1
                ready.put(None)
            except BaseException as exc:  # handed to the training thread, which raises it
                ready.put(exc)

        worker = threading.Thread(target=produce, name="rdhpc-batch-prefetch", daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                step, batches = item
                self.consumed_steps = step + 1
                yield batches
        finally:
            stop.set()
            worker.join(timeout=5)
