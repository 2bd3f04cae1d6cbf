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


def requeue_job(job_id: str) -> None:
    """`scontrol requeue`: returns once slurmctld has taken the job back, so the job cannot end as
    COMPLETED meanwhile. A refused requeue is an error (the job ends FAILED with the reason)."""
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {done.stderr.strip() or done.stdout.strip()}")


# ---- what runs in the job ---------------------------------------------------------------------
def current_segment() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1


def prepare_rank(max_segments: int):
    """This task's ranks and the process-group environment; rank 0 logs where the job meets."""
    from rdhpc.distributed.ranks import discover_ranks, export_process_group_env

    ranks = discover_ranks()
    values = export_process_group_env(ranks)
    segment = current_segment()
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
        from rdhpc.config import load_config
        from rdhpc.train.trainer import train

        ranks, segment = prepare_rank(self.max_segments)
        run = load_config(self.config_path)
        result = train(run, ranks, log=_job_log)
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
