"""What the adaptive schedule measures: each unit's gradient norm, at every optimizer step.

`GradientNormTracker` is a step pre-hook on the optimizer (the torch optimizer inside Accelerate's wrapper), so it
sees the gradients the optimizer is about to apply, in the Trainer and in custom loops alike: after gradient
accumulation, after clipping, unscaled by a `GradScaler` (whose skipped steps it does not see). It adds each unit's
gradient norm to a running sum on the gradients' device (one `torch._foreach_norm` per step: no host sync) and
hands out the mean over the steps since the last check. Under `torch.distributed` the sums are all-reduced at each
check, so every rank takes the same decision (with sharded gradients, FSDP, the summed per-shard norms are not the
full norms: not tested, not claimed). Its state is plain Python numbers,
so it goes into the Trainer's JSON checkpoint state and a resumed run decides exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .param_groups import unwrap_optimizer
from .units import FreezableUnit

__all__ = ["GradientNormTracker"]


class GradientNormTracker:
    """
    Sums each unit's gradient norm over the optimizer steps between two checks.

    Args:
        optimizer (`torch.optim.Optimizer`):
            The optimizer, raw or wrapped by Accelerate.
        units (`Callable[[], list[FreezableUnit]]`):
            The units, in their current order (which `order="execution"` may set after construction).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, units: Callable[[], list[FreezableUnit]]) -> None:
        self._units = units
        self._sums: torch.Tensor | None = None
        self.steps = 0
        self.previous: list[float] | None = None  # the means at the last check
        self.last_changes: list[float] = []  # relative changes of the trainable units at the last check
        self._handle = unwrap_optimizer(optimizer).register_step_pre_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads: list[torch.Tensor] = []
        owners: list[int] = []
        for index, unit in enumerate(self._units()):
            for param in unit.parameters:
                if param.grad is not None:
                    grads.append(param.grad)
                    owners.append(index)
        if not grads:
            return
        squares = torch.stack([norm.float() for norm in torch._foreach_norm(grads)]) ** 2
        if self._sums is None:
            self._sums = torch.zeros(len(self._units()), device=squares.device)
        per_unit = torch.zeros_like(self._sums).index_add_(0, torch.tensor(owners, device=squares.device), squares)
        self._sums += per_unit.sqrt()
        self.steps += 1

    def interval_means(self) -> list[float] | None:
        """The mean gradient norm of each unit since the last check (0 for frozen units), then start a new interval.
        `None` when no step was recorded. Every rank must call it at the same step."""
        if self.steps == 0 or self._sums is None:
            return None
        sums = self._sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.clone()
            dist.all_reduce(sums)  # every rank decides on the same numbers
        means = (sums / self.steps).tolist()
        self._sums.zero_()
        self.steps = 0
        return means

    def close(self) -> None:
        """Remove the optimizer hook."""
        self._handle.remove()

    def state_dict(self) -> dict[str, Any]:
        """The running sums, the step count and the last check's means, as JSON-safe numbers."""
        return {
            "steps": self.steps,
            "sums": None if self._sums is None else self._sums.tolist(),
            "previous": self.previous,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (float32 sums round-trip exactly through Python floats)."""
        self.steps = int(state.get("steps", 0))
        sums = state.get("sums")
        if sums is not None:
            device = self._sums.device if self._sums is not None else _parameters_device(self._units())
            self._sums = torch.tensor(sums, dtype=torch.float32, device=device)
        previous = state.get("previous")
        self.previous = None if previous is None else [float(v) for v in previous]


def _parameters_device(units: list[FreezableUnit]) -> torch.device:
    for unit in units:
        for param in unit.parameters:
            return param.device
    return torch.device("cpu")
