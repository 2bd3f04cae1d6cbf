"""Evaluation inside the training loop: the trainer holds a list of evaluators and, after each
optimizer step, runs the ones that are due through the engine's forward (so ZeRO-3 still gathers
its partitioned weights). Each evaluator returns the scalars it measured; the trainer hands them to
the run's metrics sink. The evaluators compute what the offline commands compute (`rdhpc eval`),
with the same code, on every rank's share of the examples, reduced over the ranks.

    evaluator = DepthLossEvaluator(val_dataset, run.eval, micro_batch_size, rank, world_size, device,
                                   sum_over_ranks, seed=run.train.seed)
    if evaluator.due(step, last=step == max_steps):
        result = evaluator.evaluate(forward, step)      # forward = engine(...) in eval mode
        sink.scalars(step, result.scalars)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from rdhpc.eval.depth_eval import evaluate_depths


@dataclass
class EvalResult:
    scalars: dict[str, float]  # TensorBoard tag -> value
    summary: str  # one log line


class Evaluator(Protocol):
    name: str

    def due(self, step: int, last: bool) -> bool: ...

    def evaluate(self, forward: Callable, step: int) -> EvalResult: ...


class DepthLossEvaluator:
    """Validation loss at fixed depths (`eval.depths`): the live test-time scaling curve, on the
    first `eval.rows` rows of the validation split, one contiguous slice per rank. Every row's
    initial-state noise is keyed by its index (rdhpc.eval.depth_eval.validation_seeds), so the rows,
    their noise and the token-weighted result are the same on any number of ranks, equal to
    `rdhpc eval` on the same rows; no global generator is drawn from, so evaluating never shifts
    the training streams."""

    def __init__(self, dataset, config, micro_batch_size: int, rank: int, world_size: int, device: torch.device,
                 sum_over_ranks: Callable[[list[float]], list[float]], seed: int, source: str | None = None):
        self.dataset, self.config, self.device = dataset, config, device
        # one evaluator per source of a mixture (data.sources): users judge a blend by its per-source
        # losses, `val/<source>/loss_r{d}`; a one-source run keeps `val/loss_r{d}`
        self.source = source
        self.name = f"val/{source}" if source else "val"
        self.depths = sorted(set(config.depths))
        self.micro_batch_size = micro_batch_size
        self.sum_over_ranks = sum_over_ranks
        self.seed = seed
        per_rank = -(-config.rows // world_size)
        self.first_row = min(rank * per_rank, config.rows)
        self.real_rows = min(per_rank, config.rows - self.first_row)
        # every rank runs the same number of forwards (ZeRO 3 gathers weights in each): a rank with
        # fewer rows fills its last batch with rows that count nothing
        padded = -(-per_rank // micro_batch_size) * micro_batch_size
        self.indices = (self.first_row + np.arange(padded)) % len(dataset)

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.config.interval == 0

    @torch.no_grad()
    def evaluate(self, forward: Callable, step: int) -> EvalResult:
        totals, tokens = evaluate_depths(forward, self.dataset.rows(self.indices), self.depths, self.dataset.pad_id,
                                         self.micro_batch_size, seed=self.seed, device=self.device,
                                         first_row=self.first_row, real_rows=self.real_rows)
        *sums, tokens = self.sum_over_ranks([totals[d] for d in self.depths] + [float(tokens)])
        losses = {d: s / max(tokens, 1.0) for d, s in zip(self.depths, sums)}
        return EvalResult({f"{self.name}/loss_r{d}": v for d, v in losses.items()},
                          "validation " + (f"{self.source}: " if self.source else "")
                          + "  ".join(f"r={d}: {v:.4f}" for d, v in losses.items()))
