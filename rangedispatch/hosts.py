"""Which host each rank runs on: the peer-memory tiers (FlashInfer's one/two-shot kernels, torch
symmetric memory) need every rank of a group on one host, so a group that spans hosts keeps NCCL.

The hostnames are exchanged once per process, over the default group, on the first traced call
(every rank of a tensor-parallel program makes it).
"""

from __future__ import annotations

import socket
from typing import Optional

_hostnames: Optional[list[str]] = None  # per global rank


def exchange() -> None:
    """Gather every rank's hostname (a collective: call it on all ranks, once)."""
    global _hostnames
    import torch.distributed as dist

    if _hostnames is not None or not (dist.is_available() and dist.is_initialized()):
        return
    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    _hostnames = names


def hosts_of_group(group_name: str) -> int:
    """How many hosts the ranks of a process group live on (1 when unknown)."""
    if _hostnames is None:
        return 1
    from torch.distributed.distributed_c10d import _resolve_process_group, get_process_group_ranks

    ranks = get_process_group_ranks(_resolve_process_group(group_name))
    return len({_hostnames[r] for r in ranks})
