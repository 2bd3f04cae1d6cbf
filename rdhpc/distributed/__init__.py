"""Process-group plumbing: who am I among the ranks and where is the rendezvous (ranks.py), the
start-of-job health check (preflight.py). Never imported by the model."""

from rdhpc.distributed.ranks import (RankInfo, backend_for, discover_ranks, expand_hostlist,
                                     export_process_group_env, master_address)

__all__ = ["RankInfo", "discover_ranks", "master_address", "export_process_group_env", "expand_hostlist",
           "backend_for"]
