"""Where a model's frozen prefix can be cut for activation caching: the embeddings (or stem), then the blocks.

The cut each model family knows is answered in `families/` (`ModelFamily.cache_layout`); this file turns it into a
`PrefixLayout` seen from the model as given (the modules before the blocks, the containers above them, the parameters
those hold). `activation_cache.py` caches at the last frozen block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .families import NoCacheCut, cache_cut, cache_support, look_through
from .wrappers import unwrap_model

__all__ = ["PrefixLayout", "prefix_layout"]


@dataclass(frozen=True)
class PrefixLayout:
    """
    Where a model's frozen prefix can be cut.

    Args:
        before (`tuple[torch.nn.Module, ...]`): the modules the model calls before its first block, in order (the
            embeddings, a stem); all must be frozen before anything is cached.
        blocks (`tuple[torch.nn.Module, ...]`): the blocks, in order; the cut is the last block of the frozen prefix.
        use_cache_input (`bool`): the model takes `use_cache` (a transformers decoder): training forwards get
            `use_cache=False`, since frozen layers skipped on a hit would leave a key/value cache incomplete.
        ancestor_parameters (`tuple[torch.nn.Parameter, ...]`): parameters held directly by the modules above the
            blocks (a ViT's `cls_token` and `pos_embed`): all must be frozen before anything is cached.
        above (`tuple[torch.nn.Module, ...]`): the modules between the model and the first block (the base model,
            the encoder, a `Sequential` of blocks): their forward pre-hooks run before the prefix does.
    """

    before: tuple[nn.Module, ...]
    blocks: tuple[nn.Module, ...]
    use_cache_input: bool = False
    ancestor_parameters: tuple[nn.Parameter, ...] = ()
    above: tuple[nn.Module, ...] = ()


def _unsupported(model: nn.Module, why: str) -> NotImplementedError:
    return NotImplementedError(
        f"cache_activations=True supports {cache_support()}; {type(model).__name__} is not among them ({why}). "
        "Caching needs a verified cut between the frozen prefix and the rest, where nothing after the cut reads the "
        "prefix's inner values. Train it with cache_activations=False."
    )


def _children_before(ancestor_path: list[nn.Module]) -> list[nn.Module]:
    """The children of each module on the path (root to container) defined before the next module on the path."""
    before: list[nn.Module] = []
    for parent, child in zip(ancestor_path, ancestor_path[1:], strict=False):
        for sibling in parent.children():
            if sibling is child:
                break
            before.append(sibling)
    return before


def _path_to(root: nn.Module, target: nn.Module) -> list[nn.Module] | None:
    """The modules from `root` down to `target` (both included), or `None`."""
    if root is target:
        return [root]
    for child in root.children():
        path = _path_to(child, target)
        if path is not None:
            return [root, *path]
    return None


def _layout(root: nn.Module, first: nn.Module, blocks: tuple[nn.Module, ...], use_cache_input: bool = False):
    """The layout whose blocks start at `first` (the blocks' container, or the first block), seen from `root`."""
    path = _path_to(root, first)
    ancestors = tuple(p for module in path[:-1] for p in module.parameters(recurse=False))
    above = tuple(m for m in path[1:] if not any(m is block for block in blocks))
    return PrefixLayout(tuple(_children_before(path)), blocks, use_cache_input, ancestors, above)


def prefix_layout(model: nn.Module) -> PrefixLayout:
    """
    The embeddings-then-blocks layout of a supported model (see the module docstring): the cut its family knows
    (`families/`), seen from the model.

    Raises:
        `NotImplementedError`: for any other model, naming what is missing.
    """
    root = unwrap_model(model)
    inner = look_through(root)
    try:
        cut = cache_cut(inner)
    except NoCacheCut as refused:
        raise _unsupported(refused.model, refused.why) from None
    if cut is None:
        raise _unsupported(inner, "no transformers or timm model of a supported family inside it")
    return _layout(root, cut.first, cut.blocks, cut.use_cache_input)
