"""The log-normal Poisson depth sampler of the spec, seeded from the step."""

import numpy as np

from rdhpc.model import DepthSampler, model_config_from_size


def test_statistics_over_100k_draws_match_the_paper():
    sampler = DepthSampler(mean_recurrence=32, backprop_depth=8, sigma=0.5, seed=0)
    draws = np.array([sampler.total_depth(step) for step in range(100_000)])
    assert draws.min() >= 1
    assert abs(draws.mean() - 33) < 0.3  # E[Poisson(exp(tau))] + 1 = 32 + 1
    assert abs(np.median(draws) - 29) <= 1
    p5, p95, p99 = np.percentile(draws, [5, 95, 99])
    assert abs(p5 - 12) <= 1.5 and abs(p95 - 67) <= 3 and abs(p99 - 94) <= 5


def test_same_step_same_depth_on_every_call_and_every_instance():
    a = DepthSampler(seed=7)
    b = DepthSampler(seed=7)
    assert [a(s) for s in range(500)] == [b(s) for s in range(500)]
    # order of the calls does not matter: a resumed run draws step 400 like an uninterrupted one
    assert [a(s) for s in reversed(range(400, 500))] == [b(s) for s in reversed(range(400, 500))]
    assert [a.total_depth(s) for s in range(200)] != [DepthSampler(seed=8).total_depth(s) for s in range(200)]


def test_split_is_truncated_backprop():
    sampler = DepthSampler(backprop_depth=8)
    assert sampler.split(40) == (32, 8)
    assert sampler.split(5) == (0, 5)
    assert sampler.split(8) == (0, 8)
    for step in range(1000):
        n, k = sampler(step)
        assert k == min(n + k, 8) and n == max(n + k - 8, 0)


def test_fixed_scheme_and_model_config():
    sampler = DepthSampler.from_model_config(model_config_from_size("debug", sampling_scheme="fixed"), seed=3)
    assert {sampler(s) for s in range(50)} == {(2, 2)}
