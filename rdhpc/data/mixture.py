"""Several prepared datasets blended by weight at train time (`data.sources`), and the one place that
opens a run's training and validation data.

    data:
      sources:
        - {name: web, dir: shards/web, weight: 0.7}
        - {name: code, dir: shards/code, weight: 0.3}
      mixture_window: 16          # global batches per window

The blend is a closed-form function of (shuffle_seed, the weights, the row's global position), as
the single-source order is, so every rank computes it without communicating, it is the same on any
number of ranks, and a resume continues it exactly:

- A window is `mixture_window` global batches, M rows. Source i takes n_i of them, the largest-
  remainder apportionment of M w_i / W (so |n_i - M w_i / W| < 1: exact over every window, not only
  on average). Windows are aligned with the segment's first step (below).
- Within a window, the slots go to the sources in a smooth interleave: slot keys (j + 0.5) / n_i for
  j < n_i, sorted (ties by source order). Any run of consecutive slots is then within about one row
  per source of proportional, so each global batch (and each rank's slice of it) is close to the
  mixture too, not only the window.
- Source i's k-th row overall (k counts over every window) is row k mod len_i of its own Feistel
  permutation for epoch k // len_i, seeded from (shuffle_seed, the source's name). A resume with
  sources renamed, added, removed or reordered is refused (a weight may change, below).
- When a source runs out (its k reaches len_i): data.on_exhausted 'stop' ends the run at the step
  before any source would repeat a row; 'new_epoch' continues that source with a new permutation
  (the others are unaffected).
- Weights may change on resume: the loader state keeps a history of segments (first step, weights,
  window, rows each source had consumed at that step); a new segment starts at the resume step with
  new windows and each source's count carried over, and the log says so. A checkpoint therefore
  records every weight used so far, and the order from each segment's first step on is a function of
  (seed, that history, step): the same on any rank count and after any later resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from rdhpc.data.format import ShardError
from rdhpc.data.loader import FeistelPermutation, ShardDataset
from rdhpc.errors import ConfigError


def source_seed(seed: int, name: str) -> int:
    """The permutation seed of one source: from the run's shuffle seed and the source's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def apportion(weights: list[float], total: int) -> np.ndarray:
    """Integer shares of `total` proportional to `weights` (largest remainder; ties to the earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    remainders = exact - counts
    order = sorted(range(len(w)), key=lambda i: (-remainders[i], i))
    counts[order[:total - int(counts.sum())]] += 1
    return counts


class Window:
    """One window's layout: which source each of its M slots reads, and the how-manieth of that
    source's rows in the window it is."""

    def __init__(self, weights: list[float], num_rows: int):
        self.num_rows = num_rows
        self.counts = apportion(weights, num_rows)
        keys = [((j + 0.5) / n, i, j) for i, n in enumerate(self.counts.tolist()) for j in range(n)]
        keys.sort()
        self.slot_source = np.array([i for _, i, _ in keys], dtype=np.int64)
        self.slot_rank = np.array([j for _, _, j in keys], dtype=np.int64)
        # prefix[i, s]: slots of source i among the first s slots
        self.prefix = np.zeros((len(weights), num_rows + 1), dtype=np.int64)
        self.prefix[self.slot_source, np.arange(1, num_rows + 1)] = 1
        self.prefix = np.cumsum(self.prefix, axis=1)


@dataclass
class Segment:
    first_step: int
    weights: dict[str, float]
    window: int  # global batches per window
    offsets: dict[str, int]  # rows each source had consumed before first_step

    def to_dict(self) -> dict:
        return {"first_step": self.first_step, "weights": dict(self.weights), "window": self.window,
                "offsets": dict(self.offsets)}


class MixtureOrder:
    """The global order of a Mixture (see the module's docstring): global batch indices per step,
    when the data runs out, rows consumed per source, and the history a checkpoint keeps."""

    def __init__(self, mixture: "Mixture", global_batch_size: int, seed: int, on_exhausted: str, log=None):
        self.mixture, self.global_batch_size = mixture, global_batch_size
        self.seed, self.on_exhausted = seed, on_exhausted
        self.log = log or (lambda *a: None)
        self.names = list(mixture.sources)
        self.lengths = np.array([len(s) for s in mixture.sources.values()], dtype=np.int64)
        self.starts = mixture.starts
        self.segments = [Segment(0, dict(mixture.weights), mixture.window, {n: 0 for n in self.names})]
        self._windows: dict = {}
        self._permutations: dict = {}
        window = self._window(self.segments[0])
        shares = ", ".join(f"{n} {w:g} ({c} rows)" for n, w, c in zip(self.names, mixture.weights.values(),
                                                                       window.counts.tolist()))
        self.log(f"[data] mixture of {len(self.names)} sources, windows of {mixture.window} global batches = "
                 f"{window.num_rows} rows: {shares}; when a source runs out: {on_exhausted}")

    def _window(self, segment: Segment) -> Window:
        key = (tuple(segment.weights[n] for n in self.names), segment.window)
        if key not in self._windows:
            self._windows[key] = Window(list(key[0]), segment.window * self.global_batch_size)
        return self._windows[key]

    def _segment(self, step: int) -> Segment:
        return [s for s in self.segments if s.first_step <= step][-1]

    def consumed(self, step: int) -> np.ndarray:
        """Rows each source gave to the global batches of steps [0, step)."""
        segment = self._segment(step)
        window = self._window(segment)
        full, partial = divmod((step - segment.first_step) * self.global_batch_size, window.num_rows)
        offsets = np.array([segment.offsets[n] for n in self.names], dtype=np.int64)
        return offsets + full * window.counts + window.prefix[:, partial]

    def global_batch_indices(self, step: int) -> np.ndarray:
        segment = self._segment(step)
        window = self._window(segment)
        first = (step - segment.first_step) * self.global_batch_size
        full, slot = np.divmod(np.arange(first, first + self.global_batch_size), window.num_rows)
        source = window.slot_source[slot]
        offsets = np.array([segment.offsets[n] for n in self.names], dtype=np.int64)
        k = offsets[source] + full * window.counts[source] + window.slot_rank[slot]  # the source's k-th row
        epoch, within = np.divmod(k, self.lengths[source])
        out = np.empty(self.global_batch_size, dtype=np.int64)
        for i, e in sorted(set(zip(source.tolist(), epoch.tolist()))):
            if (i, e) not in self._permutations:
                if len(self._permutations) > 4 * len(self.names):
                    self._permutations.clear()
                self._permutations[(i, e)] = FeistelPermutation(int(self.lengths[i]),
                                                                source_seed(self.seed, self.names[i]), e)
            mask = (source == i) & (epoch == e)
            out[mask] = self.starts[i] + self._permutations[(i, e)](within[mask])
        return out

    def exhausted(self, step: int) -> bool:
        """'stop': the batch of `step` would repeat some source's row."""
        return self.on_exhausted == "stop" and bool((self.consumed(step + 1) > self.lengths).any())

    def scalars(self, step: int) -> dict[str, float]:
        """Tokens seen per source by the end of `step` steps (rows x seq_len, padding included)."""
        rows = self.consumed(step)
        return {f"data/{n}/tokens": float(r * self.mixture.seq_len) for n, r in zip(self.names, rows.tolist())}

    def state_dict(self) -> dict:
        return {"history": [s.to_dict() for s in self.segments]}

    def load_state_dict(self, state: dict | None, step: int) -> None:
        if not state or not state.get("history"):
            raise ShardError("cannot resume the data order: the checkpoint has no mixture history (it was not "
                             "trained on data.sources)")
        configured = self.segments[-1]
        history = [Segment(int(s["first_step"]), {k: float(v) for k, v in s["weights"].items()}, int(s["window"]),
                           {k: int(v) for k, v in s["offsets"].items()}) for s in state["history"]]
        if any(set(s.weights) != set(self.names) for s in history):
            raise ShardError(f"cannot resume the data order: the checkpoint's sources were "
                             f"{sorted(history[-1].weights)}, data.sources names {sorted(self.names)}")
        self.segments = history
        last = history[-1]
        if last.weights != configured.weights or last.window != configured.window:
            offsets = dict(zip(self.names, self.consumed(step).tolist()))
            self.segments.append(Segment(step, dict(configured.weights), configured.window, offsets))
            before = ", ".join(f"{n} {last.weights[n]:g}" for n in self.names)
            after = ", ".join(f"{n} {configured.weights[n]:g}" for n in self.names)
            window = self._window(self.segments[-1])
            self.log(f"[data] mixture weights changed at step {step}: {before} -> {after} (windows of "
                     f"{configured.window} global batches from step {step}: "
                     + ", ".join(f"{n} {c} rows" for n, c in zip(self.names, window.counts.tolist()))
                     + "; rows consumed so far: " + ", ".join(f"{n} {k}" for n, k in offsets.items()) + ")")


class Mixture:
    """Several ShardDatasets as one RowSource: global index = the source's start + its own row index.
    The weights and the window shape the order (batch_order), never the rows."""

    def __init__(self, sources: dict[str, ShardDataset], weights: dict[str, float], window: int):
        self.sources, self.weights, self.window = sources, weights, window
        first = next(iter(sources.values()))
        self.seq_len, self.pad_id, self.manifest = first.seq_len, first.pad_id, first.manifest
        self.starts = np.cumsum([0] + [len(s) for s in sources.values()])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def fingerprint(self) -> dict:
        return {"folder": "data.sources (" + ", ".join(f"{n}: {s.folder}" for n, s in self.sources.items()) + ")",
                "rows": len(self)}

    def fingerprints(self) -> list[dict]:
        """One per source, named: what a checkpoint records and a resume compares."""
        return [{"name": n, **s.fingerprint()} for n, s in self.sources.items()]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for i, source in enumerate(self.sources.values()):
            mask = which == i
            if mask.any():
                out[mask] = source.rows(indices[mask] - self.starts[i])
        return out

    def batch_order(self, global_batch_size: int, seed: int, on_exhausted: str, log=None) -> MixtureOrder:
        return MixtureOrder(self, global_batch_size, seed, on_exhausted, log)


@dataclass
class TrainingData:
    train: object  # a RowSource: a ShardDataset, or a Mixture of data.sources
    val: dict[str | None, ShardDataset]  # validation set by source name (None: the one-source run)
    verify: dict[str, ShardDataset]  # what verify_shards checks (names as the run folder records them)
    notes: list[str] = field(default_factory=list)


def open_training_data(data, seq_len: int, padded_vocab_size: int) -> TrainingData:
    """The training RowSource and the validation sets of a DataConfig, checked against the model:
    one source (data.train_dir, validated on data.val_dir or its own val split) or a mixture
    (data.sources, each validated on its own val split). Opens manifests only (ShardDataset)."""
    if not data.sources:
        train = ShardDataset(data.train_dir, "train", seq_len=seq_len)
        _check_vocab(train, padded_vocab_size, "")
        # validation rows must be tokenized as the training rows are
        val = ShardDataset(data.val_dir or data.train_dir, "val", seq_len=seq_len,
                           tokenizer_sha256=train.manifest.tokenizer.sha256)
        return TrainingData(train, {None: val}, {"train": train, "val": val})
    sources, vals, notes = {}, {}, []
    for i, source in enumerate(data.sources):
        where = f"data.sources[{i}] ({source.name})"
        try:
            dataset = ShardDataset(source.dir, "train")
        except ShardError as exc:
            raise ShardError(f"{where}: {exc}") from None
        if sources:
            name0, first = next(iter(sources.items()))
            for what, mine, theirs in (("seq_len", dataset.seq_len, first.seq_len),
                                       ("tokenizer sha256", dataset.manifest.tokenizer.sha256,
                                        first.manifest.tokenizer.sha256)):
                if mine != theirs:
                    raise ShardError(f"{where}: {source.dir} has {what} {str(mine)[:16]}, data.sources[0] ({name0}) "
                                     f"{first.folder} has {str(theirs)[:16]}: the sources of a mixture must share "
                                     f"one tokenizer and seq_len")
        if dataset.seq_len != seq_len:
            raise ShardError(f"{where}: {source.dir} has rows of seq_len {dataset.seq_len}, the run expects {seq_len} "
                             f"(model.max_seq_len)")
        _check_vocab(dataset, padded_vocab_size, f" of {where}")
        sources[source.name] = dataset
        if any(e.rows for e in dataset.manifest.split_shards("val")):
            vals[source.name] = ShardDataset(source.dir, "val", seq_len=seq_len)
        else:
            notes.append(f"[data] {where}: {source.dir} has no validation rows; no val/{source.name}/ losses")
    mixture = Mixture(sources, {s.name: s.weight for s in data.sources}, data.mixture_window)
    verify = {f"train/{n}": s for n, s in sources.items()} | {f"val/{n}": s for n, s in vals.items()}
    return TrainingData(mixture, vals, verify, notes)


def _check_vocab(dataset: ShardDataset, padded_vocab_size: int, where: str) -> None:
    vocab = dataset.manifest.tokenizer.vocab_size
    if vocab > padded_vocab_size:
        raise ConfigError([f"model.vocab_size: the shards' tokenizer{where} has {vocab} tokens, the model embeds "
                           f"{padded_vocab_size}"])
