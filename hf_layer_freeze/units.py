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

__all__ = ["FreezableUnit", "classifier_modules", "freezable_units", "unwrap_model"]


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


def freezable_units(model: nn.Module) -> list[FreezableUnit]:
    """
    The units of `model` that can be frozen, in depth-first pre-order of the ownership tree.

    A unit is a module that directly owns parameters. The classification head is excluded: for timm models
    (and wrappers around one, such as `transformers.TimmWrapperForImageClassification`) the module returned by
    `get_classifier()` and everything inside it; for other models, the last unit. A parameter shared by
    several modules belongs to the first unit that owns it, or to the head if the head holds it.

    Args:
        model (`torch.nn.Module`):
            The model, raw or wrapped by DDP / `accelerator.prepare` / `torch.compile`.

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
    model = unwrap_model(model)
    heads = classifier_modules(model)
    head_param_ids = {id(p) for head in heads for p in head.parameters()}
    head_module_ids = {id(m) for head in heads for m in head.modules()}

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


def parameters_numel(parameters: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> int:
    """Total number of elements in `parameters`."""
    return sum(p.numel() for p in parameters)
