"""What a training step draws at random, as functions of (seed, step): the depth (the log-normal
Poisson sampler) and the seeds of every row's initial-state noise.

Seeding from (seed, step) instead of a running generator means every rank draws the same depth
without communicating, and a resumed run repeats the draws of the interrupted one exactly. The
noise of a row is keyed by its position in the global batch, so it does not depend on how the
rows are spread over ranks: the run is a function of its config, not of its world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# Streams of row noise: training rows at a step, validation rows (keyed by their row index).
TRAIN_NOISE, VALIDATION_NOISE, GENERATION_NOISE = 0, 1, 2


def row_noise_seeds(seed: int, step: int, rows, stream: int = TRAIN_NOISE) -> list[int]:
    """One 63-bit generator seed per row: a function of (seed, stream, step, row) only, where `row`
    is the row's position in the global batch (training) or its index in the split (validation).
    NumPy's SeedSequence, as the depth sampler's: about 10 us per row, once per row and step."""
    return [int(np.random.SeedSequence([seed & _MASK64, stream, step, int(row)]).generate_state(1, np.uint64)[0] >> 1)
            for row in rows]


_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class DepthSampler:
    mean_recurrence: int = 32
    backprop_depth: int = 8
    sigma: float = 0.5
    scheme: str = "poisson-lognormal"
    seed: int = 0

    @classmethod
    def from_model_config(cls, config, seed: int = 0) -> "DepthSampler":
        return cls(config.mean_recurrence, config.mean_backprop_depth, config.recurrence_sigma,
                   config.sampling_scheme, seed)

    def total_depth(self, step: int) -> int:
        """r for this optimizer step (>= 1); identical for every call with the same (seed, step)."""
        if self.scheme == "fixed":
            return self.mean_recurrence
        if self.scheme == "poisson-lognormal":
            rng = np.random.default_rng([self.seed, step])
            # E[exp(tau)] = mean_recurrence, so E[r] = mean + 1 (33 for the 3.5B run).
            tau = rng.normal(math.log(self.mean_recurrence) - 0.5 * self.sigma ** 2, self.sigma)
            return int(rng.poisson(math.exp(tau))) + 1
        raise ValueError(f"unknown sampling scheme {self.scheme!r}")

    def split(self, total_depth: int) -> tuple[int, int]:
        """(iterations without gradient, iterations with gradient) for truncated backpropagation."""
        with_grad = min(total_depth, self.backprop_depth)
        return total_depth - with_grad, with_grad

    def __call__(self, step: int) -> tuple[int, int]:
        return self.split(self.total_depth(step))
