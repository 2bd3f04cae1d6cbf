"""Jobs across hosts, on a real multi-node Slurm: nodes n1-n3, each a slurmd in network, mount and
UTS namespaces of its own (its address on 127.100.0.0/24, its host name, its node-local folder),
started by tests/slurm_cluster.py (tools/slurm_netns.py). Ranks on different hosts meet at the first
node's address, and give the losses the same ranks give on one host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import multi_node_cluster  # noqa: F401  (module fixture)
from test_slurm import JOB_TIMEOUT, job_env, job_id_of, losses, rdhpc, shards, train_args  # noqa: F401


def submit_training(tmp_path, shards, name, nodes, tasks_per_node, *overrides):
    run_dir = tmp_path / name
    started = time.monotonic()
    done = rdhpc("submit", *train_args(shards, run_dir, "train.max_steps=6", *overrides), "--nodes", nodes,
                 "--tasks-per-node", tasks_per_node, "--time", "10", "--wait", "--timeout", JOB_TIMEOUT,
                 env=job_env(tmp_path))
    job = job_id_of(done.stdout)
    assert f"job {job}: COMPLETED" in done.stdout, done.stdout
    return run_dir, job, time.monotonic() - started


@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_ranks_on_two_hosts_give_the_losses_of_one_host(tmp_path, shards, multi_node_cluster, tasks_per_node):
    ranks = 2 * tasks_per_node
    batch = f"train.micro_batch_size={8 // ranks}"  # the global batch of 8 split over the ranks
    across, job, seconds = submit_training(tmp_path, shards, "two-nodes", 2, tasks_per_node, batch)
    log0 = (across / "slurm" / f"{job}_0_log.out").read_text()
    # the rendezvous is the first node's name and address (not loopback); every rank says its host
    assert f"{ranks} rank(s) (slurm), rendezvous n1:" in log0 and "(127.100.0.11), this rank on n1" in log0, log0[-3000:]
    hosts = {int(line.split()[2].rstrip(":")): line.split()[3]
             for line in log0.splitlines() if line.startswith("[preflight] rank ")}
    assert hosts == {r: f"n{1 + r // tasks_per_node}" for r in range(ranks)}, log0[-3000:]
    assert "[preflight] all-reduce" in log0
    one, _, _ = submit_training(tmp_path, shards, "one-node", 1, ranks, batch)
    assert losses(across) == losses(one)  # the same ranks and batches: bit-identical in fp32
    assert sorted(losses(across)) == list(range(1, 7))
    print(f"2 nodes x {tasks_per_node} task(s), 6 steps: {seconds:.1f} s")


def test_node_local_folders_and_names_are_each_nodes_own(tmp_path, multi_node_cluster):
    local = multi_node_cluster["local"]
    script = tmp_path / "where.sh"
    out = tmp_path / "where.out"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output={out}
srun bash -c 'echo "$SLURM_PROCID $(hostname) $(getent hosts n1 | cut -d" " -f1)" > {local}/mark; cat {local}/mark'
""")
    job = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True, text=True,
                         timeout=JOB_TIMEOUT, check=True).stdout.strip()
    lines = sorted(out.read_text().split("\n")[:2])
    assert lines == ["0 n1 127.100.0.11", "1 n2 127.100.0.11"], (job, out.read_text())
    state = multi_node_cluster["state"]
    assert (state / "nodes" / "n1" / "local" / "mark").read_text().startswith("0 n1")
    assert (state / "nodes" / "n2" / "local" / "mark").read_text().startswith("1 n2")
    assert not (local / "mark").exists()  # the machine's own folder under the bind mounts stays empty


def test_srun_mpi_pmi2_ranks_come_from_slurm_with_or_without_mpi4py(tmp_path, multi_node_cluster):
    """srun --mpi=pmi2 puts PMI_RANK/PMI_SIZE into every task: rank discovery gives Slurm's ranks,
    and does not need mpi4py (hidden from the second step)."""
    script = tmp_path / "pmi.sh"
    out = tmp_path / "pmi.out"
    probe = ("import os, sys; {hide}from rdhpc.distributed.ranks import discover_ranks; r = discover_ranks(); "
             "print('rank', r.rank, r.world_size, r.local_rank, r.local_world_size, r.launcher, "
             "os.environ.get('PMI_RANK'), sys.modules.get('mpi4py') is not None)")
    lines = []
    for hide in ("", "sys.modules['mpi4py'] = None; "):
        lines.append(f"srun --mpi=pmi2 --ntasks-per-node=2 {sys.executable} -c \"{probe.format(hide=hide)}\"")
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n"
                      f"#SBATCH --output={out}\ncd {os.getcwd()}\nexport PYTHONPATH={os.getcwd()}\n" + "\n".join(lines) + "\n")
    subprocess.run(["sbatch", "--wait", str(script)], capture_output=True, text=True, timeout=JOB_TIMEOUT, check=True)
    seen = sorted(line for line in out.read_text().splitlines() if line.startswith("rank "))
    expected = sorted(f"rank {r} 4 {r % 2} 2 slurm {r} False" for r in range(4))
    assert seen == sorted(expected * 2), out.read_text()[-3000:]


def test_the_cluster_is_only_reachable_through_its_namespaces(multi_node_cluster):
    """From the machine's own namespace the controller's address is this machine's loopback, where
    nothing listens: a client that bypasses the wrappers reaches nothing (and nothing else)."""
    import socket

    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.100.0.1", 6817)) != 0
    bare = {k: v for k, v in os.environ.items()}
    bare["PATH"] = os.pathsep.join(p for p in bare["PATH"].split(os.pathsep) if p != str(multi_node_cluster["state"] / "bin"))
    done = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, env=bare, timeout=30)
    assert done.returncode != 0 and "Unable to contact slurm controller" in done.stderr
    plan = json.loads((multi_node_cluster["state"] / "cluster.json").read_text())
    assert plan["startup_s"] < 10
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    assert "127.100.0" not in routes  # the root namespace's routes are untouched


HEALING_OVERRIDES = ["train.max_steps=30", "checkpoint.interval=4", "train.heartbeat_interval_s=1",
                     "train.collective_timeout_s=20"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards, multi_node_cluster):
    """The losses of the failure tests' run, never interrupted: 1 node x 2 tasks (the same ranks)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    rdhpc("submit", *train_args(shards, root / "run", *HEALING_OVERRIDES), "--nodes", 1, "--tasks-per-node", 2,
          "--time", "10", "--wait", "--timeout", JOB_TIMEOUT, env=job_env(root))
    return losses(root / "run")


def test_a_job_heals_itself_after_a_rank_is_killed(tmp_path, shards, multi_node_cluster, uninterrupted):
    """kill -9 of one rank's training process (as the OOM killer or a GPU fault would): the rank
    that survives requeues the job, excluding the dead rank's host; the next segment resumes from
    the last checkpoint on the remaining nodes and finishes; its losses are those of a run that was
    never interrupted. One job id got to the end."""
    import signal

    overrides = HEALING_OVERRIDES
    run_dir = tmp_path / "healed"
    env = job_env(tmp_path)
    done = rdhpc("submit", *train_args(shards, run_dir, *overrides), "--nodes", 2, "--tasks-per-node", 1,
                 "--time", "10", env=env)
    job = job_id_of(done.stdout)
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 6:
            break
        time.sleep(0.1)
    beat = json.loads((run_dir / "heartbeat" / "rank1.json").read_text())
    assert beat["host"] == "n2", beat
    killed_at = time.monotonic()
    os.kill(beat["pid"], signal.SIGKILL)
    from rdhpc.launch.status import wait_for_job

    state = wait_for_job(job, timeout=JOB_TIMEOUT)
    status = rdhpc("status", job, env=env).stdout
    assert state == "COMPLETED", status
    info = json.loads(rdhpc("status", job, "--json", env=env).stdout)
    assert info["slurm"]["restarts"] == 1 and info["run_state"]["state"] == "completed", status
    records = info["run"]["failure_requeues"]
    # requeued once, by the killed rank's guard or by the survivor, whichever claimed it first
    assert len(records) == 1 and records[0]["exclude"] == "n2" and records[0]["segment"] == 1, records
    assert "rank 1 (host n2" in records[0]["reason"] and "n2 excluded" in status, status
    assert "n2" not in info["slurm"]["nodes"]  # the second segment ran elsewhere
    assert losses(run_dir) == uninterrupted  # resumed exactly from the checkpoint
    print(f"healed: detected and requeued, then completed {time.monotonic() - killed_at:.1f} s after the kill")


def test_which_failures_requeue_and_which_host_is_left_out():
    """The rule both the task guard and a surviving rank apply (a pure function)."""
    from rdhpc.launch.guard import rank_failure
    from rdhpc.launch.job import decide_failure_requeue
    from rdhpc.train.heartbeat import STALL_EXIT_STATUS

    dead = [{"rank": 3, "host": "n2", "text": "rank 3 (host n2, pid 7, step 12, forward/backward): its process is gone"}]
    healed = decide_failure_requeue(dead, [], 0, 3, 1, 32, my_host="n1")
    assert healed.requeue and healed.exclude == "n2" and "failure requeue 1 of 3, n2 excluded" in healed.reason
    # a rank that failed on its own error (config, shard, NaN stop, bug): another segment fails alike
    own = [{"rank": 1, "host": "n1", "text": "rank 1 (host n1, pid 9, step 0, failed: ShardError: ...)"}]
    assert not decide_failure_requeue(dead, own, 0, 3, 1, 32).requeue
    assert "failed on its own" in decide_failure_requeue([], own, 0, 3, 1, 32).reason
    assert not decide_failure_requeue(dead, [], 3, 3, 4, 32).requeue  # slurm.max_failure_requeues reached
    assert not decide_failure_requeue(dead, [], 0, 3, 32, 32).requeue  # slurm.max_segments reached
    assert not decide_failure_requeue(dead, [], 0, 0, 1, 32).requeue  # 0: never
    # silent ranks on two hosts: no single host to blame, requeue without excluding
    two = dead + [{"rank": 5, "host": "n3", "text": "rank 5 (host n3 ...): silent for 40 s"}]
    assert decide_failure_requeue(two, [], 0, 3, 1, 32).exclude is None
    assert decide_failure_requeue(dead, [], 0, 3, 1, 32, my_host="n2").exclude is None  # never itself
    # the guard: killed by a signal or by its own watchdog is the machines'; statuses 1 and 2 are the rank's
    assert rank_failure(-9) == "was killed by SIGKILL" and "watchdog" in rank_failure(STALL_EXIT_STATUS)
    assert rank_failure(0) is None and rank_failure(1) is None and rank_failure(2) is None
    assert rank_failure(-15) is None  # SIGTERM: Slurm ending the job (scancel, its own requeue, the limit)


def test_a_node_dies_and_the_job_resumes_on_the_others(tmp_path, shards, multi_node_cluster, uninterrupted):
    """Every process of n2 (its slurmd, the job's step, the rank) is killed: the machine vanishes.
    The surviving rank fails within a bounded time naming the lost host; the job is requeued (by
    the surviving rank, or by Slurm for the failed node), resumes from the last complete checkpoint
    on the remaining nodes and completes with the losses of an uninterrupted run."""
    import slurm_netns

    overrides = HEALING_OVERRIDES
    run_dir = tmp_path / "node-lost"
    env = job_env(tmp_path)
    job = job_id_of(rdhpc("submit", *train_args(shards, run_dir, *overrides), "--nodes", 2, "--tasks-per-node", 1,
                          "--time", "10", env=env).stdout)
    deadline = time.monotonic() + JOB_TIMEOUT
    beat = run_dir / "heartbeat" / "rank1.json"
    while time.monotonic() < deadline:  # after a checkpoint, and once rank 1's heartbeat shows a step
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 6 \
                and json.loads(beat.read_text()).get("step", 0) >= 6:
            break
        time.sleep(0.05)
    assert json.loads(beat.read_text())["host"] == "n2"
    killed = time.monotonic()
    assert slurm_netns.kill_node(multi_node_cluster["state"], "n2")
    try:
        from rdhpc.launch.status import wait_for_job

        state = wait_for_job(job, timeout=JOB_TIMEOUT)
        healed = time.monotonic() - killed
        status = rdhpc("status", job, env=env).stdout
        assert state == "COMPLETED", status
        info = json.loads(rdhpc("status", job, "--json", env=env).stdout)
        assert info["slurm"]["restarts"] >= 1 and info["run_state"]["state"] == "completed", status
        assert "n2" not in info["slurm"]["nodes"], status
        log0 = "".join((run_dir / "slurm" / f"{job}_0_log.{kind}").read_text() for kind in ("out", "err"))
        # the survivor names the lost host and the step it was last seen at
        named = re.search(r"rank 1 \(host n2, pid \d+, step (\d+), [^)]*\): (silent for \d+ s|its process is gone)", log0)
        assert named and int(named.group(1)) >= 6, log0[-3000:]
        records = info["run"]["failure_requeues"]
        assert [r["exclude"] for r in records] == ["n2"] and "n2 excluded from the next segment" in log0, records
        assert losses(run_dir) == uninterrupted
        print(f"node lost: the job completed {healed:.1f} s after n2 vanished; {status}")
    finally:
        slurm_netns.restart_node(multi_node_cluster["state"], "n2")


def test_a_time_limit_chain_across_two_nodes_resumes_with_identical_losses(tmp_path, shards, multi_node_cluster):
    """One-minute segments on 2 nodes that checkpoint and stop 30 s before the limit (the time
    budget RDHPC_STOP_AT, or Slurm's USR2 warning when it comes first) and requeue themselves until
    the run is complete. To make the first segment run out of time whatever the machine's speed,
    the ranks on both hosts are frozen (SIGSTOP, as a busy machine would) from step 10 until the
    budget has passed. The losses are those of an uninterrupted run of the same ranks. (The
    one-node cluster's time-limit test became this one: the same path, across hosts.)"""
    import signal

    from test_slurm import job_story, rank_processes

    steps = 60
    overrides = [f"train.max_steps={steps}"]
    run_dir = tmp_path / "chain"
    env = job_env(tmp_path)
    started = time.monotonic()
    job = job_id_of(rdhpc("submit", *train_args(shards, run_dir, *overrides), "--nodes", 2, "--tasks-per-node", 1,
                          "--time", "1", "--stop-margin", "30", "--max-segments", "10", env=env).stdout)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ((run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 10):
        assert time.monotonic() < deadline, "the first segment did not reach step 10"
        time.sleep(0.1)
    ranks = rank_processes(job)
    assert sorted(ranks) == [0, 1] and ranks[1][1]["SLURMD_NODENAME"] == "n2", ranks
    stop_at = float(ranks[0][1]["RDHPC_STOP_AT"])

    def signal_rank(pid, sig):  # a rank may have saved and exited by itself (Slurm's early USR2)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    for pid, _ in ranks.values():
        signal_rank(pid, signal.SIGSTOP)
    try:
        frozen_at = max(losses(run_dir))
        time.sleep(max(0.0, stop_at - time.time()) + 0.5)
    finally:
        for pid, _ in ranks.values():
            signal_rank(pid, signal.SIGCONT)
    from rdhpc.launch.status import wait_for_job

    state = wait_for_job(job, timeout=JOB_TIMEOUT * 2)
    elapsed = time.monotonic() - started
    story = job_story(run_dir, job)
    assert state == "COMPLETED", story
    info = json.loads(rdhpc("status", job, "--json", env=env).stdout)
    assert info["run_state"]["state"] == "completed" and info["last_step"] == steps, story
    segments = info["slurm"]["restarts"] + 1
    first = story[story.index("segment 1/"):story.index("segment 2/")]
    assert re.search(r"stopping after step \d+: (time budget \(RDHPC_STOP_AT|signal SIGUSR2"
                     r"|another rank's stop request \(SIGUSR1 or SIGUSR2\))", first), first
    assert segments >= 2 and "requeueing job" in first, story
    assert story.count("requeueing job") == segments - 1 and story.count("resumed from") == segments - 1, story
    assert story.count("rendezvous n1:") == segments and "2 rank(s) (slurm)" in story  # every segment on 2 hosts
    reference = tmp_path / "reference"
    rdhpc("submit", *train_args(shards, reference, *overrides), "--nodes", 1, "--tasks-per-node", 2, "--time", "10",
          "--wait", "--timeout", JOB_TIMEOUT, env=env)
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert losses(run_dir) == losses(reference)  # fp32 on CPU: bit-identical
    print(f"\n2 nodes: {steps} steps in {segments} one-minute segments (segment 1 out of time after step "
          f"{frozen_at}), {elapsed:.0f} s; losses identical")


def test_prep_shards_as_a_two_node_job_matches_a_local_run(tmp_path, shards, multi_node_cluster):
    """`rdhpc submit --prep shards` on 2 nodes: each node's workers keep their intermediate files
    (a piece's unsorted tokens, a shard before it is published) in that node's own node-local
    folder; the shards are byte-identical to a local run's."""
    out = tmp_path / "two_node_shards"
    local = multi_node_cluster["local"]
    done = rdhpc("submit", "--cluster", "local", "--nodes", "2", "--tasks-per-node", "1", "--time", "10",
                 "--log-dir", tmp_path / "prep_logs", "--wait", "--timeout", JOB_TIMEOUT, "--prep", "shards",
                 "--input", shards / "docs.jsonl", "--tokenizer", shards / "tok.json", "--seq-len", "64", "--out", out,
                 "--pack", "carry", "--rows-per-shard", "512", "--val-fraction", "0.2", "--piece-bytes", "100000",
                 "--local-tmp", local, env=job_env(tmp_path))
    job = job_id_of(done.stdout)
    assert "COMPLETED" in done.stdout, done.stdout
    assert "this rank on n1" in (tmp_path / "prep_logs" / f"{job}_0_log.out").read_text()
    local_names = sorted(p.name for p in (shards / "shards").glob("*.arrow"))
    assert local_names and sorted(p.name for p in out.glob("*.arrow")) == local_names
    for name in local_names:
        assert (out / name).read_bytes() == (shards / "shards" / name).read_bytes(), name
    hosts = json.loads((out / "manifest.json").read_text())["report"]["hosts"]
    assert sorted(hosts) == ["n1", "n2"] and all(h["pieces"] > 0 and h["shards"] > 0 for h in hosts.values()), hosts
    assert {h["local_tmp"] for h in hosts.values()} == {str(local / "rdhpc-prep")}
    for node in ("n1", "n2"):  # each node's own folder was used and is left empty
        used = multi_node_cluster["state"] / "nodes" / node / "local" / "rdhpc-prep"
        assert used.is_dir() and not any(used.iterdir()), node
    assert not (local / "rdhpc-prep").exists()  # nothing reached the machine's own folder under the mounts


def test_node_local_staging_on_two_nodes(tmp_path, shards, multi_node_cluster):
    """--staging on 2 nodes x 2 tasks: the archive lands in each node's own node-local folder,
    is unpacked exactly once per node (not once per task), the ranks run the staged Python; a
    broken archive fails the job before any rank starts."""
    import shutil
    import tarfile

    import yaml

    local = multi_node_cluster["local"]
    state = multi_node_cluster["state"]
    env_root = tmp_path / "env"
    (env_root / "venv" / "bin").mkdir(parents=True)
    staged_python = env_root / "venv" / "bin" / "python"
    # a stand-in for a relocated environment: it says where it runs from, then runs the real Python
    staged_python.write_text(f'#!/bin/sh\necho "$(hostname) $0" >> "$(dirname "$0")/../../python-used.log"\n'
                             f'exec {sys.executable} "$@"\n')
    staged_python.chmod(0o755)
    archive = tmp_path / "rdhpc-env.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(env_root / "venv", arcname="venv")
    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "slurm" / "clusters" / "local.yaml").read_text())
    preset["staging"] = {"enabled": True, "archive": str(archive), "dest": str(local / "stage"),
                         "python": "venv/bin/python"}
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    (clusters / "staged.yaml").write_text(yaml.safe_dump(preset))
    fake_bin = tmp_path / "bin"  # counts the unpacks: a tar that logs its host, then runs the real one
    fake_bin.mkdir()
    (fake_bin / "tar").write_text(f'#!/bin/sh\necho "$(hostname)" >> {tmp_path / "unpacks.log"}\nexec /usr/bin/tar "$@"\n')
    (fake_bin / "tar").chmod(0o755)
    env = dict(job_env(tmp_path), RDHPC_CLUSTERS_DIR=str(clusters),
               PATH=os.pathsep.join([str(state / "bin"), str(fake_bin), os.environ["PATH"]]))

    run_dir = tmp_path / "staged-run"
    args = train_args(shards, run_dir, "train.max_steps=4", "train.micro_batch_size=2")
    args[args.index("--cluster") + 1] = "staged"
    done = rdhpc("submit", *args, "--nodes", 2, "--tasks-per-node", 2, "--time", "10", "--wait", "--timeout",
                 JOB_TIMEOUT, env=env)
    job = job_id_of(done.stdout)
    assert f"job {job}: COMPLETED" in done.stdout, done.stdout
    assert sorted((tmp_path / "unpacks.log").read_text().split()) == ["n1", "n2"]  # once per node, 4 tasks
    for node in ("n1", "n2"):
        used = (state / "nodes" / node / "local" / "stage" / "python-used.log").read_text().split("\n")
        assert any(line.startswith(f"{node} {local}/stage/venv/bin/python") for line in used), used
    assert not (local / "stage").exists()  # only the nodes' own folders hold it
    assert "environment staged on 2 node(s)" in (run_dir / "slurm" / f"{job}_0_log.out").read_text()

    (tmp_path / "unpacks.log").unlink()
    archive.write_bytes(b"not a tar archive")
    broken = tmp_path / "broken-run"
    args = train_args(shards, broken, "train.max_steps=4", "train.micro_batch_size=2")
    args[args.index("--cluster") + 1] = "staged"
    failed = rdhpc("submit", *args, "--nodes", 2, "--tasks-per-node", 2, "--time", "10", "--wait", "--timeout",
                   JOB_TIMEOUT, env=env, check=False)
    job = job_id_of(failed.stdout)
    assert failed.returncode != 0 and f"job {job}: FAILED" in failed.stdout, failed.stdout
    log = (broken / "slurm" / f"{job}_0_log.err").read_text() + (broken / "slurm" / f"{job}_0_log.out").read_text()
    assert "node-local staging failed at unpacking" in log and "no rank was started" in log, log[-2000:]
    assert not (broken / "metrics.jsonl").exists() and not (broken / "heartbeat").exists()
    shutil.rmtree(state / "nodes" / "n1" / "local" / "stage", ignore_errors=True)
    shutil.rmtree(state / "nodes" / "n2" / "local" / "stage", ignore_errors=True)


def test_a_network_slower_than_the_preset_expects_stops_the_job_at_start(tmp_path, shards, multi_node_cluster):
    """A preset's min_busbw_gbps (RDHPC_MIN_BUSBW_GBPS in the job): a 2-node job whose pre-flight
    all-reduce is below it stops before step 1 on every rank, naming the likely cause; on one node
    nothing is checked (its all-reduce never touches the network)."""
    from rdhpc.distributed.preflight import network_problem

    run_dir = tmp_path / "slow-net"
    env = job_env(tmp_path)
    cache = multi_node_cluster["local"] / "miopen-cache"  # a preset's node-local cache: each rank makes its own
    done = rdhpc("submit", *train_args(shards, run_dir, "train.max_steps=4"), "--nodes", 2, "--tasks-per-node", 1,
                 "--time", "10", "--env", "RDHPC_MIN_BUSBW_GBPS=100000", "--env", f"MIOPEN_USER_DB_PATH={cache}",
                 "--wait", "--timeout", JOB_TIMEOUT, env=env, check=False)
    job = job_id_of(done.stdout)
    assert f"job {job}: FAILED" in done.stdout, done.stdout
    for task in (0, 1):
        err = (run_dir / "slurm" / f"{job}_{task}_log.err").read_text()
        assert f"rank {task}: pre-flight: the all-reduce of 4 MB between 2 nodes ran at" in err, err[-2000:]
        assert "below the 100000 GB/s the cluster preset expects" in err and "network plugin not loaded" in err
    assert not (run_dir / "metrics.jsonl").exists()
    state = multi_node_cluster["state"]
    assert all((state / "nodes" / node / "local" / "miopen-cache").is_dir() for node in ("n1", "n2"))
    assert "rank 0 imported torch, DeepSpeed and rdhpc in" in (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    one_host = {"ranks": [{"host": "n1"}, {"host": "n1"}], "allreduce": [{"bytes": 1 << 22, "busbw_gbps": 0.1}]}
    assert network_problem(one_host, 100000) is None and network_problem({**one_host, "ranks": [
        {"host": "n1"}, {"host": "n2"}]}, 0) is None


def test_a_time_above_the_partitions_limit_is_warned_at_submission(tmp_path, shards, multi_node_cluster):
    subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=30"], check=True, timeout=30)
    try:
        args = ["submit", *train_args(shards, tmp_path / "run"), "--nodes", 2, "--tasks-per-node", 1, "--dry-run"]
        long = rdhpc(*args, "--time", "60", env=job_env(tmp_path))
        assert "warning: --time 60 min is above the limit of partition debug (30:00, sinfo)" in long.stderr, long.stderr
        assert "warning" not in rdhpc(*args, "--time", "20", env=job_env(tmp_path)).stderr
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=INFINITE"], check=True, timeout=30)
