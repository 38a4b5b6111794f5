"""What a model family answers about the models it knows, and the shapes of its answers.

Generic code (`heads.py`, `units.py`, `activation_cache.prefix_layout`, `gradient_checkpointing.py`) asks each family
of the registry (`families.FAMILIES`) in order and keeps its own rules generic. Every answer is optional: `None` says
"not a model of mine, or nothing to say", and the next family, then the generic rule, decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["CacheCut", "CheckpointedLayer", "HeadAnswer", "ModelFamily", "NoCacheCut", "ParameterGroups"]


@dataclass(frozen=True)
class HeadAnswer:
    """
    What a family says of a model's head.

    Args:
        modules (`tuple[torch.nn.Module, ...]`): the head modules it names (may own no parameter).
        rules (`tuple[str, ...]`): the rules that named them, as `Head.rule` shows them (`"timm get_classifier()"`);
            empty when it names none.
        backbones (`tuple[torch.nn.Module, ...]`): the models of this family inside the model (the outermost ones):
            what lies outside every family's backbones is head too (`heads.find_head`'s generic rule).
    """

    modules: tuple[nn.Module, ...] = ()
    rules: tuple[str, ...] = ()
    backbones: tuple[nn.Module, ...] = ()


@dataclass(frozen=True)
class ParameterGroups:
    """
    Blocks given as groups of parameter names (timm's `group_matcher()`), in the order they run.

    Args:
        root (`str`): the qualified name, in the model asked, of the module that declares the groups (`""`: the
            model itself).
        groups (`tuple[tuple[str, ...], ...]`): each group's parameter names, relative to `root`.
    """

    root: str
    groups: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class CacheCut:
    """
    Where a model's frozen prefix can be cut, as its family knows it (`activation_cache.prefix_layout` derives the
    rest: what runs before, the parameters above the blocks).

    Args:
        first (`torch.nn.Module`): the blocks' container, or the first block.
        blocks (`tuple[torch.nn.Module, ...]`): the blocks, in order.
        use_cache_input (`bool`, *optional*, defaults to `False`): the model takes `use_cache` (a decoder).
    """

    first: nn.Module
    blocks: tuple[nn.Module, ...]
    use_cache_input: bool = False


class NoCacheCut(Exception):
    """
    Raised by a family's `cache_layout` for a model it knows but cannot cut (a transformers model type no cut was
    verified for); `prefix_layout` turns it into the `NotImplementedError` naming what is supported.

    Args:
        model (`torch.nn.Module`): the model that cannot be cut.
        why (`str`): what it lacks, in words.
    """

    def __init__(self, model: nn.Module, why: str) -> None:
        super().__init__(why)
        self.model = model
        self.why = why


@dataclass(frozen=True)
class CheckpointedLayer:
    """
    Where a family's gradient checkpointing begins around the first unit that still trains.

    Args:
        module (`torch.nn.Module`): a layer that calls its own checkpoint function
            (`module._gradient_checkpointing_func`, transformers' `GradientCheckpointingLayer`), whose inputs then
            require a gradient; or, with `reentrant`, the model, which checkpoints its blocks inside its own forward
            (timm's `checkpoint_seq`), whose inputs then require a gradient.
        reentrant (`Callable[[], bool]`, *optional*): for a model that checkpoints inside its forward: whether it
            checkpoints re-entrantly now (only then do its inputs need a gradient).
    """

    module: nn.Module
    reentrant: Callable[[], bool] | None = None


class ModelFamily:
    """
    A model family: what it knows of the models it makes. Subclass it and override what the family knows; every
    answer defaults to `None` ("don't know"). Register an instance with `families.register_family`.

    Attributes:
        name (`str`): the family's name, in messages.
        cache_support (`str`, *optional*): the models `cache_layout` cuts, in words, for the message refusing others
            (`"timm VisionTransformer and ResNet"`).
        block_support (`str`, *optional*): the models `blocks` answers for, in words, for the message refusing
            others (`"a timm model with group_matcher()"`).

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_layer_freeze.families import HeadAnswer, ModelFamily
    >>> class LastLinearIsHead(ModelFamily):
    ...     name = "mine"
    ...     def matches(self, model):
    ...         return isinstance(model, nn.Sequential)
    ...     def head(self, model):
    ...         return HeadAnswer((model[-1],), ("mine",), (model,))
    >>> LastLinearIsHead().head(nn.Sequential(nn.Linear(2, 2))).rules
    ('mine',)

    ```
    """

    name: str = "family"
    cache_support: str | None = None
    block_support: str | None = None

    def matches(self, model: nn.Module) -> bool:
        """Whether `model` (or a module inside it) is one this family knows; the others answer `None` if not."""
        return False

    def wraps(self, model: nn.Module) -> nn.Module | None:
        """The model `model` wraps (PEFT's `get_base_model()`), for the other families to answer on; `None`: none."""
        return None

    def head(self, model: nn.Module) -> HeadAnswer | None:
        """The head this family names in `model` (looked through wrappers), and its backbones."""
        return None

    def blocks(self, model: nn.Module) -> Sequence[nn.Module] | ParameterGroups | None:
        """The blocks of `model` for `granularity="block"`: modules (each one unit with every trainable parameter
        inside) or groups of parameter names."""
        return None

    def grouped_modules(self, model: nn.Module) -> Sequence[nn.Module] | None:
        """Modules that are one unit at every granularity (a PEFT tuner layer, with its adapters' matrices)."""
        return None

    def cache_layout(self, module: nn.Module) -> CacheCut | None:
        """Asked of each module of the model in pre-order: the cut of `module` if it is a model of this family.

        Raises:
            `NoCacheCut`: a model of this family that cannot be cut.
        """
        return None

    def checkpointed_layer(self, model: nn.Module, module: nn.Module) -> CheckpointedLayer | None:
        """Where gradient checkpointing begins around `module` (the first unit that still trains) in `model`."""
        return None
