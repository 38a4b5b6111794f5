"""Which parts of a model can be frozen, and in which order.

A *unit* is a module that directly owns parameters (`named_parameters(recurse=False)`), so parameters that sit
on a non-leaf module (a ViT's `cls_token` and `pos_embed`) are freezable like any layer's weights. Units come in
depth-first pre-order of the ownership tree (`model.named_modules()`), the order of the method card. The
classification head is never a unit: it is what the frozen features are still being fitted for.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .options import GRANULARITIES
from .schedule import validate_choice
from .wrappers import unwrap_model

__all__ = ["FreezableUnit", "classifier_modules", "freezable_units"]


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


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """
    The head(s) of `model`: what the frozen features are still being fitted for, never frozen.

    Two rules, whose results are joined:
    - timm: the outermost module with a `get_classifier()` names the head, the module (or the tuple of modules, as
      distilled DeiT models return) it returns; also when the timm model sits inside a wrapper such as
      `TimmWrapperForImageClassification`.
    - transformers: everything outside `model.base_model` is head (RoBERTa's two-layer `classifier`, DeiT's and
      LeViT's distillation classifiers, a causal LM's `lm_head`, tied to the input embedding or not).

    Heads without parameters (`nn.Identity` when the timm model was built with `num_classes=0`) do not count.
    Returns an empty list when `model` has no head by either rule.
    """
    return _find_heads(unwrap_model(model))[0]


def _find_heads(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The heads (see `classifier_modules`) and whether either rule applied (False: the model does not say)."""
    heads: list[nn.Module] = []
    known = False
    base = getattr(model, "base_model", None)
    for module in model.modules():
        get_classifier = getattr(module, "get_classifier", None)
        if not callable(get_classifier):
            continue
        try:
            head = get_classifier()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        found = [h for h in (head if isinstance(head, (tuple, list)) else (head,)) if isinstance(h, nn.Module)]
        heads += found
        # A head without parameters says "no head" only of the model itself (timm's num_classes=0); a headless
        # backbone inside a user's module says nothing of the user's own classifier.
        known = any(True for h in found for _ in h.parameters()) or module in (model, base)
        break
    if isinstance(base, nn.Module) and base is not model:
        known = True
        heads += [child for child in model.children() if child is not base]
    owning = [h for h in heads if any(True for _ in h.parameters())]
    return list({id(h): h for h in owning}.values()), known


def _timm_model_with_groups(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost (name, module) of `model` with a timm `group_matcher()`."""
    for name, module in model.named_modules():
        if callable(getattr(module, "group_matcher", None)):
            return name, module
    return None


def _block_units(model: nn.Module, heads: list[nn.Module]) -> list[FreezableUnit]:
    """Blocks by the model's own word: timm's `group_matcher()`, else transformers' `_no_split_modules`."""
    head_param_ids = {id(p) for head in heads for p in head.parameters()}
    found = _timm_model_with_groups(model)
    if found is not None:
        return _timm_block_units(model, found, head_param_ids)
    units = _transformers_block_units(model, heads)
    if units is None:
        raise ValueError(
            f"granularity='block' needs a timm model with group_matcher() or a transformers model whose "
            f"_no_split_modules name its layers (got {type(model).__name__}, which has neither); use "
            "granularity='module'"
        )
    return units


def _transformers_block_units(model: nn.Module, heads: list[nn.Module]) -> list[FreezableUnit] | None:
    """
    One unit per outermost module whose class a transformers model lists in `_no_split_modules` (its layers, and
    for some its embeddings), in depth-first order; parameters outside any block are module units, in place.
    `None` when no such block is found.
    """
    block_classes = {
        name
        for module in model.modules()
        if isinstance(getattr(module, "_no_split_modules", None), (list, tuple, set))
        for name in module._no_split_modules
    }
    whole = {id(model), id(getattr(model, "base_model", model))}  # a "block" that is the whole model splits nothing
    head_module_ids = {id(m) for head in heads for m in head.modules()}
    seen = {id(p) for head in heads for p in head.parameters()}
    units: list[FreezableUnit] = []
    inside_block = ""  # the qualified-name prefix of the block being walked through (depth-first)
    blocks = 0
    for module_name, module in model.named_modules():
        if id(module) in head_module_ids or (inside_block and module_name.startswith(inside_block)):
            continue
        is_block = type(module).__name__ in block_classes and id(module) not in whole
        if is_block:
            inside_block, blocks = f"{module_name}.", blocks + 1
        prefix = f"{module_name}." if module_name else ""
        kept = []
        for name, param in module.named_parameters(recurse=is_block):
            if id(param) not in seen:
                seen.add(id(param))
                kept.append((prefix + name, param))
        if kept:
            units.append(FreezableUnit(module_name, module, tuple(n for n, _ in kept), tuple(p for _, p in kept)))
    return units if blocks else None


def _timm_block_units(model: nn.Module, found: tuple[str, nn.Module], head_param_ids: set[int]) -> list[FreezableUnit]:
    from timm.models import group_parameters

    prefix, timm_model = found
    prefix = f"{prefix}." if prefix else ""
    params = dict(model.named_parameters())
    seen: set[int] = set(head_param_ids)
    units = []
    for _, names in sorted(group_parameters(timm_model, timm_model.group_matcher(coarse=False)).items()):
        kept = []
        for name in names:
            param = params.get(prefix + name)
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            kept.append((prefix + name, param))
        if not kept:
            continue
        common = _common_module_prefix([n for n, _ in kept])
        module = model.get_submodule(common) if common else model
        units.append(FreezableUnit(common, module, tuple(n for n, _ in kept), tuple(p for _, p in kept)))
    # Parameters of `model` outside the timm model (a wrapper's own layers) become module units, in place.
    outside = [(n, p) for n, p in params.items() if id(p) not in seen and not n.startswith(prefix)] if prefix else []
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


def freezable_units(model: nn.Module, granularity: str = "module") -> list[FreezableUnit]:
    """
    The units of `model` that can be frozen, in depth-first pre-order of the ownership tree.

    A unit is a module that directly owns parameters. The head is excluded (see `classifier_modules`): for timm
    models (and wrappers around one, such as `transformers.TimmWrapperForImageClassification`) the module returned
    by `get_classifier()`; for transformers models everything outside `model.base_model`; for other models, the
    last unit. A parameter shared by several modules belongs to the first unit that owns it, or to the head if the
    head holds it (a causal LM's input embedding tied to its `lm_head` is never frozen).

    With `granularity="block"`, a unit is instead one block as the model itself names them, so no block is ever half
    frozen: for timm models, one group of `group_matcher()` (the stem, each block or stage, as
    `timm.models.group_parameters` groups them); for transformers models, each outermost module of a class listed
    in `_no_split_modules` (ViT's and BERT's embeddings and layers, Llama's decoder layers), with parameters outside
    any block (a final norm) as module units. Other models get a `ValueError`.

    Args:
        model (`torch.nn.Module`):
            The model, raw or wrapped by DDP / `accelerator.prepare` / `torch.compile`.
        granularity (`str`, *optional*, defaults to `"module"`):
            `"module"` (the method card's) or `"block"`.

    Returns:
        `list[FreezableUnit]`: the units, earliest first. Every parameter of the model is in exactly one unit or
        in the head.

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
    model = unwrap_model(model)
    heads, heads_known = _find_heads(model)
    head_param_ids = {id(p) for head in heads for p in head.parameters()}
    head_module_ids = {id(m) for head in heads for m in head.modules()}
    if granularity == "block":
        return _block_units(model, heads)

    seen: set[int] = set(head_param_ids)
    units: list[FreezableUnit] = []
    for module_name, module in model.named_modules(remove_duplicate=True):
        if id(module) in head_module_ids:
            continue
        names: list[str] = []
        params: list[nn.Parameter] = []
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            names.append(f"{module_name}.{param_name}" if module_name else param_name)
            params.append(param)
        if params:
            units.append(FreezableUnit(module_name, module, tuple(names), tuple(params)))

    if not heads_known and units:
        units.pop()  # neither timm nor transformers names a head: the last unit stands in for the classifier
    return units
