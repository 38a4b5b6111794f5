"""The head: what the frozen features are still being fitted for, never frozen.

Head detection is a list of resolvers tried in order, each reading what the model says of itself (the timm way:
ask the model first, guess last, and say when guessing):

1. the `head` option: module names the user gives (final when given);
2. each model family (`families/`): a wrapper is looked through first (PEFT: a `PeftModel`'s `get_base_model()`, so
   the `modules_to_save` copy of a classifier sits where the classifier sat: it is head), then each family names
   the head of the models it knows: timm the classifier of the outermost module with a `get_classifier()`;
   transformers everything outside the outermost `PreTrainedModel`'s `base_model` (RoBERTa's two-layer
   `classifier`, DeiT's and LeViT's distillation heads, a causal LM's `lm_head`, tied to the input embedding or not,
   BART's `lm_head`), or, for a model that is its own base model (`T5ForConditionalGeneration`,
   `EncoderDecoderModel`, `VisionEncoderDecoderModel`), the output projection `get_output_embeddings()` names (T5's
   `lm_head`) and the heads of the transformers models inside it (an `EncoderDecoderModel`'s `BertLMHeadModel`
   decoder: its whole `cls` prediction head);
3. generic: a user's module around backbones (a `BertModel`, a headless timm model, a transformers model with its
   own head): what lies outside every family's backbones is head, joined with the backbones' own heads (rule 2:
   a `TimmWrapperForImageClassification` is a transformers model whose classifier only timm names);
4. when the caller says what trains (`freezable_units` does) and no rule names a head: the last module owning a
   trainable parameter stands in for it, with a warning naming it (`Head.rule` is `None`).

A parameter the head holds is the head's wherever else it sits: an input embedding tied to the output projection
(T5's `shared`, BART's `shared`, a BERT decoder's word embeddings) is in no unit and never freezes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .families import grouped_modules, head_answers, look_through
from .families.peft import peft_base_model
from .wrappers import unwrap_model

__all__ = ["Head", "classifier_modules", "find_head", "peft_base_model"]


@dataclass(frozen=True)
class Head:
    """
    The head of a model, as a resolver found it.

    Args:
        modules (`tuple[torch.nn.Module, ...]`): the head modules that own parameters (may be empty: a causal LM
            whose `lm_head` is tied, or frozen by PEFT, has a head that owns nothing trainable).
        rule (`str` or `None`): the rule that named it (`"head option"`, `"timm get_classifier()"`, `"transformers
            base_model"`, `"transformers get_output_embeddings()"`, `"outside the backbone"`, joined with `" + "`),
            `None` when no rule applied.
    """

    modules: tuple[nn.Module, ...]
    rule: str | None

    @property
    def parameter_ids(self) -> set[int]:
        """Ids of every parameter the head holds (trainable or not)."""
        return {id(p) for module in self.modules for p in module.parameters()}

    @property
    def module_ids(self) -> set[int]:
        """Ids of the head modules and every module inside them."""
        return {id(m) for module in self.modules for m in module.modules()}


def _owning(modules: Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    """Distinct modules that own at least one parameter, in order."""
    kept = {id(m): m for m in modules if any(True for _ in m.parameters())}
    return tuple(kept.values())


def _by_head_option(model: nn.Module, names: Sequence[str] | None, trainable: set[int] | None) -> Head | None:
    """Rule 1: the modules named `names`, looked up in `model`, else in the model a wrapper family wraps."""
    if not names:
        return None
    inner = look_through(model)
    modules = []
    for name in names:
        found = None
        for root in (model, inner):
            try:
                found = root.get_submodule(name)
                break
            except AttributeError:
                continue
        if found is None:
            raise ValueError(
                f"head must name modules of the model, got {name!r}, which is not a module of "
                f"{type(model).__name__} (names as in model.named_modules(), e.g. 'classifier')"
            )
        modules.append(found)
    return Head(_owning(modules), "head option")


def _by_families(model: nn.Module, names: Sequence[str] | None, trainable: set[int] | None) -> Head | None:
    """Rules 2 and 3, joined: each family's head of the model inside the wrappers, and what lies outside their
    backbones."""
    model = look_through(model)
    answers = head_answers(model)
    heads = [m for answer in answers for m in answer.modules]
    rules = [r for answer in answers for r in answer.rules]
    backbones = [b for answer in answers for b in answer.backbones]
    if backbones and not any(b is model for b in backbones):
        # A user's module around backbones: what lies outside them is head.
        backbone_module_ids = {id(m) for b in backbones for m in b.modules()}
        outside = [
            m
            for m in model.modules()
            if m is not model and id(m) not in backbone_module_ids and any(True for _ in m.parameters(recurse=False))
        ]
        if outside:
            heads += outside
            rules.append("outside the backbone")
    if not rules:
        return None
    return Head(_owning(heads), " + ".join(dict.fromkeys(rules)))


def _by_last_owner(model: nn.Module, names: Sequence[str] | None, trainable: set[int] | None) -> Head | None:
    """Rule 4: the last module owning a trainable parameter (the group around it, such as a PEFT tuner layer),
    with a warning naming it; only when the caller says what trains."""
    if trainable is None:
        return None
    last = _last_owner(model, {id(m) for m in grouped_modules(model)}, trainable)
    if last is None:
        return None
    # its parameters, shared ones included, are the head's: an output projection tied to the input embedding stays
    # out of the embedding's unit
    name, module = last
    warnings.warn(
        f"No rule names the head of {type(model).__name__} (no head option, timm get_classifier(), transformers "
        f"base_model or get_output_embeddings(), backbone inside it), so its last module owning trainable "
        f"parameters, {name or '<root>'!r}, is taken as the head and never frozen. Name the head with "
        "head=[...] to choose.",
        stacklevel=4,  # the caller of freezable_units (find_head, then freezable_units, in between)
    )
    return Head((module,), None)


def _last_owner(model: nn.Module, group_ids: set[int], trainable: set[int]) -> tuple[str, nn.Module] | None:
    """The last module in pre-order directly owning a trainable parameter, shared ones included (a group, such as
    a PEFT tuner layer, for the modules inside it), with its name; `None` when nothing trains."""
    last = None
    group: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if group is not None and not name.startswith(f"{group[0]}."):
            group = None
        if group is None and id(module) in group_ids:
            group = (name, module)
        if any(id(p) in trainable for p in module.parameters(recurse=False)):
            last = group or (name, module)
    return last


# The resolvers, in order: the first that names a head decides.
HEAD_RESOLVERS: tuple[Callable[[nn.Module, Sequence[str] | None, set[int] | None], Head | None], ...] = (
    _by_head_option,
    _by_families,
    _by_last_owner,
)


def find_head(
    model: nn.Module, names: Sequence[str] | None = None, *, trainable: Iterable[nn.Parameter] | None = None
) -> Head:
    """
    The head of `model` by the first rule that applies (see the module docstring).

    Args:
        model (`torch.nn.Module`): the model, bare or wrapped (DDP, `torch.compile`, PEFT).
        names (`Sequence[str]`, *optional*): the `head` option: module names, as in `model.named_modules()` of the
            unwrapped model or of the model PEFT wraps.
        trainable (`Iterable[torch.nn.Parameter]`, *optional*): the parameters that train; given, the last module
            owning one of them stands in for the head when no other rule names one, with a warning (rule 4).

    Returns:
        `Head`: its modules that own parameters and the rule that named them (`rule=None`: no rule applied).

    Raises:
        `ValueError`: a name that is no module of the model.

    Example:

    ```python
    >>> import timm
    >>> from hf_layer_freeze import find_head
    >>> find_head(timm.create_model("resnet10t", pretrained=False, num_classes=10)).rule
    'timm get_classifier()'

    ```
    """
    model = unwrap_model(model)
    trainable_ids = None if trainable is None else {id(p) for p in trainable}
    for resolve in HEAD_RESOLVERS:
        head = resolve(model, names, trainable_ids)
        if head is not None:
            return head
    return Head((), None)


def classifier_modules(model: nn.Module, names: Sequence[str] | None = None) -> list[nn.Module]:
    """
    The head modules of `model` that own parameters (see `find_head`); an empty list when no rule names a head.

    Example:

    ```python
    >>> import timm
    >>> from hf_layer_freeze.heads import classifier_modules
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    >>> classifier_modules(model) == [model.get_classifier()]
    True

    ```
    """
    return list(find_head(model, names).modules)
