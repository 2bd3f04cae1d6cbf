"""Mixtures chosen at train time (data.sources, rdhpc.data.mixture): exact proportions per window, one
order on any rank count and after a resume, weight changes on resume, per-source validation and
token counts in TensorBoard, and bad configs named with exit status 2."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from rdhpc.config import config_from_dict
from rdhpc.data.format import Manifest, ShardEntry, ShardError, TokenizerInfo, shard_name, write_shard
from rdhpc.data.loader import BatchLoader, ShardDataset
from rdhpc.data.mixture import Mixture, apportion, open_training_data
from rdhpc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16


def make_source(folder: Path, source_id: int, train_rows: int, val_rows: int = 8, rows_per_shard: int = 16,
                seq_len: int = SEQ_LEN, tokenizer_sha256: str = "a" * 64) -> Path:
    """A shard folder whose row r of source s reads [s, r // 256, r % 256, ...]: a row names itself."""
    folder.mkdir(parents=True)
    entries = []
    for split, total in (("train", train_rows), ("val", val_rows)):
        for shard, start in enumerate(range(0, total, rows_per_shard)):
            index = np.arange(start, min(start + rows_per_shard, total))
            rows = np.full((len(index), seq_len + 1), 7, dtype=np.uint16)
            rows[:, 0], rows[:, 1], rows[:, 2] = source_id + (100 if split == "val" else 0), index // 256, index % 256
            info = write_shard(folder / shard_name(split, shard), rows, seq_len=seq_len, dtype="uint16",
                               tokenizer_sha256=tokenizer_sha256, split=split)
            entries.append(ShardEntry(info["file"], split, info["rows"], rows.size, 0, 1, info["sha256"], info["bytes"]))
    Manifest(seq_len=seq_len, dtype="uint16", pack="carry", shards=entries,
             tokenizer=TokenizerInfo("none", tokenizer_sha256, 512, 508, 509, 511)).write(folder)
    return folder


def identify(rows: np.ndarray) -> list[tuple[int, int]]:
    """(source id, row index) of each row of make_source's folders."""
    return [(int(r[0]), int(r[1]) * 256 + int(r[2])) for r in rows]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return {"a": make_source(root / "a", 0, 50), "b": make_source(root / "b", 1, 70), "c": make_source(root / "c", 2, 200)}


def mixture(folders, weights, window=4) -> Mixture:
    return Mixture({n: ShardDataset(folders[n], "train") for n in weights}, dict(weights), window)


def global_rows(loader_factory, world: int, steps: range) -> list[list[tuple[int, int]]]:
    """The rows of each step's global batch, gathered from `world` loaders' rank slices."""
    loaders = [loader_factory(rank, world) for rank in range(world)]
    out = []
    for step in steps:
        parts = [loader.dataset.rows(loader.rank_batch_indices(step)) for loader in loaders]
        out.append(identify(np.concatenate(parts)))
    return out


def test_apportionment_and_exact_shares_over_every_window(folders):
    assert apportion([0.2, 0.3, 0.5], 32).tolist() == [6, 10, 16]
    assert apportion([1, 1, 1], 8).tolist() == [3, 3, 2]
    for weights in ({"a": 0.2, "b": 0.3, "c": 0.5}, {"a": 1.0, "c": 3.0}, {"a": 1, "b": 1, "c": 1}):
        source = mixture(folders, weights, window=4)
        loader = BatchLoader(source, 8, 2, rank=0, world_size=1, seed=3, on_exhausted="new_epoch")
        window_rows = 4 * 8
        expected = apportion(list(weights.values()), window_rows)
        ids = {n: i for i, n in enumerate(["a", "b", "c"])}
        batches = [identify(source.rows(loader.global_batch_indices(s))) for s in range(40)]
        for w in range(10):  # every window: each source's exact share
            rows = [r for b in batches[4 * w:4 * w + 4] for r in b]
            counts = [sum(1 for s, _ in rows if s == ids[n]) for n in weights]
            assert counts == expected.tolist()
        total = sum(weights.values())
        for batch in batches:  # every global batch: close to proportional (the smooth interleave)
            for n, w in weights.items():
                assert abs(sum(1 for s, _ in batch if s == ids[n]) - 8 * w / total) < 2
        # each source's rows: a permutation of all of them per epoch, never a repeat within one
        for n in weights:
            seen = [r for b in batches for s, r in b if s == ids[n]]
            length = len(source.sources[n])
            for e in range(len(seen) // length):
                assert sorted(seen[e * length:(e + 1) * length]) == list(range(length))


def test_one_order_on_any_rank_count_and_across_resume(folders):
    weights = {"a": 0.25, "b": 0.25, "c": 0.5}
    source = mixture(folders, weights)

    def factory(rank, world):
        return BatchLoader(source, 8, 2, rank, world, seed=11, on_exhausted="new_epoch")

    one, two, four = (global_rows(factory, world, range(30)) for world in (1, 2, 4))
    assert one == two == four
    # a resume mid-run (2 ranks -> 1) continues exactly, through the loaders' iterators
    loaders = [factory(r, 2) for r in (0, 1)]
    iterators = [iter(loader) for loader in loaders]
    for _ in range(7):
        for it in iterators:
            next(it)
    state = json.loads(json.dumps(loaders[0].state_dict()))  # as a checkpoint stores it
    assert state["consumed_steps"] == 7 and state["mixture"]["history"][0]["weights"] == weights
    assert [s["name"] for s in state["sources"]] == ["a", "b", "c"]
    resumed = factory(0, 1)
    resumed.load_state_dict(state)
    for step, batches in enumerate(resumed, start=7):
        rows = np.concatenate([inputs.numpy() for inputs, _ in batches])
        assert identify(rows) == one[step]
        if step == 29:
            break
    # another seed: another order
    other = BatchLoader(source, 8, 2, 0, 1, seed=12, on_exhausted="new_epoch")
    assert identify(source.rows(other.global_batch_indices(0))) != one[0]


def test_a_weight_change_on_resume_is_logged_recorded_and_deterministic(folders):
    before = mixture(folders, {"a": 0.5, "b": 0.5, "c": 1.0})
    loader = BatchLoader(before, 8, 2, 0, 1, seed=1, on_exhausted="new_epoch")
    it = iter(loader)
    first = [identify(np.concatenate([x.numpy() for x, _ in next(it)])) for _ in range(6)]
    state = json.loads(json.dumps(loader.state_dict()))
    consumed = loader.order.consumed(6)

    def resume(world, rank=0, log=None):
        after = mixture(folders, {"a": 0.125, "b": 0.125, "c": 0.75})
        resumed = BatchLoader(after, 8, 2, rank, world, seed=1, on_exhausted="new_epoch", log=log)
        resumed.load_state_dict(state)
        return resumed

    logged = []
    resumed = resume(1, log=logged.append)
    assert any("mixture weights changed at step 6: a 0.5, b 0.5, c 1 -> a 0.125, b 0.125, c 0.75" in line
               for line in logged), logged
    history = resumed.state_dict()["mixture"]["history"]
    assert [h["first_step"] for h in history] == [0, 6]
    assert history[0]["weights"] == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert history[1]["offsets"] == dict(zip("abc", consumed.tolist()))
    # from step 6 on: windows of the new weights, aligned with step 6, each source continuing its permutation
    new = [identify(before.rows(resumed.global_batch_indices(s))) for s in range(6, 14)]
    counts = apportion([0.125, 0.125, 0.75], 32).tolist()
    for w in range(2):
        rows = [r for b in new[4 * w:4 * w + 4] for r in b]
        assert [sum(1 for s, _ in rows if s == i) for i in range(3)] == counts
    a_rows = [r for b in first + new for s, r in b if s == 0]
    assert len(a_rows) == len(set(a_rows))  # source a (50 rows) not yet through its epoch: no repeat
    # the same on 2 ranks, and when a later resume reads the recorded history
    assert global_rows(lambda rank, world: resume(world, rank), 2, range(6, 14)) == new
    again = mixture(folders, {"a": 0.125, "b": 0.125, "c": 0.75})
    later = BatchLoader(again, 8, 2, 0, 1, seed=1, on_exhausted="new_epoch")
    later.load_state_dict(resumed.state_dict() | {"consumed_steps": 10})
    assert [identify(again.rows(later.global_batch_indices(s))) for s in range(10, 14)] == new[4:]
    assert len(later.state_dict()["mixture"]["history"]) == 2  # the same weights: no new segment
    # the per-source token counts TensorBoard gets
    assert resumed.source_scalars(6) == {f"data/{n}/tokens": float(k * SEQ_LEN) for n, k in zip("abc", consumed)}


def test_stop_before_any_source_repeats_a_row(folders):
    source = mixture(folders, {"a": 0.5, "c": 0.5})  # a has 50 rows, c 200: a runs out first
    loader = BatchLoader(source, 8, 4, 0, 1, seed=0, on_exhausted="stop")
    steps = [identify(np.concatenate([x.numpy() for x, _ in b])) for b in loader]
    assert len(steps) == 50 // 4  # 4 rows of a per step
    rows = [r for b in steps for r in b]
    assert len(rows) == len(set(rows))
    assert list(loader) == []


def test_bad_mixture_configs_are_named(folders, tmp_path):
    def problems(sources, **data):
        with pytest.raises(ConfigError) as caught:
            config_from_dict({"model": {"size": "debug"}, "data": {"sources": sources, **data}})
        return str(caught.value)

    good = {"name": "a", "dir": str(folders["a"]), "weight": 1.0}
    assert "data.sources[1].weight: must be a finite number > 0, got -1.0" in problems(
        [good, {"name": "b", "dir": str(folders["b"]), "weight": -1}])
    assert "data.sources[1].weight: must be a finite number > 0, got 0.0" in problems(
        [good, {"name": "b", "dir": str(folders["b"]), "weight": 0}])
    assert "data.sources[1].weight: must be a finite number" in problems(
        [good, {"name": "b", "dir": str(folders["b"]), "weight": float("nan")}])
    assert "data.sources[1].name: 'a' is given twice" in problems([good, dict(good)])
    assert "data.sources[0].name: 'a b' must be letters" in problems([{**good, "name": "a b"}])
    assert "data.sources[0].colour: unknown key" in problems([{**good, "colour": "red"}])
    text = problems([good], train_dir=str(folders["b"]), val_dir=str(folders["b"]))
    assert "data.sources: not with data.train_dir" in text and "data.val_dir: not with data.sources" in text
    assert "data.mixture_window: must be > 0" in problems([good], mixture_window=0)

    def opened(*sources):
        run = config_from_dict({"model": {"size": "debug", "max_seq_len": SEQ_LEN},
                                "data": {"sources": [dict(zip(("name", "dir", "weight"), s)) for s in sources]}})
        return open_training_data(run.data, SEQ_LEN, 512)

    data = opened(("a", str(folders["a"]), 1.0), ("b", str(folders["b"]), 2.0))
    assert set(data.val) == {"a", "b"} and set(data.verify) == {"train/a", "train/b", "val/a", "val/b"}
    with pytest.raises(ShardError, match=r"data.sources\[1\] \(b\): .*nowhere/manifest.json: no manifest"):
        opened(("a", str(folders["a"]), 1.0), ("b", str(tmp_path / "nowhere"), 1.0))
    make_source(tmp_path / "other_tok", 3, 40, tokenizer_sha256="f" * 64)
    with pytest.raises(ShardError, match=r"data.sources\[1\] \(o\): .* has tokenizer sha256 ffff.*data.sources\[0\] "
                                         r"\(a\)"):
        opened(("a", str(folders["a"]), 1.0), ("o", str(tmp_path / "other_tok"), 1.0))
    make_source(tmp_path / "longer", 4, 40, seq_len=32)
    with pytest.raises(ShardError, match=r"data.sources\[1\] \(l\): .* has seq_len 32, data.sources\[0\]"):
        opened(("a", str(folders["a"]), 1.0), ("l", str(tmp_path / "longer"), 1.0))


# ---- real training runs ---------------------------------------------------------------------------

def rdhpc(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "rdhpc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """The debug shards (stdlib files 0-59) and a second folder with the same tokenizer (files 60-99)."""
    from data_prep.shards import ShardSettings, run_shards
    from trained_runs import write_debug_shards

    root = tmp_path_factory.mktemp("sources")
    first = write_debug_shards(root)
    with open(root / "more.jsonl", "w") as f:
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[60:100]:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n")
    run_shards(ShardSettings(inputs=[str(root / "more.jsonl")], tokenizer=str(root / "tok.json"), seq_len=64,
                             out=str(root / "more"), pack="carry", rows_per_shard=512, val_fraction=0.2),
               log=lambda *a: None)
    return first, root / "more"


def sources_arg(first, second, weight_b=3.0):
    return f"data.sources=[{{name: std, dir: {first}, weight: 1}}, {{name: more, dir: {second}, weight: {weight_b}}}]"


def launch(run_dir, *overrides, nproc=2):
    args = ["launch", "local", "configs/debug.yaml", "--nproc", nproc, "--set", "model.max_seq_len=64",
            "--set", f"logging.run_dir={run_dir}", "--set", "train.log_interval=2", "--set", "eval.interval=4",
            "--set", "checkpoint.interval=4", "--set", "train.preflight=false", "--set", "data.mixture_window=2"]
    for o in overrides:
        args += ["--set", o]
    return rdhpc(*args)


def test_a_mixture_trains_validates_per_source_and_changes_weights_on_resume(tmp_path, two_sources):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rdhpc.cli import main

    first, second = two_sources
    run_dir = tmp_path / "run"
    done = launch(run_dir, sources_arg(first, second), "train.max_steps=4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "[data] mixture of 2 sources, windows of 2 global batches = 16 rows: std 1 (4 rows), more 3 (12 rows)" \
        in done.stdout
    done = launch(run_dir, sources_arg(first, second, weight_b=1), "train.max_steps=6")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "[data] mixture weights changed at step 4: std 1, more 3 -> std 1, more 1" in done.stdout
    from rdhpc.train.checkpoint import TRAINER_STATE, state_dir

    state = json.loads((state_dir(run_dir / "checkpoints" / "step00000006") / TRAINER_STATE).read_text())
    history = state["loader"]["mixture"]["history"]  # every weight used so far
    assert [(h["first_step"], h["weights"]) for h in history] == [(0, {"std": 1.0, "more": 3.0}),
                                                                 (4, {"std": 1.0, "more": 1.0})]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for source in ("std", "more"):
        for depth in (1, 2, 4, 8):
            assert f"val/{source}/loss_r{depth}" in tags
    assert "val/loss_r1" not in tags
    tokens = {s: [(e.step, e.value) for e in events.Scalars(f"data/{s}/tokens")] for s in ("std", "more")}
    # 2 windows of 16 rows at 1:3, then 1:1 (8 rows of 64 tokens per step)
    assert tokens["std"] == [(2, 4 * 64), (4, 8 * 64), (6, 16 * 64)]
    assert tokens["more"] == [(2, 12 * 64), (4, 24 * 64), (6, 32 * 64)]
    # in-loop validation of a source equals `rdhpc eval` on that source's folder
    assert main(["eval", str(run_dir), "--data", str(second), "--steps", "1,2,4,8", "--max-rows", "16",
                 "--batch-size", "4", "--seed", "0", "--out", str(tmp_path / "offline")]) == 0
    offline = json.loads((tmp_path / "offline" / "eval.json").read_text())["loss"]
    for depth in (1, 2, 4, 8):
        last = events.Scalars(f"val/more/loss_r{depth}")[-1]
        assert last.step == 6 and last.value == pytest.approx(offline[str(depth)], rel=1e-6)


def test_bad_sources_through_the_command_line_exit_2(tmp_path, two_sources):
    first, second = two_sources
    for done, fragments in (
            (rdhpc("train", "configs/debug.yaml", "--set", f"logging.run_dir={tmp_path / 'r1'}",
                   "--set", f"data.sources=[{{name: a, dir: {first}, weight: -2}}]"),
             ["data.sources[0].weight: must be a finite number > 0, got -2.0"]),
            (launch(tmp_path / "r2", f"data.sources=[{{name: a, dir: {first}}}, {{name: b, dir: {tmp_path / 'nope'}}}]",
                    "train.max_steps=2", nproc=1),
             ["data.sources[1] (b)", "no manifest"])):
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        for fragment in fragments:
            assert fragment in done.stderr, (fragment, done.stderr[-3000:])
