"""The memory freezing frees: gradients and optimizer state counted at each event, frozen state moved to the host.

A parameter that freezes loses its gradient (`param_groups.freeze_parameters` sets `.grad = None`) and gets none from
later backward passes: the memory its gradient took is free from the next backward on. Its optimizer state stays in
`optimizer.state` (so that checkpoints keep the full standard layout, and a parameter given back resumes where it
stopped): for AdamW two tensors the size of the parameter, on its device, that no step reads while it is frozen.

`offload_frozen_state=True` moves that state to host memory (pinned when it comes from a CUDA device, so that it
copies back at full speed) when its parameter freezes, and back to the device each tensor came from when the
parameter trains again, and when the freezer gives the model back (`unfreeze()`, `close()`: the Trainer callback's
end of training, with `keep_frozen=True` too, and the exit of `with LayerFreezer(...)`). The copies are exact, and a
frozen parameter's state is read by no optimizer step, so a run with offload is bitwise the run without it. Every
top-level tensor of a frozen parameter's state moves (`exp_avg`, `exp_avg_sq`, `momentum_buffer`, ..., Adam's small
`step` too); values that are not tensors stay as they are.

Checkpoints: `optimizer.state_dict()` (through the freezer's full-layout hooks) holds the same values with offload on
or off, the frozen parameters' state as host tensors. Torch's `Optimizer.load_state_dict` casts every state tensor to
its parameter's device (`_process_value_according_to_param_policy`); a load-state-dict post-hook moves the frozen
parameters' state back to the host right after, so a load (the Trainer's resume, `accelerator.load_state`) neither
keeps it on the device nor loses the offload.

Accounting, with offload on or off: `metrics()` counts (sizes only: no copy, no device synchronization) the bytes of
the model's gradients (`layer_freeze/grad_bytes`: what the trainable parameters' gradients take after a backward,
plus any gradient still stored on a frozen parameter), of the optimizer state left where the optimizer keeps it
(`layer_freeze/optimizer_state_bytes`: on the parameters' devices, save a few scalars such as Adam's `step`), and of
the state offloaded to the host (`layer_freeze/offloaded_state_bytes`); each freeze event logs (INFO) them before and
after it.

Refused with `offload_frozen_state=True`: FSDP (its state is sharded DTensors, saved through torch's distributed
checkpoint; FSDP's own CPU offload moves the whole state instead) and optimizers with train and eval modes
(schedule-free: each switch, at every Trainer step, reads every parameter's state on the parameter's device).
DeepSpeed is refused by the freezer whatever the options.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .events import FreezeEvent
from .param_groups import frozen_param_groups, unwrap_optimizer
from .wrappers import unwrap_model, wrapper_chain

if TYPE_CHECKING:
    from .freezer import LayerFreezer
    from .param_groups import _FrozenParamGroups

logger = logging.getLogger(__name__)

__all__ = ["MemoryCount", "StateOffload"]

HOST = torch.device("cpu")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds (a DTensor's local shard; any other tensor itself)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) and type(tensor).__name__ == "DTensor" else tensor


def _bytes(tensor: torch.Tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of `tensor`, pinned when it comes from a CUDA device. A copy even of a host tensor, so the state
    the listener holds is its own and the path is the same on every device."""
    if tensor.is_cuda:
        host = torch.empty_like(tensor, device=HOST, pin_memory=True)
        host.copy_(tensor)
        return host
    return tensor.to(HOST, copy=True)


@dataclass(frozen=True)
class MemoryCount:
    """
    Bytes of gradients and optimizer state, counted from tensor sizes (see the module docstring).

    Args:
        grad_bytes (`int`): what the trainable parameters' gradients take after a backward (`numel * element_size` of
            each, on its device), plus any gradient stored on a frozen parameter.
        optimizer_state_bytes (`int`): the optimizers' state tensors that are not offloaded.
        offloaded_state_bytes (`int`): the state tensors offloaded to host memory.
        frozen_state_bytes (`int`): the part of `optimizer_state_bytes` that belongs to frozen parameters (what
            `offload_frozen_state=True` would move to the host).
        device_types (`tuple[str, ...]`): the device types of the model's parameters (`"cuda"`, `"cpu"`, ...).
    """

    grad_bytes: int
    optimizer_state_bytes: int
    offloaded_state_bytes: int
    frozen_state_bytes: int
    device_types: tuple[str, ...] = ()

    def metrics(self) -> dict[str, int]:
        """`layer_freeze/grad_bytes`, `layer_freeze/optimizer_state_bytes`, `layer_freeze/offloaded_state_bytes`."""
        return {
            "layer_freeze/grad_bytes": self.grad_bytes,
            "layer_freeze/optimizer_state_bytes": self.optimizer_state_bytes,
            "layer_freeze/offloaded_state_bytes": self.offloaded_state_bytes,
        }


@dataclass
class _Offloaded:
    """One parameter's state on the host: for each key, the host tensor put in `optimizer.state` and the device the
    tensor came from."""

    param: torch.Tensor
    tensors: dict[Any, tuple[torch.Tensor, torch.device]] = field(default_factory=dict)


# The offloaded state of each optimizer, by id(parameter): one book per optimizer, shared by every listener serving
# it, held weakly (it goes with the optimizer).
_BOOKS: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, _Offloaded]] = weakref.WeakKeyDictionary()


def _book(optimizer: torch.optim.Optimizer) -> dict[int, _Offloaded]:
    book = _BOOKS.get(optimizer)
    if book is None:
        book = _BOOKS[optimizer] = {}
    return book


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class StateOffload:
    """
    A freeze listener that counts gradient and optimizer-state bytes at each event and, with `offload=True`, keeps
    the frozen parameters' optimizer state in host memory (see the module docstring).

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped: its parameters' gradients are counted.
        optimizers (`Sequence[torch.optim.Optimizer]`):
            The optimizers the freezer was given: frozen parameters are those taken out of their param groups.
        offload (`bool`, *optional*, defaults to `False`):
            Move the frozen parameters' state to host memory (`offload_frozen_state=True`).

    Raises:
        `NotImplementedError`: with `offload=True`, FSDP, or an optimizer with train and eval modes (schedule-free).

    Example:

    ```python
    >>> import timm, torch
    >>> from hf_layer_freeze import LayerFreezer
    >>> from hf_layer_freeze.state_offload import StateOffload
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> model(torch.randn(2, 3, 32, 32)).sum().backward()
    >>> optimizer.step()  # AdamW's state: two tensors per parameter, and a step count
    >>> freezer = LayerFreezer(model, optimizer, offload_frozen_state=True)
    >>> before = freezer.metrics()["layer_freeze/optimizer_state_bytes"]
    >>> _ = freezer.update(1.0)  # every unit but the head: its state goes to the host
    >>> after = freezer.metrics()
    >>> after["layer_freeze/optimizer_state_bytes"] + after["layer_freeze/offloaded_state_bytes"] == before
    True
    >>> freezer.listener(StateOffload).offloaded_parameters > 0
    True

    ```
    """

    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], offload: bool = False) -> None:
        if not isinstance(offload, bool):
            raise ValueError(f"offload must be True or False, got {offload!r}")
        self.given_model = model
        self.model = unwrap_model(model)
        self.optimizers = [unwrap_optimizer(o) for o in optimizers]
        self._groups: list[_FrozenParamGroups] = [frozen_param_groups(o) for o in self.optimizers]
        self.offload = offload
        self._closed = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if offload:
            self._refuse_unsupported()
            self._handles = [o.register_load_state_dict_post_hook(self._after_load) for o in self.optimizers]

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> StateOffload:
        """Always on (the accounting); moves state with `offload_frozen_state=True`."""
        return cls(freezer.model, freezer.optimizers, offload=freezer.options.offload_frozen_state)

    def _refuse_unsupported(self) -> None:
        from .distributed import is_fsdp_managed

        wrapped = any(is_fsdp_managed(module) for module in wrapper_chain(self.given_model))
        if wrapped or any(_is_dtensor(p) for p in self.model.parameters()):
            raise NotImplementedError(
                "offload_frozen_state=True does not support FSDP: its optimizer state is sharded DTensors, saved and "
                "loaded through torch's distributed checkpoint on the parameters' devices. Use FSDP's own CPU "
                "offload (FSDP2: fully_shard(..., offload_policy=CPUOffloadPolicy()); FSDP1: "
                "CPUOffload(offload_params=True)), or offload_frozen_state=False."
            )
        for optimizer in self.optimizers:
            if any(callable(getattr(optimizer, name, None)) for name in ("train", "eval")):
                raise NotImplementedError(
                    f"offload_frozen_state=True does not support {type(optimizer).__module__}."
                    f"{type(optimizer).__qualname__}: it has train and "
                    "eval modes (a schedule-free optimizer), and each switch, which the Trainer makes at every step, "
                    "reads every parameter's state, frozen ones included, on the parameter's device. Use "
                    "offload_frozen_state=False with it."
                )

    # The listener protocol.
    def on_freeze_event(self, event: FreezeEvent) -> None:
        """Move state to follow the event (with offload), and log the bytes before and after it."""
        if not event.parameters and not self.offload:
            return  # nothing changed (the event announcing the freezer, a new unit order): nothing to count
        before = self.count()
        moved = self.follow_frozen()
        if not event.parameters and not moved:
            return
        after = self.count()
        # The event's parameters lost (or got back) their gradient before this listener was told: a backward gave
        # them one before the event (or will, after it).
        changed = sum(_bytes(p) for p in event.parameters)
        grad_before = after.grad_bytes + (changed if event.frozen else -changed if event.unfrozen else 0)
        hint = ""
        if not self.offload and after.frozen_state_bytes:
            hint = (
                f" (offload_frozen_state=True would move the frozen parameters' {_human(after.frozen_state_bytes)} "
                "of it to the host)"
            )
        logger.info(
            "Freeze event (%d of %d units frozen), on %s: gradients %s -> %s, optimizer state %s -> %s%s, "
            "offloaded to host %s -> %s.",
            event.frozen_units,
            len(event.units),
            "/".join(after.device_types) or "no device",
            _human(grad_before),
            _human(after.grad_bytes),
            _human(before.optimizer_state_bytes),
            _human(after.optimizer_state_bytes),
            hint,
            _human(before.offloaded_state_bytes),
            _human(after.offloaded_state_bytes),
        )

    def metrics(self) -> dict[str, int]:
        """The bytes counted now (`MemoryCount.metrics`): sizes only, no copy and no device synchronization."""
        return self.count().metrics()

    def close(self) -> None:
        """Put every offloaded tensor back on the device it came from, and remove the load-state-dict hooks."""
        self._closed = True
        self.follow_frozen()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # Offload.
    @property
    def offloaded_parameters(self) -> int:
        """How many parameters' state is on the host now."""
        return sum(len(_book(o)) for o in self.optimizers)

    def offloaded_tensors(self) -> list[torch.Tensor]:
        """The host tensors that hold the offloaded state now (each also in its optimizer's `state`)."""
        return [host for o in self.optimizers for entry in _book(o).values() for host, _ in entry.tensors.values()]

    def follow_frozen(self) -> int:
        """
        Have on the host the state of exactly the parameters frozen now (none once closed, or without offload):
        offload what froze, or was loaded back onto the device; put back what trains again. Idempotent.

        Returns:
            `int`: how many tensors moved.
        """
        if not self.offload:
            return 0
        moved = 0
        for groups, optimizer in zip(self._groups, self.optimizers, strict=True):
            book = _book(optimizer)
            frozen = set() if self._closed else groups.frozen_ids
            for key in [key for key in book if key not in frozen]:
                moved += self._put_back(optimizer, book.pop(key))
            for param in groups.frozen_parameters() if frozen else ():
                state = optimizer.state.get(param)
                if state:
                    entry = book.get(id(param))
                    if entry is None:
                        entry = book[id(param)] = _Offloaded(param)
                    moved += self._take_off(state, entry)
        return moved

    @staticmethod
    def _take_off(state: dict[Any, Any], entry: _Offloaded) -> int:
        moved = 0
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or (key in entry.tensors and entry.tensors[key][0] is value):
                continue  # not a tensor, or on the host already
            if _is_dtensor(value):
                raise NotImplementedError(
                    "offload_frozen_state=True does not support DTensor optimizer state (FSDP, tensor parallelism): "
                    "use offload_frozen_state=False."
                )
            host = _to_host(value)
            entry.tensors[key] = (host, value.device)
            state[key] = host  # the device tensor is freed with its last reference
            moved += 1
        return moved

    @staticmethod
    def _put_back(optimizer: torch.optim.Optimizer, entry: _Offloaded) -> int:
        moved = 0
        state = optimizer.state.get(entry.param)
        for key, (host, device) in entry.tensors.items() if state else ():
            if state.get(key) is host:  # anything else was replaced since (a load): left as it is
                state[key] = host.to(device)
                moved += 1
        return moved

    def _after_load(self, optimizer: torch.optim.Optimizer) -> None:
        # torch's load_state_dict put every state tensor on its parameter's device: the frozen ones go back
        if not self._closed:
            self.follow_frozen()

    # Accounting.
    def count(self) -> MemoryCount:
        """The bytes of gradients and optimizer state now (see `MemoryCount`)."""
        grads = 0
        device_types: dict[str, None] = {}
        for param in self.model.parameters():
            device_types[param.device.type] = None
            if param.grad is not None:
                grads += _bytes(param.grad)
            elif param.requires_grad:
                grads += _bytes(param)
        on_device = offloaded = frozen_state = 0
        for groups, optimizer in zip(self._groups, self.optimizers, strict=True):
            book = _book(optimizer)
            for param, state in optimizer.state.items():
                entry = book.get(id(param))
                frozen = id(param) in groups.frozen_ids
                for key, value in _tensors(state):
                    size = _bytes(value)
                    if entry is not None and key in entry.tensors and entry.tensors[key][0] is value:
                        offloaded += size
                    else:
                        on_device += size
                        frozen_state += size if frozen else 0
        return MemoryCount(grads, on_device, offloaded, frozen_state, tuple(device_types))


def _tensors(state: Any) -> Iterable[tuple[Any, torch.Tensor]]:
    return ((k, v) for k, v in state.items() if isinstance(v, torch.Tensor)) if isinstance(state, dict) else ()
