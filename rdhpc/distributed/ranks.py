"""Rank discovery in one place: torchrun's variables, MPI (mpi4py), or Slurm's, whichever launched
the process; a plain process is rank 0 of 1.

Order matters: torchrun sets RANK/WORLD_SIZE explicitly; then a Slurm step (srun) is recognised
by SLURM_STEP_NUM_TASKS and SLURM_PROCID, and its variables win, also when `srun --mpi=pmi2` or
`--mpi=pmix` adds PMI_RANK/PMI_SIZE (PMIX_RANK) to every task: they name the same ranks, and
mpi4py is neither needed nor imported. Only when the MPI variables disagree with the step (an MPI
launcher started inside it, e.g. mpirun whose proxies srun started, one per node) or there is no
step (mpirun/mpiexec of MPICH or Open MPI) are the ranks asked of MPI through mpi4py. A Slurm
*batch script* is not a step: it is one process even when the job asked for many tasks, so
SLURM_NTASKS alone never makes ranks.

The rendezvous (master_address, export_process_group_env): an explicit MASTER_ADDR/PORT is kept;
in a Slurm job it is the first node of the allocation with a port derived from the job id (every
rank computes the same, no message); under MPI without Slurm rank 0's host and port are broadcast;
otherwise loopback. Never the machine's external address, which DeepSpeed's own discovery picks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "torchrun", "mpi", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, environ) -> int:
    value = environ.get(name)
    try:
        return int(value.split("(")[0].split(",")[0])  # SLURM_TASKS_PER_NODE looks like "4(x2)"
    except (AttributeError, ValueError):
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def discover_ranks(environ=None, use_mpi: bool = True) -> RankInfo:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env("RANK", env), _int_env("WORLD_SIZE", env)
        local = _int_env("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
        local_world = _int_env("LOCAL_WORLD_SIZE", env) if "LOCAL_WORLD_SIZE" in env else world
        return RankInfo(rank, world, local, local_world, "torchrun")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        step = RankInfo(_int_env("SLURM_PROCID", env), _int_env("SLURM_STEP_NUM_TASKS", env),
                        _int_env("SLURM_LOCALID", env) if "SLURM_LOCALID" in env else 0,
                        _tasks_on_this_node(env), "slurm")
        if _mpi_agrees_with(step, env):
            return step
    if use_mpi and any(name in env for name in _MPI_RANK_VARIABLES):
        try:
            from mpi4py import MPI  # imported only under an MPI launcher: it initialises MPI
        except ImportError:
            found = ", ".join(f"{name}={env[name]}" for name in _MPI_RANK_VARIABLES if name in env)
            raise RuntimeError(f"an MPI launcher started this process ({found}) but mpi4py is not installed: "
                               f"pip install mpi4py, or start the ranks with srun or torchrun") from None
        comm = MPI.COMM_WORLD
        local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
        return RankInfo(comm.Get_rank(), comm.Get_size(), local_comm.Get_rank(), local_comm.Get_size(), "mpi")
    return RankInfo(0, 1, 0, 1, "single")


def _tasks_on_this_node(env) -> int:
    """This node's task count from SLURM_STEP_TASKS_PER_NODE ("4(x2),3": 4 on the first two nodes,
    3 on the third), at index SLURM_NODEID."""
    text = env.get("SLURM_STEP_TASKS_PER_NODE")
    if not text:
        return _int_env("SLURM_STEP_NUM_TASKS", env)
    counts = []
    for part in text.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = _int_env("SLURM_NODEID", env) if "SLURM_NODEID" in env else 0
    if not 0 <= node < len(counts):
        raise RuntimeError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={text!r} names {len(counts)} node(s)")
    return counts[node]


def _mpi_agrees_with(step: RankInfo, env) -> bool:
    """No MPI variables, or ones naming the step's own ranks (srun --mpi=pmi2/pmix)."""
    for rank_name, size_name in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                                 ("PMIX_RANK", None)):
        if rank_name in env and _int_env(rank_name, env) != step.rank:
            return False
        if size_name and size_name in env and _int_env(size_name, env) != step.world_size:
            return False
    return True


def local_device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU a rank takes: LOCAL_RANK among the devices it sees. A task bound to its own GPU
    (srun --gpus-per-task=1 --gpu-bind=closest) sees one, device 0; an unbound one sees the node's."""
    if visible_devices < 1:
        raise RuntimeError(f"local rank {local_rank}: no GPU is visible to this rank (CUDA_VISIBLE_DEVICES / "
                           f"ROCR_VISIBLE_DEVICES, or the job's --gpus-per-node / --gpu-bind)")
    return local_rank % visible_devices


# ---- the rendezvous: master address and port --------------------------------------------------
# Variables a launcher or an earlier process may leave behind. A batch job inherits the submitter's
# environment (sbatch exports it), so a RANK or MASTER_ADDR left by a test or a torchrun shell
# would otherwise be taken for this job's own; the Slurm launcher clears them before the ranks start.
STALE_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "PMI_RANK", "PMI_SIZE",
                        "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                        "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
# Ports derived from the job id stay below Linux's ephemeral range (32768-60999), so a port that a
# client connection picked at random on the master node cannot collide with the rendezvous.
PORT_BASE, PORT_SPAN = 15000, 15000


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list -> names, in order: 'fr[00001-00003,00007],login1' ->
    ['fr00001', 'fr00002', 'fr00003', 'fr00007', 'login1'] (zero padding kept; ranges nest once
    per bracket, as Slurm writes them: 'n[1-2]-ib[3-4]' is expanded as a product)."""
    names: list[str] = []
    for item in _split_top_level(text.strip()):
        names += _expand_item(item)
    return names


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    if depth != 0:
        raise ValueError(f"unbalanced brackets in host list {text!r}")
    return [item for item in items if item]


def _expand_item(item: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, ranges, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    heads = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not high:
            heads.append(prefix + low)
            continue
        width = len(low)
        heads += [prefix + str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    tails = _expand_item(rest) if rest else [""]
    return [h + t for h in heads for t in tails]


def slurm_master(environ=None) -> tuple[str, int] | None:
    """Inside a Slurm job: the first node of the step (or of the job) and a port derived from the
    job id, the same on every rank without any message. None outside Slurm."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = env.get("SLURM_JOB_ID")
    if not nodelist or not job_id:
        return None
    try:
        first = expand_hostlist(nodelist)[0]
    except (ValueError, IndexError):
        import subprocess  # a form this parser does not know: ask Slurm's own (local, no RPC)

        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True)
        first = out.stdout.split()[0]
    return first, PORT_BASE + int(job_id.split("_")[0]) % PORT_SPAN


def master_address(ranks: RankInfo, environ=None) -> tuple[str, int, str]:
    """(address, port, where it came from) of the rendezvous of `ranks`.

    - MASTER_ADDR and MASTER_PORT already set (torchrun, or the user): kept;
    - a Slurm job: the first node of the allocation, port from the job id;
    - MPI without Slurm: rank 0's host name and a free port of rank 0, broadcast;
    - one node (or one process): 127.0.0.1 and a free port (for one process) - never the
      machine's external address, which DeepSpeed's own discovery would pick.
    """
    env = os.environ if environ is None else environ
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return env["MASTER_ADDR"], int(env["MASTER_PORT"]), "environment"
    if ranks.world_size > 1 and ranks.launcher in ("slurm", "mpi"):
        found = slurm_master(env)
        if found is not None:
            return found[0], found[1], "slurm"
    if ranks.launcher == "mpi" and ranks.local_world_size < ranks.world_size:
        import socket

        from mpi4py import MPI

        if ranks.rank == 0:
            mine = (socket.gethostname(), free_port(""))
        else:
            mine = None
        host, port = MPI.COMM_WORLD.bcast(mine, root=0)
        return host, port, "mpi"
    if ranks.world_size > 1 and ranks.launcher == "mpi":
        from mpi4py import MPI

        port = MPI.COMM_WORLD.bcast(free_port() if ranks.rank == 0 else None, root=0)
        return "127.0.0.1", port, "mpi (one node)"
    return "127.0.0.1", free_port() if ranks.world_size == 1 else 29500, "local"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (loopback by default; "" for every interface)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def export_process_group_env(ranks: RankInfo, environ=None) -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for
    torch.distributed / DeepSpeed (which otherwise run their own discovery); return what was set."""
    env = os.environ if environ is None else environ
    address, port, _ = master_address(ranks, env)
    values = {"RANK": str(ranks.rank), "WORLD_SIZE": str(ranks.world_size), "LOCAL_RANK": str(ranks.local_rank),
              "LOCAL_WORLD_SIZE": str(ranks.local_world_size), "MASTER_ADDR": address, "MASTER_PORT": str(port)}
    env.update(values)
    return values


def backend_for(device) -> str:
    """nccl on GPUs (ROCm's RCCL answers to the name nccl), gloo on the CPU."""
    return "nccl" if getattr(device, "type", str(device)) == "cuda" else "gloo"
