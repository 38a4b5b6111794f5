"""How activation caching keys a batch's examples (the exact bytes of every input tensor of each example) and takes
the rows of a batch that a sub-batch needs."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UNKEYED_INPUTS", "batch_size", "example_keys", "take_rows"]

# Inputs that never reach the frozen prefix, so they are not part of an example's key.
UNKEYED_INPUTS = ("labels",)


def take_rows(value: Any, batch: int, select: torch.Tensor) -> Any:
    """`value` with every tensor of at least 2 dimensions whose first is the batch indexed by `select`."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, select.to(value.device)) if value.ndim >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(take_rows(v, batch, select) for v in value)
    if isinstance(value, list):
        return [take_rows(v, batch, select) for v in value]
    if isinstance(value, dict):
        return {k: take_rows(v, batch, select) for k, v in value.items()}
    return value


def batch_size(args: tuple, kwargs: dict) -> int:
    """The batch size `example_keys` would find (0 when the forward has no batched tensor input), without keying."""
    for value in (*args, *(v for k, v in sorted(kwargs.items()) if k not in UNKEYED_INPUTS)):
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return value.shape[0]
    return 0


def example_keys(args: tuple, kwargs: dict) -> tuple[list[bytes], int, tuple] | None:
    """
    Per example, the exact bytes of every input tensor (name, dtype and shape included), the batch size, and the
    batch's signature (names, per-example shapes and dtypes). `None` when the forward has no batched tensor input.
    """
    named = [(f"arg{i}", v) for i, v in enumerate(args)] + sorted(kwargs.items())
    tensors = [(n, v) for n, v in named if isinstance(v, torch.Tensor) and v.ndim >= 1 and n not in UNKEYED_INPUTS]
    if not tensors:
        return None
    batch = tensors[0][1].shape[0]
    tensors = [(n, v) for n, v in tensors if v.shape[0] == batch]
    signature = tuple((n, tuple(v.shape[1:]), str(v.dtype)) for n, v in tensors)
    host = [v.detach().to("cpu").contiguous() for _, v in tensors]
    header = repr(signature).encode()
    keys = [header + b"".join(_row_bytes(t, row) for t in host) for row in range(batch)]
    return keys, batch, signature


def _row_bytes(tensor: torch.Tensor, row: int) -> bytes:
    """The exact bytes of one example of a contiguous host tensor, whatever its dtype (bfloat16 included)."""
    return tensor[row : row + 1].reshape(-1).view(torch.uint8).numpy().tobytes()
