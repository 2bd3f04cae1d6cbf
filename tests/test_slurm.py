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
            "--set", "model.max_seq_len=64", "--set", f"logging.run_dir={run_dir}", "--set", "train.log_interval=10",
            "--set", "train.val_interval=1000", "--set", "train.val_batches=1", "--set", "checkpoint.interval=10",
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


# ---- time limit and requeue: segments chain and resume with the same losses ---------------------
CHAIN_STEPS = 200  # about 0.1 s a step here: more than one 20-second segment can hold


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """Losses of the uninterrupted run (2 local ranks). The debug schedule is constant after its
    warm-up, so a shorter run of the same config has the first steps of this one."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    args = train_args(shards, run_dir, f"train.max_steps={CHAIN_STEPS}")
    done = rdhpc("launch", "local", args[0], "--nproc", "2", *args[3:])
    reference = losses(run_dir)
    assert sorted(reference) == list(range(1, CHAIN_STEPS + 1)), done.stderr[-2000:]
    return reference


def job_story(run_dir, job) -> str:
    """The non-step lines of rank 0's log and the end of its stderr: what a failed assertion shows."""
    log0 = (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    story = "\n".join(line for line in log0.splitlines() if "] step " not in line and "saved checkpoint" not in line)
    return story + "\n" + (run_dir / "slurm" / f"{job}_0_log.err").read_text()[-3000:]


def test_time_limit_stops_requeues_and_resumes_with_identical_losses(tmp_path, shards, uninterrupted,
                                                                      slurm_cluster):
    # 1-minute segments that checkpoint and stop 40 s before the limit (the time budget
    # RDHPC_STOP_AT of the batch script) and requeue themselves, until the run is complete
    run_dir = tmp_path / "chained"
    env = job_env(tmp_path)
    started = time.monotonic()
    done = rdhpc("submit", *train_args(shards, run_dir, f"train.max_steps={CHAIN_STEPS}"), "--time", "1",
                 "--stop-margin", "40", "--max-segments", "20", "--wait", "--timeout", JOB_TIMEOUT * 3,
                 env=env, timeout=JOB_TIMEOUT * 3 + 60, check=False)
    elapsed = time.monotonic() - started
    job = job_id_of(done.stdout)
    story = job_story(run_dir, job)
    assert done.returncode == 0, done.stdout + story
    info = json.loads(rdhpc("status", job, "--json", env=env).stdout)
    assert info["state"] == "COMPLETED" and info["run_state"]["state"] == "completed"
    assert info["last_step"] == CHAIN_STEPS
    segments = info["slurm"]["restarts"] + 1
    assert segments >= 2 and story.count("time budget") >= segments - 1, story
    assert story.count("requeueing job") == segments - 1 and story.count("resumed from") == segments - 1, story
    chained = losses(run_dir)
    assert sorted(chained) == list(range(1, CHAIN_STEPS + 1))
    assert chained == uninterrupted  # fp32 on CPU: bit-identical, step for step
    print(f"\n{CHAIN_STEPS} steps in {segments} one-minute segments, {elapsed:.0f} s; losses identical")


def test_outside_requeue_resumes_with_identical_losses(tmp_path, shards, uninterrupted, slurm_cluster):
    # `scontrol requeue` from outside kills the running job (no warning): the next segment resumes
    # from the last periodic checkpoint and redoes the steps after it
    steps = 60
    run_dir = tmp_path / "requeued"
    env = job_env(tmp_path)
    sub = rdhpc("submit", *train_args(shards, run_dir, f"train.max_steps={steps}"), "--time", "10", env=env)
    job = job_id_of(sub.stdout)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ((run_dir / "metrics.jsonl").exists() and max(losses(run_dir)) >= 6):
        assert time.monotonic() < deadline, "the first segment made no progress"
        time.sleep(0.2)
    killed_at = max(losses(run_dir))
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    from rdhpc.launch.slurm import wait_for_job

    state = wait_for_job(job, timeout=JOB_TIMEOUT)
    story = job_story(run_dir, job)
    assert state == "COMPLETED", story
    info = json.loads(rdhpc("status", job, "--json", env=env).stdout)
    assert info["slurm"]["restarts"] == 1 and info["run_state"]["state"] == "completed", story
    assert "segment 2/" in story and "resumed from" in story, story
    chained = losses(run_dir)
    assert sorted(chained) == list(range(1, steps + 1))
    assert chained == {s: uninterrupted[s] for s in range(1, steps + 1)}
    print(f"\nouter requeue at step {killed_at}: resumed, losses identical")


# ---- failures and cancellation are reported, nothing waits forever --------------------------------
def test_failing_rank_reports_failed_with_its_error(tmp_path, shards, slurm_cluster):
    run_dir = tmp_path / "failing"
    env = job_env(tmp_path, RDHPC_FAULT_FAIL_RANK="1")
    started = time.monotonic()
    done = rdhpc("submit", *train_args(shards, run_dir, "train.max_steps=4"), "--time", "10", "--wait",
                 "--timeout", JOB_TIMEOUT, env=env, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    job = job_id_of(done.stdout)
    status = rdhpc("status", job, env=env).stdout
    assert f"job {job}: FAILED" in status
    assert "error of task 1 (rank 1)" in status and "failing on purpose" in status, status
    assert time.monotonic() - started < 60  # rank 0 did not wait for its dead peer's rendezvous


def test_cancelled_job_is_reported_and_nothing_waits_forever(tmp_path, shards, slurm_cluster):
    import threading

    import submitit

    run_dir = tmp_path / "cancelled"
    env = job_env(tmp_path)
    waiting = subprocess.Popen([sys.executable, "-m", "rdhpc.cli", "submit",
                                *train_args(shards, run_dir, "train.max_steps=100000"), "--time", "10", "--wait",
                                "--timeout", str(JOB_TIMEOUT)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not list((tmp_path / "jobs").glob("*.json")):
            assert time.monotonic() < deadline and waiting.poll() is None, waiting.communicate()
            time.sleep(0.2)
        job = next((tmp_path / "jobs").glob("*.json")).stem
        wait_state(job, lambda i: i["state"] == "RUNNING")
        time.sleep(3)  # the tasks have started (and have not written a result)
        subprocess.run(["scancel", job], check=True, timeout=30)
        out, err = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 1 and f"job {job}: CANCELLED" in out, out + err
    assert "CANCELLED" in rdhpc("status", job, env=env).stdout
    # submitit's own result() returns (with an error) instead of waiting forever: sacct stand-in
    outcome = {}

    def collect():
        try:
            submitit.SlurmJob(folder=run_dir / "slurm", job_id=job, tasks=(0, 1)).results()
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive(), "submitit's result() is still waiting for a cancelled job"
    assert isinstance(outcome.get("error"), submitit.core.utils.UncompletedJobError)


# ---- a prep stage as a 2-task job ---------------------------------------------------------------
def test_prep_stage_as_two_task_job_matches_local_run(tmp_path, shards, slurm_cluster):
    out = tmp_path / "slurm_shards"
    env = job_env(tmp_path)
    done = rdhpc("submit", "--cluster", "local", "--tasks-per-node", "2", "--time", "10", "--log-dir",
                 tmp_path / "prep_logs", "--wait", "--timeout", JOB_TIMEOUT, "--prep", "shards", "--input",
                 shards / "docs.jsonl", "--tokenizer", shards / "tok.json", "--seq-len", "64", "--out", out,
                 "--pack", "carry", "--rows-per-shard", "512", "--val-fraction", "0.2", env=env)
    job = job_id_of(done.stdout)
    assert "COMPLETED" in done.stdout
    log0 = (tmp_path / "prep_logs" / f"{job}_0_log.out").read_text()
    assert "2 rank(s) (slurm)" in log0
    local = sorted(p.name for p in (shards / "shards").glob("*.arrow"))
    assert local and sorted(p.name for p in out.glob("*.arrow")) == local
    for name in local:
        assert (out / name).read_bytes() == (shards / "shards" / name).read_bytes(), name
    ours, theirs = (json.loads((d / "manifest.json").read_text())["shards"] for d in (out, shards / "shards"))
    assert ours == theirs
