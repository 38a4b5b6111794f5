"""Which parts of a model can be frozen, and in which order.

A *unit* is a module that directly owns parameters (`named_parameters(recurse=False)`), so parameters that sit
on a non-leaf module (a ViT's `cls_token` and `pos_embed`) are freezable like any layer's weights. Units come in
depth-first pre-order of the ownership tree (`model.named_modules()`), the order of the method card. The
classification head is never a unit: it is what the frozen features are still being fitted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .options import GRANULARITIES
from .schedule import validate_choice

__all__ = [
    "FreezableUnit",
    "UnitProfile",
    "classifier_modules",
    "freezable_units",
    "profile_units",
    "unwrap_model",
]


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """
    Strip the wrappers that training frameworks put around a model: DDP, `DataParallel`, FSDP1, `torch.compile`.

    Parameters are shared with the wrapper, so freezing through the unwrapped model freezes the wrapped one.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        FullyShardedDataParallel = nn.parallel.DistributedDataParallel  # noqa: N806
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, FullyShardedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """
    The classification head(s) of a timm model, also when it sits inside a wrapper.

    The outermost module of `model` with a timm-style `get_classifier()` names the head: the module (or the tuple
    of modules, as distilled DeiT models return) it returns. Heads without parameters (`nn.Identity` when the timm
    model was built with `num_classes=0`) do not count. Returns an empty list when no such head is found.
    """
    for module in unwrap_model(model).modules():
        get_classifier = getattr(module, "get_classifier", None)
        if not callable(get_classifier):
            continue
        try:
            head = get_classifier()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        heads = head if isinstance(head, (tuple, list)) else (head,)
        heads = [h for h in heads if isinstance(h, nn.Module) and any(True for _ in h.parameters())]
        if heads:
            return heads
    return []


def _timm_model_with_groups(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost (name, module) of `model` with a timm `group_matcher()`."""
    for name, module in model.named_modules():
        if callable(getattr(module, "group_matcher", None)):
            return name, module
    return None


def _block_units(model: nn.Module, head_param_ids: set[int]) -> list[FreezableUnit]:
    from timm.models import group_parameters

    found = _timm_model_with_groups(model)
    if found is None:
        raise ValueError(
            f"granularity='block' needs a timm model with group_matcher() (got {type(model).__name__}, which has "
            "none inside it); use granularity='module'"
        )
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

    A unit is a module that directly owns parameters. The classification head is excluded: for timm models
    (and wrappers around one, such as `transformers.TimmWrapperForImageClassification`) the module returned by
    `get_classifier()` and everything inside it; for other models, the last unit. A parameter shared by
    several modules belongs to the first unit that owns it, or to the head if the head holds it.

    With `granularity="block"`, a unit is instead one group of the timm model's own `group_matcher()` (the stem,
    each block or stage, as `timm.models.group_parameters` groups them), so no block is ever half frozen. Models
    without `group_matcher` get a `ValueError`.

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
    heads = classifier_modules(model)
    head_param_ids = {id(p) for head in heads for p in head.parameters()}
    head_module_ids = {id(m) for head in heads for m in head.modules()}
    if granularity == "block":
        return _block_units(model, head_param_ids)

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

    if not heads and units:
        units.pop()  # no timm head to name: the last unit stands in for the classifier
    return units


@dataclass(frozen=True)
class UnitProfile:
    """
    What one forward pass says about each unit (same order as the units profiled).

    Args:
        first_use (`tuple[int, ...]`): rank of the unit's first use in the forward pass (its earliest owner module).
        forward_flops (`tuple[int, ...]`): forward FLOPs attributed to the unit (its modules' own FLOPs, plus those of
            parameter-free modules, such as an attention's matmuls, given to their first unit).
    """

    first_use: tuple[int, ...]
    forward_flops: tuple[int, ...]


@torch.no_grad()
def profile_units(model: nn.Module, units: list[FreezableUnit], *args, **kwargs) -> UnitProfile:
    """
    Run one forward of `model(*args, **kwargs)` to record each unit's first use and its forward FLOPs.

    The pass runs in eval mode without gradients (BatchNorm statistics and RNG untouched) and restores the train
    mode after. The order is that of module calls, so it is the same on every rank for the same model.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = unwrap_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    order: dict[int, int] = {}

    def record(module, _args):
        order.setdefault(id(module), len(order))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    was_training = {id(m): m.training for m in model.modules()}
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with counter:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module.training = was_training[id(module)]

    root = type(model).__name__
    inclusive = {key: sum(counts.values()) for key, counts in counter.get_flop_counts().items()}

    def flops_of(name: str) -> int:
        return inclusive.get(f"{root}.{name}" if name else root, 0)

    own = {}
    for name, module in model.named_modules():
        children = sum(flops_of(f"{name}.{c}" if name else c) for c, _ in module.named_children())
        own[name] = max(0, flops_of(name) - children)

    unit_of_module: dict[str, int] = {}
    for index, unit in enumerate(units):
        for owner in unit.owner_modules(model):
            unit_of_module.setdefault(names[id(owner)], index)
    forward_flops = [0] * len(units)
    for name, value in own.items():
        index = unit_of_module.get(name)
        if index is None:  # a parameter-free module (or the head): give it to its first unit below, if any
            below = [i for n, i in unit_of_module.items() if n.startswith(f"{name}.") or not name]
            index = min(below) if below else None
        if index is not None and value:
            forward_flops[index] += value
    first_use = []
    for unit in units:
        ranks = [order[id(m)] for m in unit.owner_modules(model) if id(m) in order]
        first_use.append(min(ranks) if ranks else len(order))
    return UnitProfile(tuple(first_use), tuple(forward_flops))
