"""The forward hooks on a model's modules, and whose they are: the activation cache skips the frozen prefix's forward,
and with it every hook the prefix's modules would call, so it serves only when no foreign hook is there.

torch has no public way to list the hooks on a module. `Module._forward_hooks` and `Module._forward_pre_hooks`, and
`Module._modules` (to walk a prefix's modules at every step without `named_modules()`'s cost), and the global
dictionaries `register_module_forward_hook` / `register_module_forward_pre_hook` fill
(`torch.nn.modules.module._global_forward_hooks` / `_global_forward_pre_hooks`), are read here and only here;
`check_hook_internals()` fails at once, naming the torch version, when one of them is missing.

A hook is *foreign* unless it is one of the library's own or one that cannot change what a cached step computes:
transformers' and PEFT's `make_inputs_require_grads` (gradient checkpointing on a PEFT or text model registers it on
the input embeddings: it only marks their output as requiring a gradient, and changes no value), and transformers'
`output_capturing_hook` (it records layer outputs only inside a forward that asks for `output_hidden_states` or
`output_attentions`, which the cache always computes in full).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ForeignHook",
    "check_hook_internals",
    "foreign_forward_hooks",
    "foreign_global_forward_hooks",
    "has_forward_pre_hook",
    "may_be_parametrized",
    "walk_modules",
]

_MODULE_ATTRIBUTES = ("_forward_hooks", "_forward_pre_hooks", "_modules")
_GLOBAL_ATTRIBUTES = ("_global_forward_hooks", "_global_forward_pre_hooks")
# (where the function is defined, its name): hooks that change no value a cached step computes (module docstring).
_HARMLESS = (
    ("transformers.modeling_utils", "make_inputs_require_grads"),
    ("peft.", "make_inputs_require_grad"),
    ("transformers.utils.output_capturing", "output_capturing_hook"),
)
_NEFTUNE = ("transformers.integrations.neftune", "neftune_post_forward_hook")


@dataclass(frozen=True)
class ForeignHook:
    """
    A forward hook that is not the library's own and not known to be harmless to a cached step.

    Args:
        module (`torch.nn.Module` or `None`): the module it is registered on; `None` for a global hook.
        kind (`str`): `"forward hook"` or `"forward pre-hook"`, prefixed with `"global "` for a global one.
        name (`str`): the hook's qualified name (`module.function`).
        neftune (`bool`): it is transformers' NEFTune hook (`TrainingArguments(neftune_noise_alpha=...)`).
    """

    module: nn.Module | None
    kind: str
    name: str
    neftune: bool


def check_hook_internals() -> None:
    """
    Check that this torch has the hook dictionaries read here.

    Raises:
        `NotImplementedError`: naming the torch version and what it lacks.
    """
    probe = nn.Module()
    missing = [f"Module.{a}" for a in _MODULE_ATTRIBUTES if not isinstance(getattr(probe, a, None), dict)]
    missing += [
        f"torch.nn.modules.module.{a}"
        for a in _GLOBAL_ATTRIBUTES
        if not isinstance(getattr(torch.nn.modules.module, a, None), dict)
    ]
    if missing:
        raise NotImplementedError(
            f"torch {torch.__version__} lacks {', '.join(missing)}, which cache_activations=True reads to find the "
            "forward hooks a cached step would skip. Use cache_activations=False."
        )


def _function(hook: Callable) -> Callable:
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__func__", hook)  # a bound method: its function


def _origin(hook: Callable) -> tuple[str, str]:
    function = _function(hook)
    return getattr(function, "__module__", None) or "", getattr(function, "__name__", type(function).__name__)


def _foreign(hook: Callable, kind: str, module: nn.Module | None) -> ForeignHook | None:
    where, name = _origin(hook)
    if where == "hf_layer_freeze" or where.startswith("hf_layer_freeze."):
        return None
    if any(where.startswith(prefix) and name == harmless for prefix, harmless in _HARMLESS):
        return None
    qualified = getattr(_function(hook), "__qualname__", name)
    return ForeignHook(module, kind, f"{where}.{qualified}" if where else qualified, (where, name) == _NEFTUNE)


def foreign_forward_hooks(
    modules: Iterable[nn.Module], pre_hooks_only: bool = False, after: int | None = None
) -> list[ForeignHook]:
    """
    The foreign forward hooks and pre-hooks registered on `modules` (each module's own, not its children's).

    Args:
        modules (`Iterable[torch.nn.Module]`): the modules to look at.
        pre_hooks_only (`bool`, *optional*, defaults to `False`): look at the pre-hooks only.
        after (`int`, *optional*): only the pre-hooks that run after the one whose handle has this id.
    """
    found = []
    for module in modules:
        if not module._forward_pre_hooks and (pre_hooks_only or not module._forward_hooks):
            continue  # the usual case, checked at every step: no list built
        hooks = [("forward pre-hook", module._forward_pre_hooks)]
        if not pre_hooks_only:
            hooks.append(("forward hook", module._forward_hooks))
        for kind, registered in hooks:
            seen = after is None
            for hook_id, hook in registered.items():
                if not seen:
                    seen = hook_id == after
                    continue
                foreign = _foreign(hook, kind, module)
                if foreign is not None:
                    found.append(foreign)
    return found


def foreign_global_forward_hooks() -> list[ForeignHook]:
    """The foreign hooks registered for every module (`torch.nn.modules.module.register_module_forward_hook` and
    `register_module_forward_pre_hook`)."""
    found = []
    for kind, attribute in zip(("global forward hook", "global forward pre-hook"), _GLOBAL_ATTRIBUTES, strict=True):
        for hook in getattr(torch.nn.modules.module, attribute).values():
            foreign = _foreign(hook, kind, None)
            if foreign is not None:
                found.append(foreign)
    return found


def walk_modules(roots: Iterable[nn.Module]) -> list[nn.Module]:
    """`roots` and all their descendants, each once, in `modules()` order: what `[m for r in roots for m in
    r.modules()]` gives, at a fraction of its cost (no names built), for a walk at every training step."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = list(roots)[::-1]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return found


def may_be_parametrized(module: nn.Module) -> bool:
    """A cheap test before `torch.nn.utils.parametrize.is_parametrized` (whose attribute lookup raises and catches on
    every module that has none): whether `module` holds a `parametrizations` submodule."""
    return "parametrizations" in module._modules


def has_forward_pre_hook(module: nn.Module, hook: Callable) -> bool:
    """Whether `hook` is among `module`'s forward pre-hooks."""
    return any(registered is hook for registered in module._forward_pre_hooks.values())
