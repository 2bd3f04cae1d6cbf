"""Slurm launch on a REAL one-machine Slurm (slurm-wlm + munge, started by tests/slurm_cluster.py):
submitit jobs of 2 tasks train over gloo, stop and requeue themselves at a time budget, resume with
the same losses, fail and get cancelled visibly; prep stages run as 2-task jobs; the dry-run scripts
of the GPU presets carry what those clusters need; quoting refuses what cannot pass safely."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)
from test_adversarial import tiny_disk  # noqa: F401  (fixture: a 1 MiB tmpfs)
from trained_runs import write_debug_shards

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
    from rdhpc.launch.status import slurm_job_info

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = slurm_job_info(job_id)
        if info and predicate(info):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: condition not reached in {timeout} s (last {info})")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The debug data folder: docs.jsonl, tok.json and shards/ (trained_runs.write_debug_shards)."""
    root = tmp_path_factory.mktemp("slurm_data")
    write_debug_shards(root)
    return root


def train_args(shards, run_dir, *overrides):
    args = ["configs/debug.yaml", "--cluster", "local", "--set", f"data.train_dir={shards / 'shards'}",
            "--set", "model.max_seq_len=64", "--set", f"logging.run_dir={run_dir}", "--set", "train.log_interval=10",
            "--set", "eval.interval=1000", "--set", "eval.rows=8", "--set", "checkpoint.interval=10",
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
    assert rdhpc("status", run_dir, env=env).stdout == status  # a run folder finds its latest job
    print(f"turnaround of a 6-step 2-task job: {turnaround:.1f} s")


# ---- time limit and requeue: segments chain and resume with the same losses ---------------------
CHAIN_STEPS = 100


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


def rank_processes(job) -> dict[int, tuple[int, dict]]:
    """{rank: (pid, environment)} of a running job's tasks on this machine."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in item)
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and environ.get("SLURM_JOB_ID") == job and "SLURM_PROCID" in environ:
            found[int(environ["SLURM_PROCID"])] = (int(proc.name), environ)
    return found


# The time-limit chain (1-minute segments that run out of time, requeue and resume with the same
# losses) runs on the multi-node cluster, across 2 hosts: tests/test_multinode.py.


def test_preemption_signal_and_outside_requeue_resume_with_identical_losses(tmp_path, shards, uninterrupted,
                                                                              slurm_cluster):
    # Segment 1 gets USR2 as a preemption warning (`scancel --signal=USR2`, what Slurm sends before a
    # time limit or preemption): it checkpoints at the next step and requeues itself. Segment 2 is
    # requeued from outside with `scontrol requeue`, a kill without warning: segment 3 resumes
    # from the last periodic checkpoint and redoes the steps after it.
    steps = 80
    run_dir = tmp_path / "requeued"
    env = job_env(tmp_path)
    sub = rdhpc("submit", *train_args(shards, run_dir, f"train.max_steps={steps}"), "--time", "10", env=env)
    job = job_id_of(sub.stdout)

    def wait_for_step(step, segment):
        deadline = time.monotonic() + JOB_TIMEOUT
        log = run_dir / "slurm" / f"{job}_0_log.out"
        while not (log.exists() and f"segment {segment}/" in log.read_text() and (run_dir / "metrics.jsonl").exists()
                   and max(losses(run_dir)) >= step):
            assert time.monotonic() < deadline, f"segment {segment} did not reach step {step}"
            time.sleep(0.2)
        return max(losses(run_dir))

    signalled_at = wait_for_step(6, 1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    wait_state(job, lambda i: i["restarts"] == 1)
    resumed_at = json.loads((run_dir / "run_state.json").read_text())["step"]
    killed_at = wait_for_step(resumed_at + 6, 2)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    from rdhpc.launch.status import wait_for_job

    state = wait_for_job(job, timeout=JOB_TIMEOUT)
    story = job_story(run_dir, job)
    assert state == "COMPLETED", story
    info = json.loads(rdhpc("status", job, "--json", env=env).stdout)
    assert info["slurm"]["restarts"] == 2 and info["run_state"]["state"] == "completed", story
    assert "signal SIGUSR2" in story and story.count("requeueing job") == 1 and story.count("resumed from") == 2
    chained = losses(run_dir)
    assert sorted(chained) == list(range(1, steps + 1))
    assert chained == {s: uninterrupted[s] for s in range(1, steps + 1)}
    print(f"\nUSR2 at step {signalled_at} (saved at {resumed_at}), outside requeue at step {killed_at}: "
          f"losses identical")


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
    assert "error of task 1 (rank 1): RuntimeError: rank 1: failing on purpose" in status, status
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


# ---- what the GPU clusters get: dry-run scripts ---------------------------------------------------
def sbatch_options(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value or True
    return out


def exports(script: str) -> dict[str, str]:
    """Run the script's export lines in bash and read the values back (quoting checked for real)."""
    block = script[script.index("\nunset "):script.index("# checkpoint and stop")]  # values may span lines
    names = re.findall(r"^export ([A-Za-z_][A-Za-z0-9_]*)=", block, flags=re.M)
    probe = block + "\n" + "".join(f'printf "%s\\0" "${n}"\n' for n in names)
    done = subprocess.run(["bash", "-c", probe], capture_output=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "USER": "alice", "LD_LIBRARY_PATH": "/usr/lib"})
    assert done.returncode == 0, done.stderr
    return dict(zip(names, done.stdout.decode().split("\0")))


# What a Frontier job needs in its environment (slurm/clusters/frontier.yaml cites each: the paper's
# launcher and OLCF's PyTorch-on-Frontier page, "strongly recommended by HPE and AMD on Frontier for
# both correctness and best performance at scale"): the test fails if one disappears.
FRONTIER_NEEDS = {
    "MPICH_GPU_SUPPORT_ENABLED": "0", "HSA_FORCE_FINE_GRAIN_PCIE": "1", "FI_CXI_ATS": "0", "OMP_NUM_THREADS": "7",
    "NCCL_NET_GDR_LEVEL": "PHB", "NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3", "NCCL_CROSS_NIC": "1",
    "FI_MR_CACHE_MONITOR": "kdreg2", "FI_CXI_DISABLE_HOST_REGISTER": "1", "FI_CXI_DEFAULT_CQ_SIZE": "131072",
    "FI_CXI_DEFAULT_TX_SIZE": "2048", "FI_CXI_RX_MATCH_MODE": "hybrid", "FI_CXI_RDZV_PROTO": "alt_read",
    "FI_CXI_RDZV_EAGER_SIZE": "0", "FI_CXI_RDZV_THRESHOLD": "0", "FI_CXI_RDZV_GET_MIN": "0",
    "RDHPC_MIN_BUSBW_GBPS": "5",
}


def test_dry_run_frontier_has_what_frontier_needs(tmp_path):
    weird = "it's $(touch /tmp/pwned) `x` \"q\" \\ ;|&\n2nd line"
    done = rdhpc("submit", "configs/huginn-3.5b-frontier.yaml", "--cluster", "frontier", "--nodes", "512",
                 "--account", "ABC123", "--time", "12:00:00", "--set", "data.train_dir=/lustre/orion/shards",
                 "--set", f"logging.run_dir={tmp_path / 'run'}", "--env",
                 "LD_LIBRARY_PATH=/opt/aws-ofi-rccl/lib:${LD_LIBRARY_PATH}", "--env", f"WEIRD={weird}", "--dry-run")
    text = done.stdout
    script = text[text.index("#!/bin/bash"):text.index("# environment of every rank")]
    opts = sbatch_options(script)
    # the spec's launch: srun -N 512 -n 4096 -c7 --ntasks-per-node=8 --gpus-per-node=8
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"], opts["cpus-per-task"]) == ("512", "8", "8", "7")
    assert opts["account"] == "ABC123" and opts["partition"] == "batch" and opts["time"] == "720"
    assert opts["signal"] == "USR2@300" and opts["requeue"] is True and opts["open-mode"] == "append"
    assert "4096 rank(s)" in text and "backend nccl" in text
    for module in ("PrgEnv-gnu", "rocm/6.2.0", "rccl-net-plugin", "craype-accel-amd-gfx90a", "cray-mpich"):
        assert f"module load {module}\n" in script
    assert script.index("module load rocm/") < script.index("module load rccl-net-plugin")  # after rocm (OLCF)
    env = exports(script)
    missing = {k: (env.get(k), v) for k, v in FRONTIER_NEEDS.items() if env.get(k) != v}
    assert not missing, f"the Frontier job lost what it needs: {missing}"
    assert env["MIOPEN_USER_DB_PATH"] == env["MIOPEN_CUSTOM_CACHE_DIR"] and env["MIOPEN_USER_DB_PATH"].startswith("/tmp/")
    assert opts["network"] == "disable_rdzv_get"  # what FI_CXI_RDZV_PROTO=alt_read needs
    # RCCL fails instead of using sockets, in jobs of several nodes only (one node: no plugin)
    for nodes, expected in (("512", "OFI"), ("1", "Socket")):
        probe = script[script.index("if (( SLURM_JOB_NUM_NODES"):].split("\n")[0] + "; echo $NCCL_NET"
        assert subprocess.run(["bash", "-c", probe], env={"SLURM_JOB_NUM_NODES": nodes}, capture_output=True,
                              text=True, timeout=30).stdout.strip() == expected
    assert 'ulimit -n "$(ulimit -Hn)"' in script  # rank 0's rendezvous keeps a socket per rank
    assert env["LD_LIBRARY_PATH"] == "/opt/aws-ofi-rccl/lib:/usr/lib"  # ${NAME} expands
    assert env["WEIRD"] == weird and not Path("/tmp/pwned").exists()  # everything else is literal
    assert "unset RANK LOCAL_RANK WORLD_SIZE" in script and "MASTER_ADDR" in script.split("unset ")[1]
    # the time budget from the end Slurm gives the job (a clock read after module loads runs late)
    assert "RDHPC_STOP_AT=$(( ${SLURM_JOB_END_TIME:-$(( $(date +%s) + 43200 ))} - 300 ))" in script
    stop_at = subprocess.run(["bash", "-c", script[script.index("export RDHPC_STOP_AT"):].split("\n")[0]
                              + "; echo $RDHPC_STOP_AT"], env={"SLURM_JOB_END_TIME": "1000000", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=30).stdout
    assert stop_at.strip() == str(1000000 - 300)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "submitit.core._submit" in srun
    # srun does not inherit -c on Slurm 22.05-23.02; each task on the GCD closest to its cores
    assert "--cpus-per-task=7" in srun and "--gpus-per-task=1 --gpu-bind=closest" in srun
    assert "rdhpc.launch.guard" in srun  # the task guard that requeues a job whose rank was killed
    assert "--wckey" not in script  # sites that enforce wckeys refuse submitit's default
    # the paper's fixed 64 MB reduction chunks, as DeepSpeed bucket sizes
    assert "zero.reduce_bucket_size=16777216 zero.allgather_bucket_size=16777216 zero.overlap_comm=false" in text
    assert subprocess.run(["bash", "-n"], input=script, text=True, timeout=30).returncode == 0


def test_checkpoints_must_fit_where_the_run_writes_them(tmp_path, tiny_disk):
    """submit says what the checkpoints will take (rdhpc plan's size x (keep_last + 1)), refuses a
    file system with less free space before anything reaches Slurm, and a path the preset forbids."""
    frontier = ["configs/huginn-3.5b-frontier.yaml", "--cluster", "frontier", "--nodes", "512", "--account", "ABC123",
                "--set", "data.train_dir=/lustre/orion/shards"]
    dry = rdhpc("submit", *frontier, "--set", f"logging.run_dir={tmp_path / 'run'}", "--dry-run")
    # 3,564,976,800 parameters x (4 float32 weights + 8 Adam m, v) bytes
    assert "[submit] checkpoints: 42.78 GB each, 3 kept + 1 being written = 171.12 GB" in dry.stderr, dry.stderr
    home = rdhpc("submit", *frontier, "--set", "logging.run_dir=/ccs/home/me/run", "--dry-run", check=False)
    assert home.returncode == 2 and "lies under /ccs/home" in home.stderr and "Orion" in home.stderr
    full = rdhpc("submit", *train_args(tmp_path, tiny_disk / "run"), "--time", "10", env=job_env(tmp_path), check=False)
    assert full.returncode == 2 and "would fail at its first saves" in full.stderr, full.stderr
    assert "submitted job" not in full.stdout and not (tiny_disk / "run" / "slurm").exists()


def test_frontier_time_limits_by_node_count(tmp_path):
    """Frontier's batch partition allows 2 h up to 91 nodes, 6 h up to 183, 12 h beyond: a scaled-down
    trial asking for 12 h would wait in the queue forever, so it is refused, naming the limit."""
    def dry(nodes, time_limit):
        return rdhpc("submit", "configs/huginn-3.5b-frontier.yaml", "--cluster", "frontier", "--nodes", nodes,
                     "--account", "ABC123", "--time", time_limit, "--set", "data.train_dir=/lustre/orion/shards",
                     "--set", f"logging.run_dir={tmp_path / 'run'}", "--set", "train.global_batch_size=4096",
                     "--dry-run", check=False)

    refused = dry(8, "12:00:00")
    assert refused.returncode == 2 and "slurm.time: 12:00:00 is above the frontier limit of 02:00:00 for 8 node(s)" \
        in refused.stderr, refused.stderr
    assert dry(8, "02:00:00").returncode == 0 and dry(128, "06:00:00").returncode == 0
    assert dry(128, "6:01:00").returncode == 2 and dry(512, "12:00:00").returncode == 0
    assert "more than the frontier preset allows" in dry(9473, "1:00:00").stderr


def dry_run_with_own_preset(tmp_path, base: str, *args, **changes) -> str:
    """The dry-run script of the debug config on a user's preset: slurm/clusters/BASE.yaml with
    `changes`, found through RDHPC_CLUSTERS_DIR (no code change)."""
    preset = yaml.safe_load((REPO / "slurm" / "clusters" / f"{base}.yaml").read_text())
    preset.update(changes)
    folder = tmp_path / f"clusters-{len(list(tmp_path.glob('clusters-*')))}"
    folder.mkdir()
    (folder / "mine.yaml").write_text(yaml.safe_dump(preset))
    done = rdhpc("submit", "configs/debug.yaml", "--cluster", "mine", *args, "--set", "data.train_dir=/data/shards",
                 "--set", f"logging.run_dir={folder / 'run'}", "--dry-run",
                 env=dict(os.environ, RDHPC_CLUSTERS_DIR=str(folder)))
    return done.stdout[done.stdout.index("#!/bin/bash"):done.stdout.index("# environment of every rank")]


# What every NVIDIA job's srun line needs (the test fails if one disappears): -c again (Slurm
# 22.05-23.02 does not pass --cpus-per-task on), the failing-rank rule, the task guard.
NVIDIA_SRUN_NEEDS = ("--cpus-per-task=8", "--kill-on-bad-exit=1", "-m rdhpc.launch.guard", "submitit.core._submit")


def test_dry_run_nvidia_and_staging(tmp_path):
    done = rdhpc("submit", "configs/debug.yaml", "--cluster", "nvidia", "--nodes", "4", "--partition", "gpu",
                 "--time", "1-00:00:00", "--set", "data.train_dir=/data/shards", "--set",
                 f"logging.run_dir={tmp_path / 'run'}", "--dry-run")
    script = done.stdout[done.stdout.index("#!/bin/bash"):done.stdout.index("# environment of every rank")]
    opts = sbatch_options(script)
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"], opts["cpus-per-task"]) == ("4", "8", "8", "8")
    assert opts["partition"] == "gpu" and opts["time"] == "1440" and "account" not in opts
    env = exports(script)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["OMP_NUM_THREADS"] == "8"
    assert "32 rank(s)" in done.stdout and "backend nccl" in done.stdout and "module load" not in script
    assert "reduce_bucket_size" not in done.stdout  # only the frontier preset fixes the buckets
    srun = next(line for line in script.splitlines() if line.startswith("srun --unbuffered"))
    for needed in NVIDIA_SRUN_NEEDS:
        assert needed in srun, f"the NVIDIA job lost {needed!r}: {srun}"
    assert "--wckey" not in script and "SLURM_JOB_END_TIME" in script

    # containers (pyxis/enroot) and whole nodes, from a preset of the user's own
    script = dry_run_with_own_preset(tmp_path, "nvidia", "--nodes", "4", "--partition", "gpu",
                                     container_image="nvcr.io#nvidia/pytorch:25.01-py3",
                                     container_mounts=["/lustre:/lustre"], mpi="pmix",
                                     sbatch={"exclusive": True, "mem": 0}, account="PRJ9", qos="high", wckey="mywckey")
    opts = sbatch_options(script)
    assert opts["exclusive"] is True and opts["mem"] == "0" and opts["account"] == "PRJ9" and opts["qos"] == "high"
    assert opts["wckey"] == "mywckey"
    srun = next(line for line in script.splitlines() if line.startswith("srun --unbuffered"))
    words = shlex.split(srun)  # as bash reads it
    at = words.index("--mpi=pmix")
    assert words[at:at + 3] == ["--mpi=pmix", "--container-image=nvcr.io#nvidia/pytorch:25.01-py3",
                                "--container-mounts=/lustre:/lustre"], words

    # a user's own preset, no code change: Frontier with node-local staging switched on
    frontier = yaml.safe_load((REPO / "slurm" / "clusters" / "frontier.yaml").read_text())
    script = dry_run_with_own_preset(tmp_path, "frontier", "--account", "ABC123", "--time", "2:00:00",
                                     staging={**frontier["staging"], "enabled": True,
                                              "archive": "/lustre/orion/me/rdhpc-env.tar"})
    assert sbatch_options(script)["constraint"] == "nvme"
    assert "sbcast --force --preserve /lustre/orion/me/rdhpc-env.tar /mnt/bb/\"${USER}\"/rdhpc-env.tar" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun --unbuffered"))
    assert '/mnt/bb/"${USER}"/venv/bin/python -u -m submitit.core._submit' in srun
    assert subprocess.run(["bash", "-n"], input=script, text=True, timeout=30).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--job-name", "my job"], "slurm.job_name: 'my job' cannot be a job name"),
    (["--account", "abc\n#SBATCH --uid=0"], "cannot be passed to sbatch safely: it contains a newline"),
    (["--partition", "gpu batch"], "slurm.partition: 'gpu batch' cannot be passed to sbatch safely: it contains a space"),
    (["--log-dir", "/tmp/logs%x"], "slurm.folder: '/tmp/logs%x' cannot be used for Slurm's log files"),
    (["--env", "1BAD=x"], "slurm.env[0]: '1BAD=x' is not NAME=VALUE"),
    (["--time", "soon"], "slurm.time: 'soon' is not a Slurm time"),
    (["--cluster", "frontiers"], "no preset 'frontiers' (did you mean 'frontier'?)"),
    (["--time", "1", "--stop-margin", "60"], "slurm.stop_margin_s: 60 s is not shorter than slurm.time"),
])
def test_unsafe_or_wrong_values_are_refused(tmp_path, args, message):
    done = rdhpc("submit", "configs/debug.yaml", "--set", "data.train_dir=/data", "--set",
                 f"logging.run_dir={tmp_path}", "--dry-run", *args, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_quoting_and_presets_refuse_what_cannot_pass():
    from rdhpc.launch.presets import PresetError, load_preset
    from rdhpc.launch.quoting import QuotingError, export_line, quote_env_value

    with pytest.raises(QuotingError, match="NUL"):
        export_line("X", "a\0b")
    with pytest.raises(QuotingError, match="valid environment variable name"):
        export_line("X-Y", "1")
    assert quote_env_value("${HOME}/x y") == '"${HOME}"\'/x y\''
    assert quote_env_value("") == "''"
    bad = Path(os.environ["TMPDIR"]) / "bad.yaml"
    bad.write_text("tasks_per_node: eight\nmodules: ['rocm; rm -rf /']\nenv: {'A B': 1}\ngpu_vendr: amd\n")
    with pytest.raises(PresetError) as err:
        load_preset(str(bad))
    text = str(err.value)
    assert "tasks_per_node: expected int, got str 'eight'" in text and "modules[0]" in text and "'A B'" in text
    assert "gpu_vendr: unknown key (did you mean 'gpu_vendor'?)" in text


# ---- rank discovery ---------------------------------------------------------------------------------
def test_hostlist_and_master_address():
    from rdhpc.distributed.ranks import RankInfo, discover_ranks, expand_hostlist, master_address

    assert expand_hostlist("frontier[00001-00003,00007],login1") == [
        "frontier00001", "frontier00002", "frontier00003", "frontier00007", "login1"]
    assert expand_hostlist("n[1-2]-ib[3-4]") == ["n1-ib3", "n1-ib4", "n2-ib3", "n2-ib4"]
    # srun task 9 of 16 on the second of 2 nodes: rank from Slurm, master = FIRST node, port from the job id
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
           "SLURM_STEP_NODELIST": "frontier[08841-08842]", "SLURM_JOB_NODELIST": "frontier[08841-08842]",
           "SLURM_JOB_ID": "2042"}
    ranks = discover_ranks(env)
    assert ranks == RankInfo(9, 16, 1, 8, "slurm")
    assert master_address(ranks, env) == ("frontier08841", 15000 + 2042, "slurm")
    # an explicit rendezvous (torchrun) is kept; one process alone stays on loopback
    assert master_address(RankInfo(0, 2, 0, 2, "torchrun"), {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})[:2] == (
        "10.0.0.1", 4242)
    assert master_address(RankInfo(0, 1, 0, 1, "single"), {})[0] == "127.0.0.1"


def test_mpi_launch_discovers_ranks_and_master(tmp_path):
    """Two ranks under the venv's own mpirun (PyPI MPICH): ranks from MPI, one node -> loopback."""
    mpirun = Path(sys.executable).parent / "mpirun"
    code = ("import sys; from rdhpc.distributed import discover_ranks, master_address; r = discover_ranks(); "
            "a = master_address(r, {}); "
            "open(f'{sys.argv[1]}/rank{r.rank}', 'w').write(f'{r.rank} {r.world_size} {r.launcher} {a[0]} {a[1]}')")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    done = subprocess.run([str(mpirun), "-n", "2", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    rows = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    assert [r[:4] for r in rows] == [["0", "2", "mpi", "127.0.0.1"], ["1", "2", "mpi", "127.0.0.1"]]
    assert rows[0][4] == rows[1][4]  # the same port on both: broadcast from rank 0


# ---- pre-flight -------------------------------------------------------------------------------------
PREFLIGHT = """
import json, os, sys
import torch, torch.distributed as dist
from rdhpc.distributed import discover_ranks, export_process_group_env
from rdhpc.distributed.preflight import run_preflight
ranks = discover_ranks()
export_process_group_env(ranks)
dist.init_process_group("gloo")
lines = []
report = run_preflight(torch.device("cpu"), ranks, log=lines.append)
if ranks.rank == 0:
    print(json.dumps({"report": report, "log": lines}))
dist.destroy_process_group()
"""


def test_preflight_on_two_gloo_ranks_names_a_slow_rank(tmp_path):
    from rdhpc.distributed.ranks import free_port

    script = tmp_path / "preflight.py"
    script.write_text(PREFLIGHT)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), RDHPC_FAULT_SLOW_RANK="1:8", OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    result = json.loads(outs[0][0])
    report, log = result["report"], "\n".join(result["log"])
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and all("cpu" in r["device"] for r in report["ranks"])
    assert [a["bytes"] for a in report["allreduce"]] == [64 << 10, 1 << 20, 4 << 20]
    assert all(a["busbw_gbps"] > 0 and a["seconds"] > 0 for a in report["allreduce"])
    assert report["slow_ranks"] == [1]  # its GEMM does 8x the work it counts
    assert "all-reduce 1 MB:" in log and "GEMM 256x256 float32" in log
    assert re.search(r"SLOW: rank 1 \(\S+, cpu \(1 threads\)\) runs GEMM at .* 0\.\d\dx the median", log), log


# ---- plain sbatch templates (no submitit) ------------------------------------------------------------
def test_sbatch_templates_are_generated_from_the_presets():
    from rdhpc.launch.templates import PRESETS, TEMPLATES, render_template

    for name in PRESETS:
        assert (TEMPLATES / f"{name}.sbatch").read_text() == render_template(name), \
            f"slurm/templates/{name}.sbatch is stale: run python -m rdhpc.launch.templates"
    frontier = (TEMPLATES / "frontier.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=8\n#SBATCH --cpus-per-task=7\n#SBATCH --gpus-per-node=8" in frontier
    assert "export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3" in frontier and "module load rccl-net-plugin" in frontier
    assert "--cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest" in frontier


def test_plain_sbatch_template_trains_on_two_tasks(tmp_path, shards, slurm_cluster):
    run_dir = tmp_path / "plain"
    args = train_args(shards, run_dir, "train.max_steps=4")
    env = job_env(tmp_path, RDHPC_PYTHON=sys.executable)
    done = subprocess.run(["sbatch", "--parsable", "--time=10", f"--output={tmp_path}/plain-%j.out",
                           str(REPO / "slurm" / "templates" / "local.sbatch"), args[0], *args[3:]],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    from rdhpc.launch.status import wait_for_job

    state = wait_for_job(job, timeout=JOB_TIMEOUT)
    out = (tmp_path / f"plain-{job}.out").read_text()
    assert state == "COMPLETED", out[-3000:]
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert "2 rank(s) (cpu)" in out and "run completed at step 4: not requeued" in out


def test_the_requeue_rule_is_one_function():
    """rdhpc.launch.job.decide_requeue: the submitit task and the plain sbatch template both ask it."""
    from rdhpc.launch.job import DONE, FAIL, LEAVE_TO_SLURM, REQUEUE, SegmentEnd, decide_requeue

    def action(state, step=10, start=4, terminated=False, segment=1, max_segments=3):
        return decide_requeue(SegmentEnd(state, step, start, terminated, "time budget"), segment, max_segments).action

    assert action("completed") == DONE and action("failed") == DONE
    assert action("stopped") == REQUEUE
    assert action("stopped", step=4, start=4) == FAIL  # trained nothing: requeueing would loop
    assert action("stopped", segment=3) == DONE  # slurm.max_segments reached
    assert action("stopped", terminated=True) == LEAVE_TO_SLURM  # scancel, hard limit, preemption
    assert action("stopped", start=None) == REQUEUE  # an older run_state without start_step
    end = SegmentEnd.from_run_state({"state": "stopped", "step": 7, "start_step": 7, "reason": "signal SIGUSR2"})
    assert "stopped before its first step (signal SIGUSR2)" in decide_requeue(end, 1, 5).reason
