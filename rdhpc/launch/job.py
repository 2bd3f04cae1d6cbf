"""The job side of Slurm: what runs inside an allocation, once per task.

    TrainTask(config_path, max_segments)()   one training segment on this task (submitit pickles it)
    CommandTask(["prep", "shards", ...])()   a prep stage on this task
    decide_requeue(end, segment, max_segments)   the one rule for "requeue or not", also used by the
                                             plain sbatch templates (rdhpc.launch.templates)

Each task finds its rank from the launcher's variables (rdhpc.distributed.ranks) and the rendezvous
from the first node of the allocation, never from an address it happens to see. The requeue
decision is taken from how the segment ended, by rank 0 only, as submitit's job environment does:

- completed: the job ends; nothing to requeue.
- stopped by the time budget or Slurm's USR2 warning: rank 0 requeues the job (`scontrol requeue`),
  which keeps its id and resumes from the latest complete checkpoint, until slurm.max_segments;
- stopped by SIGTERM (scancel, the hard limit, a preemption with a grace time): Slurm is ending the
  job and requeues it by its own rules; a requeue from here would fight a scancel;
- stopped before its first step: not requeued (it would loop until max_segments): an error.

A segment can also fail (decide_failure_requeue): when a collective broke because a peer died,
froze or its node vanished, and the heartbeats show no rank that failed on its own error, the
first surviving rank to claim it requeues the job, excluding the host at fault when the silent
ranks were all on one, at most slurm.max_failure_requeues times per job, and records why in
RUN_DIR/failure_requeues.jsonl. A config error, a bad shard, a NaN stop or a rank's own exception
ends the job as before: another segment would fail the same way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass


def _job_log(*args, **kwargs):
    kwargs.setdefault("flush", True)
    print(*args, **kwargs)


# ---- the requeue rule -------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentEnd:
    """How one training segment ended, as the job sees it (the trainer's result, or the run folder's
    run_state.json for a plain sbatch script)."""

    state: str  # "completed", "stopped", "failed" or "unknown"
    step: int | None = None
    start_step: int | None = None  # the step the segment started from (its resume point); None: unknown
    terminated: bool = False  # some rank got SIGTERM: Slurm itself is ending the job
    reason: str | None = None

    @classmethod
    def from_run_state(cls, state: dict) -> "SegmentEnd":
        return cls(state.get("state", "unknown"), state.get("step"), state.get("start_step"),
                   bool(state.get("terminated")), state.get("reason"))


# What the job does after a segment: end normally, fail, requeue itself, or leave it to Slurm.
DONE, FAIL, REQUEUE, LEAVE_TO_SLURM = "done", "fail", "requeue", "leave to slurm"


@dataclass(frozen=True)
class RequeueDecision:
    action: str  # DONE, FAIL, REQUEUE or LEAVE_TO_SLURM
    reason: str

    @property
    def requeue(self) -> bool:
        return self.action == REQUEUE


def decide_requeue(end: SegmentEnd, segment: int, max_segments: int) -> RequeueDecision:
    """Requeue or not, and why: a pure function of how the segment ended and the limits."""
    if end.state == "completed":
        return RequeueDecision(DONE, f"run completed at step {end.step}: not requeued")
    if end.state != "stopped":
        return RequeueDecision(DONE, f"run {end.state} at step {end.step}: not requeued")
    if end.start_step is not None and end.step is not None and end.step <= end.start_step:
        # Requeueing a segment that trained nothing would loop until max_segments: the time budget
        # is shorter than start-up, or a stop request arrives at every start.
        return RequeueDecision(FAIL, f"segment {segment} stopped before its first step ({end.reason}); not "
                                     f"requeued: is slurm.time shorter than start-up plus slurm.stop_margin_s?")
    if segment >= max_segments:
        return RequeueDecision(DONE, f"stopped at step {end.step} after {segment} segment(s): slurm.max_segments "
                                     f"= {max_segments} reached, not requeued")
    if end.terminated:
        return RequeueDecision(LEAVE_TO_SLURM, f"stopped ({end.reason}): Slurm is ending the job itself (scancel, "
                                               f"time limit, or a preemption it requeues by its own rules); "
                                               f"checkpoint saved, no requeue from here")
    return RequeueDecision(REQUEUE, f"stopped at step {end.step} ({end.reason or 'stop requested'})")


@dataclass(frozen=True)
class FailureDecision:
    requeue: bool
    reason: str
    exclude: str | None = None  # the host to leave out of the next segment


def decide_failure_requeue(silent: list[dict], failed: list[dict], failures_so_far: int, max_failures: int,
                           segment: int, max_segments: int, my_host: str | None = None) -> FailureDecision:
    """After a broken collective: requeue (and exclude which host), or let the job fail. `silent`
    and `failed`: the heartbeats' suspects ({rank, host, text} each), as rdhpc.train.heartbeat
    finds them; a pure function of them and the limits."""
    if failed:
        return FailureDecision(False, f"{failed[0]['text']} failed on its own: not requeued (another segment "
                                      f"would fail the same way)")
    if not silent:
        return FailureDecision(False, "a collective failed but every peer's heartbeat is alive: not requeued")
    if failures_so_far >= max_failures:
        return FailureDecision(False, f"slurm.max_failure_requeues = {max_failures} reached ({failures_so_far} "
                                      f"failure requeue(s) of this job): not requeued")
    if segment >= max_segments:
        return FailureDecision(False, f"slurm.max_segments = {max_segments} reached: not requeued")
    hosts = sorted({s["host"] for s in silent if s.get("host")})
    exclude = hosts[0] if len(hosts) == 1 and hosts[0] != my_host and all(s.get("host") for s in silent) else None
    who = "; ".join(s["text"] for s in silent[:4])
    return FailureDecision(True, f"{who} (failure requeue {failures_so_far + 1} of {max_failures}"
                                 + (f", {exclude} excluded" if exclude else "") + ")", exclude)


def requeue_after_failure(exc, run, ranks, segment: int, max_segments: int) -> bool:
    """The failure path of a training segment whose collective broke under it (PeerFailure):
    decide from the heartbeats' suspects, and let one surviving rank requeue. True if requeued."""
    from rdhpc.run_folder import RunFolder

    job_id = os.environ.get("SLURM_JOB_ID")
    folder = RunFolder(run.logging.run_dir)
    suspects = exc.suspects
    decision = decide_failure_requeue(suspects.silent, suspects.failed, len(folder.failure_records(job_id)),
                                      run.slurm.max_failure_requeues, segment, max_segments, socket.gethostname())
    if not decision.requeue:
        _job_log(f"[slurm] rank {ranks.rank}: {decision.reason}", file=sys.stderr)
        return False
    claim_and_requeue(folder, job_id, segment, ranks.rank, decision)
    return True


def claim_and_requeue(folder, job_id: str, segment: int, rank, decision: FailureDecision) -> None:
    """The first rank (or task guard) to create the segment's claim file (O_EXCL) requeues the job,
    excludes the host at fault and records why; any other only says so."""
    import json
    import time

    try:
        os.close(os.open(folder.failure_claim(job_id, segment), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        _job_log(f"[slurm] rank {rank}: job {job_id} is requeued by another rank after the failure")
        return
    _job_log(f"[slurm] rank {rank} on {socket.gethostname()}: segment {segment} failed: {decision.reason}: "
             f"requeueing job {job_id}", file=sys.stderr)
    record = {"job_id": job_id, "segment": segment, "rank": rank, "host": socket.gethostname(),
              "reason": decision.reason, "exclude": decision.exclude, "time": time.time()}
    try:
        requeue_job(job_id)
    except RuntimeError as exc:  # Slurm took the job back meanwhile (its own requeue, a scancel)
        _job_log(f"[slurm] rank {rank}: not requeued: {exc}", file=sys.stderr)
        return
    with open(folder.failure_requeues, "a") as f:
        f.write(json.dumps(record) + "\n")
    if decision.exclude:
        exclude_node(job_id, decision.exclude)


def exclude_node(job_id: str, node: str, timeout: float = 60) -> None:
    """Leave `node` out of the requeued job's next segment. slurmctld refuses the update while the
    job is still completing its last segment, so it is retried until the job is pending again."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={node}"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            _job_log(f"[slurm] job {job_id}: {node} excluded from the next segment")
            return
        if time.monotonic() > deadline:
            _job_log(f"[slurm] could not exclude {node} from job {job_id}: "
                     f"{done.stderr.strip() or done.stdout.strip() or f'scontrol exited {done.returncode}'}",
                     file=sys.stderr)
            return
        time.sleep(0.5)


def requeue_job(job_id: str) -> None:
    """`scontrol requeue`: returns once slurmctld has taken the job back, so the job cannot end as
    COMPLETED meanwhile. A refused requeue is an error (the job ends FAILED with the reason)."""
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {done.stderr.strip() or done.stdout.strip()}")


# ---- what runs in the job ---------------------------------------------------------------------
# Cache folders of MIOpen, Triton and torch.compile that a preset may put on node-local disk
# (OLCF: "Needed to bypass MIOpen, Disk I/O Errors"): they must exist on every node.
NODE_LOCAL_CACHES = ("MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")

def current_segment() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1


def prepare_rank(max_segments: int):
    """This task's ranks and the process-group environment; rank 0 logs where the job meets."""
    from rdhpc.distributed.ranks import discover_ranks, export_process_group_env

    ranks = discover_ranks()
    values = export_process_group_env(ranks)
    segment = current_segment()
    for name in NODE_LOCAL_CACHES:  # a preset points them at node-local disk; every rank makes its own
        if os.environ.get(name):
            os.makedirs(os.environ[name], exist_ok=True)
    if ranks.is_main:
        try:
            address = socket.gethostbyname(values["MASTER_ADDR"])
        except OSError as exc:
            address = f"unresolved: {exc}"
        _job_log(f"[slurm] job {os.environ.get('SLURM_JOB_ID')} segment {segment}/{max_segments}: "
                 f"{ranks.world_size} rank(s) ({ranks.launcher}), rendezvous {values['MASTER_ADDR']}:"
                 f"{values['MASTER_PORT']} ({address}), this rank on {socket.gethostname()}")
    fault = os.environ.get("RDHPC_FAULT_FAIL_RANK")  # drills and tests: this rank fails at start
    if fault and int(fault) == ranks.rank:
        raise RuntimeError(f"rank {ranks.rank}: failing on purpose (RDHPC_FAULT_FAIL_RANK={fault})")
    return ranks, segment


def end_segment(ranks, decision: RequeueDecision):
    """Rank 0 requeues the job (unless Slurm is ending it itself); then every rank exits without a
    result, so the submitter (submitit's job.result(), `rdhpc submit --wait`) keeps waiting for the
    next segment. The other ranks' early exit (status 0) does not end the step while rank 0 runs."""
    job_id = os.environ["SLURM_JOB_ID"]
    if ranks.is_main and decision.requeue:
        _job_log(f"[slurm] {decision.reason}: requeueing job {job_id} for the next segment")
        requeue_job(job_id)
    elif ranks.is_main:
        _job_log(f"[slurm] {decision.reason}")
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(0)  # not an Exception: submitit writes no result for this segment


class TrainTask:
    """The callable submitit pickles: one training segment per call, on every task."""

    def __init__(self, config_path: str, max_segments: int):
        self.config_path = str(config_path)
        self.max_segments = max_segments

    def __call__(self) -> dict:
        import time

        started = time.perf_counter()
        from rdhpc.config import load_config
        from rdhpc.train.trainer import PeerFailure, train  # torch and DeepSpeed: seconds from a shared file system

        imports_s = time.perf_counter() - started
        ranks, segment = prepare_rank(self.max_segments)
        if ranks.is_main:
            _job_log(f"[slurm] rank 0 imported torch, DeepSpeed and rdhpc in {imports_s:.1f} s (every rank reads "
                     f"them; node-local staging, --staging, takes that off the shared file system)")
        run = load_config(self.config_path)
        try:
            result = train(run, ranks, log=_job_log)
        except PeerFailure as exc:
            if requeue_after_failure(exc, run, ranks, segment, self.max_segments):
                sys.stdout.flush()
                sys.stderr.flush()
                raise SystemExit(0) from None  # Slurm ends this segment; the next one resumes
            raise
        summary = {"rank": ranks.rank, "segment": segment, "step": result.step, "completed": result.completed,
                   "stop_reason": result.stop_reason, "last_loss": result.losses[-1] if result.losses else None}
        end = SegmentEnd("completed" if result.completed else "stopped", result.step,
                         result.step - len(result.losses), result.terminated, result.stop_reason)
        decision = decide_requeue(end, segment, self.max_segments)
        if decision.action == FAIL:
            raise RuntimeError(f"rank {ranks.rank}: {decision.reason}")
        if decision.action == DONE:
            if ranks.is_main and not result.completed:
                _job_log(f"[slurm] {decision.reason}")
            return summary
        end_segment(ranks, decision)

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption/timeout path (a signal before the trainer took over): requeue the
        same task; it resumes from the latest complete checkpoint, and nothing was trained since."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainTask(self.config_path, self.max_segments))


class CommandTask:
    """A prep stage on every task: `rdhpc prep STAGE ARGS...`; the stage splits its work by rank."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        import argparse

        from data_prep.cli import add_prep_parser

        ranks, _ = prepare_rank(1)
        parser = argparse.ArgumentParser(prog="rdhpc")  # data_prep's own parser: no import of the rdhpc CLI
        add_prep_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(self.argv)
        status = args.func(args)  # exceptions propagate: submitit records them as this task's error
        if status:
            raise RuntimeError(f"rank {ranks.rank}: rdhpc {' '.join(self.argv)} exited with status {status}")
        return status or 0
