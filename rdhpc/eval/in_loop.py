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

from rdhpc.eval.depth_eval import loss_by_depth


@dataclass
class EvalResult:
    scalars: dict[str, float]  # TensorBoard tag -> value
    summary: str  # one log line


class Evaluator(Protocol):
    name: str

    def due(self, step: int, last: bool) -> bool: ...

    def evaluate(self, forward: Callable, step: int) -> EvalResult: ...


def rng_devices(device: torch.device) -> list:
    """The generators a forward on `device` draws from besides the CPU's: fork_rng(devices=[])
    saves only the CPU generator, and a GPU's noise would then change after every evaluation."""
    return [device] if device.type == "cuda" else []


class DepthLossEvaluator:
    """Validation loss at fixed depths (`eval.depths`): the live test-time scaling curve. Each rank
    evaluates `eval.batches` micro-batches of its own validation rows; summed losses and token counts
    are reduced over ranks, so the result is the token-weighted mean over all ranks' rows (what
    `rdhpc eval` reports on the same rows). The initial-state noise is seeded from `seed` at every
    evaluation, inside a forked RNG, so evaluating never shifts the training streams."""

    name = "val"

    def __init__(self, dataset, config, micro_batch_size: int, rank: int, world_size: int, device: torch.device,
                 sum_over_ranks: Callable[[list[float]], list[float]], seed: int):
        self.dataset, self.config, self.device = dataset, config, device
        self.depths = sorted(set(config.depths))
        self.micro_batch_size = micro_batch_size
        self.sum_over_ranks = sum_over_ranks
        self.seed = seed
        rows_per_rank = config.batches * micro_batch_size
        self.indices = (np.arange(rows_per_rank) + rank * rows_per_rank) % len(dataset)

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.config.interval == 0

    @torch.no_grad()
    def evaluate(self, forward: Callable, step: int) -> EvalResult:
        from rdhpc.data.loader import inputs_and_labels

        rows = self.dataset.rows(self.indices)
        totals = {d: 0.0 for d in self.depths}
        tokens = 0
        with torch.random.fork_rng(devices=rng_devices(self.device)):
            torch.manual_seed(self.seed)  # the same initial-state noise at every evaluation
            for start in range(0, len(rows), self.micro_batch_size):
                inputs, labels = inputs_and_labels(rows[start:start + self.micro_batch_size], self.dataset.pad_id)
                batch = loss_by_depth(forward, inputs.to(self.device), labels.to(self.device), self.depths)
                for depth, (loss, count) in batch.items():
                    totals[depth] += loss
                tokens += batch[self.depths[0]][1]
        *sums, tokens = self.sum_over_ranks([totals[d] for d in self.depths] + [float(tokens)])
        losses = {d: s / max(tokens, 1.0) for d, s in zip(self.depths, sums)}
        return EvalResult({f"val/loss_r{d}": v for d, v in losses.items()},
                          "validation " + "  ".join(f"r={d}: {v:.4f}" for d, v in losses.items()))
