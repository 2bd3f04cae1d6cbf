"""The guard of one training task: srun starts it, it starts the rank as its child and outlives it.

    srun ... PYTHON -m rdhpc.launch.guard --run-dir RUN --max-failure-requeues 3 --max-segments 32 \
        -- PYTHON -u -m submitit.core._submit FOLDER

A rank that dies by SIGKILL or SIGBUS (the OOM killer, a GPU fault, `kill -9`, a memory error)
or is ended by its own watchdog (no progress: rdhpc.train.heartbeat) cannot ask for anything itself, and srun's
--kill-on-bad-exit then ends its peers within moments: the guard, still alive, is the one that
requeues the job (rdhpc.launch.job.decide_failure_requeue: not the run's fault; at most
slurm.max_failure_requeues per job; this host excluded from the next segment), records why in the
run folder, and exits with the rank's status. A rank that exits with its own error (a config
error, a bad shard, a NaN stop, a bug: statuses 1 and 2) is never requeued. Signals that Slurm
sends to the task (USR2 before the time limit, TERM, CONT) reach the rank directly (it shares the
guard's process group); the guard waits for its child, and once it got SIGTERM itself (Slurm is
ending the job: scancel, a requeue, the time limit) it requeues nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys


# Signals that end a rank without its code's doing or Slurm's: the OOM killer's (or a kill -9, or
# a GPU fault's) SIGKILL and a hardware memory error's SIGBUS. SIGTERM is Slurm ending the job
# (scancel, a requeue, the time limit): never a reason to requeue from here.
MACHINE_SIGNALS = (signal.SIGKILL, signal.SIGBUS)


def rank_failure(returncode: int) -> str | None:
    """Why an exit status means the machines failed the rank, or None when it is the rank's own."""
    from rdhpc.train.heartbeat import STALL_EXIT_STATUS

    if returncode < 0 and -returncode in MACHINE_SIGNALS:
        return f"was killed by {signal.Signals(-returncode).name}"
    if returncode == STALL_EXIT_STATUS:
        return "was ended by its watchdog (no progress: a hung collective or device)"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdhpc.launch.guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--max-failure-requeues", type=int, required=True)
    parser.add_argument("--max-segments", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    ended_by_slurm = []  # Slurm sends SIGTERM to the whole step (the guard too) before it kills it

    def note_termination(signum, frame):
        ended_by_slurm.append(signum)

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, note_termination)
    child = subprocess.Popen(command, restore_signals=True,
                             preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in
                                                 (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT,
                                                  signal.SIGHUP)])
    while True:
        try:
            returncode = child.wait()
            break
        except InterruptedError:
            continue
    why = rank_failure(returncode)
    if why is not None and os.environ.get("SLURM_JOB_ID") and not ended_by_slurm:
        requeue_for(why, child.pid, args)
    return returncode if returncode >= 0 else 128 - returncode


def requeue_for(why: str, pid: int, args) -> None:
    from rdhpc.launch.job import claim_and_requeue, current_segment, decide_failure_requeue
    from rdhpc.run_folder import RunFolder

    host, rank = socket.gethostname(), os.environ.get("SLURM_PROCID", "?")
    job_id = os.environ["SLURM_JOB_ID"]
    folder = RunFolder(args.run_dir)
    silent = [{"rank": rank, "host": host, "text": f"rank {rank} (host {host}, pid {pid}) {why}"}]
    decision = decide_failure_requeue(silent, [], len(folder.failure_records(job_id)), args.max_failure_requeues,
                                      current_segment(), args.max_segments)
    print(f"[slurm] guard of rank {rank} on {host}: the rank {why}", file=sys.stderr, flush=True)
    if decision.requeue:
        claim_and_requeue(folder, job_id, current_segment(), rank, decision)
    else:
        print(f"[slurm] {decision.reason}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
