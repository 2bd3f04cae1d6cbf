"""The adversarial suite: what a hostile or careless input does to rdhpc, by class. Every case ends
in a clear message naming the file, key or rank at fault and exit status 2; nothing runs that a
checkpoint smuggled in, nothing rdhpc did not write is deleted, nothing wrong trains silently.

Classes: code execution from a checkpoint; data loss (deleting, overwriting, two trainers on one
run); silently wrong (stale inputs, corrupted or foreign shards, non-finite settings); tracebacks
where a message is due (corrupt inputs, bad command lines, a full disk)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trained_runs import write_debug_shards

REPO = Path(__file__).resolve().parents[1]


def rdhpc(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "rdhpc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


def train_args(shards, run_dir, *overrides):
    args = ["configs/debug.yaml", "--set", f"data.train_dir={shards}", "--set", "model.max_seq_len=64",
            "--set", f"logging.run_dir={run_dir}", "--set", "eval.interval=1000", "--set", "checkpoint.interval=2",
            "--set", "train.preflight=false", "--set", "logging.tensorboard=false"]
    for o in overrides:
        args += ["--set", o]
    return args


def launch(shards, run_dir, *overrides, nproc=2):
    return rdhpc("launch", "local", *train_args(shards, run_dir, *overrides)[:1], "--nproc", nproc,
                 *train_args(shards, run_dir, *overrides)[1:])


def refused(done, *fragments):
    """Exit status 2, one clear message (no traceback), naming what it must name."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert str(fragment) in done.stderr, (fragment, done.stderr[-3000:])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_debug_shards(tmp_path_factory.mktemp("adversarial"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shards):
    """A 2-rank ZeRO-1 run of 4 steps: checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = launch(shards, run_dir, "train.max_steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def copy_run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ---- code execution from a checkpoint --------------------------------------------------------------

class Exploit:
    """A pickle that runs a shell command when unpickled without restriction."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path):
    torch.save({"module": Exploit(marker), "torch": Exploit(marker)}, path)


@pytest.mark.parametrize("name", ["rdhpc/rng_rank0.pt", "mp_rank_00_model_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_no_file_a_resume_reads_can_run_code(tmp_path, shards, finished_run, name):
    run_dir = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / "step00000004" / name, marker)
    done = launch(shards, run_dir, "train.max_steps=6")
    assert not marker.exists()
    refused(done, name, "nothing in it was run")


def test_the_universal_conversion_cannot_run_code_either(tmp_path, shards, finished_run):
    """Resuming on another number of ranks converts the checkpoint in a subprocess
    (rdhpc.train.universal): its loads are restricted the same way."""
    run_dir = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    done = launch(shards, run_dir, "train.max_steps=6", nproc=1)
    assert not marker.exists()
    refused(done, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "converting", "nothing in it was run")


def test_export_eval_and_init_from_refuse_a_crafted_checkpoint(tmp_path, shards, finished_run):
    run_dir = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    refused(rdhpc("export", run_dir, "--out", tmp_path / "m.safetensors"), "zero_pp_rank_0")
    refused(rdhpc("eval", run_dir, "--data", shards, "--steps", "1"), "zero_pp_rank_0")
    done = launch(shards, tmp_path / "fresh", "train.max_steps=1", f"checkpoint.init_from={run_dir}")
    refused(done, "checkpoint.init_from", "zero_pp_rank_0")
    assert not marker.exists()


def test_a_corrupt_or_truncated_checkpoint_file_is_named(tmp_path, shards, finished_run):
    run_dir = copy_run(finished_run, tmp_path)
    states = run_dir / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    refused(launch(shards, run_dir, "train.max_steps=6"), "mp_rank_00_model_states.pt")


def test_a_resume_with_another_model_shape_keeps_the_whole_message(tmp_path, shards, finished_run):
    run_dir = copy_run(finished_run, tmp_path)
    config = (run_dir / "config.yaml").read_bytes()
    done = launch(shards, run_dir, "train.max_steps=6", "model.intermediate_size=256")
    refused(done, "cannot be loaded into this run's model and optimizer", "size mismatch", "256")
    assert (run_dir / "config.yaml").read_bytes() == config  # a failed resume leaves the run's files alone


# ---- data loss: never delete or overwrite what rdhpc did not write ---------------------------------

def test_prep_never_deletes_a_work_folder_it_did_not_make(tmp_path, shards):
    out = tmp_path / "out"
    (out / ".work").mkdir(parents=True)
    (out / ".work" / "mine.txt").write_text("a user's file")
    docs = shards.parent / "docs.jsonl"
    done = rdhpc("prep", "shards", "--input", docs, "--tokenizer", shards.parent / "tok.json", "--seq-len", 64,
                 "--out", out)
    refused(done, f"{out / '.work'}: exists and was not made by `rdhpc prep shards`", "nothing was deleted")
    assert (out / ".work" / "mine.txt").read_text() == "a user's file"


def test_checkpoint_rotation_deletes_only_rdhpc_checkpoints(tmp_path, shards):
    run_dir = tmp_path / "run"
    foreign = run_dir / "checkpoints" / "step00000001"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a checkpoint")
    done = launch(shards, run_dir, "train.max_steps=6", "checkpoint.keep_last=1", nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert tags == ["step00000001", "step00000006"] and (foreign / "notes.txt").exists()


def test_a_second_trainer_on_a_running_run_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, shards):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    first = subprocess.Popen([sys.executable, "-m", "rdhpc.cli", "train",
                              *train_args(shards, run_dir, "train.max_steps=100000", "checkpoint.interval=100000")],
                             cwd=REPO, env={**env, "MASTER_PORT": "29811"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and first.poll() is None, "the first trainer did not start"
            time.sleep(0.5)
        holder = json.loads((run_dir / "rdhpc.lock").read_text())
        assert holder["pid"] == first.pid
        second = subprocess.run([sys.executable, "-m", "rdhpc.cli", "train",
                                 *train_args(shards, run_dir, "train.max_steps=3")], cwd=REPO,
                                env={**env, "MASTER_PORT": "29812"}, capture_output=True, text=True, timeout=300)
        refused(second, "in use by another trainer", f"pid {first.pid}")
        assert first.poll() is None  # untouched: still training
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1))  # one writer, no interleaving
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # its holder is gone (the same host, the process no longer exists): the lock is taken over
    third = rdhpc("train", *train_args(shards, run_dir, "train.max_steps=3", "checkpoint.resume=never",
                                       f"checkpoint.dir={tmp_path / 'other-checkpoints'}"), env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the run folder's lock from host" in third.stdout and "no longer exists" in third.stdout
    assert not (run_dir / "rdhpc.lock").exists()  # released at the end


def test_the_lock_is_taken_over_only_from_a_holder_provably_gone():
    from rdhpc.run_folder import RunLock

    me = {"host": "n2", "pid": 10, "job_id": "77", "segment": 2}
    assert RunLock.gone({"host": "n1", "pid": 5, "job_id": "77", "segment": 1}, me)  # an earlier segment of this job
    assert RunLock.gone({"host": "n1", "pid": 5, "job_id": "77", "segment": 2}, me) is None  # this very segment
    assert RunLock.gone({"host": "n1", "pid": 5, "job_id": "78", "segment": 0}, me) is None  # another job elsewhere
    assert RunLock.gone({"host": "n1", "pid": 5}, me) is None  # another host: its process cannot be checked


def test_a_killed_holder_not_yet_reaped_counts_as_gone():
    """A rank killed with its launcher stays a zombie until init reaps it; its /proc entry is still
    there for a moment, and a rerun in that moment must not be refused (seen once in CI)."""
    import socket
    from rdhpc.run_folder import RunLock, _process_start

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {**RunLock._record(), "pid": child.pid, "pid_start": _process_start(child.pid)}
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": None, "segment": 0}
        assert RunLock.gone(holder, me) is None  # alive: not gone
        child.kill()
        deadline = time.monotonic() + 10
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "no longer exists" in RunLock.gone(holder, me)  # a zombie, not yet reaped: gone
    finally:
        child.kill()
        child.wait()


def test_export_never_replaces_its_source_or_an_earlier_export(tmp_path, finished_run):
    out = tmp_path / "m.safetensors"
    assert rdhpc("export", finished_run, "--out", out).returncode == 0
    before = out.read_bytes()
    refused(rdhpc("export", finished_run, "--out", out, "--dtype", "bf16"), "would replace", "--force")
    assert out.read_bytes() == before
    refused(rdhpc("export", out, "--out", out, "--dtype", "bf16", "--force"), "source checkpoint")
    assert out.read_bytes() == before
    assert rdhpc("export", finished_run, "--out", out, "--dtype", "bf16", "--force").returncode == 0
    folder = tmp_path / "huginn"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    refused(rdhpc("export", finished_run, "--format", "huginn", "--out", folder), "config.json", "would replace")
    assert (folder / "config.json").read_text() == "{}"


# ---- silently wrong -------------------------------------------------------------------------------

def test_a_changed_input_is_never_taken_for_a_finished_one(tmp_path, shards):
    docs = tmp_path / "docs.jsonl"
    shutil.copy2(shards.parent / "docs.jsonl", docs)
    command = ["prep", "shards", "--input", docs, "--tokenizer", shards.parent / "tok.json", "--seq-len", 64,
               "--out", tmp_path / "out"]
    assert rdhpc(*command).returncode == 0
    assert "nothing to do" in rdhpc(*command).stdout
    data = bytearray(docs.read_bytes())
    stat = docs.stat()
    data[10:14] = b"EDIT" if data[10:14] != b"EDIT" else b"edit"  # the same size, even the same time
    docs.write_bytes(bytes(data))
    os.utime(docs, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    refused(rdhpc(*command), "changed since", "content changed", "Delete the folder")


def test_corrupted_or_foreign_shards_never_train(tmp_path, shards):
    """With the default data.verify_checksums (once), a flipped bit is found before step 1, and the
    run folder remembers what was verified; token ids beyond the vocabulary are named by shard and
    row even unverified, and by `prep inspect`."""
    from rdhpc.data.format import read_manifest, write_shard

    good = tmp_path / "good"
    shutil.copytree(shards, good)
    run_dir = tmp_path / "verified"
    done = launch(good, run_dir, "train.max_steps=2", nproc=1)
    assert done.returncode == 0 and "verified" in done.stdout and "(sha256 and token ids)" in done.stdout
    done = launch(good, run_dir, "train.max_steps=4", nproc=1)
    assert "shards verified before in this run folder" in done.stdout
    bad = tmp_path / "flipped"
    shutil.copytree(shards, bad)
    entry = read_manifest(bad).split_shards("train")[0]
    data = bytearray((bad / entry.file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / entry.file).write_bytes(bytes(data))
    refused(launch(bad, tmp_path / "r2", "train.max_steps=2"), entry.file, "sha256")
    # shards whose tokens exceed the vocabulary, with a manifest that vouches for them
    foreign = tmp_path / "foreign"
    shutil.copytree(shards, foreign)
    manifest = read_manifest(foreign)
    for entry in manifest.split_shards("train"):
        rows = np.full((entry.rows, manifest.seq_len + 1), 700, dtype=np.uint16)
        written = write_shard(foreign / entry.file, rows, seq_len=manifest.seq_len, dtype=manifest.dtype,
                              tokenizer_sha256=manifest.tokenizer.sha256, split="train")
        entry.sha256, entry.bytes = written["sha256"], written["bytes"]
    manifest.write(foreign)
    entry = manifest.split_shards("train")[0]
    refused(launch(foreign, tmp_path / "r3", "train.max_steps=2"), entry.file, "token id 700 >= vocabulary size 512")
    refused(launch(foreign, tmp_path / "r4", "train.max_steps=2", "data.verify_checksums=never"), "train-0",
            "holds token id 700, beyond the vocabulary of 512")
    refused(rdhpc("prep", "inspect", foreign), entry.file, "beyond the vocabulary")


def test_validation_shards_of_another_tokenizer_are_refused(tmp_path, shards):
    from rdhpc.data.format import read_manifest

    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = read_manifest(other)
    manifest.tokenizer.sha256 = "0" * 64
    manifest.write(other)
    refused(launch(shards, tmp_path / "run", "train.max_steps=2", f"data.val_dir={other}"), "made with tokenizer")


@pytest.mark.parametrize("args, message", [
    (["launch", "local", "configs/debug.yaml", "--nproc", "0"], "--nproc: must be >= 1, got 0"),
    (["config", "configs/debug.yaml", "--set", "optim.lr=.nan"], "optim.lr: must be a finite number"),
    (["config", "configs/debug.yaml", "--set", "optim.weight_decay=.inf"], "optim.weight_decay: must be a finite"),
    (["config", "configs/debug.yaml", "--set", "model.hidden_size=100000000000000000000000000000000"],
     "model.hidden_size: 100000000000000000000000000000000 is beyond any sensible model"),
    (["plan", "configs/debug.yaml", "--gpus", "1", "--gpu-type", "h100", "--tokens", "1e9", "--micro-batch", "0"],
     "--micro-batch: must be >= 1, got 0"),
])
def test_settings_that_mean_nothing_are_refused(args, message):
    refused(rdhpc(*args), message)


def test_config_files_that_are_empty_or_not_utf8(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    refused(rdhpc("train", tmp_path / "empty.yaml"), "empty.yaml: the config file is empty")
    (tmp_path / "latin1.yaml").write_bytes("model:\n  size: debug\n# caf\xe9\n".encode("latin-1"))
    refused(rdhpc("config", tmp_path / "latin1.yaml"), "latin1.yaml: not UTF-8")


def test_generation_settings_that_mean_nothing(finished_run):
    refused(rdhpc("generate", finished_run, "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens: must be >= 1")
    refused(rdhpc("generate", finished_run, "--prompt", "x", "--temperature", "nan"), "--temperature: must be a finite")


# ---- tracebacks where a message is due: corrupt inputs, bad command lines -------------------------

@pytest.fixture
def broken_corpus(tmp_path):
    import gzip

    lines = "".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(400)).encode()
    packed = gzip.compress(lines)
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "truncated.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    (root / "really-gzip.jsonl.zst").write_bytes(packed)
    (root / "empty.parquet").write_bytes(b"")
    (root / "good.jsonl").write_text("".join(json.dumps({"text": f"good text {i} " * 30}) + "\n" for i in range(300)))
    return root


def test_one_bad_file_never_stops_a_corpus(tmp_path, shards, broken_corpus):
    done = rdhpc("prep", "tokenizer", "--input", broken_corpus, "--vocab-size", 300, "--out", tmp_path / "tok.json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 malformed records skipped" in done.stdout
    done = rdhpc("prep", "shards", "--input", broken_corpus, "--tokenizer", tmp_path / "tok.json", "--seq-len", 64,
                 "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    for name, what in (("truncated.jsonl.gz", "EOFError"), ("really-gzip.jsonl.zst", "ZstdError"),
                       ("empty.parquet", "not a readable parquet file")):
        assert f"{name}:" in done.stdout and what in done.stdout, (name, done.stdout)
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert report["records_skipped"] == 3 and report["documents_read"] > 300  # the truncated file's first part too
    refused(rdhpc("prep", "shards", "--input", broken_corpus, "--tokenizer", tmp_path / "tok.json", "--seq-len", 64,
                  "--out", tmp_path / "strict", "--strict"), "--strict: stopping")


def test_prep_command_lines_that_cannot_work(tmp_path, shards):
    docs, tok = shards.parent / "docs.jsonl", shards.parent / "tok.json"
    refused(rdhpc("prep", "shards", "--input", docs, "--tokenizer", tmp_path / "nope.json", "--seq-len", 64,
                  "--out", tmp_path / "o1"), "--tokenizer", "nope.json: no such file")
    (tmp_path / "a-file").write_text("x")
    refused(rdhpc("prep", "shards", "--input", docs, "--tokenizer", tok, "--seq-len", 64, "--out", tmp_path / "a-file"),
            "a-file: is a file")
    refused(rdhpc("prep", "shards", "--input", f"a={docs}", "--weight", "a=inf", "--tokenizer", tok, "--seq-len", 64,
                  "--out", tmp_path / "o2"), "--weight a=inf: the weight must be a finite number")
    (tmp_path / "tokdir").mkdir()
    refused(rdhpc("prep", "tokenizer", "--input", docs, "--vocab-size", 300, "--out", tmp_path / "tokdir"),
            "tokdir: is a folder")
    (tmp_path / "tok.json.tmp").mkdir()
    refused(rdhpc("prep", "tokenizer", "--input", docs, "--vocab-size", 300, "--out", tmp_path / "tok.json"),
            "tok.json.tmp", "is a folder")


# ---- a full disk ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs of this test's own (the suite runs as root, as CI does)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_says_what_to_do(tmp_path, shards, tiny_disk):
    run_dir = tmp_path / "run"
    done = launch(shards, run_dir, "train.max_steps=4", f"checkpoint.dir={tiny_disk / 'checkpoints'}")
    refused(done, "saving checkpoint step00000002 failed: no space left on the device", "no complete checkpoint exists "
            "yet", "Free space")
    assert not (tiny_disk / "checkpoints" / "step00000002").exists()  # the incomplete one removed
    assert json.loads((run_dir / "run_state.json").read_text())["state"] == "failed"


def test_a_full_disk_during_prep_keeps_what_is_done(tmp_path, shards, tiny_disk):
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        for i in range(3000):
            f.write(json.dumps({"text": f"words and numbers {i} " * 40}) + "\n")
    done = rdhpc("prep", "shards", "--input", docs, "--tokenizer", shards.parent / "tok.json", "--seq-len", 64,
                 "--out", tiny_disk / "out")
    refused(done, "no space left on the device", "run the same command again")
