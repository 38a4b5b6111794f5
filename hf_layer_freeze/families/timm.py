"""timm models: they declare their own structure (`get_classifier()`, `group_matcher()`, `grad_checkpointing`)."""

from __future__ import annotations

from torch import nn

from .protocol import CacheCut, CheckpointedLayer, HeadAnswer, ModelFamily, ParameterGroups

__all__ = ["TimmFamily"]

HEAD_RULE = "timm get_classifier()"
CUT_CLASSES = ("VisionTransformer", "ResNet")  # the classes whose activation-cache cut was verified


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


def _model_with_groups(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost (name, module) of `model` with a timm `group_matcher()`."""
    for name, module in model.named_modules():
        # on the class: a PeftModel forwards unknown attributes to the model it wraps
        if callable(getattr(type(module), "group_matcher", None)):
            return name, module
    return None


class TimmFamily(ModelFamily):
    """
    timm: the outermost module with a `get_classifier()` names its classifier (also inside
    `TimmWrapperForImageClassification`); its `group_matcher()` groups are the blocks; `VisionTransformer` (patch
    embedding, then `blocks`) and `ResNet` (stem, then `layer1`..`layer4`) are cut for the activation cache; blocks
    checkpointed by the model's own forward (`grad_checkpointing`, `checkpoint_seq`) need the model's input to
    require a gradient when timm checkpoints re-entrantly.
    """

    name = "timm"
    cache_support = f"timm {' and '.join(CUT_CLASSES)}"
    block_support = "a timm model with group_matcher()"

    def matches(self, model: nn.Module) -> bool:
        return any(
            callable(getattr(m, "get_classifier", None))
            or callable(getattr(type(m), "group_matcher", None))
            or hasattr(m, "grad_checkpointing")
            or type(m).__name__ in CUT_CLASSES
            for m in model.modules()
        )

    def head(self, model: nn.Module) -> HeadAnswer | None:
        heads, timm_model = _timm_head(model)
        if timm_model is None:
            return None
        # A head without parameters says "no head" only of the model itself (timm's num_classes=0); a headless
        # backbone inside a user's module says nothing of the user's own classifier.
        if any(True for h in heads for _ in h.parameters()) or timm_model is model:
            return HeadAnswer(tuple(heads), (HEAD_RULE,), (timm_model,))
        return HeadAnswer((), (), (timm_model,))

    def blocks(self, model: nn.Module) -> ParameterGroups | None:
        found = _model_with_groups(model)
        if found is None:
            return None
        from timm.models import group_parameters

        root, timm_model = found
        groups = group_parameters(timm_model, timm_model.group_matcher(coarse=False))
        return ParameterGroups(root, tuple(tuple(names) for _, names in sorted(groups.items())))

    def cache_layout(self, module: nn.Module) -> CacheCut | None:
        if type(module).__name__ == "VisionTransformer" and isinstance(getattr(module, "blocks", None), nn.Sequential):
            return CacheCut(module.blocks, tuple(module.blocks))
        if type(module).__name__ == "ResNet" and all(hasattr(module, f"layer{i}") for i in range(1, 5)):
            stages = tuple(getattr(module, f"layer{i}") for i in range(1, 5))
            return CacheCut(stages[0], stages)
        return None

    def checkpointed_layer(self, model: nn.Module, module: nn.Module) -> CheckpointedLayer | None:
        checkpointing = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
        if not checkpointing:
            return None

        def reentrant() -> bool:
            """Whether a timm model inside the model checkpoints its blocks, re-entrantly."""
            if not any(m.grad_checkpointing is True for m in checkpointing):
                return False
            try:
                from timm.layers import use_reentrant_ckpt
            except ImportError:  # a timm too old to say: it checkpointed re-entrantly
                return True
            return bool(use_reentrant_ckpt())

        return CheckpointedLayer(model, reentrant)
