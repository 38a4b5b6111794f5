"""What a freezer froze: its own record, by identity and name, never read back from `requires_grad`.

Parameters that were frozen before the freezer was built (PEFT's base weights, an embedding frozen by hand) are not
its to freeze or to give back, and neither is a parameter someone froze between two of its events: freezing touches
only what still trains, and giving back restores exactly what was recorded (PEFT's `targeted_parameter_names`
records what a tuner touched in the same spirit).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .param_groups import freeze_parameters

__all__ = ["FrozenRecord"]


class FrozenRecord:
    """
    The parameters one freezer froze, in the order it froze them, with their qualified names.

    Example:

    ```python
    >>> import torch
    >>> from hf_layer_freeze.record import FrozenRecord
    >>> layer = torch.nn.Linear(2, 2)
    >>> layer.bias.requires_grad_(False)  # frozen by hand: not the record's
    Parameter containing:
    ...
    >>> record = FrozenRecord()
    >>> [name for name, _ in record.freeze([("weight", layer.weight), ("bias", layer.bias)])]
    ['weight']
    >>> [name for name, _ in record.give_back()], layer.weight.requires_grad, layer.bias.requires_grad
    (['weight'], True, False)

    ```
    """

    def __init__(self) -> None:
        self._frozen: dict[int, tuple[str, nn.Parameter]] = {}

    def freeze(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
        """Freeze those of `named_parameters` that still train (`requires_grad=False`, gradient dropped), record
        them, and return them."""
        newly = [(name, p) for name, p in named_parameters if p.requires_grad and id(p) not in self._frozen]
        freeze_parameters(p for _, p in newly)
        self._frozen.update((id(p), (name, p)) for name, p in newly)
        return newly

    def give_back(self) -> list[tuple[str, nn.Parameter]]:
        """Make every recorded parameter train again, forget them, and return them."""
        given = list(self._frozen.values())
        for _, param in given:
            param.requires_grad_(True)
        self._frozen.clear()
        return given

    def __contains__(self, param: object) -> bool:
        return id(param) in self._frozen

    def __len__(self) -> int:
        return len(self._frozen)

    @property
    def names(self) -> list[str]:
        """Qualified names of the recorded parameters, in the order they were frozen (what checkpoints store)."""
        return [name for name, _ in self._frozen.values()]

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The recorded parameters, in the order they were frozen."""
        return [param for _, param in self._frozen.values()]

    @property
    def numel(self) -> int:
        """Number of parameter elements recorded."""
        return sum(param.numel() for _, param in self._frozen.values())
