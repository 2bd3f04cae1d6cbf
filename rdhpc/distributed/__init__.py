"""Process-group plumbing: who am I among the ranks (ranks.py). Never imported by the model."""

from rdhpc.distributed.ranks import RankInfo, discover_ranks

__all__ = ["RankInfo", "discover_ranks"]
