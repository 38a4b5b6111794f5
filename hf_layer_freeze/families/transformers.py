"""transformers models: `base_model`, `get_output_embeddings()`, `_no_split_modules`, `GradientCheckpointingLayer`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

from .protocol import CacheCut, CheckpointedLayer, HeadAnswer, ModelFamily, NoCacheCut

__all__ = ["TransformersFamily"]

CUT_MODEL_TYPES = ("bert", "roberta", "vit", "llama")  # the model types whose activation-cache cut was verified
DECODER_MODEL_TYPES = ("llama",)  # of those, the ones taking `use_cache`


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


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _transformers_head(pretrained: PreTrainedModel) -> tuple[list[nn.Module], list[str]]:
    """The head of a transformers model, and the rules that named it (none: no head found)."""
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


def _checkpoint_layer_class() -> type | None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers without per-layer checkpointing
        return None
    return GradientCheckpointingLayer


class TransformersFamily(ModelFamily):
    """
    transformers: everything outside the outermost `PreTrainedModel`'s `base_model` is head (RoBERTa's two-layer
    `classifier`, DeiT's and LeViT's distillation heads, a causal LM's `lm_head`, tied or not, BART's `lm_head`); a
    model that is its own base model (`T5ForConditionalGeneration`, `EncoderDecoderModel`,
    `VisionEncoderDecoderModel`) names its output projection with `get_output_embeddings()`, and the transformers
    models inside it have their own heads by this rule. The blocks are the modules of the classes `_no_split_modules`
    lists; BERT, RoBERTa, ViT and Llama are cut for the activation cache at their `ModuleList` of those layers; a
    `GradientCheckpointingLayer` checkpoints through its own `_gradient_checkpointing_func`.
    """

    name = "transformers"
    cache_support = f"transformers {', '.join(CUT_MODEL_TYPES)} models (PEFT on them included)"
    block_support = "a transformers model whose _no_split_modules name its layers"

    def matches(self, model: nn.Module) -> bool:
        layer = _checkpoint_layer_class()
        return any(
            isinstance(m, PreTrainedModel)
            or isinstance(getattr(m, "_no_split_modules", None), (list, tuple, set))
            or (layer is not None and isinstance(m, layer))
            for m in model.modules()
        )

    def head(self, model: nn.Module) -> HeadAnswer | None:
        backbones = _outermost_pretrained(model)
        if not backbones:
            return None
        heads: list[nn.Module] = []
        rules: list[str] = []
        for pretrained in backbones:
            found, named_by = _transformers_head(pretrained)
            heads += found
            rules += named_by
        return HeadAnswer(tuple(heads), tuple(rules), tuple(backbones))

    def blocks(self, model: nn.Module) -> Sequence[nn.Module] | None:
        block_classes = {
            name
            for module in model.modules()
            if isinstance(getattr(module, "_no_split_modules", None), (list, tuple, set))
            for name in module._no_split_modules
        }
        # a "block" that is the whole base model splits nothing (TimmWrapperModel lists itself)
        whole = {id(model), id(getattr(model, "base_model", model))}
        blocks = [m for m in model.modules() if type(m).__name__ in block_classes and id(m) not in whole]
        return blocks or None

    def cache_layout(self, module: nn.Module) -> CacheCut | None:
        if not isinstance(module, PreTrainedModel):
            return None
        model_type = getattr(module.config, "model_type", None)
        if model_type == "timm_wrapper":
            return None  # TimmWrapperForImageClassification: the timm model inside decides
        if model_type not in CUT_MODEL_TYPES:
            raise NoCacheCut(module, f"model_type {model_type!r}")
        classes = set(module._no_split_modules or ())
        container = next(
            (
                m
                for m in module.modules()
                if isinstance(m, nn.ModuleList) and len(m) and all(type(b).__name__ in classes for b in m)
            ),
            None,
        )
        if container is None:
            raise NoCacheCut(module, "no ModuleList of the layers its _no_split_modules names")
        return CacheCut(container, tuple(container), use_cache_input=model_type in DECODER_MODEL_TYPES)

    def checkpointed_layer(self, model: nn.Module, module: nn.Module) -> CheckpointedLayer | None:
        layer_type = _checkpoint_layer_class()
        if layer_type is None:
            return None
        # The outermost transformers layer around the module: that is the checkpoint boundary.
        for candidate in model.modules():
            if isinstance(candidate, layer_type) and any(m is module for m in candidate.modules()):
                return CheckpointedLayer(candidate)
        return None
