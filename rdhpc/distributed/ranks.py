"""Rank discovery in one place: torchrun's variables, MPI (mpi4py), or Slurm's, whichever launched
the process; a plain process is rank 0 of 1.

Order matters: torchrun sets RANK/WORLD_SIZE explicitly; an MPI launcher (mpirun/mpiexec of
MPICH or Open MPI, or `srun --mpi=pmi2`) is recognised by its PMI variables and asked through
mpi4py; a Slurm step (srun) by SLURM_STEP_NUM_TASKS. A Slurm *batch script* is not a step: it is one
process even when the job asked for many tasks, so SLURM_NTASKS alone never makes ranks.
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
    if use_mpi and any(name in env for name in _MPI_RANK_VARIABLES):
        from mpi4py import MPI  # imported only under an MPI launcher: it initialises MPI

        comm = MPI.COMM_WORLD
        local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
        return RankInfo(comm.Get_rank(), comm.Get_size(), local_comm.Get_rank(), local_comm.Get_size(), "mpi")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = _int_env("SLURM_STEP_NUM_TASKS", env)
        local_world = _int_env("SLURM_STEP_TASKS_PER_NODE", env) if "SLURM_STEP_TASKS_PER_NODE" in env else world
        return RankInfo(_int_env("SLURM_PROCID", env), world, _int_env("SLURM_LOCALID", env), local_world, "slurm")
    return RankInfo(0, 1, 0, 1, "single")
