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

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from rdhpc.eval.depth_eval import evaluate_depths, validation_indices


@dataclass
class EvalResult:
    scalars: dict[str, float]  # TensorBoard tag -> value
    summary: str  # one log line
    # TensorBoard tag -> a function drawing the image (H, W, 3 uint8): called on the main rank only
    images: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)


class Evaluator(Protocol):
    name: str

    def due(self, step: int, last: bool) -> bool: ...

    def evaluate(self, forward: Callable, step: int) -> EvalResult: ...


class DepthLossEvaluator:
    """Validation loss at fixed depths (`eval.depths`): the live test-time scaling curve, on
    `eval.rows` rows spread evenly over the validation split, one contiguous part per rank. Every row's
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
        # `eval.rows` rows spread evenly over the split (validation_indices), one contiguous part of
        # that list per rank
        chosen = validation_indices(len(dataset), config.rows)
        per_rank = -(-len(chosen) // world_size)
        first = min(rank * per_rank, len(chosen))
        self.real_rows = min(per_rank, len(chosen) - first)
        # every rank runs the same number of forwards (ZeRO 3 gathers weights in each): a rank with
        # fewer rows fills its last batch with rows that count nothing
        padded = -(-per_rank // micro_batch_size) * micro_batch_size
        mine = chosen[first:first + self.real_rows]
        self.indices = np.concatenate([mine, np.full(padded - len(mine), chosen[0], dtype=np.int64)])

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.config.interval == 0

    @torch.no_grad()
    def evaluate(self, forward: Callable, step: int) -> EvalResult:
        totals, tokens = evaluate_depths(forward, self.dataset.rows(self.indices), self.depths, self.dataset.pad_id,
                                         self.micro_batch_size, seed=self.seed, device=self.device,
                                         row_indices=self.indices, real_rows=self.real_rows)
        *sums, tokens = self.sum_over_ranks([totals[d] for d in self.depths] + [float(tokens)])
        losses = {d: s / max(tokens, 1.0) for d, s in zip(self.depths, sums)}
        return EvalResult({f"{self.name}/loss_r{d}": v for d, v in losses.items()},
                          "validation " + (f"{self.source}: " if self.source else "")
                          + "  ".join(f"r={d}: {v:.4f}" for d, v in losses.items()))


class TaskEvaluator:
    """Task accuracy at fixed depths and under early exit (`eval.tasks`, rdhpc.eval.tasks): each rank
    scores its contiguous share of every task's examples, the counts are summed over the ranks;
    every example's noise is keyed by its index, so the numbers are those of `rdhpc eval --tasks`
    on one process. Draws `eval/tasks`, accuracy against depth and, over the evaluations so far,
    against the training step."""

    name = "tasks"

    def __init__(self, config, tokenizer, max_seq_len: int, pad_id: int, rank: int, world_size: int,
                 device: torch.device, sum_over_ranks: Callable[[list[float]], list[float]], seed: int):
        from rdhpc.eval.tasks import TaskScorer, load_task

        self.config, self.pad_id, self.device, self.seed = config, pad_id, device, seed
        self.rank, self.world_size, self.sum_over_ranks = rank, world_size, sum_over_ranks
        self.scorers = [TaskScorer(load_task(t.file, t.label, t.max_examples or config.task_examples), tokenizer,
                                   max_seq_len, config.task_max_new_tokens) for t in config.tasks]
        self.history: list[tuple[int, list]] = []  # (step, [TaskAccuracy]) of every evaluation

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.config.interval == 0

    @torch.no_grad()
    def evaluate(self, forward: Callable, step: int) -> EvalResult:
        from rdhpc.eval.tasks import TaskAccuracy, rank_share, score_examples, task_figure

        started = time.perf_counter()
        results = []
        for scorer in self.scorers:
            examples, real = rank_share(len(scorer.task.examples), self.rank, self.world_size)
            sums = score_examples(forward, scorer, examples, real, self.config.task_depths,
                                  self.config.task_exit_thresholds, self.pad_id, self.seed, self.device,
                                  self.config.task_batch_examples)
            results.append(TaskAccuracy.of(scorer.task, sums.from_list(self.sum_over_ranks(sums.to_list()))))
        seconds = time.perf_counter() - started
        self.history.append((step, results))
        history = list(self.history)
        scalars = {k: v for r in results for k, v in r.scalars().items()} | {"eval/task_seconds": seconds}
        return EvalResult(scalars, "; ".join(r.summary() for r in results) + f" ({seconds:.1f} s)",
                          {"eval/tasks": lambda: task_figure(history)})


def build_evaluators(run, val_datasets: dict, pad_id: int, rank: int, world_size: int, device: torch.device,
                     sum_over_ranks: Callable[[list[float]], list[float]]) -> list:
    """The trainer's evaluators: validation loss per source, and the tasks of `eval.tasks`."""
    evaluators = [DepthLossEvaluator(val, run.eval, run.train.micro_batch_size, rank, world_size, device,
                                     sum_over_ranks, seed=run.train.seed, source=source)
                  for source, val in val_datasets.items()]
    if run.eval.tasks:
        from rdhpc.eval.tasks import task_tokenizer

        evaluators.append(TaskEvaluator(run.eval, task_tokenizer(run), run.model.max_seq_len, pad_id, rank,
                                        world_size, device, sum_over_ranks, seed=run.train.seed))
    return evaluators
