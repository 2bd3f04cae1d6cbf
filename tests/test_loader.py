"""The training data loader: one global order, disjoint rank slices, exact resume on any world size."""

import json

import numpy as np
import pytest
import torch

from data_prep.shards import ShardSettings, run_shards
from data_prep.tokenizer_train import train_tokenizer
from rdhpc.data.format import ShardError
from rdhpc.data.loader import IGNORE_INDEX, BatchLoader, FeistelPermutation, ShardDataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while 12 dogs ran 3 laps around the old red barn".split()
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(3, 80)))}) + "\n")
    train_tokenizer([str(root / "docs.jsonl")], vocab_size=320, out=root / "tok.json", log=lambda *a: None)
    run_shards(ShardSettings(inputs=[str(root / "docs.jsonl")], tokenizer=str(root / "tok.json"), seq_len=32,
                             out=str(root / "shards"), pack="carry", rows_per_shard=40), log=lambda *a: None)
    return root / "shards"


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_permutation_is_a_seeded_bijection(n):
    perm = FeistelPermutation(n, seed=3, epoch=0)
    values = perm(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    assert np.array_equal(values, FeistelPermutation(n, seed=3, epoch=0)(np.arange(n)))
    if n > 16:
        assert not np.array_equal(values, FeistelPermutation(n, seed=3, epoch=1)(np.arange(n)))
        assert not np.array_equal(values, FeistelPermutation(n, seed=4, epoch=0)(np.arange(n)))
        assert not np.array_equal(values, np.arange(n))


def test_dataset_spans_every_shard(shards):
    dataset = ShardDataset(shards, "train", seq_len=32)
    assert len(dataset) > 100 and len(dataset.readers) > 1
    rows = dataset.rows(np.arange(len(dataset)))
    expected = np.concatenate([r.all_rows() for r in dataset.readers]).astype(np.int64)
    assert np.array_equal(rows, expected)


def test_ranks_take_disjoint_slices_of_one_global_order(shards):
    dataset = ShardDataset(shards, "train")
    reference = BatchLoader(dataset, global_batch_size=8, micro_batch_size=1, rank=0, world_size=1, seed=5)
    for world in (2, 4):
        loaders = [BatchLoader(dataset, 8, 1, rank, world, seed=5) for rank in range(world)]
        for step in range(reference.steps_per_epoch):
            parts = [loader.rank_batch_indices(step) for loader in loaders]
            assert np.array_equal(np.concatenate(parts), reference.global_batch_indices(step))
            assert len(set(np.concatenate(parts).tolist())) == 8
    seen = np.concatenate([reference.global_batch_indices(s) for s in range(reference.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == reference.steps_per_epoch * 8  # no row twice in an epoch


def test_micro_batches_inputs_labels_and_padding(shards):
    dataset = ShardDataset(shards, "train")
    loader = BatchLoader(dataset, global_batch_size=8, micro_batch_size=2, rank=1, world_size=2, seed=0)
    batches = next(iter(loader))
    assert len(batches) == 2  # 4 rows per rank in micro-batches of 2: two accumulation steps
    rows = dataset.rows(loader.rank_batch_indices(0))
    inputs, labels = batches[0]
    assert inputs.shape == (2, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs, torch.from_numpy(rows[:2, :-1]))
    expected = torch.from_numpy(rows[:2, 1:]).clone()
    expected[expected == dataset.pad_id] = IGNORE_INDEX
    assert torch.equal(labels, expected)
    # the carry shards end with a padded row: somewhere, pads must be ignored
    everything = dataset.rows(np.arange(len(dataset)))
    assert (everything == dataset.pad_id).any()


def test_resume_continues_exactly_on_another_world_size(shards):
    dataset = ShardDataset(shards, "train")
    straight = BatchLoader(dataset, 8, 2, rank=0, world_size=1, seed=9, on_exhausted="new_epoch")
    whole = []
    for i, batches in enumerate(straight):
        whole.append(torch.cat([inputs for inputs, _ in batches]))
        if i == 2 * straight.steps_per_epoch + 3:  # into the third epoch
            break
    # 2 ranks for 5 steps, checkpoint, then 1 rank from there
    first = [BatchLoader(dataset, 8, 2, rank=r, world_size=2, seed=9, on_exhausted="new_epoch") for r in (0, 1)]
    iterators = [iter(loader) for loader in first]
    for step in range(5):
        parts = [torch.cat([inputs for inputs, _ in next(it)]) for it in iterators]
        assert torch.equal(torch.cat(parts), whole[step])
    state = first[0].state_dict()
    assert state["consumed_steps"] == 5 and first[1].state_dict() == state
    resumed = BatchLoader(dataset, 8, 2, rank=0, world_size=1, seed=9, on_exhausted="new_epoch")
    resumed.load_state_dict(state)
    for step, batches in enumerate(resumed, start=5):
        assert torch.equal(torch.cat([inputs for inputs, _ in batches]), whole[step])
        if step == len(whole) - 1:
            break
    other = BatchLoader(dataset, 16, 2, rank=0, world_size=1, seed=9)
    with pytest.raises(ValueError, match="global_batch_size was 8, now 16"):
        other.load_state_dict(state)


def test_stop_at_the_end_of_the_data(shards):
    dataset = ShardDataset(shards, "train")
    loader = BatchLoader(dataset, 8, 4, rank=0, world_size=1, seed=0, on_exhausted="stop")
    assert sum(1 for _ in loader) == loader.steps_per_epoch == len(dataset) // 8
    assert list(loader) == []  # the position stays at the end


def test_mismatched_shards_stop_before_the_first_step(shards, tmp_path):
    with pytest.raises(ShardError, match="seq_len 32, the run expects 64"):
        ShardDataset(shards, "train", seq_len=64)
    with pytest.raises(ShardError, match="made with tokenizer"):
        ShardDataset(shards, "train", tokenizer_sha256="f" * 64)
    with pytest.raises(ShardError, match="fewer than one global batch"):
        BatchLoader(ShardDataset(shards, "val"), global_batch_size=10_000, micro_batch_size=1, rank=0,
                    world_size=1, seed=0)
    from rdhpc.errors import ConfigError

    with pytest.raises(ConfigError, match="train.global_batch_size: 8 does not split into 2 ranks"):
        BatchLoader(ShardDataset(shards, "train"), global_batch_size=8, micro_batch_size=3, rank=0,
                    world_size=2, seed=0)


def test_a_resume_on_other_data_is_refused(shards, tmp_path):
    """The loader's state records each source's tokenizer and shard content: the same row count
    with other tokens (or another tokenizer) cannot silently continue the run."""
    import shutil

    from rdhpc.data.format import read_manifest

    dataset = ShardDataset(shards, "train")
    state = BatchLoader(dataset, 8, 2, rank=0, world_size=1, seed=0).state_dict()
    assert state["sources"][0]["tokenizer_sha256"] == dataset.manifest.tokenizer.sha256
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)  # the same shards elsewhere: the same data
    BatchLoader(ShardDataset(moved, "train"), 8, 2, rank=0, world_size=1, seed=0).load_state_dict(state)
    manifest = read_manifest(moved)
    manifest.shards[0].sha256 = "0" * 64  # as if the shard had been rewritten with other tokens
    manifest.write(moved)
    other = BatchLoader(ShardDataset(moved, "train"), 8, 2, rank=0, world_size=1, seed=0)
    with pytest.raises(ShardError, match="shards_sha256 was .*the checkpoint was trained on"):
        other.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "sources"}  # a checkpoint from before sources were recorded
    other.load_state_dict(older)


def test_shards_are_opened_when_first_read_and_checked_then(shards, tmp_path):
    """Start-up reads the manifest only (issue 17: 24k shards x 4096 ranks opened at every start);
    a shard is opened, its header checked against the manifest, when one of its rows is first read,
    and the run-start verification (verify) checks every header too."""
    import shutil

    from rdhpc.data.format import read_manifest

    dataset = ShardDataset(shards, "train", seq_len=32)
    assert dataset.num_opened == 0 and len(dataset) == sum(e.rows for e in dataset.entries)
    dataset.rows(np.array([0, 1, 2]))
    assert dataset.num_opened == 1
    dataset.rows(np.array([len(dataset) - 1]))
    assert dataset.num_opened == 2
    # a shard whose row count disagrees with the manifest: found on first open, and by verify
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    manifest = read_manifest(bad)
    entry = manifest.split_shards("train")[1]
    entry.rows += 1
    manifest.write(bad)
    lazy = ShardDataset(bad, "train")
    lazy.rows(np.array([0]))  # the first shard is fine
    with pytest.raises(ShardError, match=f"{entry.file}: {entry.rows - 1} rows, the manifest says {entry.rows}"):
        lazy.rows(np.array([int(lazy.starts[1])]))
    assert lazy.num_opened == 1
    problems = ShardDataset(bad, "train").verify(rank=1, world_size=2)
    assert len(problems) == 1 and entry.file in problems[0]
    assert ShardDataset(bad, "train").verify(rank=0, world_size=2) == []
