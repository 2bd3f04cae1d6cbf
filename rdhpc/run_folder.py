"""The files of a run folder (`logging.run_dir`), named in one place.

    RUN_DIR/
      config.yaml          the resolved run config (also inside every checkpoint)
      deepspeed.json       the exact DeepSpeed config the engine was built with
      run_state.json       how the last segment ended: completed, stopped (reason) or failed (error)
      metrics.jsonl        one line per optimizer step (step, loss, lr, depth, time)
      train.log            the main rank's log, every segment appended (RunLog)
      heartbeat/rank{r}.json   per-rank liveness (rdhpc.train.heartbeat)
      tensorboard/         TensorBoard events of the run
      checkpoints/         DeepSpeed checkpoints + rdhpc's state (rdhpc.train.checkpoint)
      eval/                `rdhpc eval` outputs, one folder per checkpoint tag
      COOLDOWN             `touch` it: a trapezoid schedule starts its cool-down at the next step
      slurm/               submitit's scripts, pickles and per-task logs (`rdhpc submit`)
      slurm_jobs.jsonl     one record per submission from this folder (`rdhpc status RUN_DIR`)
      rdhpc.lock           the run's owner while a trainer runs (host, pid, Slurm job): RunLock
      shards_verified.json the shard folders fully verified for this run (data.verify_checksums: once)
      failure_requeues.jsonl  each time the job requeued itself after a failure not its own (why,
                           which host it excluded); failure_claim.JOB.SEGMENT: which rank did it

The trainer, the launcher, `rdhpc status`, export and the demo all reach these files through
RunFolder, so a rename happens here or nowhere.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from rdhpc.errors import UserError

# Unix time at which a run saves a checkpoint and stops (the job's end minus a margin); the Slurm
# scripts export it, the trainer reads it.
STOP_AT_VARIABLE = "RDHPC_STOP_AT"


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    deepspeed_config = property(lambda self: self.root / "deepspeed.json")
    run_state = property(lambda self: self.root / "run_state.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    train_log = property(lambda self: self.root / "train.log")
    heartbeats = property(lambda self: self.root / "heartbeat")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    eval = property(lambda self: self.root / "eval")
    cooldown_request = property(lambda self: self.root / "COOLDOWN")
    slurm = property(lambda self: self.root / "slurm")
    slurm_jobs = property(lambda self: self.root / "slurm_jobs.jsonl")
    lock = property(lambda self: self.root / "rdhpc.lock")
    shards_verified = property(lambda self: self.root / "shards_verified.json")
    failure_requeues = property(lambda self: self.root / "failure_requeues.jsonl")

    def failure_claim(self, job_id: str, segment: int) -> Path:
        """Created with O_EXCL by the one surviving rank that requeues the job after a failure."""
        return self.root / f"failure_claim.{job_id}.{segment}"

    def failure_records(self, job_id: str | None = None) -> list[dict]:
        if not self.failure_requeues.is_file():
            return []
        records = [json.loads(line) for line in self.failure_requeues.read_text().splitlines() if line.strip()]
        return [r for r in records if job_id is None or str(r.get("job_id")) == str(job_id)]

    def read_run_state(self) -> dict:
        """The last run_state.json, {} when there is none (or it cannot be read)."""
        try:
            return json.loads(self.run_state.read_text())
        except (OSError, ValueError):
            return {}

    def write_run_state(self, state: str, step: int, **details) -> None:
        """Atomically (another process may read it at any moment)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.run_state.with_name(self.run_state.name + ".tmp")
        tmp.write_text(json.dumps({"state": state, "step": step, "time": time.time(), **details}))
        os.replace(tmp, self.run_state)

    def metrics_lines(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


class RunLockError(UserError):
    """The run folder belongs to another trainer that may still be running."""


def _process_start(pid: int) -> str | None:
    """The start time of a running process (Linux, field 22 of /proc/PID/stat): a pid reused by
    another process has another start time. None when the process is gone, a zombie included: a
    rank killed with its launcher stays a zombie until it is reaped, but it runs no more."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # state: zombie or dead
        return None
    return fields[19]


class RunLock:
    """The owner of a run folder: a file created with O_CREAT | O_EXCL (atomic on local file
    systems, Lustre and NFSv3+) holding host, pid, process start time and Slurm job. A second
    trainer on the same folder is refused, naming the holder. The lock is taken over only when its
    holder is provably gone: a process of this host that no longer exists, or an earlier segment of
    this same Slurm job (a requeue starts a segment only after the last one ended)."""

    def __init__(self, folder: RunFolder):
        self.path = folder.lock
        self.held = False

    @staticmethod
    def _record() -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
                "job_id": os.environ.get("SLURM_JOB_ID"), "segment": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                "since": time.time()}

    def _holder(self) -> dict | None:
        for _ in range(20):  # a lock being written right now: its content follows within moments
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                time.sleep(0.05)
        return {}

    @staticmethod
    def gone(holder: dict, me: dict) -> str | None:
        """Why the holder cannot be running any more, or None when that cannot be proven."""
        if holder.get("job_id") and holder.get("job_id") == me["job_id"] and holder.get("segment", 0) < me["segment"]:
            return f"segment {holder.get('segment', 0) + 1} of this Slurm job {me['job_id']} ended"
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            start = _process_start(holder["pid"])
            if start is None:
                return f"process {holder['pid']} no longer exists"
            if holder.get("pid_start") and start != holder["pid_start"]:
                return f"process {holder['pid']} no longer exists (its pid is another process's now)"
        return None

    @staticmethod
    def describe(holder: dict) -> str:
        job = f", Slurm job {holder['job_id']} segment {holder.get('segment', 0) + 1}" if holder.get("job_id") else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if holder.get("since") else "?"
        return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {since}"

    def acquire(self, log=print) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = self._record()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                reason = self.gone(holder, me)
                if reason is None:
                    raise RunLockError(
                        f"{self.path.parent}: the run folder is in use by another trainer ({self.describe(holder)}; "
                        f"{self.path}). Two trainers on one run would interleave its checkpoints and metrics. "
                        f"Stop that run first; if it is gone for certain (e.g. its node died), delete {self.path}.")
                log(f"[train] taking over the run folder's lock from {self.describe(holder)}: {reason}")
                tmp = self.path.with_name(f"{self.path.name}.{me['host']}.{me['pid']}")
                tmp.write_text(json.dumps(me))
                os.replace(tmp, self.path)
                if self._holder() == me:
                    self.held = True
                    return
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise RunLockError(f"{self.path}: could not take the run folder's lock (other trainers keep taking it)")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False
