"""Slurm launch on a REAL one-machine Slurm (slurm-wlm + munge, started by tests/slurm_cluster.py):
submitit jobs of 2 tasks train over gloo, stop and requeue themselves at a time budget, resume with
the same losses, fail and get cancelled visibly; prep stages run as 2-task jobs; the dry-run scripts
of the GPU presets carry what those clusters need; quoting refuses what cannot pass safely."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 240  # seconds any single job may take here before the test fails


# ---- helpers ----------------------------------------------------------------------------------
def rdhpc(*args, env=None, timeout=JOB_TIMEOUT + 60, check=True):
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"rdhpc {' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def job_env(tmp_path, **extra):
    env = dict(os.environ, RDHPC_JOBS_DIR=str(tmp_path / "jobs"), **extra)
    # leftovers of a launcher in the submitting shell: the job must not take them for its own
    env.update(RANK="7", WORLD_SIZE="9", LOCAL_RANK="3", MASTER_ADDR="203.0.113.9", MASTER_PORT="1")
    return env


def job_id_of(output: str) -> str:
    return re.search(r"submitted job (\d+)", output).group(1)


def losses(run_dir) -> dict[int, float]:
    """Loss per step; a step run twice (after a hard requeue) keeps its last value."""
    return {m["step"]: m["loss"] for m in map(json.loads, open(Path(run_dir) / "metrics.jsonl"))}


def wait_state(job_id, predicate, timeout=JOB_TIMEOUT):
    from rdhpc.launch.slurm import slurm_job_info

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = slurm_job_info(job_id)
        if info and predicate(info):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: condition not reached in {timeout} s (last {info})")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import sysconfig

    from data_prep.shards import ShardSettings, run_shards
    from data_prep.tokenizer_train import train_tokenizer

    root = tmp_path_factory.mktemp("slurm_data")
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    with open(root / "docs.jsonl", "w") as f:
        for path in sources:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n")
    train_tokenizer([str(root / "docs.jsonl")], vocab_size=512, out=root / "tok.json", log=lambda *a: None)
    run_shards(ShardSettings(inputs=[str(root / "docs.jsonl")], tokenizer=str(root / "tok.json"), seq_len=64,
                             out=str(root / "shards"), pack="carry", rows_per_shard=512, val_fraction=0.2),
               log=lambda *a: None)
    return root


def train_args(shards, run_dir, *overrides):
    args = ["configs/debug.yaml", "--cluster", "local", "--set", f"data.train_dir={shards / 'shards'}",
            "--set", "model.max_seq_len=64", "--set", f"logging.run_dir={run_dir}", "--set", "train.log_interval=2",
            "--set", "train.val_interval=100", "--set", "train.val_batches=1", "--set", "checkpoint.interval=4",
            "--set", "logging.tensorboard=false"]
    for o in overrides:
        args += ["--set", o]
    return args


# ---- a 2-task training job through submitit ---------------------------------------------------
def test_two_task_training_job_runs_and_finishes(tmp_path, shards, slurm_cluster):
    run_dir = tmp_path / "run"
    env = job_env(tmp_path)
    started = time.monotonic()
    done = rdhpc("submit", *train_args(shards, run_dir, "train.max_steps=6"), "--time", "10", "--wait",
                 "--timeout", JOB_TIMEOUT, env=env)
    turnaround = time.monotonic() - started
    job = job_id_of(done.stdout)
    assert "tensorboard:" in done.stdout and f"{job}_0_log.out" in done.stdout
    assert f"job {job}: COMPLETED" in done.stdout, done.stdout
    assert sorted(losses(run_dir)) == list(range(1, 7))
    assert json.loads((run_dir / "run_state.json").read_text())["state"] == "completed"
    log0 = (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    # 2 ranks from Slurm's variables, rendezvous on the allocation's first node: not the leftovers
    assert "2 rank(s) (slurm), rendezvous localhost:" in log0, log0[-2000:]
    assert "203.0.113.9" not in log0
    # the script that was submitted is the one the dry run prints
    dry = rdhpc("submit", *train_args(shards, run_dir, "train.max_steps=6"), "--time", "10", "--dry-run", env=env)
    submitted = (run_dir / "slurm" / f"{job}_submission.sh").read_text()
    assert submitted in dry.stdout
    status = rdhpc("status", job, env=env).stdout
    assert "COMPLETED" in status and "last step 6" in status and "run: completed at step 6" in status
    print(f"turnaround of a 6-step 2-task job: {turnaround:.1f} s")
