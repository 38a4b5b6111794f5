"""Model families in one place: each file says what one family knows (head, blocks, cache cut, checkpointed layer).

The generic code asks the registry (`FAMILIES`, in order) through the functions below and keeps only generic rules.
A new built-in family is one file and one line in `FAMILIES`; a user's is a `ModelFamily` given to
`register_family`.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

from torch import nn

from .peft import PeftFamily
from .protocol import CacheCut, CheckpointedLayer, HeadAnswer, ModelFamily, NoCacheCut, ParameterGroups
from .timm import TimmFamily
from .transformers import TransformersFamily

__all__ = [
    "FAMILIES",
    "CacheCut",
    "CheckpointedLayer",
    "FamilyHandle",
    "HeadAnswer",
    "ModelFamily",
    "NoCacheCut",
    "ParameterGroups",
    "block_answers",
    "block_support",
    "cache_cut",
    "cache_support",
    "checkpointed_layer",
    "grouped_modules",
    "head_answers",
    "look_through",
    "register_family",
]

# Asked in this order: PEFT first (it wraps the others' models), timm before transformers (a
# TimmWrapperForImageClassification is a transformers model whose classifier and blocks only timm names).
FAMILIES: list[ModelFamily] = [
    PeftFamily(),
    TimmFamily(),
    TransformersFamily(),
]


class FamilyHandle:
    """
    A registered family: `remove()` takes it out of the registry; as a context manager, it is registered inside the
    block only.

    Args:
        family (`ModelFamily`): the family registered.
    """

    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    def remove(self) -> None:
        """Take the family out of the registry (nothing happens if it is out already)."""
        if any(f is self.family for f in FAMILIES):
            FAMILIES[:] = [f for f in FAMILIES if f is not self.family]

    def __enter__(self) -> ModelFamily:
        return self.family

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()


def register_family(family: ModelFamily) -> FamilyHandle:
    """
    Register a model family, asked before those registered earlier (the built-in ones included), so it can answer
    for a model they know too.

    Args:
        family (`ModelFamily`): an instance of a `ModelFamily` subclass overriding what it knows.

    Returns:
        `FamilyHandle`: `remove()` unregisters it; `with register_family(...):` registers it inside the block only.

    Raises:
        `ValueError`: `family` is no `ModelFamily`, or is registered already.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_layer_freeze import freezable_units
    >>> from hf_layer_freeze.families import HeadAnswer, ModelFamily, register_family
    >>> class Mine(ModelFamily):
    ...     name = "mine"
    ...     def matches(self, model):
    ...         return isinstance(model, nn.Sequential)
    ...     def head(self, model):
    ...         return HeadAnswer((model[0],), ("mine",), (model,))
    >>> with register_family(Mine()):
    ...     [unit.name for unit in freezable_units(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))]
    ['1']

    ```
    """
    if not isinstance(family, ModelFamily):
        raise ValueError(
            f"family must be an instance of a hf_layer_freeze.families.ModelFamily subclass, got "
            f"{type(family).__name__}"
        )
    if any(f is family for f in FAMILIES):
        raise ValueError(f"family must not be registered already, got {family.name!r}, which is")
    FAMILIES.insert(0, family)
    return FamilyHandle(family)


def _matching(model: nn.Module) -> list[ModelFamily]:
    return [family for family in FAMILIES if family.matches(model)]


def look_through(model: nn.Module) -> nn.Module:
    """The model inside every wrapper a family names (a `PeftModel`'s `get_base_model()`), or `model` itself."""
    for _ in range(len(FAMILIES) + 1):  # a wrapper of a wrapper; never a cycle
        inner = next((w for f in _matching(model) if (w := f.wraps(model)) is not None), None)
        if inner is None or inner is model:
            return model
        model = inner
    return model


def head_answers(model: nn.Module) -> list[HeadAnswer]:
    """What each family says of the head of `model` (looked through), in registry order."""
    return [answer for family in _matching(model) if (answer := family.head(model)) is not None]


def block_answers(model: nn.Module) -> Iterator[nn.Module | ParameterGroups]:
    """Each family's blocks of `model`, in registry order (the caller keeps the first that holds a block)."""
    for family in _matching(model):
        answer = family.blocks(model)
        if answer is not None:
            yield answer


def block_support() -> str:
    """The models `granularity="block"` supports, in words, for the message refusing others."""
    return " or ".join(f.block_support for f in FAMILIES if f.block_support)


def grouped_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that are one unit at every granularity (PEFT tuner layers), every family's."""
    found: dict[int, nn.Module] = {}
    for family in _matching(model):
        for module in family.grouped_modules(model) or ():
            found.setdefault(id(module), module)
    return list(found.values())


def cache_cut(model: nn.Module) -> CacheCut | None:
    """
    The cut of the outermost module of `model` (in pre-order) that a family can cut, `None` when no family knows one.

    Raises:
        `NoCacheCut`: the outermost module a family knows cannot be cut.
    """
    families = _matching(model)
    for module in model.modules():
        for family in families:
            cut = family.cache_layout(module)
            if cut is not None:
                return cut
    return None


def cache_support() -> str:
    """The models the activation cache supports, in words, for the message refusing others: in reverse registry order,
    so the built-in families come first (transformers, then timm, as the message has always read)."""
    return " and ".join(f.cache_support for f in reversed(FAMILIES) if f.cache_support)


def checkpointed_layer(model: nn.Module, module: nn.Module) -> CheckpointedLayer | None:
    """
    Where gradient checkpointing begins around `module` in `model`: a layer with its own checkpoint function (the
    nearer boundary) before a model that checkpoints inside its forward; `None` when no family knows.
    """
    answers = [a for f in _matching(model) if (a := f.checkpointed_layer(model, module)) is not None]
    return next((a for a in answers if a.reentrant is None), answers[0] if answers else None)
