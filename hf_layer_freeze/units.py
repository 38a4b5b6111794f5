"""Which parts of a model can be frozen, and in which order.

A *unit* is a module that directly owns parameters that train when the freezer is built
(`named_parameters(recurse=False)` with `requires_grad=True`), so parameters that sit on a non-leaf module (a ViT's
`cls_token` and `pos_embed`) are freezable like any layer's weights, and parameters frozen before (PEFT's base
weights, an embedding frozen by hand) are nobody's unit. Units come in depth-first pre-order of the ownership tree
(`model.named_modules()`), the order of the method card. The head (`heads.py`) is never a unit: it is what the frozen
features are still being fitted for.

Embedding units save no compute when frozen (a lookup costs no FLOPs, and the backward below the first block computes
only their weight gradients): the `embeddings` option keeps them as units (`"unit"`), folds them into the next unit
(`"merge"`) or leaves them out (`"skip"`); `is_embedding_unit` says which units they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .families import ParameterGroups, block_answers, block_support, grouped_modules, look_through
from .heads import Head, find_head
from .options import EMBEDDINGS, GRANULARITIES
from .schedule import validate_choice
from .wrappers import unwrap_model

__all__ = ["FreezableUnit", "freezable_units", "is_embedding_unit"]


@dataclass(frozen=True, eq=False)
class FreezableUnit:
    """
    One freezable unit: a module and the parameters it owns directly.

    Args:
        name (`str`):
            The module's qualified name in the (unwrapped) model, `""` for the root.
        module (`torch.nn.Module`):
            The module itself.
        parameter_names (`tuple[str, ...]`):
            Qualified names of the parameters this unit freezes.
        parameters (`tuple[torch.nn.Parameter, ...]`):
            The parameters themselves, in the same order.
    """

    name: str
    module: nn.Module
    parameter_names: tuple[str, ...]
    parameters: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        """Number of parameter elements in the unit."""
        return sum(p.numel() for p in self.parameters)

    def owner_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules that directly own this unit's parameters (one for a module unit, several for a block)."""
        model = unwrap_model(model)
        owners: dict[int, nn.Module] = {}
        for name in self.parameter_names:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            owners.setdefault(id(owner), owner)
        return list(owners.values())


def _block_units(model: nn.Module, head: Head, trainable: set[int]) -> list[FreezableUnit]:
    """Blocks by the model's own word: the first family's answer that holds a block (timm's `group_matcher()`,
    transformers' `_no_split_modules`)."""
    # a "block" that is the whole model, or the model a wrapper wraps, splits nothing
    whole = {id(model), id(look_through(model))}
    for answer in block_answers(model):
        if isinstance(answer, ParameterGroups):
            return _group_units(model, answer, head.parameter_ids, trainable)
        blocks = [m for m in answer if id(m) not in whole and id(m) not in head.module_ids]
        if blocks:
            block_ids = {id(m) for m in blocks} | {id(m) for m in grouped_modules(model)}
            return _walk_units(model, block_ids, head, trainable)
    raise ValueError(
        f"granularity='block' needs {block_support()} (got {type(model).__name__}, which has neither); use "
        "granularity='module'"
    )


def _walk_units(model: nn.Module, group_ids: set[int], head: Head, trainable: set[int]) -> list[FreezableUnit]:
    """
    One unit per module owning trainable parameters, in depth-first pre-order; a module in `group_ids` (a block, a
    PEFT tuner layer) is one unit with every trainable parameter inside it. A parameter seen before (shared) or held
    by the head is skipped.
    """
    seen = set(head.parameter_ids)
    units: list[FreezableUnit] = []
    inside_group = ""  # the qualified-name prefix of the group being walked through
    for module_name, module in model.named_modules():
        if id(module) in head.module_ids or (inside_group and module_name.startswith(inside_group)):
            continue
        is_group = id(module) in group_ids
        if is_group:
            inside_group = f"{module_name}."
        prefix = f"{module_name}." if module_name else ""
        kept = []
        for name, param in module.named_parameters(recurse=is_group):
            if id(param) in trainable and id(param) not in seen:
                seen.add(id(param))
                kept.append((prefix + name, param))
        if kept:
            units.append(FreezableUnit(module_name, module, tuple(n for n, _ in kept), tuple(p for _, p in kept)))
    return units


def _group_units(
    model: nn.Module, found: ParameterGroups, head_param_ids: set[int], trainable: set[int]
) -> list[FreezableUnit]:
    """One unit per group of parameter names that holds a trainable parameter, named for the module common to its
    parameters; parameters of `model` outside the module declaring the groups become module units, in place."""
    prefix = f"{found.root}." if found.root else ""
    params = dict(model.named_parameters())
    seen: set[int] = set(head_param_ids)
    units = []
    for names in found.groups:
        kept = []
        for name in names:
            param = params.get(prefix + name)
            if param is None or id(param) in seen or id(param) not in trainable:
                continue
            seen.add(id(param))
            kept.append((prefix + name, param))
        if not kept:
            continue
        # the group's name: the common module of its parameters, trainable or not, the head's left out
        common = _common_module_prefix([prefix + n for n in names if id(params.get(prefix + n)) not in head_param_ids])
        module = model.get_submodule(common) if common else model
        units.append(FreezableUnit(common, module, tuple(n for n, _ in kept), tuple(p for _, p in kept)))
    # Parameters of `model` outside the module declaring the groups (a wrapper's own layers) become module units.
    outside = [
        (n, p) for n, p in params.items() if id(p) in trainable and id(p) not in seen and not n.startswith(prefix)
    ]
    outside = outside if prefix else []
    for name, param in outside:
        owner = name.rpartition(".")[0]
        units.append(FreezableUnit(owner, model.get_submodule(owner) if owner else model, (name,), (param,)))
    return units


def _common_module_prefix(names: list[str]) -> str:
    parts = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)
_NORMS = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's, or a model's own by its class name (`LlamaRMSNorm`, `T5LayerNorm`)."""
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


def _is_embedding_module(module: nn.Module) -> bool:
    """Holds a lookup table, and no parameter-owning module inside it but lookups, norms and itself."""
    inside = list(module.modules())
    if not any(isinstance(m, _LOOKUPS) for m in inside):
        return False
    owners = [m for m in inside if next(m.parameters(recurse=False), None) is not None]
    return all(m is module or isinstance(m, _LOOKUPS) or _is_norm(m) for m in owners)


def _embedding_module_ids(model: nn.Module) -> set[int]:
    """The ids of every module inside (or being) an embedding module of `model`."""
    found: set[int] = set()
    for module in model.modules():
        if id(module) not in found and _is_embedding_module(module):
            found.update(id(m) for m in module.modules())
    return found


def is_embedding_unit(unit: FreezableUnit, model: nn.Module) -> bool:
    """
    Whether `unit` is an embedding unit: every parameter of it lies in an *embedding module* of `model`, a module
    holding an `nn.Embedding` (or `nn.EmbeddingBag`) and no other parameter-owning module but lookups, norms
    (`nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`, a class named `...Norm`) and itself (its own parameters, such as a
    learned position table). Freezing one saves no compute: a lookup costs no FLOPs, and what lies below the first
    block computes nothing but these weights' gradients. BERT's `BertEmbeddings` (word, position and token-type
    tables and their `LayerNorm`: one unit by block, four by module) and Llama's `embed_tokens` are; a convolutional
    patch or stem embedding (ViT's, a ResNet's stem) costs FLOPs and is not, nor is a ViT's `cls_token` or
    `pos_embed` outside any lookup-holding module.

    Args:
        unit (`FreezableUnit`): a unit of `model` (`freezable_units`).
        model (`torch.nn.Module`): the model, raw or wrapped.

    Returns:
        `bool`: whether it is an embedding unit.

    Example:

    ```python
    >>> import transformers
    >>> from hf_layer_freeze import freezable_units
    >>> from hf_layer_freeze.units import is_embedding_unit
    >>> config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                                  intermediate_size=32)
    >>> model = transformers.BertForSequenceClassification(config)
    >>> [unit.name for unit in freezable_units(model, "block") if is_embedding_unit(unit, model)]
    ['bert.embeddings']

    ```
    """
    model = unwrap_model(model)
    inside = _embedding_module_ids(model)
    return all(id(owner) in inside for owner in unit.owner_modules(model))


def _place_embeddings(model: nn.Module, units: list[FreezableUnit], embeddings: str) -> list[FreezableUnit]:
    """`units` with the embedding units as the `embeddings` option says: kept, merged into the next unit that is no
    embedding (named for it: its module, its parameters after theirs), or left out."""
    if embeddings == "unit":
        return units
    inside = _embedding_module_ids(model)
    embedding = [all(id(owner) in inside for owner in unit.owner_modules(model)) for unit in units]
    if embeddings == "skip":
        return [unit for unit, is_embedding in zip(units, embedding, strict=True) if not is_embedding]
    placed: list[FreezableUnit] = []
    waiting: list[FreezableUnit] = []  # embedding units not joined to a unit yet
    for unit, is_embedding in zip(units, embedding, strict=True):
        if is_embedding:
            waiting.append(unit)
            continue
        if waiting:
            joined = [*waiting, unit]
            names = tuple(n for u in joined for n in u.parameter_names)
            unit = FreezableUnit(unit.name, unit.module, names, tuple(p for u in joined for p in u.parameters))
            waiting = []
        placed.append(unit)
    return placed + waiting  # embeddings that no unit follows stay units of their own


def freezable_units(
    model: nn.Module,
    granularity: str = "module",
    head: Sequence[str] | None = None,
    held: Iterable[nn.Parameter] = (),
    embeddings: str = "unit",
) -> list[FreezableUnit]:
    """
    The units of `model` that can be frozen, in depth-first pre-order of the ownership tree.

    A unit is a module that directly owns parameters that train (`requires_grad=True`) now: parameters frozen
    before (by PEFT, which freezes every base weight; by hand, an embedding or a norm) are not a freezer's to
    freeze or to give back, so they are in no unit. A PEFT tuner layer (a LoRA layer: its adapters' A and B
    matrices, and more) is one unit. The head is excluded (see `heads.find_head`: the `head` names, the model PEFT
    wraps, timm's `get_classifier()`, everything outside a transformers model's `base_model`, what lies outside a
    backbone in a user's module); when no rule names it, the last module owning trainable parameters stands in for it,
    with a warning naming it. A parameter shared by several modules belongs to the first unit that owns it, or to the
    head if the head holds it (an input embedding tied to the output projection, `lm_head`, is never frozen).

    With `granularity="block"`, a unit is instead one block as the model itself names them, so no block is ever half
    frozen: for timm models, one group of `group_matcher()` (the stem, each block or stage, as
    `timm.models.group_parameters` groups them); for transformers models, each outermost module of a class listed
    in `_no_split_modules` (ViT's and BERT's embeddings and layers, Llama's decoder layers, with their LoRA
    adapters), with parameters outside any block (a final norm) as module units. Other models get a `ValueError`.

    Args:
        model (`torch.nn.Module`):
            The model, raw or wrapped by DDP / `accelerator.prepare` / `torch.compile` / PEFT.
        granularity (`str`, *optional*, defaults to `"module"`):
            `"module"` (the method card's) or `"block"`.
        head (`Sequence[str]`, *optional*):
            Names of the head modules, overriding the rules (see `LayerFreezer`'s `head` option).
        held (`Iterable[torch.nn.Parameter]`, *optional*):
            Parameters another open freezer holds frozen (`record.FreezeLedger`): the library's, not frozen by hand,
            so they are in units as if they trained.
        embeddings (`str`, *optional*, defaults to `"unit"`):
            The embedding units (`is_embedding_unit`): `"unit"`, units like any other; `"merge"`, each joins the next
            unit (in definition order) that is no embedding, whose name and module the joined unit keeps;
            `"skip"`, left out (never frozen).

    Returns:
        `list[FreezableUnit]`: the units, earliest first. Every parameter of the model that trains is in exactly one
        unit or in the head (with `embeddings="skip"`, or in an embedding unit left out).

    Example:

    ```python
    >>> import timm
    >>> from hf_layer_freeze import freezable_units
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    >>> units = freezable_units(model)
    >>> units[0].name, units[-1].name
    ('conv1.0', 'layer4.0.downsample.2')

    ```
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    validate_choice("granularity", granularity, GRANULARITIES)
    validate_choice("embeddings", embeddings, EMBEDDINGS)
    model = unwrap_model(model)
    trainable_params = [p for p in model.parameters() if p.requires_grad] + list(held)
    trainable = {id(p) for p in trainable_params}
    if granularity == "block":
        units = _block_units(model, find_head(model, head), trainable)
    else:
        # no rule names a head: the last module owning trainable parameters stands in for it, with a warning
        found = find_head(model, head, trainable=trainable_params)
        units = _walk_units(model, {id(m) for m in grouped_modules(model)}, found, trainable)
    return _place_embeddings(model, units, embeddings)
