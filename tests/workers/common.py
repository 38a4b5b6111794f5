"""What the multi-process workers share: digests to compare ranks and runs, and an all-reduce counting hook."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes, in order: equal digests mean bitwise-equal tensors."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def params_digest(model: torch.nn.Module) -> str:
    # Parameters only: DDP re-broadcasts buffers (BatchNorm statistics) from rank 0 at each forward.
    return tensors_digest(model.parameters())


class CountingState:
    """Comm-hook state that counts the gradient elements handed to all-reduce."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.elements = 0


def counting_allreduce_hook(state: CountingState, bucket):
    state.elements += bucket.buffer().numel()
    return default_hooks.allreduce_hook(state.process_group, bucket)
