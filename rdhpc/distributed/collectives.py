"""The few small collectives the trainer's components agree with: values summed or averaged over the
ranks, and flags that are true everywhere once one rank raises them (a signal, a file, a failure seen
by one rank must be acted on by all at the same step). Each is one all-reduce."""

from __future__ import annotations

import torch


def sum_over_ranks(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    return [v / dist.get_world_size() for v in sum_over_ranks(values, device)]


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag true on every rank if it is true on one."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


# What gloo and NCCL say when a peer died, froze or timed out (gloo raises plain RuntimeErrors).
_COLLECTIVE_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                               "gloo/transport", "Timed out", "timed out", "NCCL", "ProcessGroup")


def is_collective_failure(exc: BaseException) -> bool:
    """A failure of the process group (a peer gone, a timeout), not of this rank's own code."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _COLLECTIVE_FAILURE_MARKERS)


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(items))
    return [item for part in everyone for item in part]
