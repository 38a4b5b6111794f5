"""The head: what the frozen features are still being fitted for, never frozen.

Head detection is a list of resolvers tried in order, each reading what the model says of itself (the timm way:
ask the model first, guess last, and say when guessing):

1. the `head` option: module names the user gives;
2. PEFT: a `PeftModel` is looked through to the model it wraps (`get_base_model()`), so the rules below apply to
   the model inside (the `modules_to_save` copy of a classifier sits where the classifier sat: it is head);
3. timm: the outermost module with a `get_classifier()` names its classifier;
4. transformers: everything outside the outermost `PreTrainedModel`'s `base_model` (RoBERTa's two-layer
   `classifier`, DeiT's and LeViT's distillation heads, a causal LM's `lm_head`, tied to the input embedding or not,
   BART's `lm_head`). A model that is its own base model (`T5ForConditionalGeneration`, `EncoderDecoderModel`,
   `VisionEncoderDecoderModel`) names its output projection with `get_output_embeddings()` (T5's `lm_head`), and
   the transformers models inside it have their own heads by this rule (an `EncoderDecoderModel`'s
   `BertLMHeadModel` decoder: its whole `cls` prediction head);
5. a user's module around a backbone (a `BertModel`, a headless timm model, a transformers model with its own
   head): what lies outside the backbone is head, joined with the backbone's own head by rules 3 and 4.

Rules 3 to 5 are joined: a `TimmWrapperForImageClassification` is a transformers model whose classifier only timm
names. When none applies, the caller keeps the last module owning trainable parameters as head and warns naming it
(`Head.rule` is `None`).

A parameter the head holds is the head's wherever else it sits: an input embedding tied to the output projection
(T5's `shared`, BART's `shared`, a BERT decoder's word embeddings) is in no unit and never freezes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

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


def peft_base_model(model: nn.Module) -> nn.Module:
    """The model a PEFT `PeftModel` wraps (PEFT's own `get_base_model()`), or `model` itself."""
    peft = sys.modules.get("peft")  # no PEFT imported: no PeftModel can exist
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _owning(modules: Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    """Distinct modules that own at least one parameter, in order."""
    kept = {id(m): m for m in modules if any(True for _ in m.parameters())}
    return tuple(kept.values())


def _head_from_names(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, ...]:
    """The modules named `names`, looked up in `model`, else in the model PEFT wraps."""
    inner = peft_base_model(model)
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
    return tuple(modules)


def _timm_head(model: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """The classifier named by the outermost timm `get_classifier()`, and that timm model (or `None`)."""
    for module in model.modules():
        get_classifier = getattr(module, "get_classifier", None)
        if not callable(get_classifier):
            continue
        try:
            head = get_classifier()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        found = [h for h in (head if isinstance(head, (tuple, list)) else (head,)) if isinstance(h, nn.Module)]
        return found, module
    return [], None


def _outermost_pretrained(model: nn.Module, below: bool = False) -> list[PreTrainedModel]:
    """The outermost transformers `PreTrainedModel`s in `model` (`model` itself if it is one, unless `below`)."""
    found: list[PreTrainedModel] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if (below and module is model) or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, PreTrainedModel):
            found.append(module)
            inside.append(f"{name}." if name else "")
    return found


def find_head(model: nn.Module, names: Sequence[str] | None = None) -> Head:
    """
    The head of `model` by the first rule that applies (see the module docstring).

    Args:
        model (`torch.nn.Module`): the model, bare or wrapped (DDP, `torch.compile`, PEFT).
        names (`Sequence[str]`, *optional*): the `head` option: module names, as in `model.named_modules()` of the
            unwrapped model or of the model PEFT wraps.

    Returns:
        `Head`: its modules that own parameters and the rule that named them (`rule=None`: no rule applied).

    Raises:
        `ValueError`: a name that is no module of the model.
    """
    model = unwrap_model(model)
    if names:
        return Head(_owning(_head_from_names(model, names)), "head option")
    model = peft_base_model(model)
    heads: list[nn.Module] = []
    rules: list[str] = []
    timm_heads, timm_model = _timm_head(model)
    # A head without parameters says "no head" only of the model itself (timm's num_classes=0); a headless
    # backbone inside a user's module says nothing of the user's own classifier.
    if any(True for h in timm_heads for _ in h.parameters()) or timm_model is model:
        heads += timm_heads
        rules.append("timm get_classifier()")
    backbones: list[nn.Module] = _outermost_pretrained(model)
    for pretrained in backbones:
        found, named_by = _transformers_head(pretrained)
        heads += found
        rules += named_by
    if timm_model is not None and not any(timm_model is b or _contains(b, timm_model) for b in backbones):
        backbones.append(timm_model)
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
        return Head((), None)
    return Head(_owning(heads), " + ".join(dict.fromkeys(rules)))


def _transformers_head(pretrained: PreTrainedModel) -> tuple[list[nn.Module], list[str]]:
    """The head of a transformers model by rule 4, and the rules that named it (none: no head found)."""
    base = getattr(pretrained, "base_model", None)
    if isinstance(base, nn.Module) and base is not pretrained:
        return [child for child in pretrained.children() if child is not base], ["transformers base_model"]
    # Its own base model: an encoder-decoder that holds its output projection (T5) or models holding theirs.
    heads: list[nn.Module] = []
    rules: list[str] = []
    try:
        output = pretrained.get_output_embeddings()
    except (AttributeError, NotImplementedError, TypeError):  # models without output embeddings may raise
        output = None
    if isinstance(output, nn.Module) and output is not pretrained and _contains(pretrained, output):
        heads.append(output)
        rules.append("transformers get_output_embeddings()")
    for inner in _outermost_pretrained(pretrained, below=True):
        found, named_by = _transformers_head(inner)
        heads += found
        rules += named_by
    return heads, rules


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


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
