"""Generation: the KV cache across the recurrence against the full forward, per-token early exit,
the shared cache of fixed size, warm start, sampling, and `rdhpc generate` on a trained checkpoint."""

import pytest
import torch

import trained_runs
from rdhpc.cli import main
from rdhpc.generate import GenerationConfig, GenerationError, Generator
from rdhpc.model import RecurrentDepthModel, model_config_from_size


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RecurrentDepthModel(model_config_from_size("debug")).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))


def generate(model, prompt, **kwargs):
    kwargs.setdefault("num_steps", 6)
    kwargs.setdefault("max_new_tokens", 12)
    return Generator(model, GenerationConfig(**kwargs)).generate(prompt, keep_logits=True)


def test_cached_decoding_equals_the_full_forward(model, prompt):
    out = generate(model, prompt)
    sequence = prompt
    with torch.no_grad():
        torch.testing.assert_close(out.prefill_logits, model(prompt, num_steps=6, init_scale=0).logits, rtol=0, atol=0)
        for n in range(12):  # recompute everything from scratch for every new token
            logits = model(sequence, num_steps=6, init_scale=0).logits[:, -1]
            torch.testing.assert_close(out.step_logits[n], logits, rtol=0, atol=1e-5)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.tokens, sequence[:, prompt.shape[1]:])
    assert out.mean_depth == 6.0 and out.depths.shape == (2, 11)


@pytest.mark.parametrize("warm_start", [False, True])
def test_early_exit_at_threshold_zero_is_the_fixed_depth(model, prompt, warm_start):
    fixed = generate(model, prompt, warm_start=warm_start)
    adaptive = generate(model, prompt, warm_start=warm_start, exit_threshold=0.0)
    assert torch.equal(adaptive.tokens, fixed.tokens)
    assert adaptive.mean_depth == 6.0
    for a, b in zip(adaptive.step_logits, fixed.step_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_early_exit_stops_each_row_on_its_own(model, prompt):
    everything = generate(model, prompt, exit_threshold=1e9, num_steps=8)
    assert everything.mean_depth == 2.0  # the earliest exit: two successive distributions compared
    # a threshold between the rows' divergences: rows exit at different depths, and each row of the batch
    # gives what it gives alone (an exited row keeps its state and cache entries)
    config = dict(exit_threshold=3e-4, num_steps=16, warm_start=True)
    batch = generate(model, prompt, **config)
    for row in range(2):
        alone = generate(model, prompt[row:row + 1], **config)
        assert torch.equal(alone.tokens[0], batch.tokens[row])
        assert torch.equal(alone.depths[0], batch.depths[row])
    assert 2 <= batch.mean_depth < 16
    assert len(set(batch.depths.flatten().tolist())) > 1


def test_shared_cache_with_enough_slots_equals_the_full_cache(model, prompt):
    full = generate(model, prompt, num_steps=6)
    for slots in (6, 9):
        shared = generate(model, prompt, num_steps=6, cache_slots=slots)
        assert torch.equal(shared.tokens, full.tokens)
        for a, b in zip(shared.step_logits, full.step_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    fewer = generate(model, prompt, num_steps=6, cache_slots=2, exit_threshold=1e-4)
    assert fewer.tokens.shape == full.tokens.shape and torch.isfinite(torch.stack(fewer.step_logits)).all()


def test_shared_cache_memory_does_not_grow_with_depth(model, prompt):
    shared = {r: generate(model, prompt, num_steps=r, cache_slots=4, max_new_tokens=4).cache_bytes for r in (4, 16, 64)}
    full = {r: generate(model, prompt, num_steps=r, max_new_tokens=4).cache_bytes for r in (4, 16, 64)}
    assert shared[4] == shared[16] == shared[64] == full[4]
    c = model.config
    per_slot = 2 * c.num_core_layers * 2 * (9 + 4) * c.hidden_size * 4  # k and v, core blocks, batch 2, fp32
    assert full[64] - full[16] == 48 * per_slot and full[16] - full[4] == 12 * per_slot


def test_warm_start_changes_the_trajectory_and_sampling_is_seeded(model, prompt):
    cold, warm = generate(model, prompt), generate(model, prompt, warm_start=True)
    assert not all(torch.equal(a, b) for a, b in zip(cold.step_logits, warm.step_logits))
    a = generate(model, prompt, temperature=0.9, top_p=0.9, seed=3)
    b = generate(model, prompt, temperature=0.9, top_p=0.9, seed=3)
    c = generate(model, prompt, temperature=0.9, top_p=0.9, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert torch.equal(generate(model, prompt, temperature=1.0, top_k=1).tokens, cold.tokens)  # top-1 is greedy


@pytest.mark.parametrize("settings", [{}, {"exit_threshold": 1e-3, "cache_slots": 3, "warm_start": True},
                                      {"temperature": 0.9, "top_p": 0.95, "seed": 5, "init_scale": 1.0}])
def test_prompts_of_different_lengths_in_one_batch_equal_each_alone(model, settings):
    """Left padding with masked padding keys: every row of a ragged batch gives the tokens and the
    logits it gives alone (rotary attention depends only on distances, so the shift is invisible);
    sampled, each row draws its tokens and its initial-state noise from streams of its own."""
    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=rng).tolist() for n in (9, 1, 4, 9, 6)]
    config = dict(num_steps=6, max_new_tokens=10, **settings)
    together = Generator(model, GenerationConfig(**config)).generate(prompts, keep_logits=True)
    for row, ids in enumerate(prompts):
        alone = Generator(model, GenerationConfig(**config)).generate(torch.tensor([ids]), keep_logits=True)
        assert together.tokens[row].tolist() == alone.tokens[0].tolist()
        assert together.depths[row].tolist() == alone.depths[0].tolist()
        for a, b in zip(together.step_logits, alone.step_logits):
            torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together.prefill_logits[row, -len(ids):], alone.prefill_logits[0], rtol=1e-4, atol=1e-4)
        assert torch.isfinite(together.prefill_logits[row]).all()  # padding rows too: no empty softmax
    with pytest.raises(GenerationError, match="every prompt must hold at least one token"):
        Generator(model, GenerationConfig(**config)).generate([[1, 2], []])


def test_bad_settings_are_user_errors(model, prompt):
    with pytest.raises(GenerationError, match="--top-p: must be in"):
        Generator(model, GenerationConfig(top_p=1.5))
    with pytest.raises(GenerationError, match="exceeds the model's max_seq_len = 128"):
        Generator(model, GenerationConfig(max_new_tokens=200)).generate(prompt)


def test_generate_command_on_a_trained_checkpoint(capsys):
    run = trained_runs.trained_run(12, 1, "fp32")
    argv = ["generate", str(run), "--prompt", "import os\nimport", "--steps", "16", "--max-new-tokens", "12"]
    assert main(argv) == 0
    fixed = capsys.readouterr().out
    assert fixed.startswith("import os\nimport") and "mean depth per token 16.00 of 16" in fixed
    assert main(argv + ["--exit-threshold", "5e-4", "--cache-slots", "4", "--warm-start", "--json"]) == 0
    adaptive = capsys.readouterr().out
    assert "(4 core slot(s))" in adaptive and '"mean_depth"' in adaptive
    # several prompts of different lengths in one batch: each completion equals its run alone
    assert main(["generate", str(run), "--prompt", "import os\nimport", "--prompt", "def", "--steps", "16",
                 "--max-new-tokens", "12"]) == 0
    batched = capsys.readouterr().out
    assert batched.startswith(fixed.split("[generate]")[0]) and "(batch of 2)" in batched
    assert main(["generate", str(run), "--prompt", "x", "--tokenizer", "/nonexistent/tok.json"]) == 2
    assert "/nonexistent/tok.json: tokenizer file not found" in capsys.readouterr().err
