"""`rdhpc launch local CONFIG --nproc N`: N ranks of the trainer on this machine.

Each rank is a process with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free
MASTER_PORT set explicitly (left unset, DeepSpeed tries its own MPI discovery and may pick the
machine's external address). When one rank fails, the others are stopped and the launcher exits
with that rank's status: nothing is left waiting on a dead peer, nothing reports success. The others
get `grace_s` to notice on their own first (a broken collective fails within about a second), so
their own error, naming the rank at fault, reaches the log before they are stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from rdhpc.distributed.ranks import free_port


def threads_per_rank(nproc: int) -> tuple[int, str]:
    """(CPU threads of each rank, where the figure comes from): OMP_NUM_THREADS when the user set
    it, else the cores this process may use shared out (torchrun's rule: ranks that each start as
    many threads as there are cores fight over them; on 2 cores two ranks generating ran 90x
    slower at the default than with one thread each)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc), f"{cores} core(s) shared by {nproc} rank(s)"


def launch_local(command: list[str], nproc: int, log=print, grace_s: float = 10.0) -> int:
    if nproc < 1:
        from rdhpc.errors import UserError

        raise UserError(f"--nproc: must be >= 1, got {nproc}")
    port = free_port()
    threads, source = threads_per_rank(nproc)
    log(f"[launch] {nproc} rank(s) on this machine, {threads} CPU thread(s) each ({source}; set OMP_NUM_THREADS "
        f"to choose)")
    procs = []
    for rank in range(nproc):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_STEP"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen([sys.executable, "-m", "rdhpc.cli", *command], env=env))
    status = 0
    try:
        while procs and any(p.poll() is None for p in procs):
            failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                rank, status = failed[0]
                how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
                log(f"[launch] rank {rank} {how}: stopping the other ranks (they have {grace_s:g} s to "
                    f"exit on their own)", file=sys.stderr)
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.2)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status if status > 0 else (1 if status else 0)
