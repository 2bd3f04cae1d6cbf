"""Training depth per optimizer step: the log-normal Poisson sampler, seeded from the step.

Seeding from (seed, step) instead of a running generator means every rank draws the same depth
without communicating, and a resumed run repeats the draws of the interrupted one exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
