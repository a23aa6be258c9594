"""Which hosts a process group's ranks run on: the peer-memory tiers (FlashInfer's one/two-shot
kernels, torch symmetric memory) need every rank of a group on one host, so a group that spans
hosts keeps NCCL.

A group's hosts are learned inside that group only, when a traced graph of the model holds one of
its all-reduces: every rank of the group runs that collective in the same call, so every rank
takes part in the exchange too. Nothing is exchanged over any other group (a wrapper used on one
rank alone, or one per pipeline stage, never waits for ranks that do not call it). A single-rank
group needs no exchange.
"""

from __future__ import annotations

import hashlib
import socket

import torch

from rangedispatch import torch_internals

_hosts: dict[str, int] = {}  # group name -> how many hosts its ranks live on


def hosts_of_group(group_name: str) -> int:
    """How many hosts the ranks of a process group live on: a collective over that group the first
    time it is asked for (each rank asks while tracing the same call)."""
    known = _hosts.get(group_name)
    if known is not None:
        return known
    import torch.distributed as dist

    group = torch_internals.resolve_process_group(group_name)
    if dist.get_world_size(group) < 2:
        count = 1
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        digest = hashlib.sha256(socket.gethostname().encode()).digest()[:8]
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        count = len({int(t.item()) for t in every})
    _hosts[group_name] = count
    return count
