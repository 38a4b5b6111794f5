"""`FixedShardSampler`: a distributed sampler that keeps each rank's shard of the dataset fixed across epochs, so
that the examples a rank cached (activation caching) come back to it."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FixedShardSampler"]


class FixedShardSampler(torch.utils.data.Sampler[int]):
    """
    A `DistributedSampler` for activation caching: each rank keeps the same shard of the dataset every epoch and
    shuffles within it (`set_epoch`), so the examples it cached come back to it.

    Each rank caches the examples it sees. `DistributedSampler` (and Accelerate's sharding of a shuffled loader)
    deals a new random share of the dataset to each rank every epoch: an example a rank cached is in its share again
    with probability 1/world_size, and a batch of B examples is whole in its cache with probability about
    (1/world_size)^B: almost never. Keeping the shards fixed makes every batch after the first epoch a hit; the cost
    is that an example only ever meets the examples of its own shard in a rank's batch (the global batch still mixes
    all shards).

    Args:
        dataset (`Sized`): the dataset (only its length is used).
        num_replicas (`int`, *optional*): the world size (default: the process group's).
        rank (`int`, *optional*): this process's rank (default: the process group's).
        seed (`int`, *optional*, defaults to 0): seeds the shards (fixed for the run) and each epoch's shuffle.
        drop_last (`bool`, *optional*, defaults to `False`): drop the tail so that shards are equal, instead of
            repeating examples as `DistributedSampler` does.

    Example:

    ```python
    >>> from hf_layer_freeze.activation_cache import FixedShardSampler
    >>> sampler = FixedShardSampler(range(10), num_replicas=2, rank=1, seed=0)
    >>> first = list(sampler); sampler.set_epoch(1); second = list(sampler)
    >>> sorted(first) == sorted(second) and len(first) == 5
    True

    ```
    """

    def __init__(
        self, dataset: Any, num_replicas: int | None = None, rank: int | None = None, seed: int = 0, drop_last=False
    ) -> None:
        import torch.distributed as dist

        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if (
            not isinstance(num_replicas, int)
            or num_replicas < 1
            or not isinstance(rank, int)
            or not 0 <= rank < num_replicas
        ):
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank!r}, num_replicas={num_replicas!r}")
        size = len(dataset)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        per_rank = size // num_replicas if drop_last else -(-size // num_replicas)
        order = (order * 2)[: per_rank * num_replicas] if not drop_last else order[: per_rank * num_replicas]
        self.shard = order[rank::num_replicas]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the shard differently in epoch `epoch` (the shard itself stays)."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        return iter([self.shard[i] for i in torch.randperm(len(self.shard), generator=generator).tolist()])

    def __len__(self) -> int:
        return len(self.shard)
